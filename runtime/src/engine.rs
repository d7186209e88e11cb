//! The batch engine: every generation, one or many, runs through it. It owns the sequences that are
//! decoding and runs the loop for all of them: each step is ONE decoder run over every decoding
//! sequence, then per-sequence sampling.
//!
//! Scheduling, one iteration at a time ([`Engine::iterate`]):
//! 1. Waiting requests whose client went away are dropped.
//! 2. Admission: when no prompt is being prefilled, the oldest waiting request starts if the batch has
//!    a free row (`max_batch`) and the KV budget holds it (below). Requests start in arrival order.
//! 3. Prefill: the request being admitted gets its images through the vision graph; in a later
//!    iteration (or the same one when nothing decodes) ONE chunk of its prompt goes through the
//!    decoder, batch 1. When its prompt is done it samples its first token and joins the batch.
//! 4. Decode: one decoder run over every row, one new position each; sequences that finish (stop id,
//!    stop string, token budget) or are cancelled leave the batch at once.
//!
//! How big a prefill chunk is: while nothing decodes, `decode.prefill_chunk` tokens (512; the
//! prompt's first token comes soonest). While rows decode, the iteration has a budget of
//! `decode.step_tokens` positions (256): the rows take one each and the chunk gets the rest, at least
//! [`MIN_STEP_PREFILL`] so a prompt always advances. A vision run is an iteration's whole prefill work.
//! The trade-off: a running stream waits at most one budget's chunk (or one request's vision run)
//! between two of its tokens, so a smaller budget keeps inter-token latency low while a long prompt
//! takes more iterations to reach its first token; docs/PERFORMANCE.md ("prefill between decode
//! steps") has the measured curve. `step_tokens = 0` runs whole `prefill_chunk`s between steps.
//!
//! KV budget: the engine holds at most `kv_budget` cached positions over all rows. Both cache layouts
//! allocate every row as wide as the widest need (prompt + max new tokens) among the rows, so a request
//! is admitted when `(rows + 1) x max(widest need, its need) <= kv_budget`; otherwise it waits until
//! rows leave. A request whose own need exceeds the budget could never start and is refused.

use std::collections::VecDeque;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::decode::{bytes_per_position, new_batch, KvBatch, Prefill};
use crate::embed::embed_tokens;
use crate::ep_config::MIN_STEP_PREFILL;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::sampling::{Sampler, SamplingParams};
use crate::sequence::{ms, BoxedSink, Sequence, Sink, Stops};
use crate::sequence::{FinishReason, Timings};
use crate::vision::ImageBatch;

/// How many sequences decode together and how much cache they may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// Most sequences in one decoder run.
    pub max_batch: usize,
    /// Most cached positions over all rows (padding included); see the module's notes.
    pub kv_budget: usize,
}

impl EngineConfig {
    /// Refuses a request whose cache need (prompt + max new tokens) exceeds the budget: it could never
    /// start. Anything smaller waits for room if it must.
    pub fn check_need(&self, prompt_tokens: usize, max_new_tokens: usize) -> Result<()> {
        let need = prompt_tokens + max_new_tokens;
        if need > self.kv_budget {
            return Err(Error::Admission(format!(
                "the request needs {need} cache positions (prompt {prompt_tokens} + max new tokens \
                 {max_new_tokens}), the KV budget is {}",
                self.kv_budget
            )));
        }
        Ok(())
    }

    /// One sequence at a time, with the model's whole context: the CLI's `generate`.
    pub fn single(model: &Model) -> EngineConfig {
        EngineConfig {
            max_batch: 1,
            kv_budget: model.max_context(),
        }
    }
}

/// A request ready to run: prompt ids, preprocessed images, its options and where its text goes.
pub struct Job<S> {
    pub prompt: Vec<u32>,
    /// Preprocessed pixels of `images` images ([`Model::pixel_values`]).
    pub pixel_values: ImageBatch,
    pub images: usize,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    pub stop_strings: Vec<String>,
    pub ignore_stop: bool,
    /// Timings measured before submission (preprocessing).
    pub timings: Timings,
    /// When the request arrived: time to first token counts from here.
    pub submitted: Instant,
    pub sink: S,
}

impl<S> Job<S> {
    /// Cache positions the request may fill: its prompt and every token it may generate.
    pub fn kv_need(&self) -> usize {
        self.prompt.len() + self.max_new_tokens
    }
}

