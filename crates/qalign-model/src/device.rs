//! Where and in what precision the model runs, as plain qalign types: front ends (the CLI, a
//! server, Python) parse and pass these without touching the tensor library, and get a typed
//! error when this build cannot run on the device they name.

use std::fmt;
use std::str::FromStr;

use crate::error::{ModelError, Result};

/// The device the model runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Device {
    #[default]
    Cpu,
    /// A CUDA GPU by ordinal (`cuda` = `cuda:0`).
    Cuda(usize),
}

impl Device {
    /// The tensor-library device, or [`ModelError::NoCuda`] when this build has no CUDA.
    pub fn to_candle(self) -> Result<candle_core::Device> {
        match self {
            Device::Cpu => Ok(candle_core::Device::Cpu),
            Device::Cuda(ordinal) => {
                if !candle_core::utils::cuda_is_available() {
                    return Err(ModelError::NoCuda { device: self });
                }
                Ok(candle_core::Device::new_cuda(ordinal)?)
            }
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl FromStr for Device {
    type Err = ModelError;

    /// `cpu`, `cuda` (or `gpu`, = `cuda:0`) or `cuda:N`, any case.
    fn from_str(s: &str) -> Result<Self> {
        let name = s.trim().to_ascii_lowercase();
        let unknown = || ModelError::UnknownDevice {
            name: s.to_string(),
        };
        match name.as_str() {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda(0)),
            other => {
                let n = other.strip_prefix("cuda:").ok_or_else(unknown)?;
                n.parse().map(Device::Cuda).map_err(|_| unknown())
            }
        }
    }
}

/// The compute precision. `F32` reproduces the reference; `F16`/`Bf16` halve memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Dtype {
    #[default]
    F32,
    F16,
    Bf16,
}

impl Dtype {
    pub fn to_candle(self) -> candle_core::DType {
        match self {
            Dtype::F32 => candle_core::DType::F32,
            Dtype::F16 => candle_core::DType::F16,
            Dtype::Bf16 => candle_core::DType::BF16,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Dtype {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(Dtype::F32),
            "f16" | "float16" | "half" => Ok(Dtype::F16),
            "bf16" | "bfloat16" => Ok(Dtype::Bf16),
            _ => Err(ModelError::UnknownDtype {
                name: s.to_string(),
            }),
        }
    }
}

/// How the weights of the linear layers are stored for inference: quantised as they load, in
/// the ggml block formats of candle's quantised matmul. Activations, norms and embeddings stay f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Quant {
    /// 8-bit, blocks of 32 weights with one f16 scale (8.5 bits per weight).
    Q8_0,
    /// 4-bit k-quant, super-blocks of 256 weights (4.5 bits per weight).
    Q4K,
}

impl Quant {
    pub fn as_str(self) -> &'static str {
        match self {
            Quant::Q8_0 => "q8_0",
            Quant::Q4K => "q4k",
        }
    }

    /// The weights per block: a layer's input dimension must be a multiple of it.
    pub fn block_size(self) -> usize {
        self.ggml().block_size()
    }

    pub(crate) fn ggml(self) -> candle_core::quantized::GgmlDType {
        match self {
            Quant::Q8_0 => candle_core::quantized::GgmlDType::Q8_0,
            Quant::Q4K => candle_core::quantized::GgmlDType::Q4K,
        }
    }

    /// The format of ggml blocks of `dtype`, when it is one of ours.
    pub(crate) fn from_ggml(dtype: candle_core::quantized::GgmlDType) -> Option<Quant> {
        [Quant::Q8_0, Quant::Q4K]
            .into_iter()
            .find(|q| q.ggml() == dtype)
    }

    /// The format a linear layer with input dimension `in_dim` gets when `self` is asked for:
    /// `self` when `in_dim` is a multiple of its block, else Q8_0 when it fits 32, else none (f32).
    pub fn for_in_dim(self, in_dim: usize) -> Option<Quant> {
        [self, Quant::Q8_0]
            .into_iter()
            .find(|q| in_dim > 0 && in_dim.is_multiple_of(q.block_size()))
    }
}

impl fmt::Display for Quant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Quant {
    type Err = ModelError;

    /// `q8_0` (or `q8`) and `q4k` (or `q4_k`), any case.
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "q8_0" | "q8" => Ok(Quant::Q8_0),
            "q4k" | "q4_k" => Ok(Quant::Q4K),
            _ => Err(ModelError::UnknownQuant {
                name: s.to_string(),
            }),
        }
    }
}

/// Parses a device name straight into the tensor-library device (for the low-level API).
pub fn parse_device(name: &str) -> Result<candle_core::Device> {
    name.parse::<Device>()?.to_candle()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The fallback rule: the asked format when the block divides `in_dim`, else Q8_0 when
        /// 32 does, else f32; never a format whose block does not divide `in_dim`.
        #[test]
        fn fallback_rule(in_dim in 0usize..5000, q4k in any::<bool>()) {
            let asked = if q4k { Quant::Q4K } else { Quant::Q8_0 };
            let got = asked.for_in_dim(in_dim);
            match got {
                Some(q) => {
                    prop_assert!(in_dim > 0 && in_dim % q.block_size() == 0);
                    prop_assert!(q == asked || (q == Quant::Q8_0 && in_dim % asked.block_size() != 0));
                }
                None => prop_assert!(in_dim % 32 != 0 || in_dim == 0),
            }
            prop_assert_eq!(got == Some(asked), in_dim > 0 && in_dim % asked.block_size() == 0);
        }
    }

    #[test]
    fn names() {
        assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
        assert_eq!("CPU".parse::<Device>().unwrap(), Device::Cpu);
        assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
        assert_eq!("cuda:3".parse::<Device>().unwrap(), Device::Cuda(3));
        assert_eq!(Device::Cuda(3).to_string(), "cuda:3");
        for bad in ["tpu", "cuda:x", "cuda:", ""] {
            let err = bad.parse::<Device>().unwrap_err();
            assert!(
                matches!(err, ModelError::UnknownDevice { .. }),
                "{bad}: {err}"
            );
        }
        assert_eq!("BF16".parse::<Dtype>().unwrap(), Dtype::Bf16);
        assert!("f8".parse::<Dtype>().is_err());
        assert_eq!("Q8_0".parse::<Quant>().unwrap(), Quant::Q8_0);
        assert_eq!("q4k".parse::<Quant>().unwrap(), Quant::Q4K);
        for bad in ["q3", "q4_0", "f32", ""] {
            let err = bad.parse::<Quant>().unwrap_err();
            assert!(matches!(err, ModelError::UnknownQuant { .. }), "{bad}");
            assert!(err.to_string().contains("q8_0 or q4k"), "{err}");
        }
        assert!(parse_device("cpu").unwrap().is_cpu());
        if !candle_core::utils::cuda_is_available() {
            let err = parse_device("cuda:0").unwrap_err();
            assert!(matches!(err, ModelError::NoCuda { .. }), "{err}");
            assert!(!err.to_string().contains("cargo"), "{err}");
        }
    }
}
