//! `POST /v1/chat/completions`: validate, admit (or 429), wait for a slot, generate on a blocking thread,
//! and answer with one JSON object or a stream of server-sent events.

use std::convert::Infallible;
use std::ops::ControlFlow;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, StreamExt};
use llama3v::generate::{FinishReason, Generation, Request};
use llama3v::request_limits::load_images;
use llama3v::Model;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::api::{self, ReplyHeader};
use super::errors::ApiError;
use super::request::{parse_request, validate, Job};
use super::AppState;

const ENDPOINT: &str = "/v1/chat/completions";
/// Text pieces buffered between the generating thread and a slow client before generation waits.
const STREAM_BUFFER: usize = 64;

/// What the generating thread tells the handler.
enum Event {
    /// Images decoded and the prompt fits: the reply can start.
    Started {
        prompt_tokens: usize,
    },
    /// Text that became final (streaming only).
    Text(String),
    Done(Generation),
    Failed(ApiError),
}

pub async fn completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let response = match handle(&state, body).await {
        Ok(response) => response,
        Err(err) => err.into_response(),
    };
    state
        .metrics
        .count_request(ENDPOINT, response.status().as_u16());
    response
}

async fn handle(
    state: &Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::payload_too_large(state.limits.max_body_bytes)
        } else {
            ApiError::bad_request(format!("could not read the request body: {rejection}"))
        }
    })?;
    let request = parse_request(&body)?;
    drop(body);
    if state.shutting_down.load(Ordering::SeqCst) {
        return Err(ApiError::unavailable("the server is shutting down"));
    }
    let Some(model) = state.model() else {
        return Err(ApiError::unavailable(
            "the model is still loading; retry when /health answers 200",
        ));
    };
    let include_usage = request
        .stream_options
        .as_ref()
        .is_some_and(|o| o.include_usage);
    let job = validate(request, &state.limits, &model.manifest.generation)?;
    let stream = job.stream;

    let ticket = state.scheduler.admit()?;
    let queued_at = Instant::now();
    let slot = state.scheduler.slot().await?;
    state
        .metrics
        .observe_queue_wait(queued_at.elapsed().as_secs_f64());

    let header = ReplyHeader {
        id: state.next_request_id(),
        created: super::unix_now(),
        model: state.model_name.clone(),
    };
    let (tx, mut rx) = mpsc::channel(STREAM_BUFFER);
    let job_state = Arc::clone(state);
    let id = header.id.clone();
    tokio::task::spawn_blocking(move || {
        let _held = (ticket, slot);
        if let Err(err) = execute(&job_state, &model, job, &tx, &id) {
            let _ = tx.blocking_send(Event::Failed(err));
        }
    });

    let prompt_tokens = match rx.recv().await {
        Some(Event::Started { prompt_tokens }) => prompt_tokens,
        Some(Event::Failed(err)) => return Err(err),
        Some(Event::Text(_) | Event::Done(_)) | None => {
            return Err(ApiError::internal(
                "internal error: the generation ended before it started",
            ))
        }
    };
    if stream {
        Ok(sse_reply(rx, header, prompt_tokens, include_usage))
    } else {
        json_reply(rx, &header, prompt_tokens).await
    }
}

/// Runs on a blocking thread: images, prompt, generation. Sends `Started` once the prompt is known to
/// fit, text pieces while streaming, and `Done` at the end.
fn execute(
    state: &AppState,
    model: &Model,
    mut job: Job,
    tx: &mpsc::Sender<Event>,
    id: &str,
) -> Result<(), ApiError> {
    let start = Instant::now();
    if state.cancel_all.load(Ordering::SeqCst) {
        return Err(ApiError::unavailable("the server is shutting down"));
    }
    // Each URL (up to the body's size) is dropped once its bytes are out.
    let encoded = std::mem::take(&mut job.image_urls)
        .into_iter()
        .enumerate()
        .map(|(i, url)| state.images.fetch(i, &url))
        .collect::<Result<Vec<_>, _>>()?;
    let size = (model.manifest.image.width, model.manifest.image.height);
    // Headers against the pixel budget first, then one image at a time at the model's size.
    let images = load_images(
        encoded,
        &state.images.limits,
        &state.limits.request,
        size,
        &mut || Ok(()),
    )?;
    let prompt = model.prompt_ids(&job.messages, images.len())?;
    let context = model.max_context();
    let room = context.saturating_sub(prompt.len());
    let max_new_tokens = job
        .max_tokens
        .unwrap_or_else(|| state.limits.max_tokens.min(room));
    if max_new_tokens == 0 || prompt.len() + max_new_tokens > context {
        return Err(ApiError::from(llama3v::Error::ContextOverflow {
            prompt_tokens: prompt.len(),
            max_new_tokens: max_new_tokens.max(1),
            max_context: context,
        }));
    }
    if tx
        .blocking_send(Event::Started {
            prompt_tokens: prompt.len(),
        })
        .is_err()
    {
        return Ok(());
    }

    let request = Request {
        messages: &job.messages,
        images: &images,
        max_new_tokens,
        sampling: job.sampling,
        ignore_stop: job.ignore_eos,
    };
    let mut first_token: Option<f64> = None;
    let generation = model.generate_until(&request, &job.stop, &mut |piece| {
        first_token.get_or_insert_with(|| start.elapsed().as_secs_f64());
        // A dropped receiver means the client went away (the response stream or the handler was
        // dropped): stop at this step and free the KV cache.
        if state.cancel_all.load(Ordering::SeqCst) || tx.is_closed() {
            return ControlFlow::Break(());
        }
        if job.stream && !piece.is_empty() && tx.blocking_send(Event::Text(piece.into())).is_err() {
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    })?;
    let finish = finish_reason(generation.finish_reason);
    let seconds = start.elapsed().as_secs_f64();
    state.metrics.observe_generation(
        generation.prompt_tokens.len(),
        generation.tokens.len(),
        finish,
        first_token,
        seconds,
    );
    eprintln!(
        "{id}: {} prompt + {} completion tokens, {finish}, {:.0} ms",
        generation.prompt_tokens.len(),
        generation.tokens.len(),
        seconds * 1e3
    );
    let _ = tx.blocking_send(Event::Done(generation));
    Ok(())
}

fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Cancelled => "cancelled",
    }
}

