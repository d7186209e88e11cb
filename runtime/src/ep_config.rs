//! Execution-provider options a deployer sets: the GPU, CUDA's memory arena, TensorRT's precision, engine
//! and timing caches, builder level and workspace, and the request limits TensorRT's optimization
//! profiles are derived from.
//!
//! One key space serves both sources: a config file (`--ep-config FILE`, TOML or JSON, nested tables) and
//! `--ep-option KEY=VALUE` flags, which apply after the file. Every value is validated against its key's
//! type and range here, so a typo fails before any session is created, with the key, the value and what
//! was expected.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::manifest::{Dim, GraphSpec};
use crate::provider::ProviderList;

/// Every key the options accept, with what it expects; unknown keys are refused with this list.
pub const KEYS: &[(&str, &str)] = &[
    (
        "providers",
        "an ordered provider list, e.g. \"tensorrt,cuda,cpu\"",
    ),
    ("device_id", "the GPU ordinal, an integer in 0..=255"),
    (
        "cpu.arena",
        "true or false: ONNX Runtime's CPU memory arena for activations (default true)",
    ),
    (
        "cpu.prepack_weights",
        "true or false: keep a packed copy of MatMul weights (default true)",
    ),
    (
        "cuda.memory_limit",
        "the CUDA arena's size limit, bytes or e.g. \"20GiB\" (>= 1MiB)",
    ),
    (
        "cuda.arena_extend_strategy",
        "next_power_of_two or same_as_requested",
    ),
    (
        "cuda.tf32",
        "true or false: TF32 math for float32 MatMul/Conv (default false)",
    ),
    (
        "tensorrt.fp16",
        "true or false: let TensorRT build fp16 kernels",
    ),
    (
        "tensorrt.bf16",
        "true or false: let TensorRT build bf16 kernels",
    ),
    (
        "tensorrt.engine_cache",
        "true or false: keep built engines on disk (default true)",
    ),
    (
        "tensorrt.cache_dir",
        "a directory for engine and timing caches",
    ),
    (
        "tensorrt.timing_cache",
        "true or false: keep TensorRT's timing cache on disk (default true)",
    ),
    (
        "tensorrt.builder_optimization_level",
        "an integer in 0..=5 (default 3)",
    ),
    (
        "tensorrt.max_workspace_size",
        "TensorRT's workspace limit, bytes or e.g. \"4GiB\" (>= 1MiB)",
    ),
    (
        "limits.max_images",
        "images per request, an integer in 1..=64 (default 4)",
    ),
    (
        "limits.max_prompt_tokens",
        "prompt tokens per request, 1..=max_context (default max_context)",
    ),
    (
        "limits.max_context",
        "prompt + generated tokens, 1..=the model's max_context (default it)",
    ),
    (
        "limits.max_batch",
        "sequences decoded together in one decoder run, an integer in 1..=256 (default 8)",
    ),
    (
        "limits.opt_context",
        "the context length TensorRT tunes for, 1..=max_context (default max_context/2)",
    ),
    (
        "decode.prefill_chunk",
        "the most prompt tokens in one decoder run, 0 for the whole prompt in one run (default 512)",
    ),
    (
        "decode.step_tokens",
        "the batch engine's positions per iteration while sequences decode: the decoding rows plus a \
         prefill chunk of the rest (at least 16), 0 for a whole prefill_chunk (default 256)",
    ),
];

const MIN_BYTES: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ArenaStrategy {
    #[default]
    NextPowerOfTwo,
    SameAsRequested,
}

/// How the CPU provider holds weights and activations; see docs/PERFORMANCE.md ("Memory") for the
/// measured trade-off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuOptions {
    /// ONNX Runtime's arena for activations: freed blocks are kept for the next run instead of going
    /// back to the system, so a run reuses memory without page faults.
    pub arena: bool,
    /// ONNX Runtime's prepacking of constant MatMul weights into its GEMM layout at load. The packed copy
    /// replaces the original, so weights stored as external data stop being a view of the mapped file.
    pub prepack_weights: bool,
}

