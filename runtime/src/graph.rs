//! One ONNX Runtime session per exported graph, checked against the manifest, and the float tensors
//! that cross its boundary (float32 or float16, as the export's dtype says).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use half::f16;
use ort::logging::LogLevel;
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::session::{IoBinding, RunOptions, Session, SessionInputs, SessionOutputs};
use ort::value::{DynValue, Tensor, TensorElementType};

use crate::ep::{parse_placement, GraphProviderPlan, Registered};
use crate::ep_config::{tensorrt_profile, EpOptions, ResolvedLimits};
use crate::error::{Error, Result};
use crate::manifest::{resolve_inside, GraphSpec, ModelDims, TensorDtype};
use crate::provider::{Provider, ProviderList};

/// Session options shared by the three graphs.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    pub providers: ProviderList,
    /// Intra-op threads; `None` lets ONNX Runtime use every core.
    pub threads: Option<usize>,
    /// Provider options: device, CUDA arena, TensorRT precision, caches and request limits.
    pub ep: EpOptions,
    /// The request limits checked against the model ([`SessionOptions::for_model`]); TensorRT's
    /// optimization profiles are derived from them. `None`: no explicit profiles.
    pub limits: Option<ResolvedLimits>,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            providers: ProviderList::cpu(),
            threads: None,
            ep: EpOptions::default(),
            limits: None,
        }
    }
}

impl SessionOptions {
    /// These options with the request limits resolved against the model's dims (refused when they ask
    /// for more context than the model has).
    pub fn for_model(&self, dims: &ModelDims) -> Result<SessionOptions> {
        let mut options = self.clone();
        options.limits = Some(self.ep.limits.resolve(dims.max_context)?);
        Ok(options)
    }

    /// What registering `graph`'s providers needs: its TensorRT profile and cache directories. Engines
    /// go to a directory named by the graph file's sha256: ONNX Runtime names cached engines by the model
    /// path and graph structure, not the weights, so a re-exported graph at the same path would otherwise
    /// load a stale engine.
    fn plan(&self, graph: &str, spec: &GraphSpec) -> Result<GraphProviderPlan> {
        if !self.providers.providers().contains(&Provider::TensorRt) {
            return Ok(GraphProviderPlan::default());
        }
        let profile = match &self.limits {
            Some(limits) => tensorrt_profile(graph, spec, limits)?,
            None => None,
        };
        let cache = self.ep.cache_dir();
        let digest: String = spec.sha256.chars().take(16).collect();
        let engine_dir: Option<PathBuf> = cache.as_ref().map(|dir| {
            dir.join(format!(
                "{graph}-{}",
                if digest.is_empty() {
                    "unhashed"
                } else {
                    &digest
                }
            ))
        });
        Ok(GraphProviderPlan {
            profile,
            engine_dir,
            timing_dir: cache,
        })
    }
}

/// Where a graph's inputs and outputs can live between runs: the device of the first provider that runs
/// it. A decode loop that keeps its state on the device binds it with [`Device::memory_info`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda { device_id: i32 },
}

impl Device {
    /// The device a provider list puts a graph on, once `active` providers registered.
    pub fn of(active: &[Provider], device_id: u32) -> Device {
        match active.first() {
            Some(Provider::Cuda | Provider::TensorRt) => Device::Cuda {
                device_id: device_id as i32,
            },
            Some(Provider::Cpu) | None => Device::Cpu,
        }
    }

    /// ONNX Runtime's description of this device's default memory, for IoBinding and allocators.
    pub fn memory_info(self) -> Result<ort::memory::MemoryInfo<'static>> {
        use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
        let (device, id) = match self {
            Device::Cpu => (AllocationDevice::CPU, 0),
            Device::Cuda { device_id } => (AllocationDevice::CUDA, device_id),
        };
        Ok(MemoryInfo::new(
            device,
            id,
            AllocatorType::Device,
            MemoryType::Default,
        )?)
    }
}

