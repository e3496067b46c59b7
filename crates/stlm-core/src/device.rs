//! Device and dtype choice from command-line strings, and seeding.

use crate::{CoreError, OptionError, Result};
use tch::{Device, Kind};

/// Parses `auto`, `cpu`, `cuda` or `cuda:N`; `auto` picks CUDA device 0 when available.
pub fn parse_device(s: &str) -> Result<Device> {
    let cuda = |n: usize| {
        if tch::Cuda::is_available() && n < tch::Cuda::device_count() as usize {
            Ok(Device::Cuda(n))
        } else {
            Err(CoreError::from(OptionError::new(
                "device",
                s,
                format!(
                    "CUDA device {n} is not available (this machine has {} CUDA devices)",
                    tch::Cuda::device_count()
                ),
            )))
        }
    };
    match s {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda(0),
        _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => cuda(n),
            _ => Err(OptionError::new("device", s, "expected auto, cpu, cuda or cuda:N").into()),
        },
    }
}

/// Floating-point type of model weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DType {
    /// 32-bit float: the default, and the only choice on CPU.
    #[default]
    Float32,
    /// bfloat16, for CUDA.
    BFloat16,
    /// float16, for CUDA.
    Float16,
}

impl DType {
    /// Parses `float32|f32`, `bfloat16|bf16`, `float16|f16`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "float32" | "f32" => Ok(DType::Float32),
            "bfloat16" | "bf16" => Ok(DType::BFloat16),
            "float16" | "f16" => Ok(DType::Float16),
            _ => Err(OptionError::new("dtype", s, "expected float32, bfloat16 or float16").into()),
        }
    }

    /// The dtype to use on `device`: half precision is refused on CPU.
    pub fn for_device(self, device: Device) -> Result<Self> {
        if self != DType::Float32 && device == Device::Cpu {
            return Err(OptionError::new(
                "dtype",
                format!("{self:?}"),
                "half precision is for CUDA; use float32 on CPU",
            )
            .into());
        }
        Ok(self)
    }

    /// The libtorch kind.
    pub fn kind(self) -> Kind {
        match self {
            DType::Float32 => Kind::Float,
            DType::BFloat16 => Kind::BFloat16,
            DType::Float16 => Kind::Half,
        }
    }
}

/// Seeds libtorch's generators (CPU and CUDA).
pub fn seed_all(seed: u64) {
    tch::manual_seed(seed as i64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        assert!(matches!(parse_device("tpu"), Err(CoreError::Option(OptionError { name: "device", .. }))));
        assert!(parse_device("tpu").unwrap_err().to_string().contains("tpu"));
        assert!(parse_device("cuda:x").is_err());
        if !tch::Cuda::is_available() {
            assert!(parse_device("cuda:0").unwrap_err().to_string().contains("not available"));
            assert_eq!(parse_device("auto").unwrap(), Device::Cpu);
        }
    }

    #[test]
    fn half_precision_refused_on_cpu() {
        assert!(matches!(
            DType::BFloat16.for_device(Device::Cpu),
            Err(CoreError::Option(OptionError { name: "dtype", .. }))
        ));
        assert_eq!(DType::parse("bf16").unwrap(), DType::BFloat16);
        assert!(DType::parse("f8").is_err());
    }
}
