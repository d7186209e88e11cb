//! Errors in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`) with the HTTP status
//! clients act on: 4xx means "fix the request", 429/503 "retry later", 500 "our fault".

use std::borrow::Cow;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `server_error`, ...
    pub kind: &'static str,
    /// The request field at fault (`messages`, `temperature`, `messages[0].content`, ...).
    pub param: Option<Cow<'static, str>>,
    pub code: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// A request field with a bad value; `param` names it as OpenAI does.
    pub fn invalid_param(param: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        ApiError {
            param: Some(param.into()),
            code: Some("invalid_value"),
            ..Self::bad_request(message)
        }
    }

    pub fn payload_too_large(limit: usize) -> Self {
        ApiError {
            code: Some("request_too_large"),
            ..Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!("request body is larger than the limit of {limit} bytes"),
            )
        }
    }

    pub fn queue_full(running: usize, queued: usize) -> Self {
        ApiError {
            code: Some("queue_full"),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                format!(
                    "the server is busy ({running} requests running, {queued} queued, the most it \
                     accepts); retry later"
                ),
            )
        }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            message,
        )
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    pub fn body(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// The runtime's typed errors: what the request carried (images, messages, sampling, length) is the
/// client's to fix; everything about the model and its graphs is the server's.
impl From<llama3v::Error> for ApiError {
    fn from(err: llama3v::Error) -> Self {
        use llama3v::Error as E;
        let message = err.to_string();
        match err {
            E::ContextOverflow { .. } => ApiError {
                code: Some("context_length_exceeded"),
                param: Some("messages".into()),
                ..Self::bad_request(message)
            },
            E::Image { .. } | E::ImageCount { .. } => ApiError {
                code: Some("invalid_image"),
                param: Some("messages".into()),
                ..Self::bad_request(message)
            },
            // The runtime's messages start with the option's name, which is the request field's.
            E::Sampling(reason) => ApiError {
                code: Some("invalid_value"),
                param: [
                    "temperature",
                    "top_k",
                    "top_p",
                    "repetition_penalty",
                    "seed",
                ]
                .into_iter()
                .find(|field| reason.starts_with(&format!("{field} ")))
                .map(Cow::Borrowed),
                ..Self::bad_request(message)
            },
            E::RequestLimit { .. } => ApiError {
                code: Some("request_too_large"),
                param: Some("messages".into()),
                ..Self::bad_request(message)
            },
            // A request beyond the configured limits, or one that could never fit the KV budget.
            E::Admission(_) => ApiError {
                code: Some("request_too_large"),
                param: Some("messages".into()),
                ..Self::bad_request(message)
            },
            // The template raises on message structures it does not accept (e.g. roles out of order).
            E::ChatTemplate(_) => ApiError {
                param: Some("messages".into()),
                ..Self::bad_request(message)
            },
            // Model, graph, provider and tokenizer failures, and any variant added later.
            _ => Self::internal(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_errors_map_to_client_or_server_statuses() {
        let overflow = ApiError::from(llama3v::Error::ContextOverflow {
            prompt_tokens: 2100,
            max_new_tokens: 16,
            max_context: 2048,
        });
        assert_eq!(overflow.status, StatusCode::BAD_REQUEST);
        assert_eq!(overflow.code, Some("context_length_exceeded"));
        assert!(overflow.message.contains("2100") && overflow.message.contains("2048"));
        let image = ApiError::from(llama3v::Error::ImageCount {
            markers: 1,
            images: 2,
        });
        assert_eq!(image.status, StatusCode::BAD_REQUEST);
        let sampling = ApiError::from(llama3v::Error::Sampling(
            "top_p must be in (0, 1] (1 = off), got 0".into(),
        ));
        assert_eq!(sampling.param.as_deref(), Some("top_p"));
        let graph = ApiError::from(llama3v::Error::NonFiniteLogits { step: 3 });
        assert_eq!(graph.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(graph.body()["error"]["type"], "server_error");
    }
}
