//! The OpenAI chat-completions wire format: what requests may carry and how replies are spelled.
//!
//! The request type reads the honoured fields; every other field lands in `other` and is judged by
//! `fields`, the one table of what each field gets.

use serde::Deserialize;
use serde_json::{json, Map, Value};

#[derive(Debug, Deserialize)]
pub struct ChatCompletionRequest {
    pub messages: Vec<Message>,
    #[serde(default)]
    pub max_tokens: Option<u64>,
    /// The newer name of `max_tokens`; wins when both are given.
    #[serde(default)]
    pub max_completion_tokens: Option<u64>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Not in OpenAI's API; accepted as vLLM and others do.
    #[serde(default)]
    pub top_k: Option<usize>,
    /// Not in OpenAI's API; accepted as vLLM and others do (1 = off).
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: Option<Stop>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Not in OpenAI's API (vLLM's name): keep generating through the model's stop tokens.
    #[serde(default)]
    pub ignore_eos: Option<bool>,
    /// Every field not read above (only these are buffered), for `fields::check_other_fields`.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    /// `null` is allowed for assistant turns.
    #[serde(default)]
    pub content: Option<Content>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Part {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
}

/// `{"url": ...}` as OpenAI sends it; a bare string as some clients do.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ImageUrl {
    Object { url: String },
    Url(String),
}

impl ImageUrl {
    pub fn url(&self) -> &str {
        match self {
            ImageUrl::Object { url } | ImageUrl::Url(url) => url,
        }
    }
}

/// What every reply object names: which completion, when, from which model.
#[derive(Debug, Clone)]
pub struct ReplyHeader {
    pub id: String,
    pub created: u64,
    pub model: String,
}

pub fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

/// A whole (non-streamed) reply.
pub fn completion(header: &ReplyHeader, text: &str, finish_reason: &str, usage: Value) -> Value {
    json!({
        "id": header.id,
        "object": "chat.completion",
        "created": header.created,
        "model": header.model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": null,
            "finish_reason": finish_reason,
        }],
        "usage": usage,
    })
}

/// One streamed chunk with a single choice. `with_usage_field` adds `"usage": null`, as OpenAI does on
/// every chunk but the last when the client asked for usage.
pub fn chunk(
    header: &ReplyHeader,
    delta: Value,
    finish_reason: Option<&str>,
    with_usage_field: bool,
) -> Value {
    let mut value = json!({
        "id": header.id,
        "object": "chat.completion.chunk",
        "created": header.created,
        "model": header.model,
        "choices": [{
            "index": 0,
            "delta": delta,
            "logprobs": null,
            "finish_reason": finish_reason,
        }],
    });
    if with_usage_field {
        value["usage"] = Value::Null;
    }
    value
}

/// The last chunk of a stream with `include_usage`: no choices, only usage.
pub fn usage_chunk(header: &ReplyHeader, usage: Value) -> Value {
    json!({
        "id": header.id,
        "object": "chat.completion.chunk",
        "created": header.created,
        "model": header.model,
        "choices": [],
        "usage": usage,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_and_part_contents_both_parse() {
        let body = r#"{"model": "m", "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}},
                {"type": "image_url", "image_url": "data:image/png;base64,BBBB"}
            ]},
            {"role": "assistant", "content": null}
        ], "stop": "x", "stream_options": {"include_usage": true}, "user": "ignored"}"#;
        let req: ChatCompletionRequest = serde_json::from_str(body).unwrap();
        assert_eq!(req.messages.len(), 3);
        let Some(Content::Parts(parts)) = &req.messages[1].content else {
            panic!("parts expected, got {:?}", req.messages[1].content);
        };
        let urls: Vec<&str> = parts
            .iter()
            .filter_map(|p| match p {
                Part::ImageUrl { image_url } => Some(image_url.url()),
                Part::Text { .. } => None,
            })
            .collect();
        assert_eq!(
            urls,
            ["data:image/png;base64,AAAA", "data:image/png;base64,BBBB"]
        );
        assert!(matches!(req.stop, Some(Stop::One(ref s)) if s == "x"));
        assert!(req.stream_options.unwrap().include_usage);
    }

    #[test]
    fn an_unknown_part_type_is_refused() {
        let body =
            r#"{"messages": [{"role": "user", "content": [{"type": "audio", "data": ""}]}]}"#;
        assert!(serde_json::from_str::<ChatCompletionRequest>(body).is_err());
    }
}
