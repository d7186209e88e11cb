//! `manifest.json`: the versioned contract between export and runtime (see `onnx/README.md`).
//!
//! Everything the runtime needs to know about a model directory comes from here; tensor names are taken
//! from each graph's ordered input/output lists and never re-spelled elsewhere.

use std::fs;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::minicpmv::MiniCpmvSettings;
use crate::onnx_file;
use crate::preprocess::PreprocessConfig;

pub const MANIFEST_FILE: &str = "manifest.json";
pub const FORMAT: &str = "llama3v-model";
pub const FORMAT_VERSION: u32 = 1;
/// Largest image height or width a manifest may ask preprocessing for.
pub const MAX_IMAGE_SIDE: u32 = 8192;
/// Largest decoder depth a manifest may declare.
pub const MAX_LAYERS: usize = 4096;

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
    /// Reads and validates `<dir>/manifest.json` and checks that every file it names is inside `dir`.
    pub fn load(dir: &Path, options: LoadOptions) -> Result<Manifest> {
        if !dir.is_dir() {
            return Err(Error::Model {
                dir: dir.to_path_buf(),
                reason: "not a directory (export a checkpoint with llama3v-export first)".into(),
            });
        }
        let path = dir.join(MANIFEST_FILE);
        let text = fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let manifest = Manifest::parse(&text).map_err(|reason| Error::Manifest { path, reason })?;
        manifest.check_files(dir, options)?;
        Ok(manifest)
    }

    /// Parses manifest JSON and checks it against itself (no files are read): the part of
    /// [`Manifest::load`] that untrusted text alone reaches, and what the manifest fuzz target drives.
    pub fn parse(text: &str) -> std::result::Result<Manifest, String> {
        let manifest: Manifest = serde_json::from_str(text).map_err(|e| e.to_string())?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// Consistency of the manifest with itself: the contract's shape rules.
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
        let m = &self.model;
        if m.num_layers == 0 || m.num_kv_heads == 0 || m.head_dim == 0 || m.vocab_size == 0 {
            return Err("model dims must be positive".into());
        }
        if !m.num_attention_heads.is_multiple_of(m.num_kv_heads) {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_kv_heads {}",
                m.num_attention_heads, m.num_kv_heads
            ));
        }
        // Bounds the graph's input/output counts computed from it (and keeps that arithmetic exact).
        if m.num_layers > MAX_LAYERS {
            return Err(format!(
                "num_layers {} is over the limit of {MAX_LAYERS}",
                m.num_layers
            ));
        }
        if let Some(q) = &self.quantization {
            if q.block_size < 16 || !q.block_size.is_power_of_two() {
                return Err(format!(
                    "quantization.block_size {} is not a power of two of at least 16",
                    q.block_size
                ));
            }
            if let Some(name) = q.graphs.iter().find(|g| {
                !self
                    .graphs
                    .named()
                    .iter()
                    .any(|(known, _)| known == &g.as_str())
            }) {
                return Err(format!(
                    "quantization.graphs names an unknown graph {name:?}"
                ));
            }
        }
        match (self.layout, &self.minicpmv) {
            (Layout::Llava, None) => {}
            (Layout::Minicpmv, Some(settings)) => {
                settings.validate(MAX_IMAGE_SIDE)?;
                if settings.query_num != self.image.tokens_per_image {
                    return Err(format!(
                        "minicpmv query_num {} differs from image.tokens_per_image {}",
                        settings.query_num, self.image.tokens_per_image
                    ));
                }
            }
            (Layout::Llava, Some(_)) => {
                return Err("a minicpmv section in a llava layout manifest".into())
            }
            (Layout::Minicpmv, None) => {
                return Err("layout minicpmv needs the minicpmv section".into())
            }
        }
        expect_io("vision", &self.graphs.vision, 1, 1)?;
        expect_io("embed", &self.graphs.embed, 1, 1)?;
        let kv = 2 * m.num_layers;
        expect_io("decoder", &self.graphs.decoder, 3 + kv, 1 + kv)?;
        let img = &self.image;
        if img.height == 0 || img.width == 0 || img.tokens_per_image == 0 {
            return Err("image height, width and tokens_per_image must be positive".into());
        }
        if img.std.iter().any(|s| *s == 0.0 || !s.is_finite()) {
            return Err(format!(
                "image std {:?} must be finite and non-zero",
                img.std
            ));
        }
        if img.image_token_id as usize >= m.vocab_size {
            return Err(format!(
                "image_token_id {} is outside the vocabulary of {}",
                img.image_token_id, m.vocab_size
            ));
        }
        if self.text.stop_token_ids.is_empty() {
            return Err("text.stop_token_ids is empty".into());
        }
        if m.hidden_size == 0 || m.num_attention_heads == 0 || m.max_context == 0 {
            return Err("model dims must be positive".into());
        }
        // Preprocessing allocates 3 x height x width floats per image from these numbers.
        if img.height > MAX_IMAGE_SIDE || img.width > MAX_IMAGE_SIDE {
            return Err(format!(
                "image size {}x{} is over the limit of {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE}",
                img.width, img.height
            ));
        }
        if img.tokens_per_image >= m.max_context {
            return Err(format!(
                "tokens_per_image {} does not fit in max_context {}",
                img.tokens_per_image, m.max_context
            ));
        }
        self.validate_shapes()
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

    /// Every file the manifest names must be a plain relative name inside `dir`, exist, and (optionally)
    /// match its sha256.
    fn check_files(&self, dir: &Path, options: LoadOptions) -> Result<()> {
        let mut files: Vec<(&str, Option<&str>)> = vec![(self.text.tokenizer_file.as_str(), None)];
        for graph in [
            &self.graphs.vision,
            &self.graphs.embed,
            &self.graphs.decoder,
        ] {
            files.push((&graph.file, Some(&graph.sha256)));
            for ext in &graph.external_data {
                files.push((&ext.file, Some(&ext.sha256)));
            }
        }
        let model_error = |reason: String| Error::Model {
            dir: dir.to_path_buf(),
            reason,
        };
        let canonical_dir = fs::canonicalize(dir).map_err(|e| Error::io(dir, e))?;
        for (name, digest) in files {
            let path = resolve_inside(dir, name)?;
            if !path.is_file() {
                return Err(Error::Model {
                    dir: dir.to_path_buf(),
                    reason: format!("{name} is missing"),
                });
            }
            // A symlink or hard link inside the directory could still name a file outside it.
            onnx_file::check_plain_file(&canonical_dir, &path).map_err(model_error)?;
            if let (true, Some(expected)) = (options.verify_hashes, digest) {
                let found = sha256_file(&path)?;
                if !found.eq_ignore_ascii_case(expected) {
                    return Err(Error::Model {
                        dir: dir.to_path_buf(),
                        reason: format!("{name}: sha256 is {found}, the manifest says {expected}"),
                    });
                }
            }
        }
        // Before any session exists: external-data references, then declared inputs and outputs.
        for (name, graph) in self.graphs.named() {
            let path = resolve_inside(dir, &graph.file)?;
            let listed: Vec<&str> = graph
                .external_data
                .iter()
                .map(|f| f.file.as_str())
                .collect();
            let info = onnx_file::check_graph_file(dir, &path, &listed).map_err(model_error)?;
            onnx_file::check_graph_io(graph, &info).map_err(|reason| Error::Graph {
                graph: name.into(),
                reason: format!("{}: {reason}", graph.file),
            })?;
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

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
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
}
