//! One sequence's state while it decodes: its sampler and seed, repetition history, stop ids and
//! stop strings, streamed text, token budget and timings. The engine feeds it one row of logits per
//! step; it decides the token and whether the sequence is done.

use std::ops::ControlFlow;
use std::time::Instant;

use serde::Serialize;

use crate::error::Result;
use crate::sampling::Sampler;
use crate::tokenizer::{StreamDecoder, TextTokenizer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop id was sampled (it is not part of the output).
    Stop,
    /// `max_new_tokens` were generated.
    Length,
    /// The caller's callback asked to stop (e.g. its client went away); the output is what was made so far.
    Cancelled,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    /// Waiting for admission to the batch (room in the batch and the KV budget).
    pub queue_ms: f64,
    pub preprocess_ms: f64,
    pub vision_ms: f64,
    pub prefill_ms: f64,
    /// Time to first token: from the start of the request to the first sampled token.
    pub ttft_ms: f64,
    pub decode_ms: f64,
    /// Tokens per second over the decode steps (after the first token).
    pub decode_tokens_per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    pub text: String,
    /// Every generated token, including those that spelled a stop string (which `text` leaves out).
    pub tokens: Vec<u32>,
    pub prompt_tokens: Vec<u32>,
    pub finish_reason: FinishReason,
    pub timings: Timings,
}

/// Where a sequence's text goes as it becomes final, and its end. Called from the engine's thread
/// between steps, so it must not block: a server hands pieces to a channel.
pub trait Sink {
    /// Text that became final with the last token (possibly empty). `Break` cancels the sequence.
    fn on_text(&mut self, piece: &str) -> ControlFlow<()>;
    /// The row of logits each token is sampled from (reference checks record them).
    fn on_logits(&mut self, _logits: &[f32]) {}
    /// Polled at stage boundaries (waiting, before vision, between prefill chunks): `true` cancels.
    fn is_cancelled(&self) -> bool {
        false
    }
    /// The sequence's end: its generation, or the error that ended it.
    fn finish(self, result: Result<Generation>);
}

/// A boxed sink for engines that serve sinks of several kinds (the server's thread).
pub type BoxedSink = Box<dyn DynSink + Send>;

/// [`Sink`] in a form that can be boxed (`finish` takes the box).
pub trait DynSink {
    fn on_text(&mut self, piece: &str) -> ControlFlow<()>;
    fn on_logits(&mut self, logits: &[f32]);
    fn is_cancelled(&self) -> bool;
    fn finish_boxed(self: Box<Self>, result: Result<Generation>);
}

impl<S: Sink> DynSink for S {
    fn on_text(&mut self, piece: &str) -> ControlFlow<()> {
        Sink::on_text(self, piece)
    }
    fn on_logits(&mut self, logits: &[f32]) {
        Sink::on_logits(self, logits)
    }
    fn is_cancelled(&self) -> bool {
        Sink::is_cancelled(self)
    }
    fn finish_boxed(self: Box<Self>, result: Result<Generation>) {
        Sink::finish(*self, result)
    }
}

impl Sink for BoxedSink {
    fn on_text(&mut self, piece: &str) -> ControlFlow<()> {
        DynSink::on_text(&mut **self, piece)
    }
    fn on_logits(&mut self, logits: &[f32]) {
        DynSink::on_logits(&mut **self, logits)
    }
    fn is_cancelled(&self) -> bool {
        DynSink::is_cancelled(&**self)
    }
    fn finish(self, result: Result<Generation>) {
        self.finish_boxed(result)
    }
}

/// What a sequence stops on besides its token budget.
#[derive(Debug, Clone, Default)]
pub struct Stops {
    pub ids: Vec<u32>,
    pub strings: Vec<String>,
    /// Keep generating through stop ids (benchmarks and reference checks).
    pub ignore_ids: bool,
}

