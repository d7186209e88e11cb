//! The execution providers a user can name, and the ordered list they name (`tensorrt,cuda,cpu`).
//! Registering them on a session is `ep`'s; options files (`ep_config`) read the list too, which is
//! why it lives apart from both.

use std::fmt;
use std::str::FromStr;

use ort::ep::{self, ExecutionProvider as _};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    Cpu,
    Cuda,
    TensorRt,
}

impl Provider {
    pub fn name(self) -> &'static str {
        match self {
            Provider::Cpu => "cpu",
            Provider::Cuda => "cuda",
            Provider::TensorRt => "tensorrt",
        }
    }

    /// The identifier ONNX Runtime uses for the provider.
    pub fn ort_name(self) -> &'static str {
        match self {
            Provider::Cpu => ep::CPU::NAME,
            Provider::Cuda => ep::CUDA::NAME,
            Provider::TensorRt => ep::TensorRT::NAME,
        }
    }

    /// Our provider for one of ONNX Runtime's identifiers.
    pub fn from_ort_name(name: &str) -> Option<Provider> {
        [Provider::Cpu, Provider::Cuda, Provider::TensorRt]
            .into_iter()
            .find(|p| p.ort_name() == name)
    }

    /// The provider library ONNX Runtime loads for this provider and what that library needs (for the
    /// onnxruntime-gpu 1.31 wheel; docs/EXECUTION_PROVIDERS.md has the version table).
    pub fn library(self) -> &'static str {
        match self {
            Provider::Cpu => "built into libonnxruntime",
            Provider::Cuda => {
                "libonnxruntime_providers_cuda.so from the onnxruntime-gpu wheel, which loads CUDA 13 \
                 (libcudart.so.13, libcublas.so.13, libcublasLt.so.13, libcufft.so.12, libcurand.so.10) \
                 and cuDNN 9 (libcudnn.so.9), and an NVIDIA driver that supports CUDA 13"
            }
            Provider::TensorRt => {
                "libonnxruntime_providers_tensorrt.so from the onnxruntime-gpu wheel, which loads \
                 TensorRT's libnvinfer.so of the major version the wheel was built with (ldd shows it) \
                 besides the CUDA provider's libraries"
            }
        }
    }

    pub(crate) fn library_file(self) -> Option<&'static str> {
        match self {
            Provider::Cpu => None,
            Provider::Cuda => Some("libonnxruntime_providers_cuda.so"),
            Provider::TensorRt => Some("libonnxruntime_providers_tensorrt.so"),
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Provider {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(Provider::Cpu),
            "cuda" => Ok(Provider::Cuda),
            "tensorrt" | "trt" => Ok(Provider::TensorRt),
            other => Err(Error::ExecutionProvider {
                provider: other.to_string(),
                reason: "unknown provider; expected cpu, cuda or tensorrt".into(),
            }),
        }
    }
}

/// An ordered, non-empty list of providers without repeats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderList(Vec<Provider>);

impl ProviderList {
    pub fn cpu() -> Self {
        ProviderList(vec![Provider::Cpu])
    }

    pub fn providers(&self) -> &[Provider] {
        &self.0
    }

    /// Whether a GPU provider is named (the decode loop then may keep its state on the device).
    pub fn uses_gpu(&self) -> bool {
        self.0.iter().any(|p| *p != Provider::Cpu)
    }

    /// The list without `provider`, or `None` when nothing would be left.
    pub fn without(&self, provider: Provider) -> Option<ProviderList> {
        let rest: Vec<Provider> = self.0.iter().copied().filter(|p| *p != provider).collect();
        (!rest.is_empty()).then_some(ProviderList(rest))
    }
}

impl FromStr for ProviderList {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let mut list = Vec::new();
        for part in s.split(',') {
            let provider: Provider = part.parse()?;
            if list.contains(&provider) {
                return Err(Error::ExecutionProvider {
                    provider: provider.name().into(),
                    reason: format!("named twice in {s:?}"),
                });
            }
            list.push(provider);
        }
        Ok(ProviderList(list))
    }
}

impl fmt::Display for ProviderList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.0.iter().map(|p| p.name()).collect();
        f.write_str(&names.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_in_order() {
        let list: ProviderList = "tensorrt, cuda,cpu".parse().unwrap();
        assert_eq!(
            list.providers(),
            &[Provider::TensorRt, Provider::Cuda, Provider::Cpu]
        );
        assert_eq!(list.to_string(), "tensorrt,cuda,cpu");
        assert!(list.uses_gpu());
        assert_eq!(
            list.without(Provider::TensorRt).map(|l| l.to_string()),
            Some("cuda,cpu".into())
        );
        assert_eq!(ProviderList::cpu().without(Provider::Cpu), None);
    }

    #[test]
    fn unknown_and_repeated_providers_are_refused() {
        let err = "cpu,rocm".parse::<ProviderList>().unwrap_err().to_string();
        assert!(
            err.contains("rocm") && err.contains("expected cpu, cuda or tensorrt"),
            "{err}"
        );
        let err = "cpu,cpu".parse::<ProviderList>().unwrap_err().to_string();
        assert!(err.contains("named twice"), "{err}");
        assert!("".parse::<ProviderList>().is_err());
    }
}