impl Default for CpuOptions {
    fn default() -> Self {
        CpuOptions {
            arena: true,
            prepack_weights: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CudaOptions {
    pub memory_limit: Option<u64>,
    pub arena_extend_strategy: ArenaStrategy,
    /// ONNX Runtime enables TF32 by default on Ampere and later; off here so an fp32 export computes in
    /// fp32 and matches the CPU within the fp32 tolerance.
    pub tf32: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorRtOptions {
    pub fp16: bool,
    pub bf16: bool,
    pub engine_cache: bool,
    /// Engine and timing caches; `None` means [`default_cache_dir`].
    pub cache_dir: Option<PathBuf>,
    pub timing_cache: bool,
    pub builder_optimization_level: u8,
    pub max_workspace_size: Option<u64>,
}

impl Default for TensorRtOptions {
    fn default() -> Self {
        TensorRtOptions {
            fp16: false,
            bf16: false,
            engine_cache: true,
            cache_dir: None,
            timing_cache: true,
            builder_optimization_level: 3,
            max_workspace_size: None,
        }
    }
}

/// Tuning of the decode loop (not limits: they change speed and memory, never what a request may ask).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeOptions {
    /// The most prompt tokens one decoder run takes; a longer prompt is prefilled in runs of this many
    /// tokens, each attending to the cache of the ones before. Standard attention materialises
    /// `heads x run tokens x context` scores, so this bounds prefill's activation memory, and the
    /// batch engine runs one such chunk between two decode steps of the running sequences. `0`: the
    /// whole prompt in one run.
    pub prefill_chunk: usize,
    /// The batch engine's token budget per iteration while sequences decode: the decoding rows (one
    /// position each) plus a prefill chunk of what is left, never fewer than [`MIN_STEP_PREFILL`]
    /// tokens so a prompt always advances. It bounds how long a running stream waits between two
    /// tokens; a prompt that arrives while nothing decodes takes whole `prefill_chunk` runs. `0`: no
    /// budget, a whole `prefill_chunk` between two decode steps.
    pub step_tokens: usize,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions {
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
            step_tokens: DEFAULT_STEP_TOKENS,
        }
    }
}

/// What one request may ask for; TensorRT's optimization profiles span exactly this, so no request
/// within the limits rebuilds an engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestLimits {
    pub max_images: usize,
    /// Sequences decoded together (the batch engine's rows; TensorRT's decoder batch profile).
    pub max_batch: usize,
    pub max_prompt_tokens: Option<usize>,
    pub max_context: Option<usize>,
    pub opt_context: Option<usize>,
}

impl Default for RequestLimits {
    fn default() -> Self {
        RequestLimits {
            max_images: 4,
            max_batch: DEFAULT_MAX_BATCH,
            max_prompt_tokens: None,
            max_context: None,
            opt_context: None,
        }
    }
}

/// Prefill runs of at most this many tokens: on the `mid` preset (CPU) as fast as one run for an
/// 857-token prompt and faster for 2014 tokens, with a third of the activation memory at 2014 tokens
/// (docs/PERFORMANCE.md, run 5).
pub const DEFAULT_PREFILL_CHUNK: usize = 512;
/// See [`DecodeOptions::step_tokens`]; chosen from the measured trade-off in docs/PERFORMANCE.md
/// ("prefill between decode steps").
pub const DEFAULT_STEP_TOKENS: usize = 256;
/// The smallest prefill chunk the engine runs beside decoding rows, whatever the step budget.
pub const MIN_STEP_PREFILL: usize = 16;

/// Sequences decoded together unless configured: on a memory-bound decoder a batch of 8 costs little
/// more per step than one sequence (docs/PERFORMANCE.md).
pub const DEFAULT_MAX_BATCH: usize = 8;

/// [`RequestLimits`] with the model's context filled in and checked against it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResolvedLimits {
    pub max_images: usize,
    pub max_batch: usize,
    pub max_prompt_tokens: usize,
    pub max_context: usize,
    pub opt_context: usize,
}

impl RequestLimits {
    pub fn resolve(&self, model_max_context: usize) -> Result<ResolvedLimits> {
        let max_context = self.max_context.unwrap_or(model_max_context);
        if max_context == 0 || max_context > model_max_context {
            return Err(option_error(
                "limits.max_context",
                &max_context.to_string(),
                &format!("1..={model_max_context} (the model's max_context)"),
            ));
        }
        let max_prompt_tokens = self.max_prompt_tokens.unwrap_or(max_context);
        if max_prompt_tokens > max_context {
            return Err(option_error(
                "limits.max_prompt_tokens",
                &max_prompt_tokens.to_string(),
                &format!("1..={max_context} (limits.max_context)"),
            ));
        }
        let opt_context = self.opt_context.unwrap_or((max_context / 2).max(1));
        if opt_context > max_context {
            return Err(option_error(
                "limits.opt_context",
                &opt_context.to_string(),
                &format!("1..={max_context} (limits.max_context)"),
            ));
        }
        Ok(ResolvedLimits {
            max_images: self.max_images,
            max_batch: self.max_batch,
            max_prompt_tokens,
            max_context,
            opt_context,
        })
    }
}

