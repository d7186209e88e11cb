//! `llama3v serve`: an OpenAI-compatible HTTP server over one shared model.
//!
//! The socket is bound first and the model loads in the background (`/health` answers 503 until it is
//! ready). Every generation runs through one batch engine on its own thread (`llama3v::engine`): up to
//! `--max-batch` sequences decode together, one decoder run per step, within the `--kv-budget`;
//! `--max-queue` more requests wait, and beyond that requests get 429. SIGTERM/SIGINT turn `/health` to
//! 503 and answer new requests 503 with `Retry-After` (`drain`), let in-flight requests finish within
//! `--shutdown-grace-secs`, cancel what is left at its next step and exit 0.

mod api;
mod auth;
mod chat;
mod drain;
mod errors;
mod fields;
mod http;
mod images;
mod memory;
mod metrics;
mod request;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context, Result};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{middleware, Json, Router};
use clap::Args;
use llama3v::engine::{EngineConfig, EngineThread};
use llama3v::ep_config::DEFAULT_MAX_BATCH;
use llama3v::preprocess::DecodeLimits;
use llama3v::request_limits::{
    RequestLimits, DEFAULT_MAX_PROMPT_BYTES, DEFAULT_MAX_REQUEST_PIXELS,
};
use llama3v::Model;
use serde_json::json;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tower_http::catch_panic::CatchPanicLayer;

