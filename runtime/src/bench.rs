//! Benchmarks of a loaded model on synthetic input: vision, prefill, time to first token, decode at a
//! short and a long context, the runtime's own overhead per decode step, and peak resident memory.
//!
//! Prompts are random token ids and images random pixels, so any model directory can be measured
//! without data. Every figure is the median of several repetitions after a warm-up run.

use std::path::Path;
use std::time::{Duration, Instant};

use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::manifest::resolve_inside;
use crate::model::Model;
use crate::request::admit;
use crate::sampling::argmax;

#[derive(Debug, Clone, Serialize)]
pub struct BenchConfig {
    /// Text tokens in the prompt of the prefill / time-to-first-token measurement (images come on top).
    pub prompt_tokens: usize,
    /// Decode steps timed at each context length.
    pub new_tokens: usize,
    /// Images encoded in one vision run and spliced into the prefill prompt.
    pub images: usize,
    /// Context lengths (tokens already in the cache) at which decode is measured; capped so that
    /// context + new tokens fits the model's max context.
    pub contexts: Vec<usize>,
    /// Timed repetitions of the vision, prefill and time-to-first-token measurements.
    pub repeats: usize,
    pub seed: u64,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            prompt_tokens: 128,
            new_tokens: 32,
            images: 1,
            contexts: vec![128, 2048],
            repeats: 3,
            seed: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DecodePoint {
    /// Tokens in the cache when the first timed step runs.
    pub context: usize,
    pub steps: usize,
    pub tokens_per_s: f64,
    /// Median wall time of one step (embedding run + decoder run + argmax).
    pub step_ms: f64,
    /// Median time inside ONNX Runtime's decoder run.
    pub ort_run_ms: f64,
    /// Median of (step wall time - decoder run time): the embedding graph's run, building inputs,
    /// reading logits, argmax.
    pub overhead_us: f64,
    pub overhead_pct: f64,
}

/// Resident memory after a phase of the benchmark: the peak so far is monotone, so the phase whose
/// reading raised it is the one that set the peak.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryPoint {
    pub phase: String,
    /// VmRSS after the phase.
    pub rss_bytes: Option<u64>,
    /// VmHWM after the phase.
    pub peak_rss_bytes: Option<u64>,
    /// Of VmRSS: anonymous memory (activations, copies of weights) and file pages (weights mapped from
    /// external data files, read in as they are used).
    pub rss_anon_bytes: Option<u64>,
    pub rss_file_bytes: Option<u64>,
}

impl MemoryPoint {
    fn now(phase: String) -> MemoryPoint {
        MemoryPoint {
            phase,
            rss_bytes: proc_status_bytes("VmRSS:"),
            peak_rss_bytes: peak_rss_bytes(),
            rss_anon_bytes: proc_status_bytes("RssAnon:"),
            rss_file_bytes: proc_status_bytes("RssFile:"),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub dtype: String,
    pub providers: Vec<String>,
    pub threads: Option<usize>,
    pub config: BenchConfig,
    pub image_tokens: usize,
    /// Median vision run for all images in one batch, and per image.
    pub vision_batch_ms: f64,
    pub vision_ms_per_image: f64,
    /// Tokens in the prefill run (text + image tokens).
    pub prefill_tokens: usize,
    pub prefill_ms: f64,
    pub prefill_tokens_per_s: f64,
    /// Images -> features, embeddings, prefill, first greedy token.
    pub ttft_ms: f64,
    pub decode: Vec<DecodePoint>,
    /// Bytes of the graph files (weights dominate).
    pub weight_bytes: u64,
    /// Weight bytes of the decoder graph: what one decode step has to read at least once.
    pub decoder_weight_bytes: u64,
    /// KV cache bytes at the largest measured context.
    pub kv_cache_bytes: u64,
    /// VmHWM of this process at the end (Linux only).
    pub peak_rss_bytes: Option<u64>,
    /// Resident and peak memory after loading, after the prefill runs and after each decode context.
    pub memory: Vec<MemoryPoint>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let mid = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    }
}

/// Peak resident set size of this process from /proc/self/status (`VmHWM`).
pub(crate) fn peak_rss_bytes() -> Option<u64> {
    proc_status_bytes("VmHWM:")
}

/// A `kB` field of /proc/self/status, in bytes (Linux only).
fn proc_status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn file_bytes(dir: &Path, name: &str) -> Result<u64> {
    let path = resolve_inside(dir, name)?;
    Ok(std::fs::metadata(&path)
        .map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?
        .len())
}

/// Random prompts and images for a model.
pub(crate) struct Synthetic {
    rng: ChaCha8Rng,
    /// Token ids drawn from `0..vocab`, never the image token.
    vocab: u32,
    image_token: u32,
}

impl Synthetic {
    pub(crate) fn new(model: &Model, seed: u64) -> Synthetic {
        // The tokenizer's ids are the ones a real prompt uses; the model's vocabulary may be larger.
        let vocab = model
            .tokenizer
            .vocab_size()
            .min(model.manifest.model.vocab_size)
            .max(2);
        Synthetic {
            rng: ChaCha8Rng::seed_from_u64(seed),
            vocab: vocab as u32,
            image_token: model.manifest.image.image_token_id,
        }
    }