/// All provider options; `Default` is what runs when nothing is configured.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EpOptions {
    /// The provider list from the config file; `--ep` given on the command line wins.
    pub providers: Option<ProviderList>,
    pub device_id: u32,
    pub cpu: CpuOptions,
    pub cuda: CudaOptions,
    pub tensorrt: TensorRtOptions,
    pub limits: RequestLimits,
    pub decode: DecodeOptions,
}

/// A value as the file or the command line gave it; command-line values are always strings.
#[derive(Debug, Clone, PartialEq)]
pub enum OptionValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
}

impl std::fmt::Display for OptionValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OptionValue::Bool(b) => write!(f, "{b}"),
            OptionValue::Int(n) => write!(f, "{n}"),
            OptionValue::Float(x) => write!(f, "{x}"),
            OptionValue::Str(s) => write!(f, "{s:?}"),
        }
    }
}

fn option_error(key: &str, value: &str, expected: &str) -> Error {
    Error::ProviderOption {
        key: key.into(),
        value: value.into(),
        expected: expected.into(),
    }
}

impl EpOptions {
    /// Reads a config file: `.json` as JSON, anything else as TOML.
    pub fn from_file(path: &Path) -> Result<EpOptions> {
        let mut options = EpOptions::default();
        options.apply_file(path)?;
        Ok(options)
    }

    pub fn apply_file(&mut self, path: &Path) -> Result<()> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let is_json = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"));
        let value: Value = if is_json {
            serde_json::from_str(&text).map_err(|e| file_error(path, e.to_string()))?
        } else {
            let table: toml::Table =
                toml::from_str(&text).map_err(|e| file_error(path, e.to_string()))?;
            serde_json::to_value(table).map_err(|e| file_error(path, e.to_string()))?
        };
        let Value::Object(top) = value else {
            return Err(file_error(
                path,
                "expected a table of options at the top".into(),
            ));
        };
        let mut flat = Vec::new();
        flatten("", &Value::Object(top), &mut flat).map_err(|reason| file_error(path, reason))?;
        for (key, value) in flat {
            self.set(&key, &value).map_err(|e| match e {
                Error::ProviderOption {
                    key,
                    value,
                    expected,
                } => Error::ProviderOption {
                    key: format!("{key} (in {})", path.display()),
                    value,
                    expected,
                },
                other => other,
            })?;
        }
        Ok(())
    }

    /// Applies one `KEY=VALUE` from the command line.
    pub fn apply_arg(&mut self, arg: &str) -> Result<()> {
        let Some((key, value)) = arg.split_once('=') else {
            return Err(option_error(
                "--ep-option",
                &format!("{arg:?}"),
                "KEY=VALUE, e.g. tensorrt.fp16=true",
            ));
        };
        self.set(key.trim(), &OptionValue::Str(value.trim().to_string()))
    }

    /// Sets one option by its dotted key, validating the value.
    pub fn set(&mut self, key: &str, value: &OptionValue) -> Result<()> {
        let expected = KEYS
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, what)| *what)
            .ok_or_else(|| {
                let known: Vec<&str> = KEYS.iter().map(|(k, _)| *k).collect();
                option_error(
                    key,
                    &value.to_string(),
                    &format!("a known key: {}", known.join(", ")),
                )
            })?;
        let bad = || option_error(key, &value.to_string(), expected);
        match key {
            "providers" => {
                let text = as_str(value).ok_or_else(bad)?;
                self.providers = Some(text.parse().map_err(|_| bad())?);
            }
            "device_id" => self.device_id = as_int(value, 0, 255).ok_or_else(bad)? as u32,
            "cpu.arena" => self.cpu.arena = as_bool(value).ok_or_else(bad)?,
            "cpu.prepack_weights" => self.cpu.prepack_weights = as_bool(value).ok_or_else(bad)?,
            "cuda.memory_limit" => self.cuda.memory_limit = Some(as_size(value).ok_or_else(bad)?),
            "cuda.arena_extend_strategy" => {
                self.cuda.arena_extend_strategy = match as_str(value).ok_or_else(bad)? {
                    "next_power_of_two" => ArenaStrategy::NextPowerOfTwo,
                    "same_as_requested" => ArenaStrategy::SameAsRequested,
                    _ => return Err(bad()),
                }
            }
            "cuda.tf32" => self.cuda.tf32 = as_bool(value).ok_or_else(bad)?,
            "tensorrt.fp16" => self.tensorrt.fp16 = as_bool(value).ok_or_else(bad)?,
            "tensorrt.bf16" => self.tensorrt.bf16 = as_bool(value).ok_or_else(bad)?,
            "tensorrt.engine_cache" => {
                self.tensorrt.engine_cache = as_bool(value).ok_or_else(bad)?
            }
            "tensorrt.timing_cache" => {
                self.tensorrt.timing_cache = as_bool(value).ok_or_else(bad)?
            }
            "tensorrt.cache_dir" => {
                let dir = as_str(value).filter(|s| !s.is_empty()).ok_or_else(bad)?;
                self.tensorrt.cache_dir = Some(PathBuf::from(dir));
            }
            "tensorrt.builder_optimization_level" => {
                self.tensorrt.builder_optimization_level =
                    as_int(value, 0, 5).ok_or_else(bad)? as u8
            }
            "tensorrt.max_workspace_size" => {
                self.tensorrt.max_workspace_size = Some(as_size(value).ok_or_else(bad)?)
            }
            "limits.max_images" => {
                self.limits.max_images = as_int(value, 1, 64).ok_or_else(bad)? as usize
            }
            "limits.max_batch" => {
                self.limits.max_batch = as_int(value, 1, 256).ok_or_else(bad)? as usize
            }
            "limits.max_prompt_tokens" => {
                self.limits.max_prompt_tokens = Some(as_count(value).ok_or_else(bad)?)
            }
            "limits.max_context" => {
                self.limits.max_context = Some(as_count(value).ok_or_else(bad)?)
            }
            "limits.opt_context" => {
                self.limits.opt_context = Some(as_count(value).ok_or_else(bad)?)
            }
            "decode.prefill_chunk" => {
                self.decode.prefill_chunk =
                    as_int(value, 0, i64::from(u32::MAX)).ok_or_else(bad)? as usize
            }
            "decode.step_tokens" => {
                self.decode.step_tokens =
                    as_int(value, 0, i64::from(u32::MAX)).ok_or_else(bad)? as usize
            }
            _ => return Err(bad()),
        }
        Ok(())
    }

    /// Where TensorRT engines and the timing cache go: `tensorrt.cache_dir`, else
    /// `$LLAMA3V_CACHE_DIR/tensorrt`, `$XDG_CACHE_HOME/llama3v/tensorrt` or `~/.cache/llama3v/tensorrt`.
    pub fn cache_dir(&self) -> Option<PathBuf> {
        if let Some(dir) = &self.tensorrt.cache_dir {
            return Some(dir.clone());
        }
        default_cache_dir()
    }
}

