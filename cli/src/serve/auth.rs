//! Optional API keys (`--api-key`, `$LLAMA3V_API_KEY`, `--api-key-file`): requests without a valid
//! `Authorization: Bearer KEY` get 401 in OpenAI's error shape. `/health` and `/metrics` stay open, since
//! probes and scrapers carry no keys (restrict them on the network instead).
//!
//! Keys are kept only as SHA-256 digests and compared digest to digest, so the comparison's timing says
//! nothing about a key, and no key text is left to reach a log or a `Debug` print.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::errors::ApiError;

/// Paths served without a key: readiness/liveness probes and metric scrapers.
const OPEN_PATHS: [&str; 2] = ["/health", "/metrics"];

/// A key given on the command line or in the environment; its `Debug` never shows it.
#[derive(Clone)]
pub struct SecretKey(String);

impl FromStr for SecretKey {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(SecretKey(s.to_string()))
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

type KeyDigest = [u8; 32];

fn digest(key: &str) -> KeyDigest {
    Sha256::digest(key.as_bytes()).into()
}

/// The accepted keys, as digests.
pub struct ApiKeys {
    digests: Vec<KeyDigest>,
}

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKeys({} keys)", self.digests.len())
    }
}

impl ApiKeys {
    /// The keys from `--api-key` / `$LLAMA3V_API_KEY` and `--api-key-file` together; `None` when neither
    /// is given (the server is open). An empty key or a file without keys is an error, not an open server.
    pub fn from_args(key: Option<&SecretKey>, file: Option<&Path>) -> Result<Option<Self>> {
        let mut digests = Vec::new();
        if let Some(SecretKey(key)) = key {
            let key = key.trim();
            if key.is_empty() {
                return Err(anyhow!("--api-key (or $LLAMA3V_API_KEY) is empty"));
            }
            digests.push(digest(key));
        }
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading --api-key-file {}", path.display()))?;
            let before = digests.len();
            digests.extend(parse_key_file(&text).map(digest));
            if digests.len() == before {
                return Err(anyhow!(
                    "--api-key-file {} holds no key (one key a line; blank lines and lines starting \
                     with # are skipped)",
                    path.display()
                ));
            }
        }
        Ok((!digests.is_empty()).then_some(ApiKeys { digests }))
    }

    pub fn len(&self) -> usize {
        self.digests.len()
    }

    fn accepts(&self, presented: &str) -> bool {
        let presented = digest(presented);
        // Every digest is compared, so the time taken does not tell which key (if any) matched.
        self.digests
            .iter()
            .fold(false, |found, known| found | (*known == presented))
    }
}

/// One key a line; blank lines and `#` comments skipped; surrounding whitespace (a file written with a
/// trailing newline or CRLF) is not part of a key.
fn parse_key_file(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
}

/// The bearer token of an `Authorization` header, if it is one.
fn bearer_token(value: &HeaderValue) -> Option<&str> {
    let value = value.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// Middleware: lets a request through when its path is open or it carries an accepted key.
pub async fn require_key(
    State(keys): State<Arc<ApiKeys>>,
    request: Request,
    next: Next,
) -> Response {
    if OPEN_PATHS.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(bearer_token);
    match token {
        Some(token) if keys.accepts(token) => next.run(request).await,
        Some(_) => unauthorized("Incorrect API key provided."),
        None => unauthorized(
            "You didn't provide an API key. Provide it in an Authorization header using Bearer auth \
             (Authorization: Bearer YOUR_KEY).",
        ),
    }
}

/// 401 in OpenAI's shape; the presented key is never echoed.
fn unauthorized(message: &str) -> Response {
    let error = ApiError {
        status: StatusCode::UNAUTHORIZED,
        code: Some("invalid_api_key"),
        ..ApiError::bad_request(message)
    };
    let mut response = error.into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_lines_skip_blanks_and_comments() {
        let keys: Vec<&str> =
            parse_key_file("# rotation 2026-11\nkey-one\r\n\n  key-two  \n#old\n").collect();
        assert_eq!(keys, ["key-one", "key-two"]);
    }

    #[test]
    fn only_listed_keys_are_accepted() {
        let dir = std::env::temp_dir().join(format!("llama3v-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("keys");
        std::fs::write(&file, "k2\n# comment\nk3\n").unwrap();
        let cli: SecretKey = "k1".parse().unwrap();
        let keys = ApiKeys::from_args(Some(&cli), Some(&file))
            .unwrap()
            .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(keys.len(), 3);
        for key in ["k1", "k2", "k3"] {
            assert!(keys.accepts(key), "{key}");
        }
        for key in ["", "k", "k4", "# comment", "K1"] {
            assert!(!keys.accepts(key), "{key:?}");
        }
    }

    #[test]
    fn no_key_means_open_and_an_empty_key_is_refused() {
        assert!(ApiKeys::from_args(None, None).unwrap().is_none());
        let empty: SecretKey = " ".parse().unwrap();
        assert!(ApiKeys::from_args(Some(&empty), None).is_err());
    }

    #[test]
    fn debug_prints_never_show_a_key() {
        let key: SecretKey = "sk-very-secret".parse().unwrap();
        assert!(!format!("{key:?}").contains("very-secret"));
        let keys = ApiKeys::from_args(Some(&key), None).unwrap().unwrap();
        assert!(!format!("{keys:?}").contains("very-secret"));
    }

    #[test]
    fn bearer_tokens_are_read_case_insensitively() {
        let value = HeaderValue::from_static("bearer abc");
        assert_eq!(bearer_token(&value), Some("abc"));
        assert_eq!(bearer_token(&HeaderValue::from_static("Basic abc")), None);
        assert_eq!(bearer_token(&HeaderValue::from_static("abc")), None);
    }
}
