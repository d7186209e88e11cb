//! The batch engine under concurrent load: `concurrency` clients each send requests one after another
//! (a closed loop), starting a few engine iterations apart so arrivals are spread over time. The mix:
//! random prompts of varied length, every third request (`image_every`) with one random image, varied
//! reply lengths (stop ids ignored, so every reply has its planned length). Reports aggregate decode
//! tokens/s, time to first token and inter-token latency percentiles, the batch sizes the engine ran
//! and peak memory.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::bench::{peak_rss_bytes, Synthetic};
use crate::engine::{Engine, EngineConfig, Job};
use crate::error::Result;
use crate::model::Model;
use crate::request::admit;
use crate::sampling::SamplingParams;
use crate::sequence::Sink;
use crate::sequence::{Generation, Timings};

#[derive(Debug, Clone, Serialize)]
pub struct BatchBenchConfig {
    /// Clients sending requests at the same time.
    pub concurrency: usize,
    /// The engine's `max_batch`; `None`: the concurrency.
    pub max_batch: Option<usize>,
    /// Requests per client.
    pub requests_per_client: usize,
    /// Text tokens per prompt: uniform in this range.
    pub prompt_tokens: (usize, usize),
    /// Generated tokens per reply: uniform in this range.
    pub new_tokens: (usize, usize),
    /// Every Nth request carries one image; 0: none.
    pub image_every: usize,
    /// Engine iterations between two clients' first requests.
    pub stagger: usize,
    pub seed: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p95: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BatchBenchReport {
    pub config: BatchBenchConfig,
    pub requests: usize,
    pub generated_tokens: usize,
    pub wall_s: f64,
    /// Generated tokens over the wall time of the whole run.
    pub aggregate_tokens_per_s: f64,
    pub ttft_ms: Percentiles,
    pub inter_token_ms: Percentiles,
    /// Mean sequences per decoder run.
    pub mean_batch: f64,
    pub decode_steps: usize,
    /// Seconds the engine spent in vision, prefill and decode runs: prefill and vision are the same
    /// work at any batch size, so `1 - their share` bounds what batching can gain.
    pub vision_s: f64,
    pub prefill_s: f64,
    pub decode_s: f64,
    /// Mean decode step time by the number of rows it ran (a row count's steps, including sampling).
    pub step_ms_by_rows: BTreeMap<usize, f64>,
    pub peak_rss_bytes: Option<u64>,
}

/// What the engine's decode steps did over a run.
#[derive(Default)]
struct Steps {
    gaps: Vec<Duration>,
    /// Steps and their total time by row count.
    by_rows: BTreeMap<usize, (usize, Duration)>,
}

#[derive(Clone, Default)]
struct Done(Arc<Mutex<Vec<Generation>>>);

impl Sink for Done {
    fn on_text(&mut self, _piece: &str) -> ControlFlow<()> {
        ControlFlow::Continue(())
    }

