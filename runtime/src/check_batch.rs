//! `check --batch N`: a sequence decoded inside a batch gives what it gives alone.
//!
//! The reference cases' conversations are run as a mixed workload: each case several times, with
//! different token budgets, arriving at different iterations of the engine, so sequences join a
//! running batch and leave it at different steps. Each request is then run alone (a batch of one) and
//! its logits at every step are compared with the batched run's, within the manifest's logits
//! tolerance; greedy tokens must agree where the dtype requires it (fp32).

use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;

use crate::check::{load_reference, measure, Measure, Tolerances};
use crate::engine::{Engine, EngineConfig, Job};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::preprocess::{load_image, DecodeLimits};
use crate::request::admit;
use crate::sampling::SamplingParams;
use crate::sequence::Sink;
use crate::sequence::{Generation, Timings};
use crate::vision::ImageBatch;

#[derive(Debug, Clone, Serialize)]
pub struct BatchRow {
    pub request: String,
    /// Engine iteration the request was submitted at.
    pub arrives_at: usize,
    pub max_new_tokens: usize,
    pub logits: Measure,
    pub tokens_equal: bool,
    pub tokens: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct BatchCheckReport {
    pub max_batch: usize,
    /// Sequences in each decoder run of the batched pass.
    pub batch_sizes: Vec<usize>,
    pub require_token_agreement: bool,
    pub rows: Vec<BatchRow>,
}

impl BatchCheckReport {
    pub fn pass(&self) -> bool {
        !self.rows.is_empty()
            && self
                .rows
                .iter()
                .all(|row| row.logits.pass && (row.tokens_equal || !self.require_token_agreement))
    }
}

/// Every step's logits, then the generation.
type Recorded = (Vec<Vec<f32>>, Option<Result<Generation>>);

/// Keeps every step's logits and the generation.
#[derive(Clone, Default)]
struct Record(Arc<Mutex<Recorded>>);

impl Sink for Record {
    fn on_text(&mut self, _piece: &str) -> ControlFlow<()> {
        ControlFlow::Continue(())
    }

    fn on_logits(&mut self, logits: &[f32]) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .push(logits.to_vec());
    }

    fn finish(self, result: Result<Generation>) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).1 = Some(result);
    }
}

struct Planned {
    name: String,
    prompt: Vec<u32>,
    pixel_values: ImageBatch,
    images: usize,
    max_new_tokens: usize,
    arrives_at: usize,
}

impl Planned {
    fn job(&self, sink: Record) -> Job<Record> {
        Job {
            prompt: self.prompt.clone(),
            pixel_values: self.pixel_values.clone(),
            images: self.images,
            max_new_tokens: self.max_new_tokens,
            sampling: SamplingParams::greedy(),
            stop_strings: Vec::new(),
            ignore_stop: false,
            timings: Timings::default(),
            submitted: Instant::now(),
            sink,
        }
    }
}

impl Model {
    /// Runs the reference cases as a mixed batch of up to `max_batch` sequences and compares every
    /// request with the same request run alone; `tokens` is the longest token budget.
    pub fn check_batch(&self, max_batch: usize, tokens: usize) -> Result<BatchCheckReport> {
        let index = load_reference(&self.dir)?;
        let reference = self.dir.join(crate::check::REFERENCE_DIR);
        let mut plan = Vec::new();
        // Three rounds over the cases: budgets differ so rows leave at different steps, arrivals are
        // spread so rows join a batch that is already decoding.
        let budgets = [tokens, tokens / 2 + 1, tokens * 3 / 4 + 1];
        for (round, budget) in budgets.iter().enumerate() {
            for case in &index.cases {
                let images = case
                    .images
                    .iter()
                    .map(|name| load_image(&reference.join(name), &DecodeLimits::default()))
                    .collect::<Result<Vec<_>>>()?;
                let prompt = self.prompt_ids(&case.messages(), &images)?;
                let max_new_tokens =
                    (*budget).min(self.max_context() - prompt.len().min(self.max_context()));
                admit(self, prompt.len(), images.len(), max_new_tokens)?;
                plan.push(Planned {
                    name: format!("{}#{round}", case.name),
                    pixel_values: self.pixel_values(&images),
                    images: images.len(),
                    prompt,
                    max_new_tokens,
                    arrives_at: plan.len(),
                });
            }
        }
        let tolerances = Tolerances::for_manifest(&self.manifest);

        let alone: Vec<Record> = plan
            .iter()
            .map(|request| {
                let record = Record::default();
                let mut engine = Engine::new(self, EngineConfig::single(self));
                engine.submit(request.job(record.clone()));
                engine.run_to_completion();
                record
            })
            .collect();

        let batched: Vec<Record> = plan.iter().map(|_| Record::default()).collect();
        let budget = plan
            .iter()
            .map(|r| r.prompt.len() + r.max_new_tokens)
            .max()
            .unwrap_or(0);
        let config = EngineConfig {
            max_batch,
            kv_budget: budget * max_batch,
        };
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let mut engine = Engine::new(self, config);
        let seen = Arc::clone(&sizes);
        engine.on_step(move |report| {
            seen.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(report.rows)
        });
        let mut iteration = 0;
        let mut next = 0;
        while next < plan.len() || !engine.is_idle() {
            while next < plan.len() && plan[next].arrives_at <= iteration {
                engine.submit(plan[next].job(batched[next].clone()));
                next += 1;
            }
            engine.iterate();
            iteration += 1;
        }
        drop(engine);

        let mut rows = Vec::new();
        for ((request, alone), batched) in plan.iter().zip(&alone).zip(&batched) {
            let (alone_logits, alone_gen) = take(alone)?;
            let (batch_logits, batch_gen) = take(batched)?;
            // Compare the steps both runs took on the same tokens: after a different token the
            // sequences are no longer the same computation.
            let same = alone_gen
                .tokens
                .iter()
                .zip(&batch_gen.tokens)
                .take_while(|(a, b)| a == b)
                .count();
            let steps = (same + 1).min(alone_logits.len()).min(batch_logits.len());
            let flat = |rows: &[Vec<f32>]| rows[..steps].concat();
            let logits = measure(
                "logits, batched vs alone",
                &flat(&batch_logits),
                &flat(&alone_logits),
                tolerances.logits,
                tolerances.relative,
            );
            rows.push(BatchRow {
                request: request.name.clone(),
                arrives_at: request.arrives_at,
                max_new_tokens: request.max_new_tokens,
                logits,
                tokens_equal: alone_gen.tokens == batch_gen.tokens,
                tokens: batch_gen.tokens.len(),
            });
        }
        let batch_sizes = sizes.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Ok(BatchCheckReport {
            max_batch,
            batch_sizes,
            require_token_agreement: tolerances.require_token_agreement,
            rows,
        })
    }
}

fn take(record: &Record) -> Result<(Vec<Vec<f32>>, Generation)> {
    let mut inner = record.0.lock().unwrap_or_else(|p| p.into_inner());
    let generation = inner
        .1
        .take()
        .ok_or_else(|| Error::Internal("a request ended without a result".into()))??;
    Ok((std::mem::take(&mut inner.0), generation))
}