pub fn default_cache_dir() -> Option<PathBuf> {
    let var = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("LLAMA3V_CACHE_DIR")
        .map(|d| d.join("tensorrt"))
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("llama3v/tensorrt")))
        .or_else(|| var("HOME").map(|d| d.join(".cache/llama3v/tensorrt")))
}

fn file_error(path: &Path, reason: String) -> Error {
    Error::ProviderOptionsFile {
        path: path.to_path_buf(),
        reason,
    }
}

/// Nested tables become dotted keys; arrays and nulls are not option values.
fn flatten(
    prefix: &str,
    value: &Value,
    out: &mut Vec<(String, OptionValue)>,
) -> std::result::Result<(), String> {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out)?;
            }
        }
        Value::Bool(b) => out.push((prefix.into(), OptionValue::Bool(*b))),
        Value::Number(n) => out.push((
            prefix.into(),
            match n.as_i64() {
                Some(i) => OptionValue::Int(i),
                None => OptionValue::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
        )),
        Value::String(s) => out.push((prefix.into(), OptionValue::Str(s.clone()))),
        Value::Array(_) | Value::Null => {
            return Err(format!("{prefix}: expected a string, number or boolean"));
        }
    }
    Ok(())
}

fn as_str(value: &OptionValue) -> Option<&str> {
    match value {
        // ONNX Runtime takes option values as C strings.
        OptionValue::Str(s) if !s.contains('\0') => Some(s),
        _ => None,
    }
}