    pub(crate) fn ids(&mut self, n: usize) -> Vec<u32> {
        (0..n)
            .map(|_| loop {
                let id = self.rng.random_range(0..self.vocab);
                if id != self.image_token {
                    break id;
                }
            })
            .collect()
    }

    pub(crate) fn image(&mut self, width: u32, height: u32) -> RgbImage {
        RgbImage::from_fn(width, height, |_, _| {
            Rgb([self.rng.random(), self.rng.random(), self.rng.random()])
        })
    }
}

impl Model {
    /// Runs the benchmark; `progress` receives a line per phase.
    pub fn bench(
        &self,
        config: &BenchConfig,
        threads: Option<usize>,
        progress: &mut dyn FnMut(&str),
    ) -> Result<BenchReport> {
        let sessions = &self.sessions;
        let manifest = &self.manifest;
        let max_context = self.max_context();
        let image = &manifest.image;
        let image_tokens = config.images * image.tokens_per_image;
        let prefill_tokens = config.prompt_tokens + image_tokens;
        if prefill_tokens == 0 {
            return Err(Error::ContextOverflow {
                prompt_tokens: prefill_tokens,
                max_new_tokens: 1,
                max_context,
            });
        }
        admit(self, prefill_tokens, config.images, 1)?;
        let repeats = config.repeats.max(1);
        let mut synth = Synthetic::new(self, config.seed);

        let mut memory = vec![MemoryPoint::now("loaded".into())];

        // Vision + prefill + first token; the first pass warms up.
        let images: Vec<RgbImage> = (0..config.images)
            .map(|_| synth.image(image.width, image.height))
            .collect();
        let mut ids = vec![manifest.text.bos_token_id];
        ids.extend(std::iter::repeat_n(image.image_token_id, image_tokens));
        ids.extend(synth.ids(config.prompt_tokens.saturating_sub(1)));
        let mut vision_ms = Vec::new();
        let mut prefill_ms = Vec::new();
        let mut ttft_ms = Vec::new();
        let mut logits = Vec::new();
        for rep in 0..=repeats {
            progress(&format!(
                "prefill {}/{repeats}: {} images, {prefill_tokens} tokens",
                rep, config.images
            ));
            let start = Instant::now();
            let pixels = self.pixel_values(&images);
            let t = Instant::now();
            let features = sessions.image_features(&pixels, config.images)?;
            let vision = t.elapsed();
            let t = Instant::now();
            let embeds = sessions.prompt_embeddings(&ids, &features)?;
            let cache = sessions.prefill(&embeds, ids.len(), 0, &mut logits)?;
            let prefill = t.elapsed();
            std::hint::black_box(argmax(&logits));
            let ttft = start.elapsed();
            drop(cache);
            if rep > 0 {
                vision_ms.push(ms(vision));
                prefill_ms.push(ms(prefill));
                ttft_ms.push(ms(ttft));
            }
        }
        let vision_batch_ms = if config.images > 0 {
            median(&mut vision_ms)
        } else {
            0.0
        };
        let prefill_ms = median(&mut prefill_ms);
        memory.push(MemoryPoint::now(format!(
            "vision + prefill of {prefill_tokens} tokens"
        )));

        // Decode: a text prompt of `context` tokens, then `new_tokens` greedy steps, each timed.
        let mut decode = Vec::new();
        let mut largest_context = 0;
        let mut contexts: Vec<usize> = config
            .contexts
            .iter()
            .map(|&c| c.clamp(1, max_context.saturating_sub(config.new_tokens + 1).max(1)))
            .collect();
        contexts.dedup();
        for (i, &context) in contexts.iter().enumerate() {
            let mut ids = vec![manifest.text.bos_token_id];
            ids.extend(synth.ids(context.saturating_sub(1)));
            let embeds = sessions.prompt_embeddings(&ids, &[])?;
            // The warm-up's steps and the timed ones.
            let reserve = config.new_tokens + 3;
            let mut cache = sessions.prefill(&embeds, ids.len(), reserve, &mut logits)?;
            let mut token = argmax(&logits);
            // Untimed warm-up steps on the first context: ONNX Runtime plans its first runs.
            if i == 0 {
                progress("decode warm-up");
                for _ in 0..3 {
                    sessions.step(token, &mut cache, &mut logits)?;
                    token = argmax(&logits);
                }
            }
            progress(&format!(
                "decode at context {}: {} steps",
                cache.len(),
                config.new_tokens
            ));
            let first_context = cache.len();
            let mut step_ms = Vec::with_capacity(config.new_tokens);
            let mut run_ms = Vec::with_capacity(config.new_tokens);
            let mut over_us = Vec::with_capacity(config.new_tokens);
            let mut over_pct = Vec::with_capacity(config.new_tokens);
            let steps = config
                .new_tokens
                .min(max_context.saturating_sub(cache.len()));
            let loop_start = Instant::now();
            for _ in 0..steps {
                let t = Instant::now();
                sessions.step(token, &mut cache, &mut logits)?;
                token = argmax(&logits);
                let wall = t.elapsed();
                let run = cache.last_run();
                let over = wall.saturating_sub(run);
                step_ms.push(ms(wall));
                run_ms.push(ms(run));
                over_us.push(over.as_secs_f64() * 1e6);
                over_pct.push(100.0 * over.as_secs_f64() / wall.as_secs_f64().max(1e-12));
            }
            let total = loop_start.elapsed();
            largest_context = largest_context.max(cache.len());
            memory.push(MemoryPoint::now(format!(
                "prefill of {} tokens + decode to {}",
                ids.len(),
                cache.len()
            )));
            decode.push(DecodePoint {
                context: first_context,
                steps,
                tokens_per_s: steps as f64 / total.as_secs_f64().max(1e-12),
                step_ms: median(&mut step_ms),
                ort_run_ms: median(&mut run_ms),
                overhead_us: median(&mut over_us),
                overhead_pct: median(&mut over_pct),
            });
        }

        let graphs = &manifest.graphs;
        let mut weight_bytes = 0;
        let mut decoder_weight_bytes = 0;
        for (name, spec) in [
            ("vision", &graphs.vision),
            ("embed", &graphs.embed),
            ("decoder", &graphs.decoder),
        ] {
            let mut bytes = file_bytes(&self.dir, &spec.file)?;
            for extra in &spec.external_data {
                bytes += file_bytes(&self.dir, &extra.file)?;
            }
            weight_bytes += bytes;
            if name == "decoder" {
                decoder_weight_bytes = bytes;
            }
        }
        let dims = &manifest.model;
        let element = match manifest.float_dtype() {
            crate::manifest::TensorDtype::Float16 => 2,
            _ => 4,
        };
        let kv_cache_bytes =
            (2 * dims.num_layers * dims.num_kv_heads * dims.head_dim * element * largest_context)
                as u64;

        Ok(BenchReport {
            model: self.dir.display().to_string(),
            dtype: format!("{:?}", manifest.float_dtype()),
            providers: self.graphs().iter().map(|g| g.provider_summary()).collect(),
            threads,
            config: config.clone(),
            image_tokens,
            vision_batch_ms,
            vision_ms_per_image: vision_batch_ms / config.images.max(1) as f64,
            prefill_tokens,
            prefill_ms,
            prefill_tokens_per_s: prefill_tokens as f64 / (prefill_ms / 1e3).max(1e-12),
            ttft_ms: median(&mut ttft_ms),
            decode,
            weight_bytes,
            decoder_weight_bytes,
            kv_cache_bytes,
            peak_rss_bytes: peak_rss_bytes(),
            memory,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&mut []), 0.0);
    }

    #[test]
    fn peak_rss_is_read_on_linux() {
        if cfg!(target_os = "linux") {
            let bytes = peak_rss_bytes();
            assert!(bytes.is_some_and(|b| b > 0), "VmHWM: {bytes:?}");
        }
    }

    #[test]
    fn synthetic_ids_avoid_the_image_token() {
        let mut synth = Synthetic {
            rng: ChaCha8Rng::seed_from_u64(1),
            vocab: 3,
            image_token: 1,
        };
        let ids = synth.ids(200);
        assert!(ids.iter().all(|&id| id == 0 || id == 2), "{ids:?}");
    }
}
