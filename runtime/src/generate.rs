//! A request end to end: images + messages -> prompt -> prefill -> sample -> decode loop, streaming text.

use std::ops::ControlFlow;
use std::time::Instant;

use image::RgbImage;
use serde::Serialize;

use crate::chat_template::ChatMessage;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::StreamDecoder;

pub struct Request<'a> {
    pub messages: &'a [ChatMessage],
    /// Decoded images, in placeholder order.
    pub images: &'a [RgbImage],
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Keep generating through stop ids (benchmarks and reference checks).
    pub ignore_stop: bool,
}

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

fn ms_since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e3
}

/// Finds stop strings in streamed text and holds back what could still become one, so a caller never
/// receives text that a later token turns into (part of) a stop string.
struct StopStrings<'a> {
    stops: &'a [String],
    /// `text[..emitted]` has been handed to the caller.
    emitted: usize,
}

impl<'a> StopStrings<'a> {
    fn new(stops: &'a [String]) -> Self {
        StopStrings { stops, emitted: 0 }
    }

    /// After `text` grew: `Break(cut)` when a stop string starts at byte `cut` (the earliest one), else
    /// `Continue(end)` where `text[..end]` can be released (no stop string can begin before `end`).
    ///
    /// Released text never holds the start of a stop string (that suffix is held back), so a match can
    /// only begin at or after `emitted`.
    fn scan(&self, text: &str) -> ControlFlow<usize, usize> {
        let fresh = &text[self.emitted..];
        let earliest = self
            .stops
            .iter()
            .filter(|stop| !stop.is_empty())
            .filter_map(|stop| fresh.find(stop.as_str()))
            .min();
        if let Some(at) = earliest {
            return ControlFlow::Break(self.emitted + at);
        }
        let held = self
            .stops
            .iter()
            .map(|stop| longest_prefix_suffix(fresh, stop))
            .max()
            .unwrap_or(0);
        ControlFlow::Continue(text.len() - held)
    }
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

impl Model {
    /// Generates a reply; `on_text` receives each piece of text as it becomes final.
    pub fn generate(
        &self,
        request: &Request<'_>,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation> {
        self.generate_until(request, &[], &mut |piece| {
            if !piece.is_empty() {
                on_text(piece);
            }
            ControlFlow::Continue(())
        })
    }

    /// [`generate`](Self::generate) with stop strings and cancellation, for servers.
    ///
    /// `on_step` is called once per generated token with the text that became final (possibly empty:
    /// an incomplete character, or text held back because it may start a stop string), so a caller can
    /// cancel at every step by returning `Break`; the generation then ends with
    /// [`FinishReason::Cancelled`] and its KV cache is freed. A stop string ends the generation with
    /// [`FinishReason::Stop`]; neither it nor anything after it is part of the text.
    pub fn generate_until(
        &self,
        request: &Request<'_>,
        stop_strings: &[String],
        on_step: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Generation> {
        let start = Instant::now();
        let mut sampler = Sampler::new(request.sampling.clone())?;
        let prompt = self.prompt_ids(request.messages, request.images)?;
        if prompt.len() + request.max_new_tokens > self.max_context() {
            return Err(Error::ContextOverflow {
                prompt_tokens: prompt.len(),
                max_new_tokens: request.max_new_tokens,
                max_context: self.max_context(),
            });
        }
        let mut timings = Timings::default();

        let t = Instant::now();
        let pixels = self.pixel_values(request.images);
        timings.preprocess_ms = ms_since(t);
        let t = Instant::now();
        let features = self
            .sessions
            .image_features(&pixels, request.images.len())?;
        timings.vision_ms = ms_since(t);

        let t = Instant::now();
        let embeds = self.sessions.prompt_embeddings(&prompt, &features)?;
        let mut logits = Vec::new();
        let mut cache =
            self.sessions
                .prefill(&embeds, prompt.len(), request.max_new_tokens, &mut logits)?;
        timings.prefill_ms = ms_since(t);

        let stop_ids = &self.manifest.text.stop_token_ids;
        let mut history = prompt.clone();
        let mut tokens = Vec::with_capacity(request.max_new_tokens);
        let mut stream = StreamDecoder::new(&self.tokenizer, true);
        let mut stops = StopStrings::new(stop_strings);
        let mut text = String::new();
        let mut finish_reason = FinishReason::Length;
        let decode_start = Instant::now();
        for step in 0..request.max_new_tokens {
            let token = sampler.sample(&logits, &history, step)?;
            if step == 0 {
                timings.ttft_ms = ms_since(start);
            }
            if !request.ignore_stop && stop_ids.contains(&token) {
                finish_reason = FinishReason::Stop;
                break;
            }
            tokens.push(token);
            history.push(token);
            text.push_str(&stream.push(token)?);
            let release = match stops.scan(&text) {
                ControlFlow::Break(cut) => {
                    text.truncate(cut);
                    finish_reason = FinishReason::Stop;
                    cut
                }
                ControlFlow::Continue(end) => end,
            };
            let flow = on_step(&text[stops.emitted..release]);
            stops.emitted = release;
            if finish_reason == FinishReason::Stop {
                break;
            }
            if flow.is_break() {
                finish_reason = FinishReason::Cancelled;
                break;
            }
            if step + 1 < request.max_new_tokens {
                self.sessions.step(token, &mut cache, &mut logits)?;
            }
        }
        if finish_reason != FinishReason::Stop {
            // Held-back text (an unfinished character, or a stop string's beginning that never
            // completed) is final now; a stop string in it still cuts the output.
            text.push_str(&stream.finish()?);
            let release = match stops.scan(&text) {
                ControlFlow::Break(cut) => {
                    text.truncate(cut);
                    if finish_reason == FinishReason::Length {
                        finish_reason = FinishReason::Stop;
                    }
                    cut
                }
                ControlFlow::Continue(_) => text.len(),
            };
            if finish_reason != FinishReason::Cancelled && release > stops.emitted {
                // The caller is not asked again whether to go on: nothing is left to generate.
                let _ = on_step(&text[stops.emitted..release]);
            }
        }
        timings.decode_ms = ms_since(decode_start);
        let steps = tokens.len().saturating_sub(1);
        if steps > 0 && timings.decode_ms > 0.0 {
            timings.decode_tokens_per_s = steps as f64 / (timings.decode_ms / 1e3);
        }
        Ok(Generation {
            text,
            tokens,
            prompt_tokens: prompt,
            finish_reason,
            timings,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `pieces` one at a time as a decode loop would; returns what was released at each step and
    /// the final text.
    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut matcher = StopStrings::new(&stops);
        let mut text = String::new();
        let mut released = Vec::new();
        for piece in pieces {
            text.push_str(piece);
            match matcher.scan(&text) {
                ControlFlow::Break(cut) => {
                    text.truncate(cut);
                    released.push(text[matcher.emitted..].to_string());
                    return (released, text, true);
                }
                ControlFlow::Continue(end) => {
                    released.push(text[matcher.emitted..end].to_string());
                    matcher.emitted = end;
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
