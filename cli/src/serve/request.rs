//! A chat-completions request body -> a validated [`Job`]: the JSON parsed (errors name the field at
//! fault), every field judged by `fields`' table, messages mapped to the runtime's, the text checked
//! against its byte limit before anything tokenizes it, sampling resolved by the runtime's one resolver
//! (`llama3v::request`). No model is needed, so the `request_json` fuzz target runs this same code.

use llama3v::chat_template::{ChatMessage, ContentPart};
use llama3v::manifest::GenerationDefaults;
use llama3v::request::{resolve_sampling, SamplingRequest};
use llama3v::request_limits::RequestLimits;
use llama3v::sampling::SamplingParams;

use super::api::{self, ChatCompletionRequest, Content, Part, Stop};
use super::errors::ApiError;
use super::fields;

/// OpenAI's limit on stop sequences.
const MAX_STOP_STRINGS: usize = 4;

/// Limits a request is checked against before it is admitted.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_tokens: usize,
    pub max_body_bytes: usize,
    pub request: RequestLimits,
}

/// A validated request, ready to run.
pub struct Job {
    pub messages: Vec<ChatMessage>,
    /// Image URLs in placeholder order.
    pub image_urls: Vec<String>,
    pub sampling: SamplingParams,
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    pub stream: bool,
}

/// The body as a request; a malformed one names the field at fault (`messages[0].role`).
pub fn parse_request(body: &[u8]) -> Result<ChatCompletionRequest, ApiError> {
    let mut json = serde_json::Deserializer::from_slice(body);
    let request: ChatCompletionRequest =
        serde_path_to_error::deserialize(&mut json).map_err(|e| {
            let path = e.path().to_string();
            let message = format!("invalid request body: {}", e.inner());
            if path == "." {
                ApiError::bad_request(message)
            } else {
                ApiError::invalid_param(path, message)
            }
        })?;
    json.end()
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))?;
    fields::check_other_fields(&request.other)?;
    Ok(request)
}

pub fn validate(
    request: ChatCompletionRequest,
    limits: &Limits,
    defaults: &GenerationDefaults,
) -> Result<Job, ApiError> {
    let (messages, image_urls) = messages(request.messages)?;
    // Before the template and the tokenizer see the text.
    limits.request.check_prompt(&messages)?;
    let max_tokens = match (request.max_completion_tokens, request.max_tokens) {
        (Some(n), _) => Some(check_max_tokens(
            "max_completion_tokens",
            n,
            limits.max_tokens,
        )?),
        (None, Some(n)) => Some(check_max_tokens("max_tokens", n, limits.max_tokens)?),
        (None, None) => None,
    };
    let stop = match request.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(list)) => list,
    };
    if stop.len() > MAX_STOP_STRINGS || stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid_param(
            "stop",
            format!(
                "stop must be at most {MAX_STOP_STRINGS} non-empty strings, got {:?}",
                stop
            ),
        ));
    }
    let sampling = resolve_sampling(
        &SamplingRequest {
            temperature: request.temperature,
            top_k: request.top_k,
            top_p: request.top_p,
            repetition_penalty: request.repetition_penalty,
            seed: request.seed,
        },
        defaults,
    )?;
    Ok(Job {
        messages,
        image_urls,
        sampling,
        max_tokens,
        stop,
        ignore_eos: request.ignore_eos.unwrap_or(false),
        stream: request.stream.unwrap_or(false),
    })
}

fn check_max_tokens(field: &'static str, requested: u64, limit: usize) -> Result<usize, ApiError> {
    match usize::try_from(requested) {
        Ok(n) if n >= 1 && n <= limit => Ok(n),
        _ => Err(ApiError::invalid_param(
            field,
            format!("{field} must be in 1..={limit} (this server's limit), got {requested}"),
        )),
    }
}

/// OpenAI messages -> the runtime's messages, with image URLs pulled out in placeholder order.
fn messages(input: Vec<api::Message>) -> Result<(Vec<ChatMessage>, Vec<String>), ApiError> {
    if input.is_empty() {
        return Err(ApiError::invalid_param("messages", "messages is empty"));
    }
    let mut messages = Vec::with_capacity(input.len());
    let mut urls = Vec::new();
    for message in input {
        let role = match message.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            other => {
                let expected = "expected system, developer, user or assistant";
                let message = format!("unsupported role {other:?} ({expected})");
                return Err(ApiError::invalid_param("messages", message));
            }
        };
        let content = match message.content {
            None => Vec::new(),
            Some(Content::Text(text)) => vec![ContentPart::Text(text)],
            Some(Content::Parts(parts)) => parts
                .into_iter()
                .map(|part| match part {
                    Part::Text { text } => ContentPart::Text(text),
                    Part::ImageUrl { image_url } => {
                        urls.push(image_url.url().to_string());
                        ContentPart::Image
                    }
                })
                .collect(),
        };
        if role != "user" && content.contains(&ContentPart::Image) {
            return Err(ApiError::invalid_param(
                "messages",
                format!("images are accepted in user messages only, found one in a {role} message"),
            ));
        }
        messages.push(ChatMessage {
            role: role.into(),
            content,
        });
    }
    Ok((messages, urls))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;
    use serde_json::json;

    #[test]
    fn max_tokens_outside_the_limit_is_refused_with_both_numbers() {
        assert_eq!(check_max_tokens("max_tokens", 16, 64).unwrap(), 16);
        let err = check_max_tokens("max_tokens", 65, 64).unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert!(
            err.message.contains("64") && err.message.contains("65"),
            "{}",
            err.message
        );
        assert_eq!(err.param.as_deref(), Some("max_tokens"));
        assert!(check_max_tokens("max_tokens", 0, 64).is_err());
    }

    #[test]
    fn roles_map_and_images_are_pulled_out_in_order() {
        let input: Vec<api::Message> = serde_json::from_value(json!([
            {"role": "developer", "content": "sys"},
            {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "a"}},
                {"type": "text", "text": "q"},
                {"type": "image_url", "image_url": {"url": "b"}}
            ]}
        ]))
        .unwrap();
        let (messages, urls) = messages(input).unwrap();
        assert_eq!(messages[0].role, "system");
        assert_eq!(
            messages[1].content,
            [
                ContentPart::Image,
                ContentPart::Text("q".into()),
                ContentPart::Image
            ]
        );
        assert_eq!(urls, ["a", "b"]);
        let bad: Vec<api::Message> =
            serde_json::from_value(json!([{"role": "tool", "content": "x"}])).unwrap();
        assert!(super::messages(bad).is_err());
    }
}
