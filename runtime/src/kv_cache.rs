//! The KV cache as a value the decode loop owns: the decoder's `present.*` outputs of one step are the
//! `past_key_values.*` inputs of the next, moved, not copied. Beside it, the small per-step input
//! buffers (attention mask, position ids, float16 embeddings), kept so a decode step builds its inputs
//! without allocating, and, when the decoder runs bound, the sequence's IoBinding: then the tensors
//! stay in the decoder's device memory from step to step.

use std::time::Duration;

use half::f16;
use ort::value::DynValue;

use crate::decoder::BoundIo;
use crate::error::Result;
use crate::graph::float_tensor;
use crate::manifest::{ModelDims, TensorDtype};

pub struct KvCache {
    /// Per layer: key then value, each `[1, kv_heads, len, head_dim]`.
    entries: Vec<DynValue>,
    len: usize,
    /// Time spent inside ONNX Runtime's run in the last decoder run (benchmarks subtract it from the
    /// step's wall time to get the runtime's own overhead).
    last_run: Duration,
    /// The attention mask's values: ones, at least as many as the context; a run views a prefix.
    pub(crate) mask: Vec<i64>,
    /// The position ids of the run being built.
    pub(crate) positions: Vec<i64>,
    /// The embeddings converted to float16 for an fp16 graph.
    pub(crate) halves: Vec<f16>,
    /// The decoder's binding when this sequence runs bound ([`crate::decoder::StepMode::Bound`]); made
    /// by the first bound run, dropped with the cache.
    pub(crate) bound: Option<BoundIo>,
}

impl KvCache {
    /// An empty cache (`len = 0`) for one sequence.
    pub fn empty(dims: &ModelDims, dtype: TensorDtype) -> Result<KvCache> {
        let shape = vec![1, dims.num_kv_heads as i64, 0, dims.head_dim as i64];
        let entries = (0..2 * dims.num_layers)
            .map(|_| float_tensor(dtype, shape.clone(), &[]))
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache {
            entries,
            len: 0,
            last_run: Duration::ZERO,
            // Sized once to the model's context (8 bytes a position) so decode steps never regrow it.
            mask: vec![1; dims.max_context],
            positions: Vec::new(),
            halves: Vec::new(),
            bound: None,
        })
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Time inside ONNX Runtime's run during the last decoder run on this cache.
    pub fn last_run(&self) -> Duration {
        self.last_run
    }

    pub(crate) fn set_last_run(&mut self, run: Duration) {
        self.last_run = run;
    }

    /// The past tensors, per layer key then value, for binding to a decoder run.
    pub(crate) fn entries(&self) -> &[DynValue] {
        &self.entries
    }

    /// Hands the past tensors to a decoder run; [`KvCache::replace`] must follow with its presents.
    pub(crate) fn take(&mut self) -> Vec<DynValue> {
        std::mem::take(&mut self.entries)
    }

    pub(crate) fn replace(&mut self, entries: Vec<DynValue>, len: usize) {
        self.entries = entries;
        self.len = len;
    }
}
