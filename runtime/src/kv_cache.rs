//! The KV cache as a value the decode loop owns: the decoder's `present.*` outputs of one step are the
//! `past_key_values.*` inputs of the next, moved, not copied. Beside it, the small per-step input
//! buffers (attention mask, position ids, float16 embeddings), kept so a decode step builds its inputs
//! without allocating, and, when the decoder runs bound, the sequence's IoBinding: then the tensors
//! stay in the decoder's device memory from step to step.
//!
//! A fused decoder ([`crate::manifest::DecoderFlavour::Fused`]) appends to the past in place: then the
//! entries are buffers of a fixed capacity, sized to the request, bound once as both the past input
//! and the present output of every run ([`crate::decoder::StepMode::Shared`]), and a step copies no
//! part of the cache.

use std::time::Duration;

use half::f16;
use ort::memory::Allocator;
use ort::value::{DynTensor, DynValue};

use crate::decoder::BoundIo;
use crate::error::{Error, Result};
use crate::graph::{float_tensor, ort_type, Device};
use crate::manifest::{ModelDims, TensorDtype};

pub struct KvCache {
    /// Per layer: key then value, each `[1, kv_heads, len, head_dim]`.
    entries: Vec<DynValue>,
    len: usize,
    /// Positions each entry holds when the entries are shared buffers (`[1, kv_heads, capacity,
    /// head_dim]`, the first `len` positions valid); `None` when each run returns entries of exactly
    /// `len` positions.
    capacity: Option<usize>,
    /// The model's context: shared buffers never grow past it (the fused graph's rotary tables end there).
    max_context: usize,
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
            capacity: None,
            max_context: dims.max_context,
            last_run: Duration::ZERO,
            // Sized once to the model's context (8 bytes a position) so decode steps never regrow it.
            mask: vec![1; dims.max_context],
            positions: Vec::new(),
            halves: Vec::new(),
            bound: None,
        })
    }

    /// An empty cache of shared buffers for `capacity` positions, allocated by `allocator` (the
    /// decoder's device memory). Their contents start undefined: a fused decoder reads only the
    /// positions its runs wrote.
    pub fn shared(
        dims: &ModelDims,
        dtype: TensorDtype,
        capacity: usize,
        allocator: &Allocator,
    ) -> Result<KvCache> {
        let mut cache = KvCache::empty(dims, dtype)?;
        let shape = [
            1,
            dims.num_kv_heads as i64,
            capacity as i64,
            dims.head_dim as i64,
        ];
        cache.entries = (0..2 * dims.num_layers)
            .map(|_| Ok(DynTensor::new(allocator, ort_type(dtype), shape)?.into_dyn()))
            .collect::<Result<Vec<_>>>()?;
        cache.capacity = Some(capacity);
        Ok(cache)
    }

    /// Positions the shared buffers hold; `None` for a cache of per-run entries.
    pub fn capacity(&self) -> Option<usize> {
        self.capacity
    }

    /// Makes the shared buffers hold at least `needed` positions: new buffers of twice the capacity
    /// (at least `needed`, at most the model's context), the valid positions copied over, the old
    /// binding dropped.
    /// Only host memory can be copied here; a request sizes its buffers up front
    /// ([`crate::model::Sessions::prefill`]), so this is the fallback for a caller that under-reserved.
    pub(crate) fn grow(&mut self, needed: usize, device: Device, dtype: TensorDtype) -> Result<()> {
        let Some(capacity) = self.capacity else {
            return Ok(());
        };
        if needed <= capacity {
            return Ok(());
        }
        let limit = self.max_context;
        if needed > limit {
            return Err(Error::Ort(format!(
                "{needed} cache positions exceed the model's context of {limit}"
            )));
        }
        if device != Device::Cpu {
            return Err(Error::Ort(format!(
                "the KV cache buffers hold {capacity} positions and {needed} are needed; buffers in \
                 device memory are sized once per request"
            )));
        }
        let grown = needed.max(capacity.saturating_mul(2)).min(limit);
        let mut entries = Vec::with_capacity(self.entries.len());
        for old in &self.entries {
            let shape = old.shape().to_vec();
            let (heads, width) = (shape[1] as usize, shape[3] as usize);
            let new_shape = [shape[0], shape[1], grown as i64, shape[3]];
            let mut new = DynTensor::new(&Allocator::default(), ort_type(dtype), new_shape)?;
            let valid = self.len * width;
            match dtype {
                TensorDtype::Float16 => copy_heads::<f16>(old, &mut new, heads, valid)?,
                _ => copy_heads::<f32>(old, &mut new, heads, valid)?,
            }
            entries.push(new.into_dyn());
        }
        // The binding holds the old buffers as its past inputs and present outputs.
        self.bound = None;
        self.entries = entries;
        self.capacity = Some(grown);
        Ok(())
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

    /// The shared buffers, for binding them as a run's past inputs and present outputs.
    pub(crate) fn entries_mut(&mut self) -> &mut [DynValue] {
        &mut self.entries
    }

    /// Records the positions a run appended in place to the shared buffers.
    pub(crate) fn set_len(&mut self, len: usize) {
        self.len = len;
    }

    pub(crate) fn replace(&mut self, entries: Vec<DynValue>, len: usize) {
        self.entries = entries;
        self.len = len;
    }
}

