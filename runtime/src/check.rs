//! `check`: the runtime against the transformers reference stored by `llama3v-export --reference`.
//!
//! Each stage is measured on the reference's own inputs, so a difference is pinned to one stage:
//! tokenization (ids must be equal), preprocessing (pixel values), the vision graph (features from the
//! reference pixel values), and the decoder (logits of every greedy step, teacher-forced with the
//! reference tokens from the reference prompt, so one early difference does not hide the later steps).

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::chat_template::ChatMessage;
use crate::error::{Error, Result};
use crate::manifest::{resolve_inside, Manifest, ModelDtype, QuantMethod};
use crate::model::Model;
use crate::preprocess::{load_image, DecodeLimits};
use crate::request::single_turn;
use crate::sampling::argmax;
use crate::vision::ImageBatch;

pub(crate) const REFERENCE_DIR: &str = "reference";
const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct ReferenceIndex {
    pub(crate) format_version: u32,
    pub(crate) cases: Vec<ReferenceCase>,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct ReferenceCase {
    pub(crate) name: String,
    #[serde(default)]
    pub(crate) system: Option<String>,
    pub(crate) prompt: String,
    #[serde(default)]
    pub(crate) images: Vec<String>,
    pub(crate) tensors: String,
    pub(crate) greedy_tokens: Vec<u32>,
}

impl ReferenceCase {
    /// The conversation the case was computed from: optional system turn, then one user turn with the
    /// images before the prompt text.
    pub(crate) fn messages(&self) -> Vec<ChatMessage> {
        single_turn(self.system.as_deref(), self.images.len(), &self.prompt)
    }
}

/// The tolerances a model directory is checked against; they depend on the export's dtype.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Tolerances {
    /// Max abs diff of pixel values (one uint8 level after normalisation with std 0.5).
    pub pixel_values: f32,
    /// Max abs diff (fp32) or max abs diff relative to the reference's max abs value (fp16).
    pub image_features: f32,
    pub logits: f32,
    /// fp32 requires every greedy token to agree; fp16 reports agreement only.
    pub require_token_agreement: bool,
    /// int4: the reference's greedy token must be among our `top_k` largest logits on at least
    /// `min_top_k` of the teacher-forced steps (0: not measured).
    pub top_k: usize,
    pub min_top_k: f64,
    pub relative: bool,
}

/// int4 (weight-only, decoder), the exporter's bounds (llama3v_export/validate.py; onnx/README.md
/// "Quantized exports"): logits within this fraction of the reference's largest logit, and the
/// reference token among our 10 largest logits on half the teacher-forced steps. Top-1 agreement is
/// reported only: random-weight logits are nearly flat and int4 noise reorders their first places.
pub(crate) const INT4_LOGITS_RELATIVE: f32 = 0.75;
pub(crate) const INT4_TOP_K: usize = 10;
pub(crate) const INT4_MIN_TOP_K: f64 = 0.5;

impl Tolerances {
    /// The dtype's tolerances, or the quantization's where the manifest records one. A quantized
    /// decoder's logits are judged relatively; its float vision graph keeps the dtype's bound.
    pub fn for_manifest(manifest: &Manifest) -> Tolerances {
        let base = Tolerances::for_dtype(manifest.dtype);
        match &manifest.quantization {
            Some(q) if q.graphs.iter().any(|g| g == "decoder") => match q.method {
                QuantMethod::Int4 => Tolerances {
                    logits: INT4_LOGITS_RELATIVE,
                    require_token_agreement: false,
                    top_k: INT4_TOP_K,
                    min_top_k: INT4_MIN_TOP_K,
                    relative: true,
                    // The vision graph stays float: its dtype's bound, then taken relative to the
                    // largest feature (for fp32 still 1e-4, a real check of an unquantized graph).
                    ..base
                },
            },
            _ => base,
        }
    }

    pub fn for_dtype(dtype: ModelDtype) -> Tolerances {
        match dtype {
            ModelDtype::Fp32 => Tolerances {
                pixel_values: 1.0 / 127.5,
                image_features: 1e-4,
                logits: 1e-4,
                require_token_agreement: true,
                top_k: 0,
                min_top_k: 0.0,
                relative: false,
            },
            ModelDtype::Fp16 => Tolerances {
                pixel_values: 1.0 / 127.5,
                image_features: 1e-2,
                logits: 1e-2,
                require_token_agreement: false,
                top_k: 0,
                min_top_k: 0.0,
                relative: true,
            },
        }
    }
}

