//! The fused decoder's cache: per layer and kind one buffer `[rows, kv_heads, capacity, head_dim]`,
//! bound as both the past input and the present output, so GroupQueryAttention appends each row's new
//! position in place at that row's own length and no run copies the cache. Batch is the outermost
//! dimension, so a row is contiguous; rows are re-packed only when a sequence joins or leaves.
//
// inputs_embeds [B,1,D], attention_mask [B,T] (row b: ones over its len_b + 1 positions, then zeros;
// GroupQueryAttention's seqlens_k are the rows' sums - 1), position_ids [B,1] = len_b,
// past.{i} = present.{i} = buffer [B,KV,C,Hd] -> logits [B,1,V]

use std::time::{Duration, Instant};

use ort::value::DynValue;

use super::io::{read_logits, to_device, with_host, StepIo};
use super::{repack, step_mask, KvBatch, RowCopy, SequenceKv};
use crate::error::Result;
use crate::graph::{Graph, Release};
use crate::manifest::{ModelDims, TensorDtype};

pub struct SharedKv {
    kv_heads: usize,
    head_dim: usize,
    max_context: usize,
    dtype: TensorDtype,
    /// Per layer key then value; empty while no row is held.
    buffers: Vec<DynValue>,
    capacity: usize,
    /// Per row: valid positions, and positions it may grow to (its prompt and reserve).
    lens: Vec<usize>,
    needs: Vec<usize>,
    /// The binding, with the buffers bound; made anew after every re-pack.
    io: Option<StepIo>,
    last_run: Duration,
}

impl SharedKv {
    pub fn new(dims: &ModelDims, dtype: TensorDtype) -> SharedKv {
        SharedKv {
            kv_heads: dims.num_kv_heads,
            head_dim: dims.head_dim,
            max_context: dims.max_context,
            dtype,
            buffers: Vec::new(),
            capacity: 0,
            lens: Vec::new(),
            needs: Vec::new(),
            io: None,
            last_run: Duration::ZERO,
        }
    }

    /// Rebuilds the buffers as `[rows, kv_heads, capacity, head_dim]` from `copies` of the current
    /// buffers (source 0) and, if given, a joining sequence's cache (source 1).
    fn repack(
        &mut self,
        decoder: &Graph,
        joining: Option<&SequenceKv>,
        copies: &[RowCopy],
        rows: usize,
        capacity: usize,
    ) -> Result<()> {
        self.io = None;
        if rows == 0 {
            self.buffers.clear();
            self.capacity = 0;
            return Ok(());
        }
        let shape = [rows, self.kv_heads, capacity, self.head_dim];
        let layers = joining.map_or(self.buffers.len(), |s| s.entries.len());
        let mut all: Vec<&DynValue> = self.buffers.iter().collect();
        let joining_at = all.len();
        if let Some(sequence) = joining {
            all.extend(&sequence.entries);
        }
        let have_old = !self.buffers.is_empty();
        let dtype = self.dtype;
        let buffers = with_host(&all, decoder.device, |host| {
            let packed = (0..layers)
                .map(|i| {
                    let mut sources = Vec::with_capacity(2);
                    if have_old {
                        sources.push(host[i]);
                    }
                    if joining.is_some() {
                        sources.push(host[joining_at + i]);
                    }
                    repack(dtype, &sources, copies, shape)
                })
                .collect::<Result<Vec<_>>>()?;
            to_device(packed, decoder.device)
        })?;
        self.buffers = buffers;
        self.capacity = capacity;
        Ok(())
    }

    /// Copies keeping every row but `skip` at its place in the new order.
    fn keep_rows(&self, skip: Option<usize>) -> Vec<RowCopy> {
        (0..self.lens.len())
            .filter(|&r| Some(r) != skip)
            .enumerate()
            .map(|(dst_row, src_row)| RowCopy {
                source: 0,
                src_row,
                src_start: 0,
                dst_row,
                dst_start: 0,
                len: self.lens[src_row],
            })
            .collect()
    }