use crate::model_args::ModelArgs;
use auth::{ApiKeys, SecretKey};
use errors::ApiError;
use http::HttpLimits;
use images::ImagePolicy;
use memory::MemoryBudget;
use metrics::{Gauges, Metrics};
use request::Limits;

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0 = any free port; the log says which)
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Model id reported by /v1/models and in replies [default: the model directory's name]
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Sequences decoded together in one decoder run, 1 = one request at a time [default: the model's
    /// limits.max_batch, 8]
    #[arg(long, alias = "max-concurrent")]
    pub max_batch: Option<usize>,
    /// KV cache positions the decoding batch may hold, padding included [default: 4 x the model's context]
    #[arg(long)]
    pub kv_budget: Option<usize>,
    /// Requests that may wait for a generation slot; more get 429
    #[arg(long, default_value_t = 32)]
    pub max_queue: usize,
    /// Largest request body in bytes (images travel inside it as data URLs)
    #[arg(long, default_value_t = 32 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Most images in one request [default: the model's limits.max_images]
    #[arg(long)]
    pub max_images: Option<usize>,
    /// Largest max_tokens a request may ask for; also the default, capped by the room left in the context
    #[arg(long, default_value_t = 1024)]
    pub max_tokens: usize,
    /// Largest image width and height accepted, in pixels (checked before decoding)
    #[arg(long, default_value_t = 8192)]
    pub max_image_side: u32,
    /// Most pixels (width x height) of all images of one request together (checked before decoding)
    #[arg(long, default_value_t = DEFAULT_MAX_REQUEST_PIXELS)]
    pub max_request_pixels: u64,
    /// Most bytes of text over all messages of one request (checked before tokenizing)
    #[arg(long, default_value_t = DEFAULT_MAX_PROMPT_BYTES)]
    pub max_prompt_bytes: u64,
    /// Seconds a connection gets to send a request's head, counted from connecting or from its
    /// previous response (so also how long an idle keep-alive connection stays open)
    #[arg(long, default_value_t = 10.0, value_parser = parse_seconds)]
    pub header_timeout_secs: f64,
    /// Seconds a request gets to send its whole body once its head has arrived (408 after that)
    #[arg(long, default_value_t = 60.0, value_parser = parse_seconds)]
    pub body_timeout_secs: f64,
    /// Bytes request bodies may hold at once (three times each body's size: its bytes, the parsed
    /// request, its decoded images); a request whose body does not fit waits before it is read
    #[arg(long, default_value_t = 512 * 1024 * 1024)]
    pub body_memory: u64,
    /// Bytes image decoding and tokenizing may hold at once over all requests (each request's largest
    /// image at 4 bytes a pixel, or 70 bytes per byte of its text); a request that does not fit waits
    #[arg(long, default_value_t = 1024 * 1024 * 1024)]
    pub decode_memory: u64,
    /// Read special tokens (and the image token) typed in message text as plain text, so a client
    /// cannot end its turn and write the assistant's; the template's own stay special. The default
    /// parses them, as transformers' processor does
    #[arg(long)]
    pub plain_special_tokens: bool,
    /// Directory local image paths (`file://...` or plain paths) may be read from; without it they are refused
    #[arg(long)]
    pub allowed_image_dir: Option<PathBuf>,
    /// Seconds in-flight requests get to finish after SIGTERM/SIGINT before they are cancelled
    #[arg(long, default_value_t = 30.0)]
    pub shutdown_grace_secs: f64,
    /// Key clients must send as `Authorization: Bearer KEY` on /v1/* (/health and /metrics stay open);
    /// prefer the environment variable or --api-key-file, which don't show in the process list
    #[arg(
        long,
        env = "LLAMA3V_API_KEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    pub api_key: Option<SecretKey>,
    /// File of accepted API keys, one a line (blank lines and # comments skipped); with --api-key, both count
    #[arg(long, value_name = "FILE")]
    pub api_key_file: Option<PathBuf>,
}

fn parse_seconds(value: &str) -> Result<f64, String> {
    match value.trim().parse::<f64>() {
        Ok(s) if s > 0.0 && s <= 86_400.0 => Ok(s),
        _ => Err(format!("expected seconds in (0, 86400], got {value:?}")),
    }
}

/// Admission control: `admitted` counts running plus queued requests, so the 429 decision is one
/// atomic step with no window between "look" and "take".
pub struct Scheduler {
    slots: Arc<Semaphore>,
    max_running: usize,
    max_queued: usize,
    admitted: AtomicUsize,
    running: AtomicUsize,
}

/// A request's place in the system (running or queued); dropping it frees the place.
pub struct Ticket {
    scheduler: Arc<Scheduler>,
}

/// A generation slot; dropping it lets the next queued request run.
pub struct Slot {
    scheduler: Arc<Scheduler>,
    _permit: OwnedSemaphorePermit,
}

impl Scheduler {
    fn new(max_running: usize, max_queued: usize) -> Self {
        Scheduler {
            slots: Arc::new(Semaphore::new(max_running)),
            max_running,
            max_queued,
            admitted: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
        }
    }

    pub fn admit(self: &Arc<Self>) -> Result<Ticket, ApiError> {
        let before = self.admitted.fetch_add(1, Ordering::SeqCst);
        if before >= self.max_running + self.max_queued {
            self.admitted.fetch_sub(1, Ordering::SeqCst);
            return Err(ApiError::queue_full(self.max_running, self.max_queued));
        }
        Ok(Ticket {
            scheduler: Arc::clone(self),
        })
    }

    /// Waits for a generation slot (the request is "queued" meanwhile).
    pub async fn slot(self: &Arc<Self>) -> Result<Slot, ApiError> {
        let permit = Arc::clone(&self.slots)
            .acquire_owned()
            .await
            .map_err(|_| ApiError::unavailable("the server is shutting down"))?;
        self.running.fetch_add(1, Ordering::SeqCst);
        Ok(Slot {
            scheduler: Arc::clone(self),
            _permit: permit,
        })
    }

    fn gauges(&self) -> (usize, usize) {
        let running = self.running.load(Ordering::SeqCst);
        let admitted = self.admitted.load(Ordering::SeqCst);
        (running, admitted.saturating_sub(running))
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.scheduler.admitted.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.scheduler.running.fetch_sub(1, Ordering::SeqCst);
    }
}

pub struct AppState {
    model: OnceLock<Arc<Model>>,
    engine: OnceLock<EngineThread>,
    pub model_name: String,
    pub created: u64,
    pub limits: Limits,
    pub images: ImagePolicy,
    pub scheduler: Arc<Scheduler>,
    /// What request bodies and image decodes may hold at once (`memory`).
    pub bodies: Arc<MemoryBudget>,
    pub decodes: Arc<MemoryBudget>,
    pub metrics: Metrics,
    /// Set when the shutdown grace time is over: running generations stop at their next step.
    pub cancel_all: AtomicBool,
    /// Set on SIGTERM/SIGINT: no new generations start.
    pub shutting_down: AtomicBool,
    /// Keys /v1/* requests must carry; `None`: open.
    api_keys: Option<Arc<ApiKeys>>,
    next_id: AtomicU64,
}

impl AppState {
    pub fn model(&self) -> Option<Arc<Model>> {
        self.model.get().cloned()
    }

    pub fn engine(&self) -> Option<&EngineThread> {
        self.engine.get()
    }

    pub fn next_request_id(&self) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("chatcmpl-{:x}{n:06x}", self.created)
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[derive(Debug, Clone)]
enum StopReason {
    Signal(&'static str),
    LoadFailed(String),
}

pub fn run(args: &ServeArgs) -> Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(serve(args));
    // Generations cancelled at shutdown end at their next step; don't wait forever for a stuck one.
    runtime.shutdown_timeout(Duration::from_secs(5));
    result
}

fn app_state(args: &ServeArgs) -> Result<AppState> {
    if args.max_batch == Some(0) {
        return Err(anyhow!("--max-batch must be at least 1"));
    }
    let allowed_dir = args
        .allowed_image_dir
        .as_ref()
        .map(|dir| {
            dir.canonicalize()
                .with_context(|| format!("--allowed-image-dir {}", dir.display()))
        })
        .transpose()?;
    let api_keys = ApiKeys::from_args(args.api_key.as_ref(), args.api_key_file.as_deref())?;
    let model_dir = args.model.model_dir();
    let model_name = args.served_model_name.clone().unwrap_or_else(|| {
        model_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "llama3v".into())
    });
    Ok(AppState {
        model: OnceLock::new(),
        engine: OnceLock::new(),
        model_name,
        created: unix_now(),
        limits: Limits {
            max_tokens: args.max_tokens,
            max_body_bytes: args.max_body_bytes,
            request: RequestLimits {
                max_prompt_bytes: args.max_prompt_bytes,
                max_request_pixels: args.max_request_pixels,
            },
        },
        images: ImagePolicy {
            allowed_dir,
            limits: DecodeLimits {
                max_width: args.max_image_side,
                max_height: args.max_image_side,
                ..DecodeLimits::default()
            },
        },
        scheduler: Arc::new(Scheduler::new(
            args.max_batch.unwrap_or(DEFAULT_MAX_BATCH),
            args.max_queue,
        )),
        bodies: MemoryBudget::new(args.body_memory),
        decodes: MemoryBudget::new(args.decode_memory),
        metrics: Metrics::default(),
        cancel_all: AtomicBool::new(false),
        shutting_down: AtomicBool::new(false),
        api_keys: api_keys.map(Arc::new),
        next_id: AtomicU64::new(0),
    })
}

fn router(state: Arc<AppState>, http_limits: HttpLimits) -> Router {
    let body_limit = state.limits.max_body_bytes;
    let api_keys = state.api_keys.clone();
    let routes = Router::new()
        .route("/v1/chat/completions", post(chat::completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .fallback(http::not_found)
        .method_not_allowed_fallback(http::method_not_allowed)
        .layer(middleware::map_response(drain::add_retry_after))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn_with_state(
            Arc::new(http_limits),
            http::guard,
        ))
        // A panic in a handler becomes a 500 for that request; the server keeps serving.
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::internal("internal error: the request handler panicked").into_response()
        }))
        .with_state(state);
    match api_keys {
        Some(keys) => routes.layer(middleware::from_fn_with_state(keys, auth::require_key)),
        None => routes,
    }
}

