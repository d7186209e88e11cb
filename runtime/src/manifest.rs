//! `manifest.json`: the versioned contract between export and runtime (see `onnx/README.md`).
//!
//! Everything the runtime needs to know about a model directory comes from here; tensor names are taken
//! from each graph's ordered input/output lists and never re-spelled elsewhere.

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::preprocess::PreprocessConfig;

pub const MANIFEST_FILE: &str = "manifest.json";
pub const FORMAT: &str = "llama3v-model";
pub const FORMAT_VERSION: u32 = 1;
/// Largest image height or width a manifest may ask preprocessing for.
pub const MAX_IMAGE_SIDE: u32 = 8192;
/// Largest decoder depth a manifest may declare (bounds the graph's input/output counts).
pub const MAX_LAYERS: usize = 4096;
/// Largest context a manifest may declare: 2^24 positions, 128 times Llama-3.1's 131072. ONNX Runtime's
/// attention kernels count sequence lengths in int32, and the runtime sizes per-sequence position
/// state from it.
pub const MAX_CONTEXT: usize = 1 << 24;
/// Largest vocabulary (each decode step holds `vocab_size` logits): 2^24, 64 times Llama-3's.
pub const MAX_VOCAB: usize = 1 << 24;
/// Largest hidden size, head count and head dim.
pub const MAX_WIDTH: usize = 1 << 20;
/// Largest KV cache one sequence may need at `max_context` (float32): 1 TiB. Well above any real
/// model (Llama-3-8B at 131072 positions: 64 GiB), and it keeps every size computed from the dims
/// exact in 64 bits.
pub const MAX_KV_CACHE_BYTES: u128 = 1 << 40;
/// Most stop ids a manifest may list (`generation_config.json` lists a handful).
pub const MAX_STOP_IDS: usize = 1024;
/// Largest chat template source (real ones are a few KiB).
pub const MAX_CHAT_TEMPLATE_BYTES: usize = 1 << 20;
/// The only resize filter the runtime implements (PIL's bicubic).
pub const RESAMPLE: &str = "bicubic";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub dtype: ModelDtype,
    pub graphs: Graphs,
    pub model: ModelDims,
    pub image: ImageSettings,
    pub text: TextSettings,
    #[serde(default)]
    pub generation: GenerationDefaults,
    #[serde(default)]
    pub provenance: serde_json::Value,
    /// Weight quantization of some graphs (`llama3v-export --quant`); absent for a float export.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<Quantization>,
    /// How the decoder graph was built (`llama3v-export --decoder`); `plain` when absent.
    #[serde(default)]
    pub decoder_flavour: DecoderFlavour,
    /// The checkpoint layout the graphs came from; `llava` when absent (older model directories).
    #[serde(default)]
    pub layout: Layout,
    /// Slicing and prompt layout of the `minicpmv` layout (required by it, absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minicpmv: Option<MiniCpmvSettings>,
}

/// The source checkpoint's layout (onnx/README.md): how images become vision inputs and prompt tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// One fixed-size image per vision input, `tokens_per_image` image tokens per image.
    #[default]
    Llava,
    /// MiniCPM-Llama3-V 2.5: each image cut into an overview and a grid of slices ([`crate::minicpmv`]).
    Minicpmv,
}

/// The decoder graph's flavour (onnx/README.md, "Decoder flavours").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DecoderFlavour {
    /// Traced from PyTorch, standard ONNX ops only: runs on every provider, TensorRT included. Each run
    /// returns a new present cache of `past + new` positions.
    #[default]
    Plain,
    /// Built from ONNX Runtime's contrib ops (GroupQueryAttention, SkipSimplifiedLayerNormalization):
    /// ONNX Runtime's CPU and CUDA providers only. The present cache may be bound to the past's buffer,
    /// which the graph then appends to in place.
    Fused,
}

impl DecoderFlavour {
    pub fn name(self) -> &'static str {
        match self {
            DecoderFlavour::Plain => "plain",
            DecoderFlavour::Fused => "fused",
        }
    }
}

/// Weight-only quantization recorded by the exporter. The quantized graphs keep the float inputs and
/// outputs of `dtype`; only their weights (and so their accuracy) differ.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quantization {
    pub method: QuantMethod,
    /// Weights per scale, along the input dimension.
    pub block_size: u32,
    #[serde(default)]
    pub symmetric: Option<bool>,
    /// MatMulNBits' `accuracy_level` (4: int8 activations in the CPU kernel).
    #[serde(default)]
    pub accuracy_level: Option<u32>,
    /// Names of the quantized graphs (`decoder`).
    pub graphs: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantMethod {
    /// 4-bit weights in `com.microsoft::MatMulNBits`.
    Int4,
}