/// One measured quantity beside its tolerance.
#[derive(Debug, Clone, Serialize)]
pub struct Measure {
    pub stage: String,
    pub measured: f64,
    pub tolerance: f64,
    pub pass: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct CaseReport {
    pub case: String,
    pub measures: Vec<Measure>,
    pub greedy_agreement: usize,
    pub greedy_steps: usize,
}

impl CaseReport {
    pub fn pass(&self) -> bool {
        self.measures.iter().all(|m| m.pass)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub model: PathBuf,
    pub dtype: ModelDtype,
    pub tolerances: Tolerances,
    pub cases: Vec<CaseReport>,
}

impl CheckReport {
    pub fn pass(&self) -> bool {
        !self.cases.is_empty() && self.cases.iter().all(CaseReport::pass)
    }
}

pub(crate) fn load_reference(dir: &Path) -> Result<ReferenceIndex> {
    let path = dir.join(REFERENCE_DIR).join("reference.json");
    let text = fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let index: ReferenceIndex = serde_json::from_str(&text).map_err(|e| Error::Reference {
        case: "reference.json".into(),
        reason: e.to_string(),
    })?;
    if index.format_version != FORMAT_VERSION {
        return Err(Error::Reference {
            case: "reference.json".into(),
            reason: format!(
                "format_version {} is not supported (expected {FORMAT_VERSION})",
                index.format_version
            ),
        });
    }
    Ok(index)
}

/// The tensors of one case, as f32 / i64 vectors with their shapes.
struct CaseTensors {
    input_ids: Vec<u32>,
    pixel_values: Option<(Vec<usize>, Vec<f32>)>,
    /// MiniCPM-V: each slice's pixel values `[3, H, W]` (`pixel_values.{i}`), in prompt order.
    slice_pixels: Vec<(Vec<usize>, Vec<f32>)>,
    image_features: Option<(Vec<usize>, Vec<f32>)>,
    step_logits: (Vec<usize>, Vec<f32>),
}

fn load_tensors(dir: &Path, case: &ReferenceCase) -> Result<CaseTensors> {
    let err = |reason: String| Error::Reference {
        case: case.name.clone(),
        reason,
    };
    let path = resolve_inside(&dir.join(REFERENCE_DIR), &case.tensors)?;
    let bytes = fs::read(&path).map_err(|e| Error::io(&path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| err(format!("{}: {e}", path.display())))?;
    let floats = |name: &str| -> Result<Option<(Vec<usize>, Vec<f32>)>> {
        let Ok(view) = st.tensor(name) else {
            return Ok(None);
        };
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(err(format!("{name} is {:?}, expected F32", view.dtype())));
        }
        let data = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Ok(Some((view.shape().to_vec(), data)))
    };
    let ids_view = st
        .tensor("input_ids")
        .map_err(|e| err(format!("input_ids: {e}")))?;
    if ids_view.dtype() != safetensors::Dtype::I64 {
        return Err(err(format!(
            "input_ids is {:?}, expected I64",
            ids_view.dtype()
        )));
    }
    let input_ids = ids_view
        .data()
        .chunks_exact(8)
        .map(|b| {
            let v = i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
            u32::try_from(v).map_err(|_| err(format!("input id {v} out of range")))
        })
        .collect::<Result<Vec<u32>>>()?;
    let step_logits = floats("step_logits")?.ok_or_else(|| err("step_logits missing".into()))?;
    let mut slice_pixels = Vec::new();
    while let Some(slice) = floats(&format!("pixel_values.{}", slice_pixels.len()))? {
        slice_pixels.push(slice);
    }
    Ok(CaseTensors {
        input_ids,
        pixel_values: floats("pixel_values")?,
        slice_pixels,
        image_features: floats("image_features")?,
        step_logits,
    })
}

/// The reference's slices (`[3, H, W]` each) as one batch of `images` images.
fn slice_batch(slices: &[(Vec<usize>, Vec<f32>)], images: usize) -> ImageBatch {
    let mut batch = ImageBatch {
        images,
        ..ImageBatch::default()
    };
    for (shape, values) in slices {
        let dim = |i: usize| shape.get(i).copied().unwrap_or(0) as u32;
        batch.values.extend_from_slice(values);
        batch.push_slice(dim(1), dim(2));
    }
    batch
}

/// Max abs diff of two equally long slices; infinite when the lengths differ or a value is not finite.
pub(crate) fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let d = (f64::from(*x) - f64::from(*y)).abs();
            if d.is_nan() {
                f64::INFINITY
            } else {
                d
            }
        })
        .fold(0.0, f64::max)
}

