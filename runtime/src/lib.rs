//! llama3v runtime: drives the exported vision, embedding and decoder graphs with ONNX Runtime.
//!
//! The model directory contract lives in `onnx/README.md`; [`manifest`] reads it. A request flows
//! preprocess -> vision -> tokenizer/chat template -> embed + splice -> decoder prefill -> sampling ->
//! decode loop ([`generate`]).

pub mod bench;
pub mod chat_template;
pub mod check;
pub mod compare;
pub mod decoder;
pub mod embed;
pub mod ep;
pub mod ep_config;
pub mod error;
pub mod generate;
pub mod graph;
pub mod heap;
pub mod kv_cache;
pub mod manifest;
pub mod model;
pub mod onnx_file;
pub mod ort_env;
pub mod preprocess;
pub mod request_limits;
pub mod sampling;
pub mod splice;
pub mod tokenizer;
pub mod user_text;
pub mod vision;

pub use error::{Error, Result};
pub use model::{Model, ModelOptions};
