//! llama3v runtime: drives the exported vision, embedding and decoder graphs with ONNX Runtime.
//!
//! The model directory contract lives in `onnx/README.md`; [`manifest`] reads it. A request flows
//! preprocess -> vision -> tokenizer/chat template -> embed + splice -> decoder prefill -> sampling ->
//! decode loop ([`generate`]).
//!
//! The public modules are what a user of the crate (the CLI, the fuzz targets) needs; the graph-running
//! internals (embedding, splicing, vision, the provider list, the ONNX Runtime environment, the heap
//! trim, the model directory's file checks) stay inside it.

pub mod bench;
pub mod bench_batch;
pub mod chat_template;
pub mod check;
pub(crate) mod check_batch;
pub mod compare;
pub mod decode;
pub(crate) mod embed;
pub mod engine;
pub mod ep;
pub mod ep_config;
pub mod error;
pub mod generate;
pub mod graph;
pub(crate) mod heap;
pub mod manifest;
pub mod minicpmv;
pub mod model;
pub(crate) mod model_dir;
pub mod onnx_file;
pub(crate) mod ort_env;
pub mod preprocess;
pub(crate) mod provider;
mod read_limit;
pub mod request;
pub mod request_limits;
pub mod sampling;
pub mod sequence;
pub(crate) mod splice;
pub mod tokenizer;
pub mod user_text;
pub(crate) mod vision;

pub use error::{Error, Result};
pub use model::{Model, ModelOptions};