fn as_bool(value: &OptionValue) -> Option<bool> {
    match value {
        OptionValue::Bool(b) => Some(*b),
        OptionValue::Str(s) => match s.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Some(true),
            "false" | "0" | "no" | "off" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

fn as_int(value: &OptionValue, min: i64, max: i64) -> Option<i64> {
    let n = match value {
        OptionValue::Int(n) => *n,
        OptionValue::Str(s) => s.parse().ok()?,
        _ => return None,
    };
    (min..=max).contains(&n).then_some(n)
}

fn as_count(value: &OptionValue) -> Option<usize> {
    as_int(value, 1, i64::from(u32::MAX)).map(|n| n as usize)
}

/// Bytes as an integer, or a number with a unit: B, KB/MB/GB/TB (powers of 1000), KiB/MiB/GiB/TiB.
fn as_size(value: &OptionValue) -> Option<u64> {
    let bytes = match value {
        OptionValue::Int(n) => u64::try_from(*n).ok()?,
        OptionValue::Str(s) => parse_size(s)?,
        _ => return None,
    };
    (bytes >= MIN_BYTES).then_some(bytes)
}

pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => return None,
    };
    if let Ok(n) = number.parse::<u64>() {
        return n.checked_mul(scale);
    }
    let x: f64 = number.parse().ok()?;
    let bytes = x * scale as f64;
    (x.is_finite() && x >= 0.0 && bytes < u64::MAX as f64).then_some(bytes as u64)
}

/// TensorRT optimization profile strings (`trt_profile_{min,opt,max}_shapes`): `name:1x3x384x384,...`
/// for every input with a symbolic dimension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeProfile {
    pub min: String,
    pub opt: String,
    pub max: String,
}

/// The (min, opt, max) a symbolic dimension of `graph` takes within the request limits. The vision graph's
/// batch is the number of images in a request, the decoder's the sequences decoding together; the
/// embedding graph runs one row of ids (a prompt, or one token of every decoding sequence). `opt` is the decode
/// step (one new token, a half-full context), the shape the decoder runs most.
fn dim_range(graph: &str, dim: &str, limits: &ResolvedLimits) -> Option<(usize, usize, usize)> {
    Some(match (graph, dim) {
        ("vision", "batch") => (1, 1, limits.max_images),
        ("decoder", "batch") => (1, 1, limits.max_batch),
        (_, "batch") => (1, 1, 1),
        ("embed", "sequence") => (1, 1, limits.max_prompt_tokens.max(limits.max_batch)),
        ("decoder", "sequence") => (1, 1, limits.max_prompt_tokens),
        ("decoder", "past_sequence") => (0, limits.opt_context - 1, limits.max_context - 1),
        ("decoder", "total_sequence") => (1, limits.opt_context, limits.max_context),
        _ => return None,
    })
}

