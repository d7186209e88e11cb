//! A request end to end: images + messages -> prompt -> prefill -> sample -> decode loop, streaming text.

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
    pub tokens: Vec<u32>,
    pub prompt_tokens: Vec<u32>,
    pub finish_reason: FinishReason,
    pub timings: Timings,
}

fn ms_since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e3
}

impl Model {
    /// Generates a reply; `on_text` receives each piece of text as it becomes final.
    pub fn generate(
        &self,
        request: &Request<'_>,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation> {
        let start = Instant::now();
        let mut sampler = Sampler::new(request.sampling.clone())?;
        let prompt = self.prompt_ids(request.messages, request.images.len())?;
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
        let mut cache = self.sessions.prefill(&embeds, prompt.len(), &mut logits)?;
        timings.prefill_ms = ms_since(t);

        let stop_ids = &self.manifest.text.stop_token_ids;
        let mut history = prompt.clone();
        let mut tokens = Vec::with_capacity(request.max_new_tokens);
        let mut stream = StreamDecoder::new(&self.tokenizer, true);
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
            let piece = stream.push(token)?;
            if !piece.is_empty() {
                on_text(&piece);
                text.push_str(&piece);
            }
            if step + 1 < request.max_new_tokens {
                self.sessions.step(token, &mut cache, &mut logits)?;
            }
        }
        let rest = stream.finish()?;
        if !rest.is_empty() {
            on_text(&rest);
            text.push_str(&rest);
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
