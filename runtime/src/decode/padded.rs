//! The standard-op decoder's cache: every run takes the past `[rows, kv_heads, width, head_dim]` and
//! returns the present one position wider. Rows shorter than the widest are padded on the left (their
//! first `pad` positions masked out), so a step appends at the same position of every row.
//
// inputs_embeds [B,S,D], attention_mask [B,W+S], position_ids [B,S], past.{i} [B,KV,W,Hd]
//   -> logits [B,1,V] (last position), present.{i} [B,KV,W+S,Hd]

use std::time::{Duration, Instant};

use ort::value::DynValue;

use super::io::{read_logits, to_device, with_host, StepIo};
use super::{repack, step_mask, KvBatch, RowCopy, SequenceKv};
use crate::error::{Error, Result};
use crate::graph::{float_tensor, Graph, Release};
use crate::manifest::{ModelDims, TensorDtype};

pub struct PaddedKv {
    kv_heads: usize,
    head_dim: usize,
    layers: usize,
    dtype: TensorDtype,
    /// Per layer key then value, `[rows, kv_heads, width, head_dim]`; empty while no row is held.
    entries: Vec<DynValue>,
    /// Positions per row, padding included.
    width: usize,
    /// Per row: masked positions at its start.
    pads: Vec<usize>,
    io: Option<StepIo>,
    last_run: Duration,
}

impl PaddedKv {
    pub fn new(dims: &ModelDims, dtype: TensorDtype) -> PaddedKv {
        PaddedKv {
            kv_heads: dims.num_kv_heads,
            head_dim: dims.head_dim,
            layers: dims.num_layers,
            dtype,
            entries: Vec::new(),
            width: 0,
            pads: Vec::new(),
            io: None,
            last_run: Duration::ZERO,
        }
    }

    fn lens(&self) -> Vec<usize> {
        self.pads.iter().map(|pad| self.width - pad).collect()
    }

    /// Runs `seq` more positions of a single sequence (prefill); starts the row when empty.
    pub(crate) fn run_sequence(
        &mut self,
        decoder: &Graph,
        embeds: &[f32],
        seq: usize,
        logits: &mut Vec<f32>,
    ) -> Result<()> {
        if self.pads.len() > 1 || self.pads.first().is_some_and(|&pad| pad > 0) {
            return Err(decoder.error("a prompt is prefilled alone, without padding".into()));
        }
        if self.pads.is_empty() {
            let shape = vec![1, self.kv_heads as i64, 0, self.head_dim as i64];
            self.entries = (0..2 * self.layers)
                .map(|_| float_tensor(self.dtype, shape.clone(), &[]))
                .collect::<Result<_>>()?;
            self.pads.push(0);
            self.width = 0;
        }
        let total = self.width + seq;
        let mask = vec![1_i64; total];
        let positions: Vec<i64> = (self.width as i64..total as i64).collect();
        self.run(decoder, embeds, seq, &mask, &positions, logits)
    }

    /// One run over every row with `seq` new positions each; replaces the cache only if it succeeds.
    fn run(
        &mut self,
        decoder: &Graph,
        embeds: &[f32],
        seq: usize,
        mask: &[i64],
        positions: &[i64],
        logits: &mut Vec<f32>,
    ) -> Result<()> {
        let rows = self.pads.len();
        let spec = &decoder.spec;
        if self.entries.len() + 3 != spec.inputs.len() {
            return Err(decoder.error(format!(
                "the cache holds {} tensors, the graph takes {} past inputs",
                self.entries.len(),
                spec.inputs.len().saturating_sub(3)
            )));
        }
        if self.io.is_none() {
            self.io = Some(StepIo::new(decoder, self.dtype)?);
        }
        let io = self
            .io
            .as_mut()
            .ok_or_else(|| decoder.error("the decoder binding was not made".into()))?;
        io.bind_inputs(decoder, embeds, rows, seq, mask, positions)?;
        for (input, value) in spec.inputs[3..].iter().zip(&self.entries) {
            io.binding.bind_input(input.name.as_str(), value)?;
        }
        // Binding to a device again also drops the binding's hold on the last run's presents.
        for output in &spec.outputs[1..] {
            io.binding
                .bind_output_to_device(output.name.as_str(), &io.device_memory)?;
        }
        let release = if seq > 1 {
            Release::FreeMemory
        } else {
            Release::Keep
        };
        let started = Instant::now();
        let mut ran = None;
        let result = decoder.run_binding(&io.binding, release, |outputs| {
            ran = Some(started.elapsed());
            read_logits(decoder, &decoder.take_output(outputs, 0)?, rows, logits)?;
            (1..spec.outputs.len())
                .map(|i| decoder.take_output(outputs, i))
                .collect::<Result<Vec<_>>>()
        });
        // The binding holds the past until cleared: let it go now so the cache is not held twice.
        io.binding.clear_inputs();
        self.entries = result?;
        self.width += seq;
        self.last_run = ran.unwrap_or_default();
        Ok(())
    }

