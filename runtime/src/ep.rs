//! Execution providers behind one small type: the user names an ordered list (`tensorrt,cuda,cpu`).
//!
//! A provider that fails to register is an error naming the provider, the library it needs and why it
//! failed, unless a later entry of the list is a fallback; then the fallback is reported as a warning.
//! There is no silent CPU fallback: `cuda` alone fails where CUDA cannot run.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::ep::{self, ExecutionProvider as _};
use ort::session::builder::SessionBuilder;

use crate::ep_config::{ArenaStrategy, EpOptions, ShapeProfile};
use crate::error::{Error, Result};
// The provider list is its own module (ep_config reads it from options files); re-exported here,
// where registering it lives, for callers that name it `ep::ProviderList`.
pub use crate::provider::{Provider, ProviderList};

/// What registering one graph's providers needs beyond [`EpOptions`]: its TensorRT profile and the
/// directory its engines are cached in.
#[derive(Debug, Clone, Default)]
pub struct GraphProviderPlan {
    pub profile: Option<ShapeProfile>,
    pub engine_dir: Option<PathBuf>,
    pub timing_dir: Option<PathBuf>,
}

impl ProviderList {
    /// Registers the providers on a session builder in order. Returns the providers that registered and
    /// a warning for each one that failed but had a fallback after it.
    pub fn register(
        &self,
        builder: &mut SessionBuilder,
        options: &EpOptions,
        plan: &GraphProviderPlan,
    ) -> Result<Registered> {
        let mut registered = Registered::default();
        let providers = self.providers();
        for (i, provider) in providers.iter().enumerate() {
            match register_one(*provider, builder, options, plan) {
                Ok(()) => registered.active.push(*provider),
                Err(reason) => {
                    let mut reason = format!("{reason} (needs {})", provider.library());
                    let next = providers.get(i + 1);
                    // The last provider failing ends the list: say why the earlier ones fell back too.
                    if next.is_none() && !registered.warnings.is_empty() {
                        reason = format!("{reason}; earlier: {}", registered.warnings.join("; "));
                    }
                    let err = Error::ExecutionProvider {
                        provider: provider.name().into(),
                        reason,
                    };
                    match next {
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

/// Which providers registered on a session, what fell back, and where ONNX Runtime placed the nodes.
#[derive(Debug, Clone, Default)]
pub struct Registered {
    pub active: Vec<Provider>,
    pub warnings: Vec<String>,
    /// ONNX Runtime's node placement: (provider identifier, node count), from the session's verbose log.
    /// Empty when ONNX Runtime did not report it.
    pub placement: Vec<(String, usize)>,
}

impl Registered {
    /// `CUDAExecutionProvider 210 nodes, CPUExecutionProvider 12 nodes`, or the registered providers when
    /// the placement is unknown.
    pub fn placement_summary(&self) -> String {
        if self.placement.is_empty() {
            let names: Vec<&str> = self.active.iter().map(|p| p.name()).collect();
            return format!("{} (node placement not reported)", names.join(","));
        }
        self.placement
            .iter()
            .map(|(provider, nodes)| {
                let name =
                    Provider::from_ort_name(provider).map_or(provider.as_str(), |p| p.name());
                format!("{name} {nodes} nodes")
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Parses ONNX Runtime's verbose node-placement lines (`inference_session.cc`):
/// ` All nodes placed on [CPUExecutionProvider]. Number of nodes: 42` or
/// ` Node(s) placed on [CUDAExecutionProvider]. Number of nodes: 40`.
pub fn parse_placement(message: &str) -> Option<(String, usize)> {
    let rest = message.trim_start();
    let rest = rest
        .strip_prefix("All nodes placed on [")
        .or_else(|| rest.strip_prefix("Node(s) placed on ["))?;
    let (provider, rest) = rest.split_once(']')?;
    let count = rest.split("Number of nodes:").nth(1)?;
    let digits: String = count
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    Some((provider.to_string(), digits.parse().ok()?))
}

fn register_one(
    provider: Provider,
    builder: &mut SessionBuilder,
    options: &EpOptions,
    plan: &GraphProviderPlan,
) -> std::result::Result<(), String> {
    // A provider the loaded ONNX Runtime was built without cannot register; say so plainly, with where
    // the provider library was looked for, instead of passing on ONNX Runtime's lower-level message.
    let available = match provider {
        Provider::Cpu => Ok(true),
        Provider::Cuda => ep::CUDA::is_available(),
        Provider::TensorRt => ep::TensorRT::is_available(),
    }
    .map_err(|e| e.to_string())?;
    if !available {
        return Err(not_built_with(provider));
    }
    if provider != Provider::Cpu {
        preload_gpu_libraries();
    }
    let result = match provider {
        Provider::Cpu => ep::CPU::default()
            .with_arena_allocator(options.cpu.arena)
            .register(builder),
        Provider::Cuda => cuda(options).register(builder),
        Provider::TensorRt => {
            for dir in [&plan.engine_dir, &plan.timing_dir].into_iter().flatten() {
                std::fs::create_dir_all(dir).map_err(|e| {
                    format!(
                        "cannot create the engine cache directory {}: {e}",
                        dir.display()
                    )
                })?;
            }
            tensorrt(options, plan).register(builder)
        }
    };
    result.map_err(|e| e.to_string())
}

fn not_built_with(provider: Provider) -> String {
    let lib = crate::ort_env::find_library().ok();
    let file = provider.library_file().unwrap_or("");
    let looked = lib
        .as_deref()
        .and_then(Path::parent)
        .map(|dir| dir.join(file));
    let found = looked.as_ref().is_some_and(|p| p.is_file());
    format!(
        "the loaded ONNX Runtime ({}) does not offer {} (available: {}); {} {}. Install the \
         onnxruntime-gpu wheel (LLAMA3V_GPU=1 ./scripts/setup.sh) or point ORT_DYLIB_PATH at its \
         libonnxruntime",
        lib.as_deref()
            .map_or("?".into(), |p| p.display().to_string()),
        provider.ort_name(),
        available_providers().join(", "),
        looked.map_or(file.to_string(), |p| p.display().to_string()),
        if found {
            "exists but was not accepted"
        } else {
            "was not found"
        },
    )
}

/// The providers the loaded ONNX Runtime library was built with.
pub fn available_providers() -> Vec<&'static str> {
    let mut names = vec![ep::CPU::NAME];
    if ep::CUDA::is_available().unwrap_or(false) {
        names.push(ep::CUDA::NAME);
    }
    if ep::TensorRT::is_available().unwrap_or(false) {
        names.push(ep::TensorRT::NAME);
    }
    names
}

fn cuda(options: &EpOptions) -> ep::CUDA {
    let o = &options.cuda;
    let mut cuda = ep::CUDA::default()
        .with_device_id(options.device_id as i32)
        .with_arena_extend_strategy(match o.arena_extend_strategy {
            ArenaStrategy::NextPowerOfTwo => ep::ArenaExtendStrategy::NextPowerOfTwo,
            ArenaStrategy::SameAsRequested => ep::ArenaExtendStrategy::SameAsRequested,
        })
        .with_tf32(o.tf32);
    if let Some(limit) = o.memory_limit {
        cuda = cuda.with_memory_limit(limit as usize);
    }
    cuda
}

fn tensorrt(options: &EpOptions, plan: &GraphProviderPlan) -> ep::TensorRT {
    let o = &options.tensorrt;
    let mut trt = ep::TensorRT::default()
        .with_device_id(options.device_id as i32)
        .with_fp16(o.fp16)
        .with_bf16(o.bf16)
        .with_builder_optimization_level(o.builder_optimization_level);
    if let Some(size) = o.max_workspace_size {
        trt = trt.with_max_workspace_size(size as usize);
    }
    if let Some(dir) = plan.engine_dir.as_ref().filter(|_| o.engine_cache) {
        trt = trt
            .with_engine_cache(true)
            .with_engine_cache_path(dir.display());
    }
    if let Some(dir) = plan.timing_dir.as_ref().filter(|_| o.timing_cache) {
        trt = trt
            .with_timing_cache(true)
            .with_timing_cache_path(dir.display());
    }
    if let Some(p) = &plan.profile {
        trt = trt
            .with_profile_min_shapes(&p.min)
            .with_profile_opt_shapes(&p.opt)
            .with_profile_max_shapes(&p.max);
    }
    trt
}

/// The CUDA, cuDNN and TensorRT libraries of the NVIDIA wheels (`nvidia-*`, `nvidia-cudnn-cu13`,
/// `tensorrt-cu13-libs`) installed next to onnxruntime-gpu, loaded once so the provider libraries find
/// them by soname without `LD_LIBRARY_PATH`. A library that is absent is skipped: the system may
/// provide it, and if nothing does, registering the provider fails with the missing name.
fn preload_gpu_libraries() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let Some(site) = crate::ort_env::find_library()
            .ok()
            .and_then(|lib| lib.parent()?.parent()?.parent().map(Path::to_path_buf))
        else {
            return;
        };
        let mut libs = Vec::new();
        for root in ["nvidia", "tensorrt_libs"] {
            shared_libraries(&site.join(root), 3, &mut libs);
        }
        // Dependencies before their dependants; libcudnn.so.9 before the sub-libraries it loads.
        const ORDER: &[&str] = &[
            "libcudart.so",
            "libnvJitLink.so",
            "libnvrtc.so",
            "libcublasLt.so",
            "libcublas.so",
            "libcurand.so",
            "libcufft.so",
            "libcudnn.so",
            "libcudnn_",
            "libnvinfer.so",
            "libnvinfer_plugin.so",
            "libnvonnxparser.so",
        ];
        for prefix in ORDER {
            for lib in &libs {
                let name = lib.file_name().and_then(|n| n.to_str()).unwrap_or("");
                if name.starts_with(prefix) {
                    let _ = ort::util::preload_dylib(lib.as_os_str());
                }
            }
        }
    });
}

/// `*.so.*` files under `dir`, `depth` levels deep, sorted so runs load in the same order.
fn shared_libraries(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    paths.sort();
    for path in paths {
        if path.is_dir() {
            if depth > 0 {
                shared_libraries(&path, depth - 1, out);
            }
        } else if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.contains(".so."))
        {
            out.push(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_lines_parse() {
        assert_eq!(
            parse_placement(" All nodes placed on [CPUExecutionProvider]. Number of nodes: 42"),
            Some(("CPUExecutionProvider".into(), 42))
        );
        assert_eq!(
            parse_placement(" Node(s) placed on [CUDAExecutionProvider]. Number of nodes: 7"),
            Some(("CUDAExecutionProvider".into(), 7))
        );
        assert_eq!(parse_placement("Node placements"), None);
        let r = Registered {
            active: vec![Provider::Cuda, Provider::Cpu],
            warnings: vec![],
            placement: vec![
                ("CUDAExecutionProvider".into(), 40),
                ("CPUExecutionProvider".into(), 2),
            ],
        };
        assert_eq!(r.placement_summary(), "cuda 40 nodes, cpu 2 nodes");
    }
}