impl std::fmt::Display for Quantization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let method = match self.method {
            QuantMethod::Int4 => "int4",
        };
        write!(
            f,
            "{method} weights, block {}, {}",
            self.block_size,
            match self.symmetric {
                Some(true) => "symmetric",
                Some(false) => "asymmetric",
                None => "symmetry unrecorded",
            }
        )?;
        if let Some(level) = self.accuracy_level {
            write!(f, ", accuracy level {level}")?;
        }
        write!(f, " in {}", self.graphs.join(", "))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelDtype {
    Fp32,
    Fp16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TensorDtype {
    Float32,
    Float16,
    Int64,
}

impl std::fmt::Display for TensorDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TensorDtype::Float32 => "float32",
            TensorDtype::Float16 => "float16",
            TensorDtype::Int64 => "int64",
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Graphs {
    pub vision: GraphSpec,
    pub embed: GraphSpec,
    pub decoder: GraphSpec,
}

impl Graphs {
    pub fn named(&self) -> [(&'static str, &GraphSpec); 3] {
        [
            ("vision", &self.vision),
            ("embed", &self.embed),
            ("decoder", &self.decoder),
        ]
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GraphSpec {
    pub file: String,
    pub sha256: String,
    #[serde(default)]
    pub external_data: Vec<FileDigest>,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileDigest {
    pub file: String,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: TensorDtype,
    pub shape: Vec<Dim>,
}

/// A tensor dimension: fixed, or symbolic (`batch`, `sequence`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Dim {
    Fixed(i64),
    Symbolic(String),
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Symbolic(s) => f.write_str(s),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelDims {
    pub num_layers: usize,
    pub num_attention_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub hidden_size: usize,
    pub vocab_size: usize,
    pub max_context: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageSettings {
    pub height: u32,
    pub width: u32,
    pub resample: String,
    pub do_rescale: bool,
    pub rescale_factor: f32,
    pub do_normalize: bool,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub do_convert_rgb: bool,
    pub tokens_per_image: usize,
    pub image_token: String,
    pub image_token_id: u32,
}

impl ImageSettings {
    pub fn preprocess_config(&self) -> PreprocessConfig {
        PreprocessConfig {
            height: self.height,
            width: self.width,
            do_convert_rgb: self.do_convert_rgb,
            do_rescale: self.do_rescale,
            rescale_factor: self.rescale_factor,
            do_normalize: self.do_normalize,
            mean: self.mean,
            std: self.std,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TextSettings {
    pub tokenizer_file: String,
    pub bos_token: String,
    pub bos_token_id: u32,
    pub eos_token: String,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    pub stop_token_ids: Vec<u32>,
    pub chat_template: String,
}

/// Sampling defaults from the checkpoint's `generation_config.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GenerationDefaults {
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub top_k: Option<usize>,
    #[serde(default)]
    pub do_sample: Option<bool>,
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
}

/// Which checks [`Manifest::load`] runs on the graph files.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    /// Hash every graph and external-data file against the manifest. Costs a full read of the weights.
    pub verify_hashes: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            verify_hashes: true,
        }
    }
}

impl Manifest {
    /// Parses manifest JSON and checks it against itself (no files are read): the part of
    /// [`Manifest::load`] that untrusted text alone reaches, and what the manifest fuzz target drives.
    pub fn parse(text: &str) -> std::result::Result<Manifest, String> {
        let manifest: Manifest = serde_json::from_str(text).map_err(|e| e.to_string())?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// Consistency of the manifest with itself, and every number within what the runtime can allocate
    /// for it: the contract's rules (onnx/README.md, onnx/manifest.schema.json). Each part is its own
    /// function, so a new optional field adds one check where its section is.
    fn validate(&self) -> std::result::Result<(), String> {
        if self.format != FORMAT {
            return Err(format!("format is {:?}, expected {FORMAT:?}", self.format));
        }
        if self.format_version != FORMAT_VERSION {
            return Err(format!(
                "format_version {} is not supported (this runtime reads version {FORMAT_VERSION})",
                self.format_version
            ));
        }
        self.validate_model()?;
        self.validate_digests()?;
        self.validate_quantization()?;
        expect_io("vision", &self.graphs.vision, 1, 1)?;
        expect_io("embed", &self.graphs.embed, 1, 1)?;
        let kv = 2 * self.model.num_layers;
        expect_io("decoder", &self.graphs.decoder, 3 + kv, 1 + kv)?;
        self.validate_image()?;
        self.validate_layout()?;
        self.validate_text()?;
        self.validate_generation()?;
        self.validate_shapes()
    }

    fn validate_model(&self) -> std::result::Result<(), String> {
        let m = &self.model;
        let dims = [
            ("num_layers", m.num_layers, MAX_LAYERS),
            ("num_attention_heads", m.num_attention_heads, MAX_WIDTH),
            ("num_kv_heads", m.num_kv_heads, MAX_WIDTH),
            ("head_dim", m.head_dim, MAX_WIDTH),
            ("hidden_size", m.hidden_size, MAX_WIDTH),
            ("vocab_size", m.vocab_size, MAX_VOCAB),
            ("max_context", m.max_context, MAX_CONTEXT),
        ];
        for (name, value, limit) in dims {
            if value == 0 || value > limit {
                return Err(format!("model.{name} is {value}, expected 1..={limit}"));
            }
        }
        if !m.num_attention_heads.is_multiple_of(m.num_kv_heads) {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_kv_heads {}",
                m.num_attention_heads, m.num_kv_heads
            ));
        }
        // One sequence's KV cache at the full context (float32, the widest): the most a request can
        // make the runtime hold; bounding it keeps every size computed from these dims exact.
        let kv_bytes = [m.num_layers, m.num_kv_heads, m.head_dim, m.max_context]
            .iter()
            .fold(2 * 4u128, |acc, &d| acc * d as u128);
        if kv_bytes > MAX_KV_CACHE_BYTES {
            return Err(format!(
                "model dims make a KV cache of {kv_bytes} bytes at max_context {} (2 x num_layers x \
                 num_kv_heads x head_dim x max_context x 4), over the limit of {MAX_KV_CACHE_BYTES}",
                m.max_context
            ));
        }
        Ok(())
    }

    /// A digest that cannot be a sha256 would fail only when hashes are verified; refuse it always.
    fn validate_digests(&self) -> std::result::Result<(), String> {
        for (name, graph) in self.graphs.named() {
            let digests = std::iter::once((graph.file.as_str(), graph.sha256.as_str())).chain(
                graph
                    .external_data
                    .iter()
                    .map(|f| (f.file.as_str(), f.sha256.as_str())),
            );
            for (file, digest) in digests {
                if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(format!(
                        "graphs.{name}: the sha256 of {file} is {digest:?}, not 64 hex digits"
                    ));
                }
            }
        }
        Ok(())
    }

    fn validate_quantization(&self) -> std::result::Result<(), String> {
        let Some(q) = &self.quantization else {
            return Ok(());
        };
        if q.block_size < 16 || !q.block_size.is_power_of_two() {
            return Err(format!(
                "quantization.block_size {} is not a power of two of at least 16",
                q.block_size
            ));
        }
        let known = self.graphs.named().map(|(name, _)| name);
        if let Some(name) = q.graphs.iter().find(|g| !known.contains(&g.as_str())) {
            return Err(format!(
                "quantization.graphs names an unknown graph {name:?}"
            ));
        }
        Ok(())
    }

    fn validate_image(&self) -> std::result::Result<(), String> {
        let img = &self.image;
        if img.height == 0 || img.width == 0 || img.tokens_per_image == 0 {
            return Err("image height, width and tokens_per_image must be positive".into());
        }
        // Preprocessing allocates 3 x height x width floats per image from these numbers.
        if img.height > MAX_IMAGE_SIDE || img.width > MAX_IMAGE_SIDE {
            return Err(format!(
                "image size {}x{} is over the limit of {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE}",
                img.width, img.height
            ));
        }
        if img.tokens_per_image >= self.model.max_context {
            return Err(format!(
                "tokens_per_image {} does not fit in max_context {}",
                img.tokens_per_image, self.model.max_context
            ));
        }
        // The runtime resizes with PIL's bicubic filter only; another filter would be silently wrong.
        if img.resample != RESAMPLE {
            return Err(format!(
                "image.resample is {:?}; this runtime implements only {RESAMPLE:?} (PIL's, as \
                 SiglipImageProcessorPil resizes)",
                img.resample
            ));
        }
        if !img.do_convert_rgb {
            return Err(
                "image.do_convert_rgb is false; this runtime always converts images to RGB \
                 (alpha composited over white), which is what true means"
                    .into(),
            );
        }
        if !(img.rescale_factor.is_finite() && img.rescale_factor > 0.0) {
            return Err(format!(
                "image.rescale_factor {} must be finite and positive",
                img.rescale_factor
            ));
        }
        if img.mean.iter().any(|m| !m.is_finite()) {
            return Err(format!("image mean {:?} must be finite", img.mean));
        }
        if img.std.iter().any(|s| *s == 0.0 || !s.is_finite()) {
            return Err(format!(
                "image std {:?} must be finite and non-zero",
                img.std
            ));
        }
        if img.image_token_id as usize >= self.model.vocab_size {
            return Err(format!(
                "image_token_id {} is outside the vocabulary of {}",
                img.image_token_id, self.model.vocab_size
            ));
        }
        Ok(())
    }

    /// The layout's own section is present exactly when the layout needs it, and agrees with `image`.
    fn validate_layout(&self) -> std::result::Result<(), String> {
        match (self.layout, &self.minicpmv) {
            (Layout::Llava, None) => Ok(()),
            (Layout::Minicpmv, Some(settings)) => {
                settings.validate(MAX_IMAGE_SIDE)?;
                if settings.query_num != self.image.tokens_per_image {
                    return Err(format!(
                        "minicpmv query_num {} differs from image.tokens_per_image {}",
                        settings.query_num, self.image.tokens_per_image
                    ));
                }
                Ok(())
            }
            (Layout::Llava, Some(_)) => Err("a minicpmv section in a llava layout manifest".into()),
            (Layout::Minicpmv, None) => Err("layout minicpmv needs the minicpmv section".into()),
        }
    }

    fn validate_text(&self) -> std::result::Result<(), String> {
        let text = &self.text;
        let vocab = self.model.vocab_size;
        if text.stop_token_ids.is_empty() {
            return Err("text.stop_token_ids is empty".into());
        }
        if text.stop_token_ids.len() > MAX_STOP_IDS {
            return Err(format!(
                "text.stop_token_ids lists {} ids, over the limit of {MAX_STOP_IDS}",
                text.stop_token_ids.len()
            ));
        }
        // A stop id the logits cannot produce would never end a generation.
        let ids = [("bos_token_id", text.bos_token_id)]
            .into_iter()
            .chain(text.pad_token_id.map(|id| ("pad_token_id", id)))
            .chain(text.stop_token_ids.iter().map(|&id| ("stop_token_ids", id)));
        for (field, id) in ids {
            if id as usize >= vocab {
                return Err(format!(
                    "text.{field} has {id}, outside the vocabulary of {vocab}"
                ));
            }
        }
        if text.chat_template.len() > MAX_CHAT_TEMPLATE_BYTES {
            return Err(format!(
                "text.chat_template is {} bytes, over the limit of {MAX_CHAT_TEMPLATE_BYTES}",
                text.chat_template.len()
            ));
        }
        Ok(())
    }

    fn validate_generation(&self) -> std::result::Result<(), String> {
        let g = &self.generation;
        if let Some(t) = g.temperature {
            if !(t.is_finite() && t >= 0.0) {
                return Err(format!(
                    "generation.temperature {t} must be a finite number >= 0"
                ));
            }
        }
        if let Some(p) = g.top_p {
            if !(0.0..=1.0).contains(&p) {
                return Err(format!("generation.top_p {p} must be in [0, 1]"));
            }
        }
        if let Some(r) = g.repetition_penalty {
            if !(r.is_finite() && r > 0.0) {
                return Err(format!(
                    "generation.repetition_penalty {r} must be a finite number > 0"
                ));
            }
        }
        Ok(())
    }

    /// The fixed dims of the graphs' tensors must agree with the model and image settings (symbolic
    /// dims are free); a mismatch would otherwise surface as a shape error deep inside a run.
    fn validate_shapes(&self) -> std::result::Result<(), String> {
        let m = &self.model;
        let img = &self.image;
        let g = &self.graphs;
        let fixed = |n: usize| Some(n as i64);
        let h = Some(i64::from(img.height));
        let w = Some(i64::from(img.width));
        let mut expected: Vec<(&str, &TensorSpec, Vec<Option<i64>>)> = vec![
            ("vision", &g.vision.inputs[0], vec![None, Some(3), h, w]),
            (
                "vision",
                &g.vision.outputs[0],
                vec![None, fixed(img.tokens_per_image), fixed(m.hidden_size)],
            ),
            ("embed", &g.embed.inputs[0], vec![None, None]),
            (
                "embed",
                &g.embed.outputs[0],
                vec![None, None, fixed(m.hidden_size)],
            ),
            (
                "decoder",
                &g.decoder.inputs[0],
                vec![None, None, fixed(m.hidden_size)],
            ),
            ("decoder", &g.decoder.inputs[1], vec![None, None]),
            ("decoder", &g.decoder.inputs[2], vec![None, None]),
            (
                "decoder",
                &g.decoder.outputs[0],
                vec![None, None, fixed(m.vocab_size)],
            ),
        ];
        let kv = vec![None, fixed(m.num_kv_heads), None, fixed(m.head_dim)];
        for spec in g.decoder.inputs[3..].iter().chain(&g.decoder.outputs[1..]) {
            expected.push(("decoder", spec, kv.clone()));
        }
        for (graph, spec, dims) in expected {
            let shape: Vec<String> = spec.shape.iter().map(|d| d.to_string()).collect();
            if spec.shape.len() != dims.len() {
                return Err(format!(
                    "graph {graph} {:?} has shape [{}], expected rank {}",
                    spec.name,
                    shape.join(", "),
                    dims.len()
                ));
            }
            for (axis, (dim, want)) in spec.shape.iter().zip(&dims).enumerate() {
                if let (Dim::Fixed(found), Some(want)) = (dim, want) {
                    if found != want {
                        return Err(format!(
                            "graph {graph} {:?} has shape [{}]: dim {axis} is {found}, the model settings say {want}",
                            spec.name,
                            shape.join(", ")
                        ));
                    }
                }
                if let Dim::Fixed(found) = dim {
                    if *found <= 0 {
                        return Err(format!(
                            "graph {graph} {:?} has shape [{}]: dim {axis} must be positive",
                            spec.name,
                            shape.join(", ")
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// The float type graphs take and give in this export.
    pub fn float_dtype(&self) -> TensorDtype {
        match self.dtype {
            ModelDtype::Fp32 => TensorDtype::Float32,
            ModelDtype::Fp16 => TensorDtype::Float16,
        }
    }

    /// The (width, height) every image is resized to before the vision graph, when the layout has
    /// one: images may be decoded straight to it. MiniCPM-V slices each image from its own size.
    pub fn image_size(&self) -> Option<(u32, u32)> {
        match self.minicpmv {
            Some(_) => None,
            None => Some((self.image.width, self.image.height)),
        }
    }
}

fn expect_io(
    graph: &str,
    spec: &GraphSpec,
    inputs: usize,
    outputs: usize,
) -> std::result::Result<(), String> {
    if spec.inputs.len() != inputs || spec.outputs.len() != outputs {
        return Err(format!(
            "graph {graph} lists {} inputs and {} outputs, expected {inputs} and {outputs}",
            spec.inputs.len(),
            spec.outputs.len()
        ));
    }
    Ok(())
}

/// Joins a file name from the manifest to the model directory, refusing anything that could leave it.
pub fn resolve_inside(dir: &Path, name: &str) -> Result<PathBuf> {
    let rel = Path::new(name);
    let plain = !name.is_empty() && rel.components().all(|c| matches!(c, Component::Normal(_)));
    if !plain {
        return Err(Error::Model {
            dir: dir.to_path_buf(),
            reason: format!(
                "file name {name:?} must be a relative path inside the model directory"
            ),
        });
    }
    Ok(dir.join(rel))
}

/// Largest `max_slice_nums` a manifest may declare (2.5 uses 9).
pub const MAX_SLICES: u32 = 64;

/// The manifest's `minicpmv` section: slicing and the prompt layout's special tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MiniCpmvSettings {
    /// Feature rows per slice (the resampler's queries; 96 in 2.5).
    pub query_num: usize,
    pub max_slice_nums: u32,
    /// A slice holds about `scale_resolution²` pixels.
    pub scale_resolution: u32,
    pub patch_size: u32,
    pub image_start_token: String,
    pub image_start_token_id: u32,
    pub image_end_token: String,
    pub image_end_token_id: u32,
    pub slice_start_token: String,
    pub slice_start_token_id: u32,
    pub slice_end_token: String,
    pub slice_end_token_id: u32,
}

impl MiniCpmvSettings {
    pub fn validate(&self, max_side: u32) -> std::result::Result<(), String> {
        if self.query_num == 0 || self.patch_size == 0 || self.scale_resolution == 0 {
            return Err(
                "minicpmv query_num, patch_size and scale_resolution must be positive".into(),
            );
        }
        if self.scale_resolution > max_side || self.patch_size > self.scale_resolution {
            return Err(format!(
                "minicpmv scale_resolution {} must be at most {max_side} and at least patch_size {}",
                self.scale_resolution, self.patch_size
            ));
        }
        if !(1..=MAX_SLICES).contains(&self.max_slice_nums) {
            return Err(format!(
                "minicpmv max_slice_nums {} must be in 1..={MAX_SLICES}",
                self.max_slice_nums
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_leave_the_directory_are_refused() {
        let dir = Path::new("/models/m");
        for bad in ["../x.onnx", "/etc/passwd", "a/../../b", ""] {
            assert!(resolve_inside(dir, bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            resolve_inside(dir, "vision.onnx").ok(),
            Some(dir.join("vision.onnx"))
        );
    }

    #[test]
    fn quantization_parses_and_unknown_methods_are_refused() {
        let q: Quantization = serde_json::from_str(
            r#"{"method": "int4", "block_size": 32, "symmetric": true, "accuracy_level": 4, "graphs": ["decoder"]}"#,
        )
        .unwrap();
        assert_eq!(q.method, QuantMethod::Int4);
        assert_eq!(q.block_size, 32);
        assert_eq!(
            q.to_string(),
            "int4 weights, block 32, symmetric, accuracy level 4 in decoder"
        );
        let unknown = r#"{"method": "int3", "block_size": 32, "graphs": ["decoder"]}"#;
        assert!(serde_json::from_str::<Quantization>(unknown).is_err());
    }

    #[test]
    fn symbolic_and_fixed_dims_parse() {
        let dims: Vec<Dim> = serde_json::from_str(r#"["batch", 3, 384]"#).unwrap();
        assert_eq!(
            dims,
            vec![
                Dim::Symbolic("batch".into()),
                Dim::Fixed(3),
                Dim::Fixed(384)
            ]
        );
    }

    /// The documents of `onnx/manifest-examples/cases.json`: the runtime accepts exactly those the case
    /// says it does, with the message it names (tests/python/test_manifest_schema.py holds the JSON
    /// Schema to the same cases).
    #[test]
    fn schema_cases_are_accepted_or_refused_as_listed() {
        let base: serde_json::Value =
            serde_json::from_str(include_str!("../../onnx/manifest-examples/valid.json"))
                .unwrap_or_else(|e| panic!("valid.json: {e}"));
        let cases: Vec<serde_json::Value> =
            serde_json::from_str(include_str!("../../onnx/manifest-examples/cases.json"))
                .unwrap_or_else(|e| panic!("cases.json: {e}"));
        assert!(cases.len() > 20);
        for case in &cases {
            let name = case["name"].as_str().unwrap_or_default();
            let mut doc = base.clone();
            for pointer in case["remove"].as_array().into_iter().flatten() {
                let pointer = pointer.as_str().unwrap_or_default();
                let (parent, key) = pointer.rsplit_once('/').unwrap_or_default();
                if let Some(serde_json::Value::Object(map)) = doc.pointer_mut(parent) {
                    map.remove(key);
                } else {
                    panic!("{name}: no object at {parent}");
                }
            }
            for (pointer, value) in case["set"].as_object().into_iter().flatten() {
                set_pointer(&mut doc, pointer, value.clone());
            }
            let result = Manifest::parse(&doc.to_string());
            let accepted = case["runtime"].as_bool().unwrap_or_default();
            match (result, accepted) {
                (Ok(_), true) => {}
                (Err(e), false) => {
                    let message = case["message"].as_str().unwrap_or_default();
                    assert!(e.contains(message), "{name}: {e:?} lacks {message:?}");
                }
                (Ok(_), false) => panic!("{name}: accepted"),
                (Err(e), true) => panic!("{name}: refused: {e}"),
            }
        }
    }

    /// Sets the value at a JSON pointer; an index one past an array's end appends.
    fn set_pointer(doc: &mut serde_json::Value, pointer: &str, value: serde_json::Value) {
        let (parent, key) = pointer.rsplit_once('/').unwrap_or_default();
        match doc.pointer_mut(parent) {
            Some(serde_json::Value::Object(map)) => {
                map.insert(key.to_owned(), value);
            }
            Some(serde_json::Value::Array(items)) => {
                let index: usize = key.parse().unwrap_or_else(|e| panic!("{pointer}: {e}"));
                if index == items.len() {
                    items.push(value);
                } else {
                    items[index] = value;
                }
            }
            _ => panic!("{pointer}: no object or array at {parent}"),
        }
    }
}