async fn serve(args: &ServeArgs) -> Result<ExitCode> {
    let state = Arc::new(app_state(args)?);
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("binding {}:{}", args.host, args.port))?;
    let addr: SocketAddr = listener.local_addr().context("reading the bound address")?;
    let model_dir = args.model.model_dir();
    eprintln!(
        "llama3v serve: listening on http://{addr} (loading {})",
        model_dir.display()
    );
    if let Some(keys) = &state.api_keys {
        eprintln!(
            "llama3v serve: /v1/* requires an API key ({} accepted)",
            keys.len()
        );
    }

    let (stop_tx, stop_rx) = watch::channel(None::<StopReason>);
    let mut model_args = args.model.clone();
    // Request limits live in the model's options, where admission reads them.
    if let Some(max_images) = args.max_images {
        model_args
            .ep_option
            .push(format!("limits.max_images={max_images}"));
    }
    if let Some(max_batch) = args.max_batch {
        model_args
            .ep_option
            .push(format!("limits.max_batch={max_batch}"));
    }
    spawn_model_loader(
        &state,
        model_args,
        args.plain_special_tokens,
        engine_config(args),
        stop_tx.clone(),
    );
    spawn_signal_listener(stop_tx);

    let http_limits = HttpLimits {
        header_timeout: Duration::from_secs_f64(args.header_timeout_secs),
        body_timeout: Duration::from_secs_f64(args.body_timeout_secs),
        max_body_bytes: args.max_body_bytes,
        bodies: Arc::clone(&state.bodies),
    };
    let app = router(Arc::clone(&state), http_limits.clone());
    let server = http::serve(
        listener,
        app,
        &http_limits,
        drain::until_drained(stop_rx.clone(), Arc::clone(&state)),
    );
    tokio::pin!(server);

    let grace = Duration::from_secs_f64(args.shutdown_grace_secs.max(0.0));
    let mut stopped = stop_rx.clone();
    let grace_over = async {
        let _ = stopped.wait_for(Option::is_some).await;
        state.shutting_down.store(true, Ordering::SeqCst);
        let (running, queued) = state.scheduler.gauges();
        eprintln!(
            "llama3v serve: shutting down; {running} running and {queued} queued requests get {:.1} s to finish",
            grace.as_secs_f64()
        );
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        result = &mut server => result.context("serving HTTP")?,
        () = grace_over => {
            let (running, queued) = state.scheduler.gauges();
            eprintln!("llama3v serve: grace time over; cancelling {running} running and {queued} queued requests");
            state.cancel_all.store(true, Ordering::SeqCst);
            state.scheduler.slots.close();
            // Cancelled generations stop at their next step and send their last event.
            if tokio::time::timeout(Duration::from_secs(5), &mut server).await.is_err() {
                eprintln!("llama3v serve: connections still open 5 s after cancelling; closing them");
            }
        }
    }
    let reason = stop_rx.borrow().clone();
    match reason {
        Some(StopReason::LoadFailed(message)) => Err(anyhow!(message)),
        Some(StopReason::Signal(name)) => {
            eprintln!("llama3v serve: stopped ({name})");
            Ok(ExitCode::SUCCESS)
        }
        None => Ok(ExitCode::SUCCESS),
    }
}