pub(crate) struct Sequence<'t, S> {
    pub sink: S,
    sampler: Sampler,
    prompt: Vec<u32>,
    history: Vec<u32>,
    tokens: Vec<u32>,
    max_new_tokens: usize,
    stream: StreamDecoder<'t>,
    stops: Stops,
    /// `text[..emitted]` has been handed to the sink.
    emitted: usize,
    text: String,
    pub timings: Timings,
    submitted: Instant,
    decode_start: Option<Instant>,
    last_token_at: Option<Instant>,
}

impl<'t, S: Sink> Sequence<'t, S> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        sink: S,
        tokenizer: &'t TextTokenizer,
        sampler: Sampler,
        prompt: Vec<u32>,
        max_new_tokens: usize,
        stops: Stops,
        timings: Timings,
        submitted: Instant,
    ) -> Self {
        Sequence {
            sink,
            sampler,
            history: prompt.clone(),
            prompt,
            tokens: Vec::with_capacity(max_new_tokens),
            max_new_tokens,
            stream: StreamDecoder::new(tokenizer, true),
            stops,
            emitted: 0,
            text: String::new(),
            timings,
            submitted,
            decode_start: None,
            last_token_at: None,
        }
    }

    /// The token the next step feeds for this sequence.
    pub fn last_token(&self) -> Option<u32> {
        self.tokens.last().copied()
    }

    /// Samples from this sequence's row of logits and hands the text that became final to the sink;
    /// `Some(reason)` when the sequence is done. The second value is the time since its previous
    /// token (the inter-token latency), `None` for the first.
    pub fn advance(
        &mut self,
        logits: &[f32],
    ) -> Result<(Option<FinishReason>, Option<std::time::Duration>)> {
        let now = Instant::now();
        let gap = self.last_token_at.map(|at| now - at);
        self.last_token_at = Some(now);
        if self.max_new_tokens == 0 {
            return Ok((Some(FinishReason::Length), gap));
        }
        self.sink.on_logits(logits);
        let token = self
            .sampler
            .sample(logits, &self.history, self.tokens.len())?;
        if self.decode_start.is_none() {
            self.timings.ttft_ms = ms(self.submitted.elapsed());
            self.decode_start = Some(Instant::now());
        }
        if !self.stops.ignore_ids && self.stops.ids.contains(&token) {
            return Ok((Some(FinishReason::Stop), gap));
        }
        self.tokens.push(token);
        self.history.push(token);
        self.text.push_str(&self.stream.push(token)?);
        let (release, stopped) = match scan(&self.stops.strings, &self.text, self.emitted) {
            ControlFlow::Break(cut) => {
                self.text.truncate(cut);
                (cut, true)
            }
            ControlFlow::Continue(end) => (end, false),
        };
        let flow = self.sink.on_text(&self.text[self.emitted..release]);
        self.emitted = release;
        let reason = if stopped {
            Some(FinishReason::Stop)
        } else if flow.is_break() {
            Some(FinishReason::Cancelled)
        } else if self.tokens.len() == self.max_new_tokens {
            Some(FinishReason::Length)
        } else {
            None
        };
        Ok((reason, gap))
    }

    /// Ends the sequence: held-back text is released (a stop string in it still cuts it) and the
    /// generation handed to the sink.
    pub fn finish(mut self, mut reason: FinishReason) {
        let result = self.flush(&mut reason).map(|()| {
            if let Some(start) = self.decode_start {
                self.timings.decode_ms = ms(start.elapsed());
            }
            let steps = self.tokens.len().saturating_sub(1);
            if steps > 0 && self.timings.decode_ms > 0.0 {
                self.timings.decode_tokens_per_s = steps as f64 / (self.timings.decode_ms / 1e3);
            }
            Generation {
                text: std::mem::take(&mut self.text),
                tokens: std::mem::take(&mut self.tokens),
                prompt_tokens: std::mem::take(&mut self.prompt),
                finish_reason: reason,
                timings: self.timings.clone(),
            }
        });
        self.sink.finish(result);
    }

    fn flush(&mut self, reason: &mut FinishReason) -> Result<()> {
        if *reason == FinishReason::Stop {
            return Ok(());
        }
        // Held-back text (an unfinished character, or a stop string's beginning that never
        // completed) is final now; a stop string in it still cuts the output.
        self.text.push_str(&self.stream.finish()?);
        let release = match scan(&self.stops.strings, &self.text, self.emitted) {
            ControlFlow::Break(cut) => {
                self.text.truncate(cut);
                if *reason == FinishReason::Length {
                    *reason = FinishReason::Stop;
                }
                cut
            }
            ControlFlow::Continue(_) => self.text.len(),
        };
        if *reason != FinishReason::Cancelled && release > self.emitted {
            // The sink is not asked again whether to go on: nothing is left to generate.
            let _ = self.sink.on_text(&self.text[self.emitted..release]);
        }
        self.emitted = release;
        Ok(())
    }
}

