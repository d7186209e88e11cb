//! The KV cache as a value the decode loop owns: the decoder's `present.*` outputs of one step are the
//! `past_key_values.*` inputs of the next, moved, not copied.

use std::time::Duration;

use ort::value::DynValue;

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
        })
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Hands the past tensors to a decoder run; [`KvCache::replace`] must follow with its presents.
    pub(crate) fn take(&mut self) -> Vec<DynValue> {
        std::mem::take(&mut self.entries)
    }

    /// Time inside ONNX Runtime's run during the last decoder run on this cache.
    pub fn last_run(&self) -> Duration {
        self.last_run
    }

    pub(crate) fn set_last_run(&mut self, run: Duration) {
        self.last_run = run;
    }

    pub(crate) fn replace(&mut self, entries: Vec<DynValue>, len: usize) {
        self.entries = entries;
        self.len = len;
    }
}