/// The optimization profile of one graph's dynamic inputs, from its manifest spec and the limits;
/// `None` when every input shape is fixed.
pub fn tensorrt_profile(
    graph: &str,
    spec: &GraphSpec,
    limits: &ResolvedLimits,
) -> Result<Option<ShapeProfile>> {
    let mut sides: [Vec<String>; 3] = Default::default();
    for input in &spec.inputs {
        if !input.shape.iter().any(|d| matches!(d, Dim::Symbolic(_))) {
            continue;
        }
        // The profile syntax separates inputs with ',' and names from shapes with ':'.
        if input.name.contains([',', ':']) {
            return Err(Error::Graph {
                graph: graph.into(),
                reason: format!(
                    "input {:?} cannot be named in a TensorRT profile (',' or ':')",
                    input.name
                ),
            });
        }
        let mut dims: [Vec<String>; 3] = Default::default();
        for dim in &input.shape {
            let (lo, opt, hi) = match dim {
                Dim::Fixed(n) => {
                    let n = usize::try_from(*n).map_err(|_| Error::Graph {
                        graph: graph.into(),
                        reason: format!("input {:?} has a negative dimension {n}", input.name),
                    })?;
                    (n, n, n)
                }
                Dim::Symbolic(name) => dim_range(graph, name, limits).ok_or_else(|| Error::Graph {
                    graph: graph.into(),
                    reason: format!(
                        "input {:?} has symbolic dimension {name:?}, which has no TensorRT profile range \
                         (known: batch, sequence, past_sequence, total_sequence)",
                        input.name
                    ),
                })?,
            };
            for (side, n) in dims.iter_mut().zip([lo, opt, hi]) {
                side.push(n.to_string());
            }
        }
        for (side, shape) in sides.iter_mut().zip(dims) {
            side.push(format!("{}:{}", input.name, shape.join("x")));
        }
    }
    if sides[0].is_empty() {
        return Ok(None);
    }
    let [min, opt, max] = sides.map(|s| s.join(","));
    Ok(Some(ShapeProfile { min, opt, max }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Manifest;

    fn err(result: Result<()>) -> String {
        match result {
            Ok(()) => panic!("accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn every_key_parses_from_arguments() {
        let mut o = EpOptions::default();
        for arg in [
            "providers=tensorrt,cuda,cpu",
            "device_id=1",
            "cuda.memory_limit=20GiB",
            "cuda.arena_extend_strategy=same_as_requested",
            "cuda.tf32=true",
            "tensorrt.fp16=yes",
            "tensorrt.bf16=0",
            "tensorrt.engine_cache=false",
            "tensorrt.cache_dir=/var/cache/trt",
            "tensorrt.timing_cache=off",
            "tensorrt.builder_optimization_level=5",
            "tensorrt.max_workspace_size=1.5GB",
            "limits.max_images=2",
            "limits.max_prompt_tokens=1024",
            "limits.max_context=2048",
            "limits.opt_context=512",
            "limits.max_batch=16",
            "decode.prefill_chunk=256",
            "decode.step_tokens=64",
            "cpu.arena=false",
            "cpu.prepack_weights=no",
        ] {
            o.apply_arg(arg).unwrap_or_else(|e| panic!("{arg}: {e}"));
        }
        assert_eq!(
            o.providers.as_ref().map(|p| p.to_string()),
            Some("tensorrt,cuda,cpu".into())
        );
        assert_eq!(o.device_id, 1);
        assert_eq!(o.cuda.memory_limit, Some(20 << 30));
        assert_eq!(o.cuda.arena_extend_strategy, ArenaStrategy::SameAsRequested);
        assert!(o.cuda.tf32 && o.tensorrt.fp16 && !o.tensorrt.bf16);
        assert!(!o.tensorrt.engine_cache && !o.tensorrt.timing_cache);
        assert_eq!(o.cache_dir(), Some(PathBuf::from("/var/cache/trt")));
        assert_eq!(o.tensorrt.builder_optimization_level, 5);
        assert_eq!(o.tensorrt.max_workspace_size, Some(1_500_000_000));
        assert_eq!(
            o.limits,
            RequestLimits {
                max_images: 2,
                max_batch: 16,
                max_prompt_tokens: Some(1024),
                max_context: Some(2048),
                opt_context: Some(512),
            }
        );
        assert_eq!(
            o.cpu,
            CpuOptions {
                arena: false,
                prepack_weights: false
            }
        );
        assert_eq!(o.decode.prefill_chunk, 256);
        assert_eq!(o.decode.step_tokens, 64);
    }

    #[test]
    fn removed_io_binding_option_is_refused() {
        // Both cache layouts always keep the cache in the decoder's memory: there is no choice left.
        let e = err(EpOptions::default().apply_arg("decode.io_binding=true"));
        assert!(
            e.contains("decode.io_binding") && e.contains("a known key"),
            "{e}"
        );
    }

    #[test]
    fn bad_values_name_key_value_and_range() {
        let mut o = EpOptions::default();
        let e = err(o.apply_arg("tensorrt.builder_optimization_level=7"));
        assert!(
            e.contains("tensorrt.builder_optimization_level")
                && e.contains("\"7\"")
                && e.contains("0..=5"),
            "{e}"
        );
        let e = err(o.apply_arg("device_id=-1"));
        assert!(e.contains("device_id") && e.contains("0..=255"), "{e}");
        let e = err(o.apply_arg("cuda.memory_limit=12 parsecs"));
        assert!(
            e.contains("cuda.memory_limit") && e.contains("20GiB"),
            "{e}"
        );
        let e = err(o.apply_arg("cuda.memory_limit=1000"));
        assert!(e.contains(">= 1MiB"), "{e}");
        let e = err(o.apply_arg("cuda.arena_extend_strategy=greedy"));
        assert!(e.contains("next_power_of_two or same_as_requested"), "{e}");
        let e = err(o.apply_arg("tensorrt.fp16=maybe"));
        assert!(e.contains("true or false"), "{e}");
        let e = err(o.apply_arg("tensorrt.fp61=true"));
        assert!(
            e.contains("tensorrt.fp61") && e.contains("a known key") && e.contains("tensorrt.fp16"),
            "{e}"
        );
        let e = err(o.apply_arg("providers=cpu,rocm"));
        assert!(e.contains("providers") && e.contains("\"cpu,rocm\""), "{e}");
        let e = err(o.apply_arg("decode.prefill_chunk=-1"));
        assert!(
            e.contains("decode.prefill_chunk") && e.contains("default 512"),
            "{e}"
        );
        let e = err(o.apply_arg("cpu.arena=sometimes"));
        assert!(
            e.contains("cpu.arena") && e.contains("true or false"),
            "{e}"
        );
        let e = err(o.apply_arg("limits.max_images=0"));
        assert!(e.contains("1..=64"), "{e}");
        let e = err(o.apply_arg("tensorrt.fp16"));
        assert!(e.contains("KEY=VALUE"), "{e}");
        // Typed values from a file: a string where a boolean is expected is still read, a float is not an
        // integer.
        assert!(o
            .set("tensorrt.fp16", &OptionValue::Str("true".into()))
            .is_ok());
        assert!(o.set("device_id", &OptionValue::Float(1.5)).is_err());
        assert!(o
            .set("tensorrt.cache_dir", &OptionValue::Str("a\0b".into()))
            .is_err());
        // Nothing above changed what had been validly set before.
        assert_eq!(o.tensorrt.builder_optimization_level, 3);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("8GiB"), Some(8 << 30));
        assert_eq!(parse_size("512 MiB"), Some(512 << 20));
        assert_eq!(parse_size("2gb"), Some(2_000_000_000));
        assert_eq!(parse_size("0.5GiB"), Some(1 << 29));
        assert_eq!(parse_size("-1GiB"), None);
        assert_eq!(parse_size("GiB"), None);
        assert_eq!(parse_size("99999999999TiB"), None);
    }

    #[test]
    fn files_in_toml_and_json() {
        let dir = std::env::temp_dir().join(format!("llama3v-ep-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let toml_path = dir.join("ep.toml");
        std::fs::write(
            &toml_path,
            "providers = \"tensorrt,cuda,cpu\"\ndevice_id = 0\n[cuda]\nmemory_limit = \"8GiB\"\n\
             [tensorrt]\nfp16 = true\nbuilder_optimization_level = 4\nmax_workspace_size = 4294967296\n\
             [limits]\nmax_context = 1024\n",
        )
        .unwrap();
        let o = EpOptions::from_file(&toml_path).unwrap();
        assert_eq!(o.cuda.memory_limit, Some(8 << 30));
        assert!(o.tensorrt.fp16);
        assert_eq!(o.tensorrt.builder_optimization_level, 4);
        assert_eq!(o.tensorrt.max_workspace_size, Some(4 << 30));
        assert_eq!(o.limits.max_context, Some(1024));

        let json_path = dir.join("ep.json");
        std::fs::write(
            &json_path,
            r#"{"tensorrt": {"builder_optimization_level": 9}}"#,
        )
        .unwrap();
        let e = EpOptions::from_file(&json_path).unwrap_err().to_string();
        assert!(
            e.contains("tensorrt.builder_optimization_level")
                && e.contains("ep.json")
                && e.contains("0..=5"),
            "{e}"
        );

        std::fs::write(&toml_path, "[tensorrt\nfp16 = true").unwrap();
        let e = EpOptions::from_file(&toml_path).unwrap_err().to_string();
        assert!(e.contains("ep.toml") && e.contains("options file"), "{e}");
        std::fs::write(&json_path, r#"{"limits": {"max_images": [1, 2]}}"#).unwrap();
        let e = EpOptions::from_file(&json_path).unwrap_err().to_string();
        assert!(e.contains("limits.max_images"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn limits_resolve_against_the_model() {
        let l = RequestLimits::default().resolve(4096).unwrap();
        assert_eq!(
            l,
            ResolvedLimits {
                max_images: 4,
                max_batch: 8,
                max_prompt_tokens: 4096,
                max_context: 4096,
                opt_context: 2048
            }
        );
        let too_long = RequestLimits {
            max_context: Some(8192),
            ..Default::default()
        };
        let e = too_long.resolve(4096).unwrap_err().to_string();
        assert!(
            e.contains("limits.max_context") && e.contains("8192") && e.contains("1..=4096"),
            "{e}"
        );
        let prompt = RequestLimits {
            max_context: Some(1024),
            max_prompt_tokens: Some(2000),
            ..Default::default()
        };
        let e = prompt.resolve(4096).unwrap_err().to_string();
        assert!(
            e.contains("limits.max_prompt_tokens") && e.contains("1..=1024"),
            "{e}"
        );
    }

    /// A manifest of the contract's shape (two layers, 4 KV heads of 16, 32x32 images of 16 tokens).
    fn manifest() -> Manifest {
        let t = |name: &str, dtype: &str, shape: serde_json::Value| serde_json::json!({"name": name, "dtype": dtype, "shape": shape});
        let mut inputs = vec![
            t(
                "inputs_embeds",
                "float32",
                serde_json::json!(["batch", "sequence", 64]),
            ),
            t(
                "attention_mask",
                "int64",
                serde_json::json!(["batch", "total_sequence"]),
            ),
            t(
                "position_ids",
                "int64",
                serde_json::json!(["batch", "sequence"]),
            ),
        ];
        let mut outputs = vec![t(
            "logits",
            "float32",
            serde_json::json!(["batch", "sequence", 100]),
        )];
        for i in 0..2 {
            for kv in ["key", "value"] {
                inputs.push(t(
                    &format!("past_key_values.{i}.{kv}"),
                    "float32",
                    serde_json::json!(["batch", 4, "past_sequence", 16]),
                ));
                outputs.push(t(
                    &format!("present.{i}.{kv}"),
                    "float32",
                    serde_json::json!(["batch", 4, "total_sequence", 16]),
                ));
            }
        }
        let graph = |inputs: Vec<serde_json::Value>, outputs: Vec<serde_json::Value>| serde_json::json!({"file": "g.onnx", "sha256": "00", "inputs": inputs, "outputs": outputs});
        let value = serde_json::json!({
            "format": "llama3v-model", "format_version": 1, "dtype": "fp32",
            "graphs": {
                "vision": graph(vec![t("pixel_values", "float32", serde_json::json!(["batch", 3, 32, 32]))],
                                vec![t("image_features", "float32", serde_json::json!(["batch", 16, 64]))]),
                "embed": graph(vec![t("input_ids", "int64", serde_json::json!(["batch", "sequence"]))],
                               vec![t("inputs_embeds", "float32", serde_json::json!(["batch", "sequence", 64]))]),
                "decoder": graph(inputs, outputs),
            },
            "model": {"num_layers": 2, "num_attention_heads": 4, "num_kv_heads": 4, "head_dim": 16,
                      "hidden_size": 64, "vocab_size": 100, "max_context": 2048},
            "image": {"height": 32, "width": 32, "resample": "bicubic", "do_rescale": true,
                      "rescale_factor": 0.00392156862745098, "do_normalize": true, "mean": [0.5, 0.5, 0.5],
                      "std": [0.5, 0.5, 0.5], "do_convert_rgb": true, "tokens_per_image": 16,
                      "image_token": "<image>", "image_token_id": 99},
            "text": {"tokenizer_file": "tokenizer.json", "bos_token": "<s>", "bos_token_id": 1,
                     "eos_token": "</s>", "stop_token_ids": [2], "chat_template": ""}
        });
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn profiles_span_the_request_limits() {
        let m = manifest();
        let limits = RequestLimits {
            max_images: 2,
            max_batch: 4,
            max_prompt_tokens: Some(512),
            max_context: Some(1024),
            opt_context: Some(256),
        }
        .resolve(m.model.max_context)
        .unwrap();

        let vision = tensorrt_profile("vision", &m.graphs.vision, &limits)
            .unwrap()
            .unwrap();
        assert_eq!(vision.min, "pixel_values:1x3x32x32");
        assert_eq!(vision.opt, "pixel_values:1x3x32x32");
        assert_eq!(vision.max, "pixel_values:2x3x32x32");

        let embed = tensorrt_profile("embed", &m.graphs.embed, &limits)
            .unwrap()
            .unwrap();
        assert_eq!(
            (embed.min.as_str(), embed.max.as_str()),
            ("input_ids:1x1", "input_ids:1x512")
        );

        let decoder = tensorrt_profile("decoder", &m.graphs.decoder, &limits)
            .unwrap()
            .unwrap();
        let past = |i: usize, kv: &str, b: usize, p: usize| {
            format!("past_key_values.{i}.{kv}:{b}x4x{p}x16")
        };
        let expect = |b: usize, s: usize, t: usize, p: usize| {
            let mut parts = vec![
                format!("inputs_embeds:{b}x{s}x64"),
                format!("attention_mask:{b}x{t}"),
                format!("position_ids:{b}x{s}"),
            ];
            for i in 0..2 {
                parts.push(past(i, "key", b, p));
                parts.push(past(i, "value", b, p));
            }
            parts.join(",")
        };
        // Prefill of one token on an empty cache; a decode step of one sequence at the tuned context;
        // a full batch, prompt and past.
        assert_eq!(decoder.min, expect(1, 1, 1, 0));
        assert_eq!(decoder.opt, expect(1, 1, 256, 255));
        assert_eq!(decoder.max, expect(4, 512, 1024, 1023));
    }

    #[test]
    fn unknown_symbolic_dims_are_refused() {
        let mut m = manifest();
        m.graphs.embed.inputs[0].shape[1] = Dim::Symbolic("tokens".into());
        let limits = RequestLimits::default().resolve(2048).unwrap();
        let e = tensorrt_profile("embed", &m.graphs.embed, &limits)
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"tokens\"") && e.contains("input_ids"), "{e}");
        m.graphs.vision.inputs[0].shape[0] = Dim::Fixed(1);
        assert_eq!(
            tensorrt_profile("vision", &m.graphs.vision, &limits).unwrap(),
            None
        );
    }
}
