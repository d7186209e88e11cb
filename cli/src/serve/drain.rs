//! Shutting down without dropping work, the way load balancers and Kubernetes expect it.
//!
//! On SIGTERM/SIGINT `/health` turns 503 at once, so balancers take the replica out of rotation; the
//! listener stays open meanwhile, and requests that still arrive (a balancer's health checks lag by an
//! interval) get 503 with `Retry-After` instead of a refused connection, so a balancer or client retries
//! them elsewhere. The listener closes once no request is running or queued, or when the grace time ends.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use tokio::sync::watch;

use super::{AppState, StopReason};

/// How often the drain checks whether the last request has finished: short next to any generation.
const DRAIN_POLL: Duration = Duration::from_millis(50);

/// Seconds a client is told to wait before retrying a 503 (loading, draining) or a 429 (queue full).
/// Behind a balancer the retry lands on another replica, so the wait can be short.
pub const RETRY_AFTER_SECS: u64 = 1;

/// Resolves when the HTTP server should stop accepting connections: at once if the model failed to
/// load, else after a stop signal once every admitted request (running or queued) has finished.
/// Requests still running at the end of the grace time are cancelled by the caller, which also
/// resolves this.
pub async fn until_drained(mut stop: watch::Receiver<Option<StopReason>>, state: Arc<AppState>) {
    let reason = match stop.wait_for(Option::is_some).await {
        Ok(reason) => reason.clone(),
        // The sender is gone: nothing can stop the server any more, so stop now.
        Err(_) => return,
    };
    if let Some(StopReason::LoadFailed(_)) = reason {
        return;
    }
    state.shutting_down.store(true, Ordering::SeqCst);
    loop {
        let (running, queued) = state.scheduler.gauges();
        if running + queued == 0 {
            return;
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
}

/// Adds `Retry-After` to 503 and 429 answers that don't carry one.
pub async fn add_retry_after(mut response: Response) -> Response {
    let status = response.status();
    if (status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS)
        && !response.headers().contains_key(header::RETRY_AFTER)
    {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
    }
    response
}
