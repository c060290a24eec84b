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

/// Parses a device name straight into the tensor-library device (for the low-level API).
pub fn parse_device(name: &str) -> Result<candle_core::Device> {
    name.parse::<Device>()?.to_candle()
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(parse_device("cpu").unwrap().is_cpu());
        if !candle_core::utils::cuda_is_available() {
            let err = parse_device("cuda:0").unwrap_err();
            assert!(matches!(err, ModelError::NoCuda { .. }), "{err}");
            assert!(!err.to_string().contains("cargo"), "{err}");
        }
    }
}