pub(crate) fn ms(duration: std::time::Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// After `text` grew: `Break(cut)` when a stop string starts at byte `cut` (the earliest one), else
/// `Continue(end)` where `text[..end]` can be released (no stop string can begin before `end`).
///
/// Released text (`text[..emitted]`) never holds the start of a stop string (that suffix is held
/// back), so a match can only begin at or after `emitted`.
fn scan(stops: &[String], text: &str, emitted: usize) -> ControlFlow<usize, usize> {
    let fresh = &text[emitted..];
    let earliest = stops
        .iter()
        .filter(|stop| !stop.is_empty())
        .filter_map(|stop| fresh.find(stop.as_str()))
        .min();
    if let Some(at) = earliest {
        return ControlFlow::Break(emitted + at);
    }
    let held = stops
        .iter()
        .map(|stop| longest_prefix_suffix(fresh, stop))
        .max()
        .unwrap_or(0);
    ControlFlow::Continue(text.len() - held)
}

/// Length of the longest proper prefix of `stop` that `text` ends with (0 if none). The prefix ends on
/// a character boundary of `stop`, so `text.len() - result` is a character boundary of `text`.
fn longest_prefix_suffix(text: &str, stop: &str) -> usize {
    stop.char_indices()
        .map(|(i, _)| i)
        .skip(1)
        .filter(|&k| text.ends_with(&stop[..k]))
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `pieces` one at a time as a decode loop would; returns what was released at each step and
    /// the final text.
    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut emitted = 0;
        let mut text = String::new();
        let mut released = Vec::new();
        for piece in pieces {
            text.push_str(piece);
            match scan(&stops, &text, emitted) {
                ControlFlow::Break(cut) => {
                    text.truncate(cut);
                    released.push(text[emitted..].to_string());
                    return (released, text, true);
                }
                ControlFlow::Continue(end) => {
                    released.push(text[emitted..end].to_string());
                    emitted = end;
                }
            }
        }
        (released, text, false)
    }

    #[test]
    fn a_stop_string_split_over_pieces_is_held_back_then_cut() {
        let (released, text, stopped) = run(&["END"], &["ab", "cE", "N", "Dxyz"]);
        assert_eq!(released, ["ab", "c", "", ""]);
        assert_eq!(text, "abc");
        assert!(stopped);
    }

    #[test]
    fn a_false_start_is_released_once_it_cannot_match() {
        let (released, text, stopped) = run(&["END"], &["aE", "Nx", "y"]);
        assert_eq!(released, ["a", "ENx", "y"]);
        assert_eq!(text, "aENxy");
        assert!(!stopped);
    }

    #[test]
    fn the_earliest_of_several_stop_strings_wins() {
        let (_, text, stopped) = run(&["world", "lo"], &["hello world"]);
        assert_eq!(text, "hel");
        assert!(stopped);
    }

    #[test]
    fn no_stop_strings_release_everything_at_once() {
        let (released, _, stopped) = run(&[], &["a", "bc"]);
        assert_eq!(released, ["a", "bc"]);
        assert!(!stopped);
    }

    #[test]
    fn held_text_ends_on_a_character_boundary() {
        // "é" is two bytes; a stop string starting with it must not split the text inside it.
        let (released, _, _) = run(&["éx"], &["aé"]);
        assert_eq!(released, ["a"]);
        assert_eq!(longest_prefix_suffix("aé", "éx"), "é".len());
    }
}