    pub(crate) fn into_sequence(self) -> Result<SequenceKv> {
        if self.pads != [0] {
            return Err(Error::Internal(format!(
                "a prefilled sequence is one unpadded row, this cache has pads {:?}",
                self.pads
            )));
        }
        Ok(SequenceKv {
            entries: self.entries,
            len: self.width,
        })
    }

    /// Rebuilds every entry as `[rows, kv_heads, width, head_dim]` from `copies` of the current
    /// entries (source 0) and, if given, a joining sequence's (source 1).
    fn repack(
        &self,
        decoder: &Graph,
        joining: Option<&SequenceKv>,
        copies: &[RowCopy],
        rows: usize,
        width: usize,
    ) -> Result<Vec<DynValue>> {
        let shape = [rows, self.kv_heads, width, self.head_dim];
        let mut all: Vec<&DynValue> = self.entries.iter().collect();
        if let Some(sequence) = joining {
            all.extend(&sequence.entries);
        }
        let layers = self.entries.len();
        with_host(&all, decoder.device, |host| {
            let packed = (0..layers)
                .map(|i| {
                    let mut sources = vec![host[i]];
                    if joining.is_some() {
                        sources.push(host[layers + i]);
                    }
                    repack(self.dtype, &sources, copies, shape)
                })
                .collect::<Result<Vec<_>>>()?;
            to_device(packed, decoder.device)
        })
    }
}

impl KvBatch for PaddedKv {
    fn rows(&self) -> usize {
        self.pads.len()
    }

    fn row_len(&self, row: usize) -> usize {
        self.pads.get(row).map_or(0, |pad| self.width - pad)
    }

    fn allocated_positions(&self) -> usize {
        self.width
    }

    fn step(&mut self, decoder: &Graph, embeds: &[f32], logits: &mut Vec<f32>) -> Result<()> {
        if self.pads.is_empty() {
            return Err(decoder.error("a decode step over an empty batch".into()));
        }
        let (mask, positions) = step_mask(&self.pads, &self.lens(), self.width + 1);
        self.run(decoder, embeds, 1, &mask, &positions, logits)
    }

    fn push(&mut self, decoder: &Graph, sequence: SequenceKv, _reserve: usize) -> Result<()> {
        if self.pads.is_empty() {
            self.width = sequence.len;
            self.entries = sequence.entries;
            self.pads.push(0);
            return Ok(());
        }
        let rows = self.pads.len();
        let width = self.width.max(sequence.len);
        let shift = width - self.width;
        let mut copies: Vec<RowCopy> = (0..rows)
            .map(|row| RowCopy {
                source: 0,
                src_row: row,
                src_start: 0,
                dst_row: row,
                dst_start: shift,
                len: self.width,
            })
            .collect();
        copies.push(RowCopy {
            source: 1,
            src_row: 0,
            src_start: 0,
            dst_row: rows,
            dst_start: width - sequence.len,
            len: sequence.len,
        });
        self.entries = self.repack(decoder, Some(&sequence), &copies, rows + 1, width)?;
        for pad in &mut self.pads {
            *pad += shift;
        }
        self.pads.push(width - sequence.len);
        self.width = width;
        Ok(())
    }

    fn remove(&mut self, decoder: &Graph, row: usize) -> Result<()> {
        if row >= self.pads.len() {
            return Err(decoder.error(format!("no row {row} in a batch of {}", self.pads.len())));
        }
        if self.pads.len() == 1 {
            self.entries.clear();
            self.pads.clear();
            self.width = 0;
            return Ok(());
        }
        let mut pads = self.pads.clone();
        pads.remove(row);
        // Padding every remaining row shares is dropped.
        let trim = pads.iter().copied().min().unwrap_or(0);
        let width = self.width - trim;
        let copies: Vec<RowCopy> = (0..self.pads.len())
            .filter(|&r| r != row)
            .enumerate()
            .map(|(dst_row, src_row)| RowCopy {
                source: 0,
                src_row,
                src_start: trim,
                dst_row,
                dst_start: 0,
                len: width,
            })
            .collect();
        self.entries = self.repack(decoder, None, &copies, pads.len(), width)?;
        self.pads = pads.iter().map(|pad| pad - trim).collect();
        self.width = width;
        Ok(())
    }

    fn last_run(&self) -> Duration {
        self.last_run
    }
}