/// A graph's session. ONNX Runtime's `Run` needs exclusive access through `ort`, so the session sits
/// behind a mutex: a model is shared by reference between requests, which interleave run by run.
pub struct Graph {
    pub name: &'static str,
    pub spec: GraphSpec,
    session: Mutex<Session>,
    /// Run options that hand the arena's free memory back after a run (see [`Release`]); `None` when
    /// the device has no arena (`cpu.arena=false`).
    release_arena: Option<RunOptions>,
    pub providers: Registered,
    pub device: Device,
}

impl Graph {
    /// Creates the session on the first providers of the list that work. A provider can register and
    /// still fail when the session is created (no device, a CUDA library of the wrong version); then the
    /// next provider of the list takes over with a warning, as when registering fails.
    pub fn open(
        dir: &Path,
        name: &'static str,
        spec: &GraphSpec,
        options: &SessionOptions,
    ) -> Result<Graph> {
        let path = resolve_inside(dir, &spec.file)?;
        let plan = options.plan(name, spec)?;
        let mut providers = options.providers.clone();
        let mut warnings = Vec::new();
        loop {
            let placement = Arc::new(Mutex::new(Vec::new()));
            let mut builder = session_builder(options, name, &placement)?;
            let mut registered = providers.register(&mut builder, &options.ep, &plan)?;
            match builder.commit_from_file(&path) {
                Ok(session) => {
                    check_io(name, spec, &session)?;
                    warnings.append(&mut registered.warnings);
                    registered.warnings = warnings;
                    registered.placement =
                        std::mem::take(&mut *placement.lock().unwrap_or_else(|p| p.into_inner()));
                    let device = Device::of(&registered.active, options.ep.device_id);
                    return Ok(Graph {
                        name,
                        spec: spec.clone(),
                        session: Mutex::new(session),
                        release_arena: arena_shrinkage(device, options.ep.cpu.arena)?,
                        device,
                        providers: registered,
                    });
                }
                Err(e) => {
                    let first_gpu = registered
                        .active
                        .iter()
                        .copied()
                        .find(|p| *p != Provider::Cpu);
                    let rest = first_gpu.and_then(|p| providers.without(p).map(|rest| (p, rest)));
                    let Some((failed, rest)) = rest else {
                        return Err(Error::Session {
                            graph: name.into(),
                            providers: registered
                                .active
                                .iter()
                                .map(|p| p.name())
                                .collect::<Vec<_>>()
                                .join(","),
                            path: path.clone(),
                            source: e,
                        });
                    };
                    warnings.append(&mut registered.warnings);
                    warnings.push(format!(
                        "execution provider {failed}: creating the session failed: {e} (needs {}); \
                         falling back to {rest}",
                        failed.library()
                    ));
                    providers = rest;
                }
            }
        }
    }

    /// Runs the session and hands its outputs to `read`, which takes what it needs out of them.
    pub fn run<'i, 'v: 'i, const N: usize, R>(
        &self,
        inputs: impl Into<SessionInputs<'i, 'v, N>>,
        release: Release,
        read: impl FnOnce(&mut SessionOutputs<'_>) -> Result<R>,
    ) -> Result<R> {
        // A poisoned lock only means another request panicked mid-run; the session itself is intact.
        let mut session = self
            .session
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut outputs = match (release, &self.release_arena) {
            (Release::FreeMemory, Some(shrink)) => session.run_with_options(inputs, shrink)?,
            _ => session.run(inputs)?,
        };
        if release == Release::FreeMemory {
            crate::heap::release_free_heap();
        }
        read(&mut outputs)
    }

    /// A binding of this graph's inputs and outputs, for [`Graph::run_binding`].
    pub fn create_binding(&self) -> Result<IoBinding> {
        let session = self
            .session
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        Ok(session.create_binding()?)
    }

    /// An allocator of this graph's device memory, for tensors a binding keeps between runs: ONNX
    /// Runtime's CPU allocator, or the session's allocator for its CUDA memory.
    pub fn allocator(&self) -> Result<ort::memory::Allocator> {
        if self.device == Device::Cpu {
            return Ok(ort::memory::Allocator::default());
        }
        let session = self
            .session
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        Ok(ort::memory::Allocator::new(
            &session,
            self.device.memory_info()?,
        )?)
    }

