//! One decoder run: new embeddings + the cache in, logits + the grown cache out.
//
// inputs_embeds [1,S,D], attention_mask [1,P+S], position_ids [1,S], past.{i} [1,KV,P,Hd]
//   -> logits [1,1,V] (last position), present.{i} [1,KV,P+S,Hd]
//
// Two ways to run it. A plain run hands ONNX Runtime the inputs and gets every output back in host
// memory: on the CPU that is where the cache lives anyway, but on CUDA or TensorRT it would copy the
// whole cache to the host and back every step. A bound run ([`BoundIo`]) binds the present outputs to
// the decoder's device memory and the next run's past inputs to those same values, so the cache never
// leaves the device; only the logits are bound to host memory. A shared run (fused decoders) binds
// each past input and its present output to one buffer of the request's capacity, once per sequence:
// the graph appends the new positions in place and no run allocates or copies the cache.

use std::borrow::Cow;
use std::time::Instant;

use half::f16;
use ort::memory::{Allocator, MemoryInfo};
use ort::session::{IoBinding, SessionInputValue};
use ort::value::{DynTensor, DynValue, Tensor, TensorRef};

use crate::error::{Error, Result};
use crate::graph::{ort_type, read_last_row, Device, Graph, Release};
use crate::kv_cache::KvCache;
use crate::manifest::{Dim, TensorDtype};

/// A prompt run (more than one new position) hands its arena's free memory back; a decode step keeps it.
fn release_after(seq: usize) -> Release {
    if seq > 1 {
        Release::FreeMemory
    } else {
        Release::Keep
    }
}

/// How a decoder run hands its inputs and outputs to ONNX Runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepMode {
    /// `Session::run`: inputs in, every output back in host memory.
    Plain,
    /// An IoBinding: the cache bound in the decoder's device memory, the logits in host memory.
    Bound,
    /// An IoBinding whose past inputs and present outputs are the same fixed-capacity buffers
    /// ([`KvCache::shared`]); needs a fused decoder.
    Shared,
}

impl StepMode {
    /// The name `inspect` reports, as the `decode.io_binding` option spells the choice.
    pub fn name(self) -> &'static str {
        match self {
            StepMode::Plain => "plain",
            StepMode::Bound => "io_binding",
            StepMode::Shared => "shared_buffer",
        }
    }
}

/// Runs `embeds` (`seq` rows of `hidden`) through the decoder after the cached positions, stores the
/// grown cache back into `cache` and the last position's logits into `logits`.
///
/// A plain run hands the embeddings (float32), attention mask and position ids to ONNX Runtime as
/// views of buffers the caller and the cache keep, so a decode step copies none of them into fresh
/// tensors. A bound run keeps the sequence's binding in the cache, made by its first bound run.
pub fn decoder_step(
    graph: &Graph,
    dtype: TensorDtype,
    mode: StepMode,
    embeds: &[f32],
    seq: usize,
    cache: &mut KvCache,
    logits: &mut Vec<f32>,
) -> Result<()> {
    if seq == 0 || !embeds.len().is_multiple_of(seq) {
        return Err(graph.error(format!(
            "{} embedding values do not make {seq} rows",
            embeds.len()
        )));
    }
    if dtype == TensorDtype::Int64 {
        return Err(graph.error("the decoder's float type cannot be int64".into()));
    }
    let hidden = embeds.len() / seq;
    if mode != StepMode::Plain {
        return bound_step(graph, dtype, mode, embeds, seq, hidden, cache, logits);
    }
    let past = cache.len();
    let total = past + seq;
    let spec = &graph.spec;

    if cache.mask.len() < total {
        cache.mask.resize(total, 1);
    }
    cache.positions.clear();
    cache.positions.extend(past as i64..total as i64);
    if dtype == TensorDtype::Float16 {
        cache.halves.clear();
        cache
            .halves
            .extend(embeds.iter().map(|v| f16::from_f32(*v)));
    }
    let past_values = cache.take();

    let embeds_shape = [1, seq as i64, hidden as i64];
    // Int64 was rejected above: the embeddings are float16 or float32.
    let embeds_value: SessionInputValue<'_> = if dtype == TensorDtype::Float16 {
        TensorRef::from_array_view((embeds_shape, cache.halves.as_slice()))?.into()
    } else {
        TensorRef::from_array_view((embeds_shape, embeds))?.into()
    };
    let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> =
        Vec::with_capacity(spec.inputs.len());
    inputs.push((spec.inputs[0].name.as_str().into(), embeds_value));
    inputs.push((
        spec.inputs[1].name.as_str().into(),
        TensorRef::from_array_view(([1, total as i64], &cache.mask[..total]))?.into(),
    ));
    inputs.push((
        spec.inputs[2].name.as_str().into(),
        TensorRef::from_array_view(([1, seq as i64], cache.positions.as_slice()))?.into(),
    ));
    for (spec, value) in spec.inputs[3..].iter().zip(past_values) {
        inputs.push((spec.name.as_str().into(), value.into()));
    }

    let started = Instant::now();
    let mut ran = None;
    let presents = graph.run(inputs, release_after(seq), |outputs| {
        ran = Some(started.elapsed());
        read_last_row(&graph.take_output(outputs, 0)?, logits)?;
        (1..graph.spec.outputs.len())
            .map(|i| graph.take_output(outputs, i))
            .collect::<Result<Vec<_>>>()
    })?;
    cache.replace(presents, total);
    cache.set_last_run(ran.unwrap_or_default());
    Ok(())
}