/// Copies the first `valid` values of each head's rows into a buffer with room for more positions.
fn copy_heads<T: ort::value::PrimitiveTensorElementType + Copy + std::fmt::Debug>(
    old: &DynValue,
    new: &mut DynTensor,
    heads: usize,
    valid: usize,
) -> Result<()> {
    let (_, src) = old.try_extract_tensor::<T>()?;
    let (_, dst) = new.try_extract_tensor_mut::<T>()?;
    let (src_head, dst_head) = (src.len() / heads.max(1), dst.len() / heads.max(1));
    for head in 0..heads {
        dst[head * dst_head..head * dst_head + valid]
            .copy_from_slice(&src[head * src_head..head * src_head + valid]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims() -> ModelDims {
        ModelDims {
            num_layers: 2,
            num_attention_heads: 4,
            num_kv_heads: 2,
            head_dim: 3,
            hidden_size: 12,
            vocab_size: 10,
            max_context: 16,
        }
    }

    #[test]
    fn shared_buffers_grow_keeping_every_valid_position() {
        crate::ort_env::environment().unwrap();
        let f32 = TensorDtype::Float32;
        let mut cache = KvCache::shared(&dims(), f32, 4, &Allocator::default()).unwrap();
        assert_eq!(cache.capacity(), Some(4));
        // Buffer `e`, head `h`, position `p`, lane `l` holds e * 1000 + h * 100 + p * 10 + l.
        let value =
            |e: usize, h: usize, p: usize, l: usize| (e * 1000 + h * 100 + p * 10 + l) as f32;
        for (e, entry) in cache.entries_mut().iter_mut().enumerate() {
            let (_, data) = entry.try_extract_tensor_mut::<f32>().unwrap();
            for (i, slot) in data.iter_mut().enumerate() {
                *slot = value(e, i / 12, i % 12 / 3, i % 3);
            }
        }
        cache.set_len(3);
        cache.grow(4, Device::Cpu, f32).unwrap();
        assert_eq!(cache.capacity(), Some(4), "enough room: no new buffers");
        cache.grow(5, Device::Cpu, f32).unwrap();
        assert_eq!(cache.capacity(), Some(8), "twice the capacity");
        for (e, entry) in cache.entries().iter().enumerate() {
            assert_eq!(entry.shape()[..], [1, 2, 8, 3]);
            let (_, data) = entry.try_extract_tensor::<f32>().unwrap();
            for h in 0..2 {
                for p in 0..3 {
                    for l in 0..3 {
                        assert_eq!(data[h * 24 + p * 3 + l], value(e, h, p, l));
                    }
                }
            }
        }
        cache.grow(9, Device::Cpu, f32).unwrap();
        assert_eq!(cache.capacity(), Some(16), "at most the model's context");
        let err = cache.grow(17, Device::Cpu, f32).unwrap_err().to_string();
        assert!(err.contains("17") && err.contains("16"), "{err}");
    }
}
