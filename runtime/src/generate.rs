//! A request end to end: images + messages -> prompt -> prefill -> sample -> decode loop, streaming text.

use std::ops::ControlFlow;
use std::time::Instant;

use image::RgbImage;

use crate::chat_template::ChatMessage;
use crate::engine::{Engine, EngineConfig, Job};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::request::admit;
use crate::sampling::SamplingParams;
use crate::sequence::{ms, Generation, Sink, Timings};

pub struct Request<'a> {
    pub messages: &'a [ChatMessage],
    /// Decoded images, in placeholder order.
    pub images: &'a [RgbImage],
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Keep generating through stop ids (benchmarks and reference checks).
    pub ignore_stop: bool,
}

/// Hands a single generation's text to the caller's callback and keeps its result.
struct Collect<'c> {
    on_step: &'c mut dyn FnMut(&str) -> ControlFlow<()>,
    result: &'c mut Option<Result<Generation>>,
}

impl Sink for Collect<'_> {
    fn on_text(&mut self, piece: &str) -> ControlFlow<()> {
        (self.on_step)(piece)
    }

    fn finish(self, result: Result<Generation>) {
        *self.result = Some(result);
    }
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

    /// [`generate`](Self::generate) with stop strings and cancellation: the batch engine with this one
    /// request.
    ///
    /// `on_step` is called once per generated token with the text that became final (possibly empty:
    /// an incomplete character, or text held back because it may start a stop string), so a caller can
    /// cancel at every step by returning `Break`; the generation then ends with
    /// [`crate::sequence::FinishReason::Cancelled`] and its KV cache is freed. A stop string ends the generation with
    /// [`crate::sequence::FinishReason::Stop`]; neither it nor anything after it is part of the text.
    pub fn generate_until(
        &self,
        request: &Request<'_>,
        stop_strings: &[String],
        on_step: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Generation> {
        let submitted = Instant::now();
        let prompt = self.prompt_ids(request.messages, request.images)?;
        admit(
            self,
            prompt.len(),
            request.images.len(),
            request.max_new_tokens,
        )?;
        let t = Instant::now();
        let pixel_values = self.pixel_values(request.images);
        let timings = Timings {
            preprocess_ms: ms(t.elapsed()),
            ..Timings::default()
        };
        let mut result = None;
        let mut engine = Engine::new(self, EngineConfig::single(self));
        engine.submit(Job {
            prompt,
            pixel_values,
            images: request.images.len(),
            max_new_tokens: request.max_new_tokens,
            sampling: request.sampling.clone(),
            stop_strings: stop_strings.to_vec(),
            ignore_stop: request.ignore_stop,
            timings,
            submitted,
            sink: Collect {
                on_step,
                result: &mut result,
            },
        });
        engine.run_to_completion();
        drop(engine);
        result.unwrap_or_else(|| Err(Error::Internal("the engine ended without a result".into())))
    }
}