/// The decoder's IoBinding for one sequence, and the host tensors it reuses from run to run. It lives
/// in the sequence's [`KvCache`] and goes with it.
pub(crate) struct BoundIo {
    binding: IoBinding,
    /// Where the present outputs are bound: the decoder's device memory.
    cache_memory: MemoryInfo<'static>,
    /// Host memory, where the logits are bound when the manifest leaves their shape open.
    host_memory: MemoryInfo<'static>,
    /// The logits are bound once to a host tensor of the manifest's fixed `[1, 1, vocab]`, which every
    /// run overwrites in place.
    logits_prebound: bool,
    /// The embeddings `[1, seq, hidden]` and position ids `[1, seq]` of the last run, refilled in place
    /// while `seq` stays the same (every decode step). ONNX Runtime's binding copies a tensor that
    /// borrows its data (to keep the borrow from outliving the run) but takes an owned one as it is.
    embeds: Option<DynValue>,
    positions: Option<DynValue>,
}

impl BoundIo {
    /// A binding with the logits bound; with `shared` buffers, also each past input and its present
    /// output bound to the same buffer for the sequence's life.
    fn new(graph: &Graph, shared: Option<&mut [DynValue]>) -> Result<BoundIo> {
        let mut binding = graph.create_binding()?;
        let logits = &graph.spec.outputs[0];
        // check_io made the graph's logits the manifest's dtype and rank; a fixed shape is bound once.
        let vocab = match logits.shape.as_slice() {
            [_, Dim::Fixed(1), Dim::Fixed(vocab)] if *vocab > 0 => Some(*vocab),
            _ => None,
        };
        let logits_prebound = match vocab {
            Some(vocab) => {
                let tensor =
                    DynTensor::new(&Allocator::default(), ort_type(logits.dtype), [1, 1, vocab])?;
                binding.bind_output(logits.name.as_str(), tensor)?;
                true
            }
            None => false,
        };
        if let Some(buffers) = shared {
            let spec = &graph.spec;
            let pairs = spec.inputs[3..].iter().zip(&spec.outputs[1..]);
            for ((past, present), buffer) in pairs.zip(buffers.iter_mut()) {
                binding.bind_input(past.name.as_str(), &*buffer)?;
                binding.bind_output(present.name.as_str(), &mut *buffer)?;
            }
        }
        Ok(BoundIo {
            binding,
            cache_memory: graph.device.memory_info()?,
            host_memory: Device::Cpu.memory_info()?,
            logits_prebound,
            embeds: None,
            positions: None,
        })
    }
}

/// A host tensor of `shape` in `slot`, made anew only when the shape changed.
fn reusable<'a>(
    slot: &'a mut Option<DynValue>,
    dtype: TensorDtype,
    shape: &[i64],
) -> Result<&'a mut DynValue> {
    if slot.as_ref().is_none_or(|v| &v.shape()[..] != shape) {
        let tensor = DynTensor::new(&Allocator::default(), ort_type(dtype), shape.to_vec())?;
        *slot = Some(tensor.into_dyn());
    }
    slot.as_mut()
        .ok_or_else(|| Error::Ort("a reusable tensor was not made".into()))
}