/// How many entries of `row` are larger than entry `index` (0: it is the largest); a missing or NaN
/// entry ranks last.
pub(crate) fn rank_of(row: &[f32], index: usize) -> usize {
    match row.get(index) {
        Some(&v) if !v.is_nan() => row.iter().filter(|&&x| x > v).count(),
        _ => row.len(),
    }
}

/// Max abs diff of two outputs, or relative to `b`'s largest magnitude when the tolerances are relative.
pub(crate) fn measure(
    stage: &str,
    a: &[f32],
    b: &[f32],
    tolerance: f32,
    relative: bool,
) -> Measure {
    let diff = max_abs_diff(a, b);
    let (measured, detail) = if relative {
        let scale = b
            .iter()
            .map(|x| f64::from(x.abs()))
            .fold(0.0, f64::max)
            .max(f64::MIN_POSITIVE);
        (
            diff / scale,
            format!("max abs diff {diff:.3e}, relative to max |reference| {scale:.3e}"),
        )
    } else {
        (diff, "max abs diff".to_string())
    };
    Measure {
        stage: stage.into(),
        measured,
        tolerance: f64::from(tolerance),
        pass: measured <= f64::from(tolerance),
        detail,
    }
}

impl Model {
    /// Runs every reference case of the model directory and measures each stage.
    pub fn check_reference(&self) -> Result<CheckReport> {
        let index = load_reference(&self.dir)?;
        let tolerances = Tolerances::for_manifest(&self.manifest);
        let mut cases = Vec::new();
        for case in &index.cases {
            cases.push(self.check_case(case, tolerances)?);
        }
        Ok(CheckReport {
            model: self.dir.clone(),
            dtype: self.manifest.dtype,
            tolerances,
            cases,
        })
    }

