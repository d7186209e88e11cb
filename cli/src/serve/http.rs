//! The HTTP layer under the routes: connections, time limits and the limits on a request's head and
//! body, with every refusal in OpenAI's error shape.
//!
//! - A connection must send a complete request head within `--header-timeout-secs` of connecting or
//!   of its previous response (hyper's header-read timeout, which also closes idle keep-alive
//!   connections), and a whole body within `--body-timeout-secs` of its head (408 otherwise).
//! - A declared `Content-Length` over `--max-body-bytes` gets 413 before a byte of the body is read;
//!   a body without one is cut off at the limit (413). A body is read only once the bodies' memory
//!   budget has room for it (`memory`); until then the request waits.
//! - A target over `MAX_URI_BYTES` gets 414, a head over `MAX_HEADER_BYTES` or `MAX_HEADERS` fields
//!   gets 431, an unknown path 404 and a wrong method 405, all as `{"error": {...}}`. Heads too large
//!   for hyper's own buffer (`HYPER_MAX_BUF_BYTES`, `HYPER_MAX_HEADERS`) are refused by hyper itself
//!   with a bare 431 or 414 and the connection closed: those never reach this code.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

use super::errors::ApiError;
use super::memory::MemoryBudget;

/// Longest request target (path and query) accepted.
pub const MAX_URI_BYTES: usize = 8 * 1024;
/// Largest request head (header names and values) accepted.
pub const MAX_HEADER_BYTES: usize = 32 * 1024;
/// Most header fields accepted.
pub const MAX_HEADERS: usize = 64;
/// hyper's read buffer per connection; a head that does not fit gets hyper's bare 431.
const HYPER_MAX_BUF_BYTES: usize = 64 * 1024;
/// hyper's limit on header fields; more get hyper's bare 431.
const HYPER_MAX_HEADERS: usize = 128;

/// The HTTP layer's limits (flags of `serve`).
#[derive(Debug, Clone)]
pub struct HttpLimits {
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub max_body_bytes: usize,
    /// What request bodies may hold at once (`memory`).
    pub bodies: Arc<MemoryBudget>,
}

/// Bodies are held about three times: the bytes, the parsed request, the base64-decoded images.
const BODY_COPIES: u64 = 3;

/// Serves `router` on `listener` until `shutdown` completes; then stops accepting, lets each
/// connection finish its request in flight (idle ones close at once) and returns when all are done.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: &HttpLimits,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(HYPER_MAX_BUF_BYTES)
        .max_headers(HYPER_MAX_HEADERS)
        .keep_alive(true);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                // Out of file descriptors and the like: wait instead of spinning, as axum::serve does.
                Err(err) => {
                    eprintln!("llama3v serve: accepting a connection failed: {err}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            // A connection's errors (a client that went away, a timed-out head) end only it.
            let _ = connection.await;
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

fn too_long(status: StatusCode, code: &'static str, message: String) -> Response {
    ApiError {
        status,
        code: Some(code),
        ..ApiError::bad_request(message)
    }
    .into_response()
}

/// Middleware for every route: the head's limits, then the body read whole under its size and time
/// limits, so handlers get a body that is already in memory.
pub async fn guard(
    State(limits): State<Arc<HttpLimits>>,
    request: Request,
    next: Next,
) -> Response {
    let uri_len = request.uri().to_string().len();
    if uri_len > MAX_URI_BYTES {
        return too_long(
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            format!(
                "the request target is {uri_len} bytes, more than the limit of {MAX_URI_BYTES}"
            ),
        );
    }
    let headers = request.headers();
    let head_bytes: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if headers.len() > MAX_HEADERS || head_bytes > MAX_HEADER_BYTES {
        return too_long(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!(
                "the request has {} header fields of {head_bytes} bytes, more than the limits of \
                 {MAX_HEADERS} fields and {MAX_HEADER_BYTES} bytes",
                headers.len()
            ),
        );
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_body_bytes as u64) {
        return ApiError::payload_too_large(limits.max_body_bytes).into_response();
    }
    // Room for the body before a byte of it is read (none for requests that carry none); held until
    // the handler has answered.
    let expects_body = declared.is_some_and(|n| n > 0)
        || (declared.is_none() && headers.contains_key(header::TRANSFER_ENCODING));
    let _body_memory = if expects_body {
        let size = declared.unwrap_or(limits.max_body_bytes as u64);
        match limits.bodies.reserve(BODY_COPIES * size).await {
            Some(reservation) => Some(reservation),
            None => return ApiError::unavailable("the server is shutting down").into_response(),
        }
    } else {
        None
    };
    let (parts, body) = request.into_parts();
    let read = axum::body::to_bytes(body, limits.max_body_bytes);
    let bytes = match tokio::time::timeout(limits.body_timeout, read).await {
        Err(_) => {
            return ApiError {
                status: StatusCode::REQUEST_TIMEOUT,
                code: Some("body_timeout"),
                ..ApiError::bad_request(format!(
                    "the request body did not arrive within {:.0} s",
                    limits.body_timeout.as_secs_f64()
                ))
            }
            .into_response()
        }
        Ok(Err(err)) if is_length_limit(&err) => {
            return ApiError::payload_too_large(limits.max_body_bytes).into_response()
        }
        Ok(Err(err)) => {
            return ApiError::bad_request(format!("could not read the request body: {err}"))
                .into_response()
        }
        Ok(Ok(bytes)) => bytes,
    };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

fn is_length_limit(err: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = e.source();
    }
    false
}

/// 404 for a path no route serves.
pub async fn not_found() -> Response {
    ApiError {
        status: StatusCode::NOT_FOUND,
        code: Some("not_found"),
        ..ApiError::bad_request(
            "no such endpoint (served: POST /v1/chat/completions, GET /v1/models, /health, /metrics)",
        )
    }
    .into_response()
}

/// 405 for a served path with another method.
pub async fn method_not_allowed(request: Request) -> Response {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        code: Some("method_not_allowed"),
        ..ApiError::bad_request(format!(
            "{} is not served at {} (served: POST /v1/chat/completions, GET /v1/models, /health, \
             /metrics)",
            request.method(),
            request.uri().path()
        ))
    }
    .into_response()
}
