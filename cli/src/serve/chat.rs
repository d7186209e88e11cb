//! `POST /v1/chat/completions`: parse and validate (`request`), admit (or 429), wait for a slot, decode
//! images under the request's pixel budget and build the prompt on a blocking thread, hand the job to
//! the batch engine, and answer with one JSON object or a stream of server-sent events.

use std::convert::Infallible;
use std::ops::ControlFlow;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, StreamExt};
use llama3v::engine::Job as EngineJob;
use llama3v::request::{admit, check_image_count};
use llama3v::request_limits::{load_images, prompt_text_bytes};
use llama3v::sequence::Sink;
use llama3v::sequence::{FinishReason, Generation, Timings};
use llama3v::Model;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::api::{self, ReplyHeader};
use super::errors::ApiError;
use super::memory::decode_cost;
use super::request::{parse_request, validate, Job};
use super::AppState;

const ENDPOINT: &str = "/v1/chat/completions";
/// How often a request waiting for decode memory checks whether its client is still there.
const MEMORY_POLL: Duration = Duration::from_millis(20);

/// What the engine tells the handler. The channel is unbounded so the engine never waits for a slow
/// client; what it holds is bounded by the request's token budget.
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
    // Before any image is fetched or decoded.
    check_image_count(&model, job.image_urls.len())?;
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
    let (tx, mut rx) = mpsc::unbounded_channel();
    let job_state = Arc::clone(state);
    let id = header.id.clone();
    tokio::task::spawn_blocking(move || {
        let sink = ReplySink {
            tx: tx.clone(),
            state: Arc::clone(&job_state),
            id,
            stream: job.stream,
            start: queued_at,
            first_token: None,
            _held: (ticket, slot),
        };
        prepare(&job_state, &model, job, sink);
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

/// Runs on a blocking thread: images, prompt and admission checks, then the job goes to the batch
/// engine. Sends `Started` once the prompt is known to fit, or the error that refused it; the sink
/// sends the rest.
fn prepare(state: &AppState, model: &Model, job: Job, sink: ReplySink) {
    let submitted = Instant::now();
    if state.cancel_all.load(Ordering::SeqCst) {
        return sink.fail(ApiError::unavailable("the server is shutting down"));
    }
    // A client that went away stops the work at the next stage boundary: between images, before the
    // prompt, before the engine (which checks again before vision and between prefill chunks).
    let gone = || ApiError::unavailable("the client went away");
    let mut job = job;
    let built = (|| {
        // Each URL (up to the body's size) is dropped once its bytes are out.
        let mut encoded = Vec::with_capacity(job.image_urls.len());
        for (i, url) in std::mem::take(&mut job.image_urls).into_iter().enumerate() {
            if sink.is_cancelled() {
                return Err(gone());
            }
            encoded.push(state.images.fetch(i, &url)?);
        }
        // Headers against the pixel budget first; then room in the decode memory budget for the
        // costlier of decoding the largest image and tokenizing the text (waiting for it, as long as
        // the client does); then one image at a time (at the model's size where it has one).
        let checked = state
            .limits
            .request
            .check_images(encoded, &state.images.limits)?;
        let cost = decode_cost(
            checked.dims(),
            prompt_text_bytes(&job.messages),
            model.manifest.image_size().is_none(),
        );
        let _decode_memory = state
            .decodes
            .reserve_blocking(cost, MEMORY_POLL, || sink.is_cancelled())
            .ok_or_else(gone)?;
        let images = load_images(
            checked,
            &state.images.limits,
            model.manifest.image_size(),
            &mut || {
                if sink.is_cancelled() {
                    Err(llama3v::Error::Cancelled)
                } else {
                    Ok(())
                }
            },
        )
        .map_err(|err| match err {
            llama3v::Error::Cancelled => gone(),
            err => ApiError::from(err),
        })?;
        if sink.is_cancelled() {
            return Err(gone());
        }
        let prompt = model.prompt_ids(&job.messages, &images)?;
        let room = model.limits().max_context.saturating_sub(prompt.len());
        let max_new_tokens = job
            .max_tokens
            .unwrap_or_else(|| state.limits.max_tokens.min(room).max(1));
        admit(model, prompt.len(), images.len(), max_new_tokens)?;
        if let Some(engine) = state.engine() {
            engine.config().check_need(prompt.len(), max_new_tokens)?;
        }
        let t = Instant::now();
        let pixel_values = model.pixel_values(&images);
        let timings = Timings {
            preprocess_ms: t.elapsed().as_secs_f64() * 1e3,
            ..Timings::default()
        };
        Ok::<_, ApiError>((prompt, pixel_values, images.len(), max_new_tokens, timings))
    })();
    let (prompt, pixel_values, images, max_new_tokens, timings) = match built {
        Ok(parts) => parts,
        Err(err) => return sink.fail(err),
    };
    let Some(engine) = state.engine() else {
        return sink.fail(ApiError::unavailable("the model is still loading"));
    };
    let started = Event::Started {
        prompt_tokens: prompt.len(),
    };
    if sink.tx.send(started).is_err() {
        return;
    }
    let job = EngineJob {
        prompt,
        pixel_values,
        images,
        max_new_tokens,
        sampling: job.sampling,
        stop_strings: job.stop,
        ignore_stop: job.ignore_eos,
        timings,
        submitted,
        sink: Box::new(sink) as llama3v::sequence::BoxedSink,
    };
    if let Err(job) = engine.submit(job) {
        job.sink.finish(Err(llama3v::Error::Internal(
            "the engine has stopped".into(),
        )));
    }
}

/// Hands a generation's text to its handler as the engine makes it; holds the request's ticket and
/// slot until the generation ends.
struct ReplySink {
    tx: mpsc::UnboundedSender<Event>,
    state: Arc<AppState>,
    id: String,
    stream: bool,
    start: Instant,
    first_token: Option<f64>,
    _held: (super::Ticket, super::Slot),
}

impl ReplySink {
    /// Ends a request refused before it reached the engine; its ticket and slot go with the sink.
    fn fail(self, err: ApiError) {
        let _ = self.tx.send(Event::Failed(err));
    }
}

impl Sink for ReplySink {
    fn on_text(&mut self, piece: &str) -> ControlFlow<()> {
        let start = self.start;
        self.first_token
            .get_or_insert_with(|| start.elapsed().as_secs_f64());
        // A closed receiver means the client went away (the response stream or the handler was
        // dropped): stop at this step and free the sequence's row.
        if self.is_cancelled() {
            return ControlFlow::Break(());
        }
        if self.stream && !piece.is_empty() && self.tx.send(Event::Text(piece.into())).is_err() {
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    }

    fn is_cancelled(&self) -> bool {
        self.state.cancel_all.load(Ordering::SeqCst) || self.tx.is_closed()
    }

    fn finish(self, result: llama3v::Result<Generation>) {
        let generation = match result {
            Ok(generation) => generation,
            Err(err) => {
                let _ = self.tx.send(Event::Failed(ApiError::from(err)));
                return;
            }
        };
        let finish = finish_reason(generation.finish_reason);
        let seconds = self.start.elapsed().as_secs_f64();
        self.state.metrics.observe_generation(
            generation.prompt_tokens.len(),
            generation.tokens.len(),
            finish,
            self.first_token,
            seconds,
        );
        eprintln!(
            "{}: {} prompt + {} completion tokens, {finish}, {:.0} ms",
            self.id,
            generation.prompt_tokens.len(),
            generation.tokens.len(),
            seconds * 1e3
        );
        let _ = self.tx.send(Event::Done(generation));
    }
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
    mut rx: mpsc::UnboundedReceiver<Event>,
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
    rx: mpsc::UnboundedReceiver<Event>,
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
