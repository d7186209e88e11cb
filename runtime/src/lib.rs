//! llama3v runtime: drives the exported vision, embedding and decoder graphs with ONNX Runtime.
//!
//! The model directory contract lives in `onnx/README.md`; [`manifest`] reads it.

pub mod chat_template;
pub mod error;
pub mod manifest;
pub mod preprocess;
pub mod sampling;
pub mod tokenizer;

pub use error::{Error, Result};