/// What one decode step did, for metrics.
#[derive(Debug, Clone, Default)]
pub struct StepReport {
    pub rows: usize,
    pub step: Duration,
    /// Time between each sequence's previous token and this one (sequences past their first).
    pub inter_token: Vec<Duration>,
}

/// Gauges of the engine's state, published after each iteration and before any sequence's sink
/// finishes (so a client that has its reply never reads gauges that still count it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub waiting: usize,
    pub prefilling: usize,
    pub decoding: usize,
    /// Cached positions allocated (rows x widest row) and the budget they count against.
    pub kv_positions: usize,
    pub kv_budget: usize,
    pub kv_bytes_per_position: usize,
    pub max_batch: usize,
    /// Time in vision, prefill and decode runs since the engine started.
    pub work: WorkTimes,
}

/// Time the engine spent in each kind of graph run since it started: where a workload's time goes
/// (prefill and vision are work no batching shares out).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkTimes {
    pub vision: Duration,
    pub prefill: Duration,
    pub decode: Duration,
}

struct Prefilling<'t, S> {
    sequence: Sequence<'t, S>,
    embeds: Vec<f32>,
    /// Prompt rows prefilled so far.
    done: usize,
    prefill: Prefill,
    reserve: usize,
    started: Instant,
}

/// What [`Engine::on_step`] calls after every decode step.
type StepObserver<'m> = Box<dyn FnMut(&StepReport) + Send + 'm>;

/// A job taken from the queue: its sequence state and what its prefill needs.
struct Admitted<'m, S> {
    sequence: Sequence<'m, S>,
    pixels: ImageBatch,
    images: usize,
    /// Positions the sequence may append after its prompt.
    reserve: usize,
}

pub struct Engine<'m, S> {
    model: &'m Model,
    config: EngineConfig,
    waiting: VecDeque<Job<S>>,
    prefilling: Option<Prefilling<'m, S>>,
    batch: Box<dyn KvBatch>,
    running: Vec<Sequence<'m, S>>,
    /// Needs (prompt + max new tokens) of the running rows, in row order.
    needs: Vec<usize>,
    logits: Vec<f32>,
    on_step: Option<StepObserver<'m>>,
    published: Option<Arc<Mutex<EngineStats>>>,
    work: WorkTimes,
}

impl<'m, S: Sink> Engine<'m, S> {
    pub fn new(model: &'m Model, config: EngineConfig) -> Engine<'m, S> {
        Engine {
            model,
            config: EngineConfig {
                max_batch: config.max_batch.max(1),
                kv_budget: config.kv_budget,
            },
            waiting: VecDeque::new(),
            prefilling: None,
            batch: new_batch(
                model.manifest.decoder_flavour,
                &model.manifest.model,
                model.manifest.float_dtype(),
            ),
            running: Vec::new(),
            needs: Vec::new(),
            logits: Vec::new(),
            on_step: None,
            published: None,
            work: WorkTimes::default(),
        }
    }

    /// Called after every decode step with what it did.
    pub fn on_step(&mut self, report: impl FnMut(&StepReport) + Send + 'm) {
        self.on_step = Some(Box::new(report));
    }

    /// Keeps `stats` current: written after every iteration and before any sink finishes.
    pub fn publish_to(&mut self, stats: Arc<Mutex<EngineStats>>) {
        self.published = Some(stats);
        self.publish();
    }

    fn publish(&self) {
        if let Some(published) = &self.published {
            *published.lock().unwrap_or_else(|p| p.into_inner()) = self.stats();
        }
    }

    /// Queues a request. One that could never start (its cache need exceeds the budget) ends at once
    /// with an error naming both numbers.
    pub fn submit(&mut self, job: Job<S>) {
        match self.config.check_need(job.prompt.len(), job.max_new_tokens) {
            Ok(()) => self.waiting.push_back(job),
            Err(err) => job.sink.finish(Err(err)),
        }
    }

    /// Nothing waits, prefills or decodes.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.prefilling.is_none() && self.running.is_empty()
    }

    pub fn stats(&self) -> EngineStats {
        let model = &self.model.manifest;
        EngineStats {
            waiting: self.waiting.len(),
            prefilling: usize::from(self.prefilling.is_some()),
            decoding: self.running.len(),
            kv_positions: self.batch.rows() * self.batch.allocated_positions(),
            kv_budget: self.config.kv_budget,
            kv_bytes_per_position: bytes_per_position(&model.model, model.float_dtype()),
            max_batch: self.config.max_batch,
            work: self.work,
        }
    }