    fn bind(&mut self, decoder: &Graph) -> Result<&mut StepIo> {
        if self.io.is_none() {
            let mut io = StepIo::new(decoder, self.dtype)?;
            let spec = &decoder.spec;
            let pairs = spec.inputs[3..].iter().zip(&spec.outputs[1..]);
            for ((past, present), buffer) in pairs.zip(self.buffers.iter_mut()) {
                io.binding.bind_input(past.name.as_str(), &*buffer)?;
                io.binding
                    .bind_output(present.name.as_str(), &mut *buffer)?;
            }
            self.io = Some(io);
        }
        self.io
            .as_mut()
            .ok_or_else(|| decoder.error("the decoder binding was not made".into()))
    }
}

/// Positions the buffers need for rows holding `lens` that may grow to `needs` (a row that outgrew its
/// reserve keeps what it holds).
fn room(lens: &[usize], needs: &[usize]) -> usize {
    lens.iter().chain(needs).copied().max().unwrap_or(0)
}

impl KvBatch for SharedKv {
    fn rows(&self) -> usize {
        self.lens.len()
    }

    fn row_len(&self, row: usize) -> usize {
        self.lens.get(row).copied().unwrap_or(0)
    }

    fn allocated_positions(&self) -> usize {
        self.capacity
    }

    fn step(&mut self, decoder: &Graph, embeds: &[f32], logits: &mut Vec<f32>) -> Result<()> {
        let rows = self.lens.len();
        if rows == 0 {
            return Err(decoder.error("a decode step over an empty batch".into()));
        }
        if self.buffers.len() + 3 != decoder.spec.inputs.len() {
            return Err(decoder.error(format!(
                "the cache holds {} buffers, the graph takes {} past inputs",
                self.buffers.len(),
                decoder.spec.inputs.len().saturating_sub(3)
            )));
        }
        let width = self.lens.iter().max().copied().unwrap_or(0) + 1;
        if width > self.capacity {
            // A row outgrew what it reserved: room for twice as many, within the model's context.
            let capacity = width.max(self.capacity * 2).min(self.max_context);
            if width > capacity {
                return Err(decoder.error(format!(
                    "{width} cache positions exceed the model's context of {}",
                    self.max_context
                )));
            }
            let copies = self.keep_rows(None);
            self.repack(decoder, None, &copies, rows, capacity)?;
        }
        let (mask, positions) = step_mask(&vec![0; rows], &self.lens, width);
        let io = self.bind(decoder)?;
        io.bind_inputs(decoder, embeds, rows, 1, &mask, &positions)?;
        let started = Instant::now();
        let mut ran = None;
        decoder.run_binding(&io.binding, Release::Keep, |outputs| {
            ran = Some(started.elapsed());
            read_logits(decoder, &decoder.take_output(outputs, 0)?, rows, logits)
        })?;
        for len in &mut self.lens {
            *len += 1;
        }
        self.last_run = ran.unwrap_or_default();
        Ok(())
    }

    fn push(&mut self, decoder: &Graph, sequence: SequenceKv, reserve: usize) -> Result<()> {
        let need = sequence
            .len
            .saturating_add(reserve)
            .min(self.max_context)
            .max(sequence.len);
        let rows = self.lens.len();
        let mut copies = self.keep_rows(None);
        copies.push(RowCopy {
            source: usize::from(!self.buffers.is_empty()),
            src_row: 0,
            src_start: 0,
            dst_row: rows,
            dst_start: 0,
            len: sequence.len,
        });
        let capacity = room(&self.lens, &self.needs).max(need);
        self.repack(decoder, Some(&sequence), &copies, rows + 1, capacity)?;
        self.lens.push(sequence.len);
        self.needs.push(need);
        Ok(())
    }

    fn remove(&mut self, decoder: &Graph, row: usize) -> Result<()> {
        if row >= self.lens.len() {
            return Err(decoder.error(format!("no row {row} in a batch of {}", self.lens.len())));
        }
        let copies = self.keep_rows(Some(row));
        let (mut lens, mut needs) = (self.lens.clone(), self.needs.clone());
        lens.remove(row);
        needs.remove(row);
        self.repack(decoder, None, &copies, needs.len(), room(&lens, &needs))?;
        self.lens = lens;
        self.needs = needs;
        Ok(())
    }

    fn last_run(&self) -> Duration {
        self.last_run
    }
}
