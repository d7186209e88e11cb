//! Decode state: the KV cache of a batch of sequences in the layout the decoder's flavour needs, and
//! the decoder run over it. One type per layout, each owning its tensors and binding, chosen once by
//! [`new_batch`] from the manifest's flavour; the decode loop ([`crate::engine`]) never asks which.
//!
//! - [`PaddedKv`] (plain standard-op decoder, the graph TensorRT runs): every run returns the grown
//!   cache, `[rows, kv_heads, positions, head_dim]`. Rows of different lengths are padded on the left
//!   and masked, with per-row position ids; a sequence joining or leaving re-packs the rows.
//! - [`SharedKv`] (fused decoder, GroupQueryAttention): one buffer per layer and kind with a row per
//!   sequence, `[rows, kv_heads, capacity, head_dim]`, bound as both past and present; each run appends
//!   in place at each row's own length (per-row `seqlens_k` from the mask's sums).
//!
//! A prompt is prefilled alone ([`Prefill`], batch 1, in chunks) and then handed to the batch, which
//! copies its positions into a row. The cache of both layouts lives in the decoder's device memory
//! (an IoBinding keeps each run's presents there); only embeddings, mask, positions and logits cross.
//!
//! A failed run leaves the batch as it was before the run: the cache tensors are replaced only after
//! the run succeeded, and a shared buffer's valid lengths only grow then.

mod io;
mod padded;
mod shared;

use std::time::Duration;

use half::f16;
use ort::value::{DynTensor, DynValue, PrimitiveTensorElementType};

use crate::error::{Error, Result};
use crate::graph::{ort_type, Graph};
use crate::manifest::{DecoderFlavour, ModelDims, TensorDtype};

pub use padded::PaddedKv;
pub use shared::SharedKv;

/// The KV cache of the sequences decoding together, and one decoder run over all of them.
pub trait KvBatch: Send {
    /// Sequences held, in row order.
    fn rows(&self) -> usize;

    /// Positions row `row` holds.
    fn row_len(&self, row: usize) -> usize;

    /// Positions allocated per row (the widest row's, padding included): the memory held is
    /// `rows() * allocated_positions() * bytes per position`.
    fn allocated_positions(&self) -> usize;

    /// One decoder run: one new position per row (`embeds` holds one embedding row per batch row, in
    /// row order); the logits of every row go to `logits` (rows x vocab).
    fn step(&mut self, decoder: &Graph, embeds: &[f32], logits: &mut Vec<f32>) -> Result<()>;

    /// Adds a prefilled sequence as the last row; `reserve` more positions will be appended to it.
    fn push(&mut self, decoder: &Graph, sequence: SequenceKv, reserve: usize) -> Result<()>;

    /// Removes row `row`; the rows after it move up by one.
    fn remove(&mut self, decoder: &Graph, row: usize) -> Result<()>;

    /// Time inside ONNX Runtime's run during the last step.
    fn last_run(&self) -> Duration;
}

/// The empty batch for a decoder of `flavour`.
pub fn new_batch(
    flavour: DecoderFlavour,
    dims: &ModelDims,
    dtype: TensorDtype,
) -> Box<dyn KvBatch> {
    match flavour {
        DecoderFlavour::Plain => Box::new(PaddedKv::new(dims, dtype)),
        DecoderFlavour::Fused => Box::new(SharedKv::new(dims, dtype)),
    }
}

/// The cache layout a decoder of `flavour` decodes with: its name (as `inspect` reports it) and how
/// it works.
pub fn layout_description(flavour: DecoderFlavour) -> (&'static str, &'static str) {
    match flavour {
        DecoderFlavour::Plain => (
            "padded",
            "rows padded on the left and masked; each run returns the grown cache in the decoder's \
             device memory",
        ),
        DecoderFlavour::Fused => (
            "shared_buffer",
            "one buffer per layer with a row per sequence, bound as past and present; each run \
             appends in place",
        ),
    }
}

/// One sequence's cache after its prompt: per layer key then value, `[1, kv_heads, len, head_dim]`,
/// in the decoder's device memory.
pub struct SequenceKv {
    pub(crate) entries: Vec<DynValue>,
    pub(crate) len: usize,
}

/// A prompt run through the decoder alone (batch 1), in one run or several chunks; every run returns
/// the grown cache (a fused decoder given a past of exactly its length does too).
pub struct Prefill {
    kv: PaddedKv,
}

impl Prefill {
    pub fn new(dims: &ModelDims, dtype: TensorDtype) -> Prefill {
        Prefill {
            kv: PaddedKv::new(dims, dtype),
        }
    }