    /// Time spent in vision, prefill and decode runs so far.
    pub fn work(&self) -> WorkTimes {
        self.work
    }

    /// One scheduling iteration (module notes).
    pub fn iterate(&mut self) {
        self.drop_cancelled();
        let ran_vision = self.prefilling.is_none() && self.admit();
        // A vision run is the iteration's prefill work while rows wait for their next token.
        let chunk_too = !ran_vision || self.running.is_empty();
        if chunk_too && self.prefilling.is_some() {
            self.prefill_chunk();
        }
        if !self.running.is_empty() {
            self.decode_step();
        }
        self.publish();
    }

    /// Runs until every submitted request has ended.
    pub fn run_to_completion(&mut self) {
        while !self.is_idle() {
            self.iterate();
        }
    }

    fn drop_cancelled(&mut self) {
        let (cancelled, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|job| job.sink.is_cancelled());
        self.waiting = waiting.into();
        if !cancelled.is_empty() {
            self.publish();
        }
        for job in cancelled {
            match self.sequence(job) {
                Ok(admitted) => admitted.sequence.finish(FinishReason::Cancelled),
                Err((sink, err)) => sink.finish(Err(err)),
            }
        }
    }

    /// Whether a request of `need` positions fits the budget beside the running rows.
    fn fits(&self, need: usize) -> bool {
        let widest = self.needs.iter().copied().fold(need, usize::max);
        let rows = self.running.len() + 1;
        rows <= self.config.max_batch && rows.saturating_mul(widest) <= self.config.kv_budget
    }

