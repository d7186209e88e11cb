//! Every request field of `POST /v1/chat/completions` this server knows, and what it gets: the one
//! place that decides whether a field is honoured, refused or ignored (the README's table is this
//! one, and a test keeps them equal).
//!
//! - **honoured**: read and acted on (`api::ChatCompletionRequest` holds them);
//! - **refused**: it would change the answer and is not supported, so a request that sets it to
//!   anything but its neutral value gets 400 naming it (never a reply that silently differs);
//! - **ignored**: it cannot change the answer of this server, so it is accepted and not read.
//!
//! A field in none of these is refused as unknown, as OpenAI refuses it: a misspelt or newer option
//! must not be dropped without a word. `null` counts as absent for every field.

use serde_json::{Map, Value};

use super::errors::ApiError;

/// What a field gets.
#[derive(Debug, Clone, Copy)]
pub enum Treatment {
    Honoured,
    /// Accepted while the value is neutral (`neutral` says which values are), refused otherwise.
    Refused {
        neutral: fn(&Value) -> bool,
        neutral_text: &'static str,
        why: &'static str,
    },
    /// Accepted and not read; the reason it cannot change the answer (the README's table gives it, a
    /// test keeps the two equal).
    Ignored(#[allow(dead_code)] &'static str),
}

use Treatment::{Honoured, Ignored, Refused};

fn never(_: &Value) -> bool {
    false
}
fn is_one(v: &Value) -> bool {
    v.as_f64() == Some(1.0)
}
fn is_zero(v: &Value) -> bool {
    v.as_f64() == Some(0.0)
}
fn is_false(v: &Value) -> bool {
    v == &Value::Bool(false)
}
fn is_empty(v: &Value) -> bool {
    v.as_array().is_some_and(Vec::is_empty) || v.as_object().is_some_and(Map::is_empty)
}
fn is_none_choice(v: &Value) -> bool {
    matches!(v.as_str(), Some("none" | "auto"))
}
fn is_text_format(v: &Value) -> bool {
    v.get("type").and_then(Value::as_str) == Some("text")
}
fn is_text_modality(v: &Value) -> bool {
    v.as_array()
        .is_some_and(|a| a.iter().all(|m| m.as_str() == Some("text")))
}

/// The table, in OpenAI's order of its reference, then the extensions other servers share.
pub const FIELDS: &[(&str, Treatment)] = &[
    ("messages", Honoured),
    ("model", Ignored("one model is served; replies name it")),
    (
        "audio",
        Refused {
            neutral: never,
            neutral_text: "absent",
            why: "audio output is not supported",
        },
    ),
    (
        "frequency_penalty",
        Refused {
            neutral: is_zero,
            neutral_text: "0",
            why: "frequency_penalty is not supported (use repetition_penalty)",
        },
    ),
    (
        "function_call",
        Refused {
            neutral: is_none_choice,
            neutral_text: "\"none\" or \"auto\"",
            why: "function calling is not supported",
        },
    ),
    (
        "functions",
        Refused {
            neutral: is_empty,
            neutral_text: "[]",
            why: "function calling is not supported",
        },
    ),
    (
        "logit_bias",
        Refused {
            neutral: is_empty,
            neutral_text: "{}",
            why: "logit_bias is not supported",
        },
    ),
    (
        "logprobs",
        Refused {
            neutral: is_false,
            neutral_text: "false",
            why: "logprobs are not supported",
        },
    ),
    ("max_completion_tokens", Honoured),
    ("max_tokens", Honoured),
    (
        "metadata",
        Ignored("stored nowhere; only labels the request"),
    ),
    (
        "modalities",
        Refused {
            neutral: is_text_modality,
            neutral_text: "[\"text\"]",
            why: "only text output is supported",
        },
    ),
    (
        "n",
        Refused {
            neutral: is_one,
            neutral_text: "1",
            why: "only n = 1 is supported",
        },
    ),
    (
        "parallel_tool_calls",
        Ignored("tools are refused, so there are no tool calls"),
    ),
    (
        "prediction",
        Ignored("predicted outputs change latency, not the answer"),
    ),
    (
        "presence_penalty",
        Refused {
            neutral: is_zero,
            neutral_text: "0",
            why: "presence_penalty is not supported (use repetition_penalty)",
        },
    ),
    (
        "prompt_cache_key",
        Ignored("a caching hint; the answer is the same"),
    ),
    (
        "reasoning_effort",
        Refused {
            neutral: never,
            neutral_text: "absent",
            why: "reasoning_effort is not supported",
        },
    ),
    (
        "response_format",
        Refused {
            neutral: is_text_format,
            neutral_text: "{\"type\": \"text\"}",
            why: "only plain text replies are supported",
        },
    ),
    (
        "safety_identifier",
        Ignored("identifies the end user for abuse monitoring"),
    ),
    ("seed", Honoured),
    ("service_tier", Ignored("one tier is served")),
    ("stop", Honoured),
    (
        "store",
        Ignored("nothing is stored; the answer is the same"),
    ),
    ("stream", Honoured),
    ("stream_options", Honoured),
    ("temperature", Honoured),
    (
        "tool_choice",
        Refused {
            neutral: is_none_choice,
            neutral_text: "\"none\" or \"auto\"",
            why: "tools are not supported",
        },
    ),
    (
        "tools",
        Refused {
            neutral: is_empty,
            neutral_text: "[]",
            why: "tools are not supported",
        },
    ),
    (
        "top_logprobs",
        Refused {
            neutral: is_zero,
            neutral_text: "0",
            why: "logprobs are not supported",
        },
    ),
    ("top_p", Honoured),
    (
        "user",
        Ignored("identifies the end user; the answer is the same"),
    ),
    (
        "verbosity",
        Refused {
            neutral: never,
            neutral_text: "absent",
            why: "verbosity is not supported",
        },
    ),
    (
        "web_search_options",
        Refused {
            neutral: never,
            neutral_text: "absent",
            why: "web search is not supported",
        },
    ),
    // Not in OpenAI's API; vLLM and others accept them.
    ("top_k", Honoured),
    ("repetition_penalty", Honoured),
    ("ignore_eos", Honoured),
];

/// Checks the fields `api::ChatCompletionRequest` does not read (those are the honoured ones).
pub fn check_other_fields(other: &Map<String, Value>) -> Result<(), ApiError> {
    for (name, value) in other {
        if value.is_null() {
            continue;
        }
        match FIELDS.iter().find(|(known, _)| known == name) {
            None => {
                return Err(ApiError::invalid_param(
                    name.clone(),
                    format!(
                        "unknown field {name:?} (this server's fields are listed in its README)"
                    ),
                ))
            }
            Some((_, Ignored(_))) => {}
            Some((
                _,
                Refused {
                    neutral,
                    neutral_text,
                    why,
                },
            )) => {
                if !neutral(value) {
                    return Err(ApiError::invalid_param(
                        name.clone(),
                        format!("{why}: {name} must be absent, null or {neutral_text}"),
                    ));
                }
            }
            // Only reached if `ChatCompletionRequest` lost a field the table honours.
            Some((_, Honoured)) => {
                return Err(ApiError::internal(format!(
                    "internal error: field {name} is honoured but not read"
                )))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::api::ChatCompletionRequest;
    use super::*;
    use serde_json::json;

    fn parse(body: Value) -> Result<(), ApiError> {
        let request: ChatCompletionRequest =
            serde_json::from_value(body).map_err(|e| ApiError::bad_request(e.to_string()))?;
        check_other_fields(&request.other)
    }

    fn base() -> Value {
        json!({"messages": [{"role": "user", "content": "hi"}]})
    }

    #[test]
    fn every_honoured_field_is_read_by_the_request_type() {
        // A value of the right type for each honoured field: none may land among the unread fields.
        let mut body = base();
        let values = json!({
            "max_completion_tokens": 4, "max_tokens": 4, "seed": 1, "stop": "x", "stream": false,
            "stream_options": {"include_usage": true}, "temperature": 0.5, "top_p": 0.9, "top_k": 5,
            "repetition_penalty": 1.1, "ignore_eos": false,
        });
        for (name, treatment) in FIELDS {
            if matches!(treatment, Honoured) && *name != "messages" {
                body[*name] = values[*name].clone();
                assert!(!values[*name].is_null(), "no test value for {name}");
            }
        }
        let request: ChatCompletionRequest = serde_json::from_value(body).unwrap();
        assert!(request.other.is_empty(), "unread: {:?}", request.other);
    }

    #[test]
    fn refused_fields_are_refused_unless_neutral_and_name_themselves() {
        for (field, bad, neutral) in [
            ("logit_bias", json!({"123": 5}), json!({})),
            ("top_logprobs", json!(3), json!(0)),
            ("logprobs", json!(true), json!(false)),
            ("n", json!(2), json!(1)),
            ("frequency_penalty", json!(0.5), json!(0)),
            ("presence_penalty", json!(0.5), json!(0.0)),
            ("tools", json!([{"type": "function"}]), json!([])),
            ("tool_choice", json!("required"), json!("none")),
            (
                "response_format",
                json!({"type": "json_object"}),
                json!({"type": "text"}),
            ),
            ("modalities", json!(["text", "audio"]), json!(["text"])),
            ("audio", json!({"voice": "x"}), Value::Null),
            ("reasoning_effort", json!("high"), Value::Null),
        ] {
            let mut body = base();
            body[field] = bad;
            let err = parse(body).unwrap_err();
            assert_eq!(err.param.as_deref(), Some(field), "{}", err.message);
            assert!(err.message.contains(field), "{}", err.message);
            let mut body = base();
            body[field] = neutral;
            assert!(parse(body).is_ok(), "{field} neutral value refused");
        }
    }

    #[test]
    fn ignored_fields_pass_and_unknown_ones_are_refused() {
        let mut body = base();
        for (name, treatment) in FIELDS {
            if matches!(treatment, Ignored(_)) {
                body[*name] = json!("anything");
            }
        }
        assert!(parse(body).is_ok());
        let mut body = base();
        body["guided_json"] = json!({"type": "object"});
        let err = parse(body).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("guided_json"));
        assert!(err.message.contains("unknown field"), "{}", err.message);
    }

    #[test]
    fn the_table_names_each_field_once() {
        let mut names: Vec<&str> = FIELDS.iter().map(|(n, _)| *n).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len());
    }

    /// The README's field table is this table: every field with what it gets.
    #[test]
    fn the_readme_lists_every_field_with_its_treatment() {
        let readme = include_str!("../../../README.md");
        for (name, treatment) in FIELDS {
            let kind = match treatment {
                Honoured => "honoured".to_string(),
                Refused { .. } => "refused".to_string(),
                Ignored(why) => format!("ignored: {why} |"),
            };
            let row = format!("| `{name}` | {kind}");
            assert!(readme.contains(&row), "README lacks the row {row:?}");
        }
    }
}
