//! Request policy, once for every entry point (`generate`, `serve`, `bench`): sampling defaults and the
//! admission checks a request passes before any graph runs. The bounds checked before a request's
//! text is tokenized and its images decoded (bytes, pixels) are `request_limits`'.

use crate::chat_template::{ChatMessage, ContentPart};
use crate::error::{Error, Result};
use crate::manifest::GenerationDefaults;
use crate::model::Model;
use crate::sampling::SamplingParams;

/// transformers' `GenerationConfig` defaults, used where neither the request nor the checkpoint's
/// `generation_config.json` sets a field.
const DEFAULT_TEMPERATURE: f32 = 1.0;
const DEFAULT_TOP_K: usize = 50;
const DEFAULT_REPETITION_PENALTY: f32 = 1.0;

/// The conversation of a one-question request (the CLI's `generate`, reference cases): an optional
/// system turn, then one user turn with its images before the question.
pub fn single_turn(system: Option<&str>, images: usize, prompt: &str) -> Vec<ChatMessage> {
    let mut messages = Vec::new();
    if let Some(system) = system {
        messages.push(ChatMessage::text("system", system));
    }
    let mut content: Vec<ContentPart> = (0..images).map(|_| ContentPart::Image).collect();
    content.push(ContentPart::Text(prompt.to_string()));
    messages.push(ChatMessage {
        role: "user".into(),
        content,
    });
    messages
}

/// Sampling fields as a request gives them; `None` is "not set".
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SamplingRequest {
    /// `0` asks for greedy decoding; any other value samples.
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<u64>,
}

/// The request's fields over the checkpoint's `generation_config.json` over transformers' defaults,
/// as transformers' `generate` merges them: the checkpoint decides whether to sample (`do_sample`)
/// unless the request sets a temperature; when sampling, an unset `top_k` is the checkpoint's or 50.
/// Checked: an out-of-range value is an error naming the field.
pub fn resolve_sampling(
    request: &SamplingRequest,
    defaults: &GenerationDefaults,
) -> Result<SamplingParams> {
    let checkpoint_samples = defaults.do_sample.unwrap_or(false);
    let temperature = request.temperature.unwrap_or(if checkpoint_samples {
        defaults.temperature.unwrap_or(DEFAULT_TEMPERATURE)
    } else {
        0.0
    });
    let samples = temperature != 0.0;
    let params = SamplingParams {
        temperature,
        top_k: request
            .top_k
            .or(samples.then(|| defaults.top_k.unwrap_or(DEFAULT_TOP_K))),
        top_p: request
            .top_p
            .or(if samples { defaults.top_p } else { None }),
        repetition_penalty: request
            .repetition_penalty
            .or(defaults.repetition_penalty)
            .unwrap_or(DEFAULT_REPETITION_PENALTY),
        seed: request.seed,
    };
    params.validate()?;
    Ok(params)
}

/// Refuses more images than `limits.max_images`. [`admit`] checks it too; a server calls it before it
/// fetches or decodes any image.
pub fn check_image_count(model: &Model, images: usize) -> Result<()> {
    let max_images = model.limits().max_images;
    if images > max_images {
        return Err(Error::Admission(format!(
            "{images} images given, more than the limit of {max_images} per request (limits.max_images)"
        )));
    }
    Ok(())
}

/// Checks a request against the model's context and the configured request limits
/// (`limits.max_images`, `limits.max_prompt_tokens`, `limits.max_context`) before any graph runs.
/// The image count must also match the prompt's placeholders ([`Model::prompt_ids`] checks that).
pub fn admit(
    model: &Model,
    prompt_tokens: usize,
    images: usize,
    max_new_tokens: usize,
) -> Result<()> {
    check_image_count(model, images)?;
    let limits = model.limits();
    // The context first: a prompt that cannot fit is the client's most common mistake, and OpenAI's
    // clients know its error (context_length_exceeded).
    if prompt_tokens + max_new_tokens > limits.max_context {
        return Err(Error::ContextOverflow {
            prompt_tokens,
            max_new_tokens,
            max_context: limits.max_context,
        });
    }
    if prompt_tokens > limits.max_prompt_tokens {
        return Err(Error::Admission(format!(
            "the prompt is {prompt_tokens} tokens, at most {} per request (limits.max_prompt_tokens)",
            limits.max_prompt_tokens
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling_checkpoint() -> GenerationDefaults {
        GenerationDefaults {
            temperature: Some(0.6),
            top_p: Some(0.9),
            top_k: None,
            do_sample: Some(true),
            repetition_penalty: None,
        }
    }

    #[test]
    fn a_sampling_checkpoint_samples_with_transformers_top_k_unless_the_request_says_otherwise() {
        let p = resolve_sampling(&SamplingRequest::default(), &sampling_checkpoint()).unwrap();
        assert_eq!(
            (p.temperature, p.top_k, p.top_p, p.repetition_penalty),
            (0.6, Some(50), Some(0.9), 1.0)
        );
        let request = SamplingRequest {
            temperature: Some(0.0),
            ..Default::default()
        };
        let p = resolve_sampling(&request, &sampling_checkpoint()).unwrap();
        assert!(p.is_greedy());
        assert_eq!((p.top_k, p.top_p), (None, None));
        let request = SamplingRequest {
            top_k: Some(5),
            top_p: Some(0.5),
            repetition_penalty: Some(1.2),
            seed: Some(7),
            ..Default::default()
        };
        let p = resolve_sampling(&request, &sampling_checkpoint()).unwrap();
        assert_eq!(
            (p.top_k, p.top_p, p.repetition_penalty, p.seed),
            (Some(5), Some(0.5), 1.2, Some(7))
        );
    }

    #[test]
    fn a_greedy_checkpoint_samples_only_when_the_request_sets_a_temperature() {
        let greedy = GenerationDefaults::default();
        let p = resolve_sampling(&SamplingRequest::default(), &greedy).unwrap();
        assert!(p.is_greedy());
        let request = SamplingRequest {
            temperature: Some(0.7),
            ..Default::default()
        };
        let p = resolve_sampling(&request, &greedy).unwrap();
        assert_eq!((p.temperature, p.top_k, p.top_p), (0.7, Some(50), None));
    }

    #[test]
    fn out_of_range_fields_are_refused() {
        let request = SamplingRequest {
            temperature: Some(-1.0),
            ..Default::default()
        };
        let err = resolve_sampling(&request, &GenerationDefaults::default()).unwrap_err();
        assert!(err.to_string().contains("temperature"), "{err}");
    }
}