    fn sequence(&self, job: Job<S>) -> std::result::Result<Admitted<'m, S>, (S, Error)> {
        let Job {
            prompt,
            pixel_values,
            images,
            max_new_tokens,
            sampling,
            stop_strings,
            ignore_stop,
            mut timings,
            submitted,
            sink,
        } = job;
        timings.queue_ms = ms(submitted.elapsed());
        let stops = Stops {
            ids: self.model.manifest.text.stop_token_ids.clone(),
            strings: stop_strings,
            ignore_ids: ignore_stop,
        };
        let sampler = match Sampler::new(sampling) {
            Ok(sampler) => sampler,
            Err(err) => return Err((sink, err)),
        };
        let sequence = Sequence::new(
            sink,
            &self.model.tokenizer,
            sampler,
            prompt,
            max_new_tokens,
            stops,
            timings,
            submitted,
        );
        Ok(Admitted {
            sequence,
            pixels: pixel_values,
            images,
            reserve: max_new_tokens,
        })
    }

    /// Starts the oldest waiting request if it fits: its images through the vision graph, its prompt
    /// embedded. Whether a vision run took place.
    fn admit(&mut self) -> bool {
        let Some(front) = self.waiting.front() else {
            return false;
        };
        if !self.fits(front.kv_need()) {
            return false;
        }
        let Some(job) = self.waiting.pop_front() else {
            return false;
        };
        let prompt = job.prompt.clone();
        let Admitted {
            mut sequence,
            pixels,
            images,
            reserve,
        } = match self.sequence(job) {
            Ok(admitted) => admitted,
            Err((sink, err)) => {
                self.publish();
                sink.finish(Err(err));
                return false;
            }
        };
        let sessions = &self.model.sessions;
        let started = Instant::now();
        let features = sessions.image_features(&pixels, images);
        let vision = started.elapsed();
        sequence.timings.vision_ms = ms(vision);
        self.work.vision += vision;
        let embeds = features.and_then(|features| sessions.prompt_embeddings(&prompt, &features));
        match embeds {
            Ok(embeds) => {
                self.prefilling = Some(Prefilling {
                    sequence,
                    embeds,
                    done: 0,
                    prefill: Prefill::new(
                        &self.model.manifest.model,
                        self.model.manifest.float_dtype(),
                    ),
                    reserve,
                    started,
                })
            }
            Err(err) => {
                self.publish();
                sequence.sink.finish(Err(err))
            }
        }
        images > 0
    }

    fn chunk_tokens(&self, remaining: usize) -> usize {
        let sessions = &self.model.sessions;
        chunk_tokens(
            remaining,
            sessions.prefill_chunk(),
            sessions.step_tokens(),
            self.running.len(),
        )
    }

    /// One chunk of the admitted prompt; when the prompt is done, its first token, and the sequence
    /// joins the batch.
    fn prefill_chunk(&mut self) {
        let Some(mut p) = self.prefilling.take() else {
            return;
        };
        if p.sequence.sink.is_cancelled() {
            self.publish();
            return p.sequence.finish(FinishReason::Cancelled);
        }
        let hidden = self.model.manifest.model.hidden_size;
        let rows = p.embeds.len() / hidden.max(1);
        let end = p.done + self.chunk_tokens(rows - p.done);
        let decoder = &self.model.sessions.decoder;
        let started = Instant::now();
        let run = p.prefill.run(
            decoder,
            &p.embeds[p.done * hidden..end * hidden],
            end - p.done,
            &mut self.logits,
        );
        self.work.prefill += started.elapsed();
        if let Err(err) = run {
            self.publish();
            return p.sequence.sink.finish(Err(err));
        }
        p.done = end;
        if p.done < rows {
            self.prefilling = Some(p);
            return;
        }
        p.sequence.timings.prefill_ms = ms(p.started.elapsed()) - p.sequence.timings.vision_ms;
        let Prefilling {
            mut sequence,
            prefill,
            reserve,
            ..
        } = p;
        match sequence.advance(&self.logits) {
            Err(err) => {
                self.publish();
                sequence.sink.finish(Err(err))
            }
            Ok((Some(reason), _)) => {
                self.publish();
                sequence.finish(reason)
            }
            Ok((None, _)) => {
                let need = rows + reserve;
                let joined = prefill
                    .finish()
                    .and_then(|kv| self.batch.push(decoder, kv, reserve));
                match joined {
                    Ok(()) => {
                        self.running.push(sequence);
                        self.needs.push(need);
                    }
                    Err(err) => {
                        self.publish();
                        sequence.sink.finish(Err(err))
                    }
                }
            }
        }
    }

    /// One decoder run over every running row, then each row's token.
    fn decode_step(&mut self) {
        let started = Instant::now();
        let tokens: Vec<u32> = self
            .running
            .iter()
            .map(|s| s.last_token().unwrap_or_default())
            .collect();
        let sessions = &self.model.sessions;
        let run = embed_tokens(&sessions.embed, &tokens).and_then(|embeds| {
            self.batch
                .step(&sessions.decoder, &embeds, &mut self.logits)
        });
        self.work.decode += started.elapsed();
        if let Err(err) = run {
            // The batch's cache is as it was before the run, but its sequences cannot go on.
            for row in (0..self.running.len()).rev() {
                let _ = self.batch.remove(&sessions.decoder, row);
            }
            self.needs.clear();
            let failed = std::mem::take(&mut self.running);
            self.publish();
            for sequence in failed {
                sequence.sink.finish(Err(Error::Graph {
                    graph: "decoder".into(),
                    reason: err.to_string(),
                }));
            }
            return;
        }
        let vocab = self.logits.len() / self.running.len();
        let mut report = StepReport {
            rows: self.running.len(),
            step: Duration::ZERO,
            inter_token: Vec::with_capacity(self.running.len()),
        };
        let mut ended = Vec::new();
        for (row, sequence) in self.running.iter_mut().enumerate() {
            match sequence.advance(&self.logits[row * vocab..(row + 1) * vocab]) {
                Ok((reason, gap)) => {
                    report.inter_token.extend(gap);
                    if let Some(reason) = reason {
                        ended.push((row, Ok(reason)));
                    }
                }
                Err(err) => ended.push((row, Err(err))),
            }
        }
        let mut left = Vec::with_capacity(ended.len());
        for (row, outcome) in ended.into_iter().rev() {
            let sequence = self.running.remove(row);
            self.needs.remove(row);
            let removed = self.batch.remove(&sessions.decoder, row);
            left.push((sequence, outcome, removed));
        }
        if !left.is_empty() {
            self.publish();
        }
        for (sequence, outcome, removed) in left {
            match (outcome, removed) {
                (Ok(reason), Ok(())) => sequence.finish(reason),
                (Err(err), _) | (_, Err(err)) => sequence.sink.finish(Err(err)),
            }
        }
        report.step = started.elapsed();
        if let Some(on_step) = &mut self.on_step {
            on_step(&report);
        }
    }
}