    fn check_case(&self, case: &ReferenceCase, tol: Tolerances) -> Result<CaseReport> {
        let reference = load_tensors(&self.dir, case)?;
        let mut measures = Vec::new();
        // Pixel values are compared absolutely whatever the dtype: preprocessing runs in f32 either way.
        let compare = |stage: &str, ours: &[f32], theirs: &[f32], tolerance: f32| {
            measure(
                stage,
                ours,
                theirs,
                tolerance,
                tol.relative && stage != "pixel_values",
            )
        };

        let limits = DecodeLimits::default();
        let ref_dir = self.dir.join(REFERENCE_DIR);
        let images = case
            .images
            .iter()
            .map(|name| load_image(&resolve_inside(&ref_dir, name)?, &limits))
            .collect::<Result<Vec<_>>>()?;

        // Tokenization and chat template.
        let ids = self.prompt_ids(&case.messages(), &images)?;
        let mismatched = if ids.len() == reference.input_ids.len() {
            ids.iter()
                .zip(&reference.input_ids)
                .filter(|(a, b)| a != b)
                .count()
        } else {
            ids.len().max(reference.input_ids.len())
        };
        measures.push(Measure {
            stage: "input_ids".into(),
            measured: mismatched as f64,
            tolerance: 0.0,
            pass: mismatched == 0,
            detail: format!(
                "differing ids ({} runtime, {} reference)",
                ids.len(),
                reference.input_ids.len()
            ),
        });

        // Preprocessing, then the vision graph on the reference's pixel values.
        let mut features = Vec::new();
        let reference_pixels = match (&reference.pixel_values, reference.slice_pixels.is_empty()) {
            (Some((shape, values)), _) => {
                let dim = |i: usize| shape.get(i).copied().unwrap_or(0);
                let (h, w) = (dim(2) as u32, dim(3) as u32);
                Some(ImageBatch::uniform(values.clone(), dim(0), h, w))
            }
            (None, false) => Some(slice_batch(&reference.slice_pixels, images.len())),
            (None, true) => None,
        };
        if let Some(reference_pixels) = reference_pixels {
            let ours = self.pixel_values(&images);
            // Slices of other sizes than the reference's are a preprocessing mismatch too.
            let mut pixels = compare("pixel_values", &ours, &reference_pixels, tol.pixel_values);
            if ours.runs != reference_pixels.runs {
                pixels.measured = f64::INFINITY;
                pixels.pass = false;
                pixels.detail = format!(
                    "slice sizes differ: {:?} runtime, {:?} reference",
                    ours.runs, reference_pixels.runs
                );
            }
            measures.push(pixels);
            features = self
                .sessions
                .image_features(&reference_pixels, images.len())?;
            if let Some((_, ref_features)) = &reference.image_features {
                measures.push(compare(
                    "image_features",
                    &features,
                    ref_features,
                    tol.image_features,
                ));
            }
        }

        // Decoder: prefill on the reference prompt, then teacher-forced steps with the reference tokens.
        let (logit_shape, ref_logits) = &reference.step_logits;
        let vocab = logit_shape.get(1).copied().unwrap_or(0);
        let steps = case.greedy_tokens.len();
        if vocab == 0 || logit_shape[0] != steps {
            return Err(Error::Reference {
                case: case.name.clone(),
                reason: format!("step_logits has shape {logit_shape:?}, expected [{steps}, vocab]"),
            });
        }
        let embeds = self
            .sessions
            .prompt_embeddings(&reference.input_ids, &features)?;
        let mut logits = Vec::new();
        let mut cache =
            self.sessions
                .prefill(&embeds, reference.input_ids.len(), steps, &mut logits)?;
        let mut worst = 0.0f64;
        let mut worst_step = 0;
        let mut agreement = 0;
        let mut within_top_k = 0;
        for (step, &token) in case.greedy_tokens.iter().enumerate() {
            if step > 0 {
                self.sessions
                    .step(case.greedy_tokens[step - 1], &mut cache, &mut logits)?;
            }
            let row = &ref_logits[step * vocab..(step + 1) * vocab];
            let m = compare("logits", &logits, row, tol.logits);
            if m.measured > worst {
                worst = m.measured;
                worst_step = step;
            }
            if !logits.is_empty() && argmax(&logits) == token {
                agreement += 1;
            }
            if tol.top_k > 0 && rank_of(&logits, token as usize) < tol.top_k {
                within_top_k += 1;
            }
        }
        let logits_measure = Measure {
            stage: "step_logits".into(),
            measured: worst,
            tolerance: f64::from(tol.logits),
            pass: worst <= f64::from(tol.logits),
            detail: format!(
                "worst over {steps} steps (prefill + decode), at step {worst_step}{}",
                if tol.relative { ", relative" } else { "" }
            ),
        };
        measures.push(logits_measure);
        // Disagreeing steps allowed: none (fp32), or any (fp16 and int4 report them).
        let allowed = if tol.require_token_agreement {
            0.0
        } else {
            steps as f64
        };
        let disagree = (steps - agreement) as f64;
        measures.push(Measure {
            stage: "greedy_tokens".into(),
            measured: disagree,
            tolerance: allowed,
            pass: disagree <= allowed,
            detail: format!("{agreement}/{steps} greedy tokens agree"),
        });
        if tol.top_k > 0 {
            let missed = (steps - within_top_k) as f64;
            let allowed = ((1.0 - tol.min_top_k) * steps as f64 + 1e-9).floor();
            measures.push(Measure {
                stage: "greedy_top_k".into(),
                measured: missed,
                tolerance: allowed,
                pass: missed <= allowed,
                detail: format!(
                    "steps whose reference token is outside our {} largest logits ({within_top_k}/{steps} within, minimum {:.2})",
                    tol.top_k, tol.min_top_k
                ),
            });
        }
        Ok(CaseReport {
            case: case.name.clone(),
            measures,
            greedy_agreement: agreement,
            greedy_steps: steps,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diffs_and_ranks() {
        assert_eq!(max_abs_diff(&[1.0, 2.0], &[1.5, 1.0]), 1.0);
        assert!(max_abs_diff(&[1.0], &[1.0, 2.0]).is_infinite());
        assert!(max_abs_diff(&[f32::NAN], &[1.0]).is_infinite());
        assert_eq!(rank_of(&[0.1, 0.7, 0.5], 1), 0);
        assert_eq!(rank_of(&[0.1, 0.7, 0.5], 0), 2);
        assert_eq!(rank_of(&[0.1, 0.7], 5), 2);
        assert_eq!(rank_of(&[f32::NAN, 0.7], 0), 2);
    }
}
