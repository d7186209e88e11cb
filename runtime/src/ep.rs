//! Execution providers behind one small type: the user names an ordered list (`tensorrt,cuda,cpu`).
//!
//! A provider that fails to register is an error unless a later entry of the list is a fallback; then the
//! fallback is reported as a warning. There is no silent CPU fallback: `cuda` alone fails where CUDA
//! cannot run.

use std::fmt;
use std::str::FromStr;

use ort::ep::{self, ExecutionProvider as _};
use ort::session::builder::SessionBuilder;

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

    /// The provider library ONNX Runtime loads for this provider, for error messages.
    fn library(self) -> &'static str {
        match self {
            Provider::Cpu => "built into libonnxruntime",
            Provider::Cuda => "libonnxruntime_providers_cuda.so (from the onnxruntime-gpu wheel)",
            Provider::TensorRt => {
                "libonnxruntime_providers_tensorrt.so (from the onnxruntime-gpu wheel) and libnvinfer"
            }
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

    /// Registers the providers on a session builder in order. Returns the providers that registered and
    /// a warning for each one that failed but had a fallback after it.
    pub fn register(&self, builder: &mut SessionBuilder) -> Result<Registered> {
        let mut registered = Registered::default();
        for (i, provider) in self.0.iter().enumerate() {
            match register_one(*provider, builder) {
                Ok(()) => registered.active.push(*provider),
                Err(reason) => {
                    let err = Error::ExecutionProvider {
                        provider: provider.name().into(),
                        reason: format!("{reason} (needs {})", provider.library()),
                    };
                    match self.0.get(i + 1) {
                        Some(next) => registered
                            .warnings
                            .push(format!("{err}; falling back to {next}")),
                        None => return Err(err),
                    }
                }
            }
        }
        Ok(registered)
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

#[derive(Debug, Clone, Default)]
pub struct Registered {
    pub active: Vec<Provider>,
    pub warnings: Vec<String>,
}

fn register_one(
    provider: Provider,
    builder: &mut SessionBuilder,
) -> std::result::Result<(), String> {
    // A provider the loaded ONNX Runtime was built without cannot register; say so plainly instead of
    // passing on ONNX Runtime's lower-level message.
    let available = match provider {
        Provider::Cpu => Ok(true),
        Provider::Cuda => ep::CUDA::is_available(),
        Provider::TensorRt => ep::TensorRT::is_available(),
    }
    .map_err(|e| e.to_string())?;
    if !available {
        return Err(format!(
            "the loaded ONNX Runtime library was built without {}",
            provider.ort_name()
        ));
    }
    let result = match provider {
        Provider::Cpu => ep::CPU::default().register(builder),
        Provider::Cuda => ep::CUDA::default().register(builder),
        Provider::TensorRt => ep::TensorRT::default().register(builder),
    };
    result.map_err(|e| e.to_string())
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