/// Prompt tokens for the next prefill chunk of a prompt with `remaining` tokens left: a whole
/// `prefill_chunk` (0: all of them) while nothing decodes, otherwise what the step budget leaves
/// beside the `decoding` rows, at least [`MIN_STEP_PREFILL`] (module notes). Never more than
/// `remaining`.
fn chunk_tokens(
    remaining: usize,
    prefill_chunk: usize,
    step_tokens: usize,
    decoding: usize,
) -> usize {
    let whole = match prefill_chunk {
        0 => remaining,
        chunk => chunk.min(remaining),
    };
    if step_tokens == 0 || decoding == 0 {
        return whole;
    }
    whole.min(step_tokens.saturating_sub(decoding).max(MIN_STEP_PREFILL))
}

/// The engine on a thread of its own, for a server: ONNX Runtime's runs are synchronous, so request
/// handlers submit jobs over a channel and receive their text through their sinks, which must not
/// block (a slow client never stalls the batch).
pub struct EngineThread {
    config: EngineConfig,
    jobs: Option<mpsc::Sender<Job<BoxedSink>>>,
    stats: Arc<Mutex<EngineStats>>,
    thread: Option<JoinHandle<()>>,
}

impl EngineThread {
    /// Starts the engine over `model`; `on_step` sees every decode step.
    pub fn spawn(
        model: Arc<Model>,
        config: EngineConfig,
        on_step: impl FnMut(&StepReport) + Send + 'static,
    ) -> Result<EngineThread> {
        let (jobs, inbox) = mpsc::channel::<Job<BoxedSink>>();
        let stats = Arc::new(Mutex::new(EngineStats::default()));
        let published = Arc::clone(&stats);
        let thread = std::thread::Builder::new()
            .name("llama3v-engine".into())
            .spawn(move || {
                let mut engine = Engine::new(&model, config);
                engine.on_step(on_step);
                engine.publish_to(published);
                loop {
                    if engine.is_idle() {
                        // Nothing to do until a job arrives; the channel closes when the server ends.
                        match inbox.recv() {
                            Ok(job) => engine.submit(job),
                            Err(_) => return,
                        }
                    }
                    while let Ok(job) = inbox.try_recv() {
                        engine.submit(job);
                    }
                    engine.publish();
                    engine.iterate();
                }
            })
            .map_err(|e| Error::Internal(format!("starting the engine thread: {e}")))?;
        Ok(EngineThread {
            config,
            jobs: Some(jobs),
            stats,
            thread: Some(thread),
        })
    }

    /// Queues a job; an error hands the job back when the engine has stopped.
    pub fn submit(&self, job: Job<BoxedSink>) -> std::result::Result<(), Box<Job<BoxedSink>>> {
        match &self.jobs {
            Some(jobs) => jobs.send(job).map_err(|e| Box::new(e.0)),
            None => Err(Box::new(job)),
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The engine's state after its last iteration.
    pub fn stats(&self) -> EngineStats {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for EngineThread {
    fn drop(&mut self) {
        // Closing the channel ends the thread once the engine has finished what it holds.
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::chunk_tokens;
    use crate::ep_config::MIN_STEP_PREFILL;

    #[test]
    fn a_whole_chunk_while_nothing_decodes() {
        assert_eq!(chunk_tokens(1000, 512, 256, 0), 512);
        assert_eq!(chunk_tokens(300, 512, 256, 0), 300);
        assert_eq!(chunk_tokens(1000, 0, 256, 0), 1000);
    }

    #[test]
    fn the_step_budget_shares_an_iteration_with_the_decoding_rows() {
        assert_eq!(chunk_tokens(1000, 512, 256, 6), 250);
        assert_eq!(chunk_tokens(1000, 0, 256, 6), 250);
        assert_eq!(chunk_tokens(100, 512, 256, 6), 100);
        // A budget smaller than the chunk limit only ever shrinks a chunk.
        assert_eq!(chunk_tokens(1000, 64, 256, 6), 64);
    }

    #[test]
    fn a_prompt_always_advances() {
        assert_eq!(chunk_tokens(1000, 512, 256, 255), MIN_STEP_PREFILL);
        assert_eq!(chunk_tokens(1000, 512, 8, 64), MIN_STEP_PREFILL);
        assert_eq!(chunk_tokens(3, 512, 8, 64), 3);
    }

    #[test]
    fn no_budget_runs_whole_chunks_between_steps() {
        assert_eq!(chunk_tokens(1000, 512, 0, 16), 512);
        assert_eq!(chunk_tokens(1000, 0, 0, 16), 1000);
    }
}