/// [`decoder_step`] through the sequence's [`BoundIo`]: inputs from host buffers reused between steps,
/// the logits bound to host memory. [`StepMode::Bound`]: the past bound to the cache's values where the
/// last run left them, the presents bound to the decoder's device. [`StepMode::Shared`]: past and
/// present bound once to the cache's buffers, which the run appends to.
#[allow(clippy::too_many_arguments)]
fn bound_step(
    graph: &Graph,
    dtype: TensorDtype,
    mode: StepMode,
    embeds: &[f32],
    seq: usize,
    hidden: usize,
    cache: &mut KvCache,
    logits: &mut Vec<f32>,
) -> Result<()> {
    let past = cache.len();
    let total = past + seq;
    let spec = &graph.spec;
    if cache.entries().len() + 3 != spec.inputs.len() {
        return Err(graph.error(format!(
            "the cache holds {} tensors, the graph takes {} past inputs",
            cache.entries().len(),
            spec.inputs.len().saturating_sub(3)
        )));
    }
    let shared = mode == StepMode::Shared;
    if shared {
        if cache.capacity().is_none() {
            return Err(graph.error("a shared-buffer run needs a cache of shared buffers".into()));
        }
        cache.grow(total, graph.device, dtype)?;
    }
    let mut io = match cache.bound.take() {
        Some(io) => io,
        None => BoundIo::new(graph, shared.then(|| cache.entries_mut()))?,
    };

    let BoundIo {
        binding,
        cache_memory,
        host_memory,
        logits_prebound,
        embeds: embeds_slot,
        positions: positions_slot,
    } = &mut io;
    let embeds_value = reusable(embeds_slot, dtype, &[1, seq as i64, hidden as i64])?;
    if dtype == TensorDtype::Float16 {
        let (_, data) = embeds_value.try_extract_tensor_mut::<f16>()?;
        for (half, value) in data.iter_mut().zip(embeds) {
            *half = f16::from_f32(*value);
        }
    } else {
        let (_, data) = embeds_value.try_extract_tensor_mut::<f32>()?;
        data.copy_from_slice(embeds);
    }
    let positions = reusable(positions_slot, TensorDtype::Int64, &[1, seq as i64])?;
    let (_, data) = positions.try_extract_tensor_mut::<i64>()?;
    for (slot, position) in data.iter_mut().zip(past as i64..) {
        *slot = position;
    }
    // The mask's shape grows every step, so it is the one input made anew each run.
    let mask = Tensor::from_array(([1, total as i64], vec![1_i64; total]))?;

    // ort's binding calls take names as owned strings: each bind costs one small allocation.
    binding.bind_input(spec.inputs[0].name.as_str(), &*embeds_value)?;
    binding.bind_input(spec.inputs[1].name.as_str(), &mask)?;
    binding.bind_input(spec.inputs[2].name.as_str(), &*positions)?;
    if !*logits_prebound {
        binding.bind_output_to_device(spec.outputs[0].name.as_str(), host_memory)?;
    }
    if !shared {
        for (input, value) in spec.inputs[3..].iter().zip(cache.entries()) {
            binding.bind_input(input.name.as_str(), value)?;
        }
        // Binding to a device again also drops the binding's hold on the last run's presents: left
        // bound to them (this run's past inputs, `seq` positions shorter), ONNX Runtime would try to
        // write this run's presents into them.
        for output in &spec.outputs[1..] {
            binding.bind_output_to_device(output.name.as_str(), cache_memory)?;
        }
    }

    let started = Instant::now();
    let mut ran = None;
    let result = graph.run_binding(&io.binding, release_after(seq), |outputs| {
        ran = Some(started.elapsed());
        read_last_row(&graph.take_output(outputs, 0)?, logits)?;
        if shared {
            // The presents are the cache's own buffers, already holding this run's positions.
            return Ok(Vec::new());
        }
        (1..graph.spec.outputs.len())
            .map(|i| graph.take_output(outputs, i))
            .collect::<Result<Vec<_>>>()
    });
    if shared {
        result?;
        cache.set_len(total);
    } else {
        // The binding holds the past and the other inputs until cleared: let the past go now, not at
        // the next step, so the cache is not held twice between steps.
        io.binding.clear_inputs();
        let presents = result?;
        cache.replace(presents, total);
    }
    cache.set_last_run(ran.unwrap_or_default());
    cache.bound = Some(io);
    Ok(())
}