    /// Runs the session on what `binding` binds and hands the outputs to `read`. Copies of inputs to
    /// the device, which ONNX Runtime queues when they are bound, are waited for before the run; copies
    /// of outputs to host memory are complete before `read` sees them.
    pub fn run_binding<R>(
        &self,
        binding: &IoBinding,
        release: Release,
        read: impl FnOnce(&mut SessionOutputs<'_>) -> Result<R>,
    ) -> Result<R> {
        binding.synchronize_inputs()?;
        let mut session = self
            .session
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut outputs = match (release, &self.release_arena) {
            (Release::FreeMemory, Some(shrink)) => {
                session.run_binding_with_options(binding, shrink)?
            }
            _ => session.run_binding(binding)?,
        };
        if release == Release::FreeMemory {
            crate::heap::release_free_heap();
        }
        binding.synchronize_outputs()?;
        read(&mut outputs)
    }

    /// Takes an output out of a run's outputs by its manifest name.
    pub fn take_output(
        &self,
        outputs: &mut SessionOutputs<'_>,
        index: usize,
    ) -> Result<ort::value::DynValue> {
        let name = &self.spec.outputs[index].name;
        outputs
            .remove(name.as_str())
            .ok_or_else(|| self.error(format!("output {name:?} is missing")))
    }

    pub fn error(&self, reason: String) -> Error {
        graph_error(self.name, reason)
    }

    pub fn input_name(&self, index: usize) -> &str {
        &self.spec.inputs[index].name
    }

    /// A human-readable line: which providers run this graph.
    pub fn provider_summary(&self) -> String {
        let names: Vec<&str> = self.providers.active.iter().map(|p| p.name()).collect();
        if self.providers.placement.is_empty() {
            return format!("{}: {}", self.name, names.join(","));
        }
        format!(
            "{}: {} ({})",
            self.name,
            names.join(","),
            self.providers.placement_summary()
        )
    }
}

/// What a run leaves in ONNX Runtime's memory arena once it is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// Freed activation blocks stay in the arena for the next run (decode steps: same sizes every
    /// step, no page faults).
    Keep,
    /// Free memory goes back to the system after the run: the arena's wholly free regions, and the
    /// heap's free pages (`heap`). For prefill and vision runs, whose activations are many times a
    /// decode step's: a long-lived server would otherwise keep the largest prompt's working set.
    FreeMemory,
}

/// Run options asking ONNX Runtime to shrink the device's arena after a run; `None` for a CPU graph
/// without an arena (ONNX Runtime refuses to shrink one that does not exist).
fn arena_shrinkage(device: Device, cpu_arena: bool) -> Result<Option<RunOptions>> {
    if device == Device::Cpu && !cpu_arena {
        return Ok(None);
    }
    let mut options = RunOptions::new()?;
    let arena = match device {
        Device::Cpu => "cpu:0".to_string(),
        Device::Cuda { device_id } => format!("gpu:{device_id}"),
    };
    options.set("memory.enable_memory_arena_shrinkage", arena)?;
    Ok(Some(options))
}

/// A session builder whose verbose log is read for ONNX Runtime's node placement (the C API has no
/// other way to ask which provider got which node); errors still reach stderr as ONNX Runtime's own
/// logger would print them.
fn session_builder(
    options: &SessionOptions,
    name: &'static str,
    placement: &Arc<Mutex<Vec<(String, usize)>>>,
) -> Result<SessionBuilder> {
    let env = crate::ort_env::environment()?;
    let sink = Arc::clone(placement);
    let logger: ort::logging::LoggerFunction = Arc::new(
        move |level: LogLevel, _category: &str, _id: &str, _location: &str, message: &str| {
            if let Some(entry) = parse_placement(message) {
                sink.lock().unwrap_or_else(|p| p.into_inner()).push(entry);
            } else if level >= LogLevel::Error {
                eprintln!("onnxruntime ({name}): {message}");
            }
        },
    );
    let mut builder = Session::builder(env)?
        .with_optimization_level(GraphOptimizationLevel::Level3)
        .map_err(ort::Error::from)?
        .with_logger(logger)
        .map_err(ort::Error::from)?
        .with_log_level(LogLevel::Verbose)
        .map_err(ort::Error::from)?
        .with_prepacking(options.ep.cpu.prepack_weights)
        .map_err(ort::Error::from)?;
    if let Some(threads) = options.threads {
        builder = builder
            .with_intra_threads(threads)
            .map_err(ort::Error::from)?;
    }
    Ok(builder)
}