/// A generation cancelled while its client still listens can only mean the server is shutting down.
fn cancelled_error() -> ApiError {
    ApiError::unavailable("the server shut down before the generation finished")
}

async fn json_reply(
    mut rx: mpsc::Receiver<Event>,
    header: &ReplyHeader,
    prompt_tokens: usize,
) -> Result<Response, ApiError> {
    loop {
        match rx.recv().await {
            Some(Event::Text(_) | Event::Started { .. }) => {}
            Some(Event::Done(generation)) => {
                if generation.finish_reason == FinishReason::Cancelled {
                    return Err(cancelled_error());
                }
                let usage = api::usage(prompt_tokens, generation.tokens.len());
                let body = api::completion(
                    header,
                    &generation.text,
                    finish_reason(generation.finish_reason),
                    usage,
                );
                return Ok(Json(body).into_response());
            }
            Some(Event::Failed(err)) => return Err(err),
            None => {
                return Err(ApiError::internal(
                    "internal error: the generation stopped without a result",
                ))
            }
        }
    }
}

fn data(value: &Value) -> SseEvent {
    SseEvent::default().data(value.to_string())
}

fn error_events(err: &ApiError) -> Vec<SseEvent> {
    vec![data(&err.body()), SseEvent::default().data("[DONE]")]
}

/// The reply as server-sent events: a role chunk, one chunk per text piece, a chunk with the finish
/// reason, the usage chunk if asked for, then `[DONE]`. Dropping the stream (the client went away)
/// drops `rx`, which the generating thread notices at its next step.
fn sse_reply(
    rx: mpsc::Receiver<Event>,
    header: ReplyHeader,
    prompt_tokens: usize,
    include_usage: bool,
) -> Response {
    let first = data(&api::chunk(
        &header,
        json!({"role": "assistant", "content": ""}),
        None,
        include_usage,
    ));
    let rest = stream::unfold(Some(rx), move |rx| {
        let header = header.clone();
        async move {
            let mut rx = rx?;
            let (events, next) = match rx.recv().await {
                Some(Event::Text(piece)) => {
                    let delta = json!({"content": piece});
                    (
                        vec![data(&api::chunk(&header, delta, None, include_usage))],
                        Some(rx),
                    )
                }
                Some(Event::Started { .. }) => (Vec::new(), Some(rx)),
                Some(Event::Done(generation)) => (
                    done_events(&header, &generation, prompt_tokens, include_usage),
                    None,
                ),
                Some(Event::Failed(err)) => (error_events(&err), None),
                None => (
                    error_events(&ApiError::internal(
                        "internal error: the generation stopped without a result",
                    )),
                    None,
                ),
            };
            Some((events, next))
        }
    });
    let events = stream::once(async move { vec![first] })
        .chain(rest)
        .flat_map(|events| stream::iter(events.into_iter().map(Ok::<_, Infallible>)));
    Sse::new(events).into_response()
}

fn done_events(
    header: &ReplyHeader,
    generation: &Generation,
    prompt_tokens: usize,
    include_usage: bool,
) -> Vec<SseEvent> {
    if generation.finish_reason == FinishReason::Cancelled {
        return error_events(&cancelled_error());
    }
    let reason = finish_reason(generation.finish_reason);
    let mut events = vec![data(&api::chunk(
        header,
        json!({}),
        Some(reason),
        include_usage,
    ))];
    if include_usage {
        let usage = api::usage(prompt_tokens, generation.tokens.len());
        events.push(data(&api::usage_chunk(header, usage)));
    }
    events.push(SseEvent::default().data("[DONE]"));
    events
}