    fn finish(self, result: Result<Generation>) {
        if let Ok(generation) = result {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(generation);
        }
    }
}

fn percentiles(values: &mut [f64]) -> Percentiles {
    values.sort_by(f64::total_cmp);
    let at = |q: f64| {
        if values.is_empty() {
            return 0.0;
        }
        values[((values.len() - 1) as f64 * q).round() as usize]
    };
    Percentiles {
        p50: at(0.5),
        p95: at(0.95),
    }
}

impl Model {
    /// Runs the closed-loop workload through one engine.
    pub fn bench_batch(&self, config: &BatchBenchConfig) -> Result<BatchBenchReport> {
        let manifest = &self.manifest;
        let image = &manifest.image;
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let mut synth = Synthetic::new(self, config.seed);
        let clients = config.concurrency.max(1);
        let total = clients * config.requests_per_client.max(1);
        let mut jobs = Vec::with_capacity(total);
        for i in 0..total {
            let with_image = config.image_every > 0 && i % config.image_every == 0;
            let text = rng.random_range(
                config.prompt_tokens.0..=config.prompt_tokens.1.max(config.prompt_tokens.0),
            );
            let mut prompt = vec![manifest.text.bos_token_id];
            let mut images = Vec::new();
            if with_image {
                prompt.extend(std::iter::repeat_n(
                    image.image_token_id,
                    image.tokens_per_image,
                ));
                images.push(synth.image(image.width, image.height));
            }
            prompt.extend(synth.ids(text));
            let new = rng
                .random_range(config.new_tokens.0..=config.new_tokens.1.max(config.new_tokens.0));
            let room = self.max_context().saturating_sub(prompt.len());
            let new = new.min(room);
            admit(self, prompt.len(), usize::from(with_image), new)?;
            jobs.push((prompt, self.pixel_values(&images), images.len(), new));
        }
        let widest = jobs.iter().map(|j| j.0.len() + j.3).max().unwrap_or(1);
        let done = Done::default();
        let steps = Arc::new(Mutex::new(Steps::default()));
        let max_batch = config.max_batch.unwrap_or(clients).max(1);
        let mut engine = Engine::new(
            self,
            EngineConfig {
                max_batch,
                kv_budget: widest * max_batch,
            },
        );
        let seen = Arc::clone(&steps);
        engine.on_step(move |report| {
            let mut s = seen.lock().unwrap_or_else(|p| p.into_inner());
            s.gaps.extend(&report.inter_token);
            let by_rows = s.by_rows.entry(report.rows).or_default();
            by_rows.0 += 1;
            by_rows.1 += report.step;
        });

        let start = Instant::now();
        let mut queue = jobs.into_iter();
        // Client k sends its first request at iteration k * stagger, then a new one whenever fewer
        // than `clients` requests are in the engine.
        let mut sent = 0;
        let mut iteration = 0;
        loop {
            let in_flight = sent - done.0.lock().unwrap_or_else(|p| p.into_inner()).len();
            let started_clients = (iteration / config.stagger.max(1) + 1).min(clients);
            if in_flight < started_clients {
                if let Some((prompt, pixel_values, images, max_new_tokens)) = queue.next() {
                    engine.submit(Job {
                        prompt,
                        pixel_values,
                        images,
                        max_new_tokens,
                        sampling: SamplingParams::greedy(),
                        stop_strings: Vec::new(),
                        ignore_stop: true,
                        timings: Timings::default(),
                        submitted: Instant::now(),
                        sink: done.clone(),
                    });
                    sent += 1;
                    continue;
                }
            }
            if engine.is_idle() && sent == total {
                break;
            }
            engine.iterate();
            iteration += 1;
        }
        let wall = start.elapsed();
        let work = engine.work();
        drop(engine);

        let generations = std::mem::take(&mut *done.0.lock().unwrap_or_else(|p| p.into_inner()));
        let generated_tokens: usize = generations.iter().map(|g| g.tokens.len()).sum();
        let mut ttft: Vec<f64> = generations.iter().map(|g| g.timings.ttft_ms).collect();
        let steps = std::mem::take(&mut *steps.lock().unwrap_or_else(|p| p.into_inner()));
        let mut itl: Vec<f64> = steps.gaps.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        let decode_steps: usize = steps.by_rows.values().map(|&(count, _)| count).sum();
        let rows: usize = steps
            .by_rows
            .iter()
            .map(|(&rows, &(count, _))| rows * count)
            .sum();
        Ok(BatchBenchReport {
            config: config.clone(),
            requests: generations.len(),
            generated_tokens,
            wall_s: wall.as_secs_f64(),
            aggregate_tokens_per_s: generated_tokens as f64 / wall.as_secs_f64().max(1e-9),
            ttft_ms: percentiles(&mut ttft),
            inter_token_ms: percentiles(&mut itl),
            mean_batch: rows as f64 / decode_steps.max(1) as f64,
            decode_steps,
            vision_s: work.vision.as_secs_f64(),
            prefill_s: work.prefill.as_secs_f64(),
            decode_s: work.decode.as_secs_f64(),
            step_ms_by_rows: steps
                .by_rows
                .iter()
                .map(|(&rows, &(count, total))| (rows, total.as_secs_f64() * 1e3 / count as f64))
                .collect(),
            peak_rss_bytes: peak_rss_bytes(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_the_nearest_rank() {
        let mut values: Vec<f64> = (1..=20).map(f64::from).rev().collect();
        let p = percentiles(&mut values);
        assert_eq!((p.p50, p.p95), (11.0, 19.0));
        let p = percentiles(&mut []);
        assert_eq!((p.p50, p.p95), (0.0, 0.0));
    }
}