fn graph_error(name: &str, reason: String) -> Error {
    Error::Graph {
        graph: name.into(),
        reason,
    }
}

/// The session's inputs and outputs must be exactly the manifest's, names and dtypes.
fn check_io(name: &str, spec: &GraphSpec, session: &Session) -> Result<()> {
    let sides = [
        ("input", &spec.inputs, session.inputs()),
        ("output", &spec.outputs, session.outputs()),
    ];
    for (side, expected, found) in sides {
        if expected.len() != found.len() {
            return Err(graph_error(
                name,
                format!(
                    "the graph has {} {side}s, the manifest lists {}",
                    found.len(),
                    expected.len()
                ),
            ));
        }
        for spec in expected {
            let outlet = found
                .iter()
                .find(|o| o.name() == spec.name)
                .ok_or_else(|| {
                    graph_error(
                        name,
                        format!("the graph has no {side} named {:?}", spec.name),
                    )
                })?;
            let ty = outlet.dtype().tensor_type();
            if ty != Some(ort_type(spec.dtype)) {
                return Err(graph_error(
                    name,
                    format!(
                        "{side} {:?} is {ty:?} in the graph, {} in the manifest",
                        spec.name, spec.dtype
                    ),
                ));
            }
            let rank = outlet.dtype().tensor_shape().map(|s| s.len());
            if rank != Some(spec.shape.len()) {
                return Err(graph_error(
                    name,
                    format!(
                        "{side} {:?} has rank {rank:?} in the graph, {} in the manifest",
                        spec.name,
                        spec.shape.len()
                    ),
                ));
            }
        }
    }
    Ok(())
}

pub(crate) fn ort_type(dtype: TensorDtype) -> TensorElementType {
    match dtype {
        TensorDtype::Float32 => TensorElementType::Float32,
        TensorDtype::Float16 => TensorElementType::Float16,
        TensorDtype::Int64 => TensorElementType::Int64,
    }
}

/// Builds a float tensor of the graph's float type from f32 data.
pub fn float_tensor(dtype: TensorDtype, shape: Vec<i64>, data: &[f32]) -> Result<DynValue> {
    Ok(match dtype {
        TensorDtype::Float32 => Tensor::from_array((shape, data.to_vec()))?.into_dyn(),
        TensorDtype::Float16 => {
            let halves: Vec<f16> = data.iter().map(|v| f16::from_f32(*v)).collect();
            Tensor::from_array((shape, halves))?.into_dyn()
        }
        TensorDtype::Int64 => {
            return Err(Error::Internal("float_tensor called with int64".into()));
        }
    })
}

pub fn int64_tensor(shape: Vec<i64>, data: Vec<i64>) -> Result<DynValue> {
    Ok(Tensor::from_array((shape, data))?.into_dyn())
}

/// Copies a float32 or float16 tensor into `out` as f32 and returns its shape.
pub fn read_floats(value: &DynValue, out: &mut Vec<f32>) -> Result<Vec<i64>> {
    out.clear();
    match value.data_type() {
        TensorElementType::Float32 => {
            let (shape, data) = value.try_extract_tensor::<f32>()?;
            out.extend_from_slice(data);
            Ok(shape.to_vec())
        }
        TensorElementType::Float16 => {
            let (shape, data) = value.try_extract_tensor::<f16>()?;
            out.extend(data.iter().map(|v| v.to_f32()));
            Ok(shape.to_vec())
        }
        other => Err(Error::Internal(format!(
            "expected a float32 or float16 tensor, found {other:?}"
        ))),
    }
}

