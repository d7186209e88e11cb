//! `POST /v1/chat/completions`: validate, admit (or 429), wait for a slot, decode images and build the
//! prompt on a blocking thread, hand the job to the batch engine, and answer with one JSON object or a
//! stream of server-sent events.

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
use llama3v::chat_template::{ChatMessage, ContentPart};
use llama3v::engine::Job as EngineJob;
use llama3v::generate::{FinishReason, Generation, Timings};
use llama3v::request::{admit, resolve_sampling, SamplingRequest};
use llama3v::sampling::SamplingParams;
use llama3v::sequence::Sink;
use llama3v::Model;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::api::{self, ChatCompletionRequest, Content, Part, ReplyHeader, Stop};
use super::errors::ApiError;
use super::AppState;

const ENDPOINT: &str = "/v1/chat/completions";
/// OpenAI's limit on stop sequences.
const MAX_STOP_STRINGS: usize = 4;

/// A validated request, ready to run.
struct Job {
    messages: Vec<ChatMessage>,
    /// Image URLs in placeholder order.
    image_urls: Vec<String>,
    sampling: SamplingParams,
    max_tokens: Option<usize>,
    stop: Vec<String>,
    ignore_eos: bool,
    stream: bool,
}

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
    let request: ChatCompletionRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))?;
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
    let job = validate(request, state, &model)?;
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

fn validate(
    request: ChatCompletionRequest,
    state: &AppState,
    model: &Model,
) -> Result<Job, ApiError> {
    if request.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid_param("n", "only n = 1 is supported"));
    }
    for (name, value) in [
        ("frequency_penalty", request.frequency_penalty),
        ("presence_penalty", request.presence_penalty),
    ] {
        if value.is_some_and(|v| v != 0.0) {
            return Err(ApiError::invalid_param(
                name,
                format!("{name} is not supported (use repetition_penalty)"),
            ));
        }
    }
    if request.logprobs == Some(true) {
        return Err(ApiError::invalid_param(
            "logprobs",
            "logprobs are not supported",
        ));
    }
    if request
        .tools
        .as_ref()
        .is_some_and(|t| !t.is_null() && t.as_array().is_none_or(|a| !a.is_empty()))
    {
        return Err(ApiError::invalid_param("tools", "tools are not supported"));
    }
    if let Some(format) = &request.response_format {
        if format.get("type").and_then(Value::as_str) != Some("text") {
            return Err(ApiError::invalid_param(
                "response_format",
                "only response_format {\"type\": \"text\"} is supported",
            ));
        }
    }
    let (messages, image_urls) = messages(request.messages)?;
    let max_images = model.limits().max_images;
    if image_urls.len() > max_images {
        return Err(ApiError::invalid_param(
            "messages",
            format!(
                "the request has {} images, more than the limit of {max_images}",
                image_urls.len(),
            ),
        ));
    }
    let max_tokens = request
        .max_completion_tokens
        .or(request.max_tokens)
        .map(|n| check_max_tokens(n, state.limits.max_tokens))
        .transpose()?;
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
        &model.manifest.generation,
    )
    .map_err(ApiError::from)?;
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

fn check_max_tokens(requested: u64, limit: usize) -> Result<usize, ApiError> {
    match usize::try_from(requested) {
        Ok(n) if n >= 1 && n <= limit => Ok(n),
        _ => Err(ApiError::invalid_param(
            "max_tokens",
            format!("max_tokens must be in 1..={limit} (this server's limit), got {requested}"),
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
    let built = (|| {
        let mut images = Vec::with_capacity(job.image_urls.len());
        for (i, url) in job.image_urls.iter().enumerate() {
            if sink.is_cancelled() {
                return Err(gone());
            }
            images.push(state.images.load(i, url)?);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_tokens_outside_the_limit_is_refused_with_both_numbers() {
        assert_eq!(check_max_tokens(16, 64).unwrap(), 16);
        let err = check_max_tokens(65, 64).unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert!(
            err.message.contains("64") && err.message.contains("65"),
            "{}",
            err.message
        );
        assert!(check_max_tokens(0, 64).is_err());
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