    /// Positions prefilled so far.
    pub fn len(&self) -> usize {
        if self.kv.rows() == 0 {
            0
        } else {
            self.kv.row_len(0)
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Runs `rows` more prompt positions (`embeds`: `rows` embedding rows); the last position's logits
    /// go to `logits`.
    pub fn run(
        &mut self,
        decoder: &Graph,
        embeds: &[f32],
        rows: usize,
        logits: &mut Vec<f32>,
    ) -> Result<()> {
        self.kv.run_sequence(decoder, embeds, rows, logits)
    }

    /// The cache, for [`KvBatch::push`].
    pub fn finish(self) -> Result<SequenceKv> {
        self.kv.into_sequence()
    }
}

/// Bytes one cached position takes over all layers, keys and values.
pub fn bytes_per_position(dims: &ModelDims, dtype: TensorDtype) -> usize {
    let width = match dtype {
        TensorDtype::Float16 => 2,
        _ => 4,
    };
    2 * dims.num_layers * dims.num_kv_heads * dims.head_dim * width
}

/// One block of positions copied from a source tensor's row into a new tensor's row, every head.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RowCopy {
    pub source: usize,
    pub src_row: usize,
    pub src_start: usize,
    pub dst_row: usize,
    pub dst_start: usize,
    pub len: usize,
}

/// A host tensor `[rows, heads, positions, width]` (zeros where no copy lands) filled by `copies`
/// from `sources` (each `[_, heads, _, width]`).
pub(crate) fn repack(
    dtype: TensorDtype,
    sources: &[&DynValue],
    copies: &[RowCopy],
    shape: [usize; 4],
) -> Result<DynValue> {
    match dtype {
        TensorDtype::Float16 => repack_as::<f16>(dtype, sources, copies, shape),
        TensorDtype::Float32 => repack_as::<f32>(dtype, sources, copies, shape),
        TensorDtype::Int64 => Err(Error::Internal("a KV cache cannot be int64".into())),
    }
}

fn repack_as<T: PrimitiveTensorElementType + Copy + Default + std::fmt::Debug>(
    dtype: TensorDtype,
    sources: &[&DynValue],
    copies: &[RowCopy],
    shape: [usize; 4],
) -> Result<DynValue> {
    let [_, heads, positions, width] = shape;
    let mut out = DynTensor::new(
        &ort::memory::Allocator::default(),
        ort_type(dtype),
        shape.map(|d| d as i64),
    )?;
    let (_, dst) = out.try_extract_tensor_mut::<T>()?;
    // Padding is never attended to (masked, or past a row's length), but zeros keep it finite.
    dst.fill(T::default());
    for copy in copies {
        let source = sources
            .get(copy.source)
            .ok_or_else(|| Error::Internal("a row copy names no source".into()))?;
        let (src_shape, src) = source.try_extract_tensor::<T>()?;
        let src_positions = src_shape.get(2).copied().unwrap_or(0) as usize;
        let in_bounds = copy.src_start + copy.len <= src_positions
            && copy.dst_start + copy.len <= positions
            && src.len() >= (copy.src_row + 1) * heads * src_positions * width;
        if !in_bounds {
            return Err(Error::Internal(format!(
                "row copy {copy:?} does not fit {src_shape:?} -> {shape:?}"
            )));
        }
        for head in 0..heads {
            let from = ((copy.src_row * heads + head) * src_positions + copy.src_start) * width;
            let to = ((copy.dst_row * heads + head) * positions + copy.dst_start) * width;
            dst[to..to + copy.len * width].copy_from_slice(&src[from..from + copy.len * width]);
        }
    }
    Ok(out.into_dyn())
}

/// The mask and position ids of one decode step over rows holding `lens` positions, laid out `width`
/// wide with each row's valid positions starting at `starts[row]`: ones over the valid positions and
/// the new one, zeros elsewhere.
pub(crate) fn step_mask(starts: &[usize], lens: &[usize], width: usize) -> (Vec<i64>, Vec<i64>) {
    let mut mask = vec![0_i64; starts.len() * width];
    for (row, (&start, &len)) in starts.iter().zip(lens).enumerate() {
        mask[row * width + start..row * width + start + len + 1].fill(1);
    }
    let positions = lens.iter().map(|&len| len as i64).collect();
    (mask, positions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ort::value::Tensor;

    #[test]
    fn repack_moves_each_rows_positions_for_every_head() {
        crate::ort_env::environment().unwrap();
        // Source [2 rows, 2 heads, 3 positions, 1 wide]: value = row * 100 + head * 10 + position.
        let data: Vec<f32> = (0..12)
            .map(|i| ((i / 6) * 100 + (i / 3 % 2) * 10 + i % 3) as f32)
            .collect();
        let source = Tensor::from_array(([2_i64, 2, 3, 1], data))
            .unwrap()
            .into_dyn();
        let copies = [
            RowCopy {
                source: 0,
                src_row: 1,
                src_start: 1,
                dst_row: 0,
                dst_start: 0,
                len: 2,
            },
            RowCopy {
                source: 0,
                src_row: 0,
                src_start: 0,
                dst_row: 1,
                dst_start: 2,
                len: 2,
            },
        ];
        let out = repack(TensorDtype::Float32, &[&source], &copies, [2, 2, 4, 1]).unwrap();
        let (_, got) = out.try_extract_tensor::<f32>().unwrap();
        #[rustfmt::skip]
        let expected = [
            101., 102., 0., 0.,   111., 112., 0., 0.,
            0., 0., 0., 1.,       0., 0., 10., 11.,
        ];
        assert_eq!(got, expected);
        let err = repack(
            TensorDtype::Float32,
            &[&source],
            &[RowCopy {
                source: 0,
                src_row: 0,
                src_start: 2,
                dst_row: 0,
                dst_start: 0,
                len: 2,
            }],
            [1, 2, 4, 1],
        )
        .unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
    }

    #[test]
    fn step_masks_cover_each_rows_positions_and_the_new_one() {
        let (mask, positions) = step_mask(&[2, 0], &[1, 3], 4);
        assert_eq!(mask, [0, 0, 1, 1, 1, 1, 1, 1]);
        assert_eq!(positions, [1, 3]);
        let (mask, positions) = step_mask(&[0, 0], &[1, 2], 3);
        assert_eq!(mask, [1, 1, 0, 1, 1, 1]);
        assert_eq!(positions, [1, 2]);
    }
}