/// The last row (last position) of a float tensor shaped `[.., rows, width]`, as f32.
pub fn read_last_row(value: &DynValue, out: &mut Vec<f32>) -> Result<()> {
    out.clear();
    match value.data_type() {
        TensorElementType::Float32 => {
            let (_, data) = value.try_extract_tensor::<f32>()?;
            let width = last_dim(value)?;
            out.extend_from_slice(&data[data.len() - width..]);
        }
        TensorElementType::Float16 => {
            let (_, data) = value.try_extract_tensor::<f16>()?;
            let width = last_dim(value)?;
            out.extend(data[data.len() - width..].iter().map(|v| v.to_f32()));
        }
        other => {
            return Err(Error::Internal(format!(
                "expected a float32 or float16 tensor, found {other:?}"
            )))
        }
    }
    Ok(())
}

fn last_dim(value: &DynValue) -> Result<usize> {
    let shape = value.shape();
    let width = shape.last().copied().unwrap_or(0);
    let total: i64 = shape.iter().product();
    if width <= 0 || total < width {
        return Err(Error::Internal(format!(
            "tensor of shape {shape:?} has no last row"
        )));
    }
    Ok(width as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn embed_spec() -> GraphSpec {
        serde_json::from_value(serde_json::json!({
            "file": "embed.onnx",
            "sha256": "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}],
            "outputs": [{"name": "inputs_embeds", "dtype": "float32", "shape": ["batch", "sequence", 64]}],
        }))
        .unwrap()
    }

    #[test]
    fn the_first_registered_provider_picks_the_device() {
        assert_eq!(
            Device::of(&[Provider::TensorRt, Provider::Cuda, Provider::Cpu], 1),
            Device::Cuda { device_id: 1 }
        );
        assert_eq!(Device::of(&[Provider::Cpu], 1), Device::Cpu);
    }

    #[test]
    fn tensorrt_plans_profiles_and_a_cache_per_graph_file() {
        let mut ep = EpOptions::default();
        ep.apply_arg("tensorrt.cache_dir=/cache").unwrap();
        ep.apply_arg("limits.max_prompt_tokens=100").unwrap();
        let dims: ModelDims = serde_json::from_value(serde_json::json!({
            "num_layers": 1, "num_attention_heads": 2, "num_kv_heads": 2, "head_dim": 8,
            "hidden_size": 64, "vocab_size": 10, "max_context": 256
        }))
        .unwrap();
        let options = SessionOptions {
            providers: "tensorrt,cuda,cpu".parse().unwrap(),
            ep,
            ..Default::default()
        }
        .for_model(&dims)
        .unwrap();
        let plan = options.plan("embed", &embed_spec()).unwrap();
        assert_eq!(
            plan.engine_dir,
            Some(PathBuf::from("/cache/embed-0123456789abcdef"))
        );
        assert_eq!(plan.timing_dir, Some(PathBuf::from("/cache")));
        let profile = plan.profile.unwrap();
        assert_eq!(
            (profile.min.as_str(), profile.max.as_str()),
            ("input_ids:1x1", "input_ids:1x100")
        );

        // Without TensorRT in the list there is nothing to plan (and no cache directory is made).
        let cpu = SessionOptions {
            ep: options.ep.clone(),
            ..Default::default()
        };
        let plan = cpu.plan("embed", &embed_spec()).unwrap();
        assert!(plan.profile.is_none() && plan.engine_dir.is_none());

        // Limits beyond the model's context are refused when the model is opened.
        let mut ep = EpOptions::default();
        ep.apply_arg("limits.max_context=512").unwrap();
        let err = SessionOptions {
            ep,
            ..Default::default()
        }
        .for_model(&dims)
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("limits.max_context") && err.contains("1..=256"),
            "{err}"
        );
    }
}
