//! llama3v runtime: drives the exported vision, embedding and decoder graphs with ONNX Runtime.
//!
//! The model directory contract lives in `onnx/README.md`; [`manifest`] reads it. A request flows
//! preprocess -> vision -> tokenizer/chat template -> embed + splice -> decoder prefill -> sampling ->
//! decode loop ([`generate`]).

pub mod bench;
pub mod bench_batch;
pub mod chat_template;
pub mod check;
pub mod check_batch;
pub mod compare;
pub mod decode;
pub mod embed;
pub mod engine;
pub mod ep;
pub mod ep_config;
pub mod error;
pub mod generate;
pub mod graph;
pub mod heap;
pub mod manifest;
pub mod minicpmv;
pub mod model;
pub mod model_dir;
pub mod onnx_file;
pub mod ort_env;
pub mod preprocess;
pub mod provider;
mod read_limit;
pub mod request;
pub mod request_limits;
pub mod sampling;
pub mod sequence;
pub mod splice;
pub mod tokenizer;
pub mod user_text;
pub mod vision;

pub use error::{Error, Result};
pub use model::{Model, ModelOptions};
