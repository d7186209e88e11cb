//! The runtime's typed error. Messages say what was expected and what was found.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("invalid model directory {dir}: {reason}")]
    Model { dir: PathBuf, reason: String },

    #[error("invalid manifest {path}: {reason}")]
    Manifest { path: PathBuf, reason: String },

    /// ONNX Runtime failed; the `ort` error is the source.
    #[error("ONNX Runtime: {0}")]
    OnnxRuntime(#[source] ort::Error),

    /// ONNX Runtime could not create a graph's session on the providers that registered.
    #[error("graph {graph}: creating the session on {providers} failed: {}: {source}", path.display())]
    Session {
        graph: String,
        providers: String,
        path: PathBuf,
        #[source]
        source: ort::Error,
    },

    /// ONNX Runtime's shared library could not be found or loaded.
    #[error("ONNX Runtime: {0}")]
    OrtLibrary(String),

    /// A failure of the runtime's own invariants (a bug, not bad input and not ONNX Runtime).
    #[error("internal error: {0}")]
    Internal(String),

    /// A model file over its size limit, or not a regular file, refused before it is read.
    #[error("{path}: {reason}")]
    FileLimit { path: PathBuf, reason: String },

    #[error("execution provider {provider}: {reason}")]
    ExecutionProvider { provider: String, reason: String },

    #[error("execution provider option {key} = {value}: expected {expected}")]
    ProviderOption {
        key: String,
        value: String,
        expected: String,
    },

    #[error("execution provider options file {path}: {reason}")]
    ProviderOptionsFile { path: PathBuf, reason: String },

    #[error("image {source_name}: {reason}")]
    Image { source_name: String, reason: String },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("chat template: {0}")]
    ChatTemplate(String),

    #[error("invalid sampling option: {0}")]
    Sampling(String),

    #[error("prompt has {markers} image placeholder(s) but {images} image(s) were given")]
    ImageCount { markers: usize, images: usize },

    #[error("image features have {rows} rows but the prompt has {markers} image-token positions")]
    Splice { rows: usize, markers: usize },

    #[error("prompt is {prompt_tokens} tokens; with {max_new_tokens} new tokens that exceeds the context of {max_context}")]
    ContextOverflow {
        prompt_tokens: usize,
        max_new_tokens: usize,
        max_context: usize,
    },

    #[error("request refused: {0}")]
    Admission(String),

    /// A request over one of its bounds (`request_limits`), found before the work that would cost it.
    #[error("request too large: {what}: {found} {unit}, more than the limit of {limit} {unit}")]
    RequestLimit {
        what: String,
        found: u64,
        limit: u64,
        unit: &'static str,
    },

    /// The work was stopped between stages because its requester went away.
    #[error("the request was cancelled")]
    Cancelled,

    #[error("graph {graph}: {reason}")]
    Graph { graph: String, reason: String },

    #[error("non-finite logits (NaN or Inf) at decode step {step}")]
    NonFiniteLogits { step: usize },

    #[error("reference case {case}: {reason}")]
    Reference { case: String, reason: String },
}

impl From<ort::Error> for Error {
    fn from(e: ort::Error) -> Self {
        Error::OnnxRuntime(e)
    }
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
