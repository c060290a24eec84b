//! Parses a device name (`cpu`, `cuda`, `cuda:N`) into a candle device, with a clear error when
//! this build has no CUDA support, so front ends never handle raw device strings.

use candle_core::Device;

use crate::error::{ModelError, Result};

/// `cpu`, `cuda` (= `cuda:0`) or `cuda:N`.
pub fn parse_device(name: &str) -> Result<Device> {
    let name = name.trim().to_ascii_lowercase();
    let ordinal = match name.as_str() {
        "cpu" => return Ok(Device::Cpu),
        "cuda" | "gpu" => 0,
        other => match other.strip_prefix("cuda:") {
            Some(n) => n.parse::<usize>().map_err(|_| {
                ModelError::Input(format!("bad device `{name}`: expected cpu, cuda or cuda:N"))
            })?,
            None => {
                return Err(ModelError::Input(format!(
                    "unknown device `{name}`: expected cpu, cuda or cuda:N"
                )));
            }
        },
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(ModelError::Input(format!(
            "device `{name}` needs CUDA, but this qalign was built without it: \
             rebuild with `cargo build --release --features cuda`"
        )));
    }
    Ok(Device::new_cuda(ordinal)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert!(parse_device("CPU").unwrap().is_cpu());
        assert!(parse_device("tpu").is_err());
        assert!(parse_device("cuda:x").is_err());
        if !candle_core::utils::cuda_is_available() {
            let err = parse_device("cuda:0").unwrap_err().to_string();
            assert!(err.contains("--features cuda"), "{err}");
        }
    }
}