/// The engine's settings from the loaded model's limits and the flags.
fn engine_config(args: &ServeArgs) -> impl Fn(&Model) -> EngineConfig {
    let kv_budget = args.kv_budget;
    move |model| EngineConfig {
        max_batch: model.limits().max_batch,
        kv_budget: kv_budget.unwrap_or(4 * model.max_context()),
    }
}

fn spawn_model_loader(
    state: &Arc<AppState>,
    model_args: ModelArgs,
    plain_special_tokens: bool,
    config: impl Fn(&Model) -> EngineConfig + Send + 'static,
    stop: watch::Sender<Option<StopReason>>,
) {
    let state = Arc::clone(state);
    tokio::spawn(async move {
        let dir = model_args.model_dir();
        let loaded = tokio::task::spawn_blocking(move || {
            let mut model = model_args.load()?;
            if plain_special_tokens {
                model.read_special_tokens_as_text();
            }
            anyhow::Ok(model)
        })
        .await;
        let failure = match loaded {
            Ok(Ok(model)) => {
                let model = Arc::new(model);
                let config = config(&model);
                let metrics = Arc::clone(&state);
                let engine = EngineThread::spawn(Arc::clone(&model), config, move |report| {
                    metrics.metrics.observe_step(report)
                });
                match engine {
                    Ok(engine) => {
                        let _ = state.engine.set(engine);
                        let _ = state.model.set(model);
                        eprintln!(
                            "llama3v serve: model {} ready; batch of up to {} sequences, KV budget {} \
                             positions",
                            dir.display(),
                            config.max_batch,
                            config.kv_budget
                        );
                        return;
                    }
                    Err(err) => format!("{err}"),
                }
            }
            Ok(Err(err)) => format!("{err:#}"),
            Err(join) => format!("loading model {}: {join}", dir.display()),
        };
        // A server that can never become ready should say so and stop, not answer 503 forever.
        let _ = stop.send(Some(StopReason::LoadFailed(failure)));
    });
}

fn spawn_signal_listener(stop: watch::Sender<Option<StopReason>>) {
    tokio::spawn(async move {
        let name = wait_for_signal().await;
        stop.send_if_modified(|reason| {
            if reason.is_none() {
                *reason = Some(StopReason::Signal(name));
                true
            } else {
                false
            }
        });
    });
}

#[cfg(unix)]
async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(err) => {
            eprintln!(
                "llama3v serve: cannot listen for SIGTERM ({err}); only SIGINT stops the server"
            );
            let _ = tokio::signal::ctrl_c().await;
            return "SIGINT";
        }
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "SIGINT",
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() -> &'static str {
    let _ = tokio::signal::ctrl_c().await;
    "Ctrl-C"
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    let response = if state.shutting_down.load(Ordering::SeqCst) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "shutting_down"})),
        )
    } else if state.model.get().is_some() {
        (StatusCode::OK, Json(json!({"status": "ok"})))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "loading"})),
        )
    };
    response.into_response()
}

async fn models(State(state): State<Arc<AppState>>) -> Response {
    state.metrics.count_request("/v1/models", 200);
    Json(json!({
        "object": "list",
        "data": [{
            "id": state.model_name,
            "object": "model",
            "created": state.created,
            "owned_by": "llama3v",
        }],
    }))
    .into_response()
}

async fn metrics_text(State(state): State<Arc<AppState>>) -> Response {
    let (running, queued) = state.scheduler.gauges();
    let body = state.metrics.render(&Gauges {
        running,
        queued,
        max_running: state.scheduler.max_running,
        max_queued: state.scheduler.max_queued,
        ready: state.model.get().is_some(),
        draining: state.shutting_down.load(Ordering::SeqCst),
        engine: state.engine().map(EngineThread::stats),
        bodies: (state.bodies.reserved_bytes(), state.bodies.total_bytes()),
        decodes: (state.decodes.reserved_bytes(), state.decodes.total_bytes()),
    });
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}
