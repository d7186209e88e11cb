//! What every decoder run binds besides the cache: the new positions' embeddings, the attention mask,
//! the position ids and the logits. Kept with the binding from run to run so a decode step refills
//! host tensors in place instead of allocating them.

use half::f16;
use ort::memory::{Allocator, MemoryInfo};
use ort::session::IoBinding;
use ort::value::{DynTensor, DynTensorValueType, DynValue, Tensor};

use crate::error::{Error, Result};
use crate::graph::{ort_type, read_floats, Device, Graph};
use crate::manifest::TensorDtype;

/// A decoder's binding and the host tensors it reuses.
pub(crate) struct StepIo {
    pub(crate) binding: IoBinding,
    /// Where outputs that the next run takes as inputs are bound: the decoder's device memory.
    pub(crate) device_memory: MemoryInfo<'static>,
    host_memory: MemoryInfo<'static>,
    dtype: TensorDtype,
    /// `[rows, seq, hidden]` embeddings and `[rows, seq]` position ids of the last run, refilled in
    /// place while the shape stays (every decode step of a stable batch). ONNX Runtime's binding copies
    /// a tensor that borrows its data but takes an owned one as it is.
    embeds: Option<DynValue>,
    positions: Option<DynValue>,
}

impl StepIo {
    pub(crate) fn new(graph: &Graph, dtype: TensorDtype) -> Result<StepIo> {
        if dtype == TensorDtype::Int64 {
            return Err(graph.error("the decoder's float type cannot be int64".into()));
        }
        let mut binding = graph.create_binding()?;
        let host_memory = Device::Cpu.memory_info()?;
        binding.bind_output_to_device(graph.spec.outputs[0].name.as_str(), &host_memory)?;
        Ok(StepIo {
            binding,
            device_memory: graph.device.memory_info()?,
            host_memory,
            dtype,
            embeds: None,
            positions: None,
        })
    }

    /// Binds `rows x seq` new positions: their embeddings (row-major, `hidden` wide), the mask
    /// (`rows x mask_width`, row-major) and the position ids (`rows x seq`).
    pub(crate) fn bind_inputs(
        &mut self,
        graph: &Graph,
        embeds: &[f32],
        rows: usize,
        seq: usize,
        mask: &[i64],
        positions: &[i64],
    ) -> Result<()> {
        let points = rows * seq;
        if points == 0 || !embeds.len().is_multiple_of(points) || positions.len() != points {
            return Err(graph.error(format!(
                "{} embedding values and {} positions do not make {rows} rows of {seq} positions",
                embeds.len(),
                positions.len()
            )));
        }
        let hidden = (embeds.len() / points) as i64;
        let shape = [rows as i64, seq as i64, hidden];
        let value = reusable(&mut self.embeds, self.dtype, &shape)?;
        if self.dtype == TensorDtype::Float16 {
            let (_, data) = value.try_extract_tensor_mut::<f16>()?;
            for (half, v) in data.iter_mut().zip(embeds) {
                *half = f16::from_f32(*v);
            }
        } else {
            let (_, data) = value.try_extract_tensor_mut::<f32>()?;
            data.copy_from_slice(embeds);
        }
        let ids = reusable(
            &mut self.positions,
            TensorDtype::Int64,
            &[rows as i64, seq as i64],
        )?;
        ids.try_extract_tensor_mut::<i64>()?
            .1
            .copy_from_slice(positions);
        // The mask's width grows every step, so it is the one input made anew each run.
        let width = (mask.len() / rows.max(1)) as i64;
        let mask = Tensor::from_array(([rows as i64, width], mask.to_vec()))?;
        let spec = &graph.spec;
        // ort's binding calls take names as owned strings: each bind costs one small allocation.
        self.binding
            .bind_input(spec.inputs[0].name.as_str(), &*value)?;
        self.binding
            .bind_input(spec.inputs[1].name.as_str(), &mask)?;
        self.binding
            .bind_input(spec.inputs[2].name.as_str(), &*ids)?;
        // Rebinding the logits to host memory drops the binding's hold on the last run's logits.
        self.binding
            .bind_output_to_device(spec.outputs[0].name.as_str(), &self.host_memory)?;
        Ok(())
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
        .ok_or_else(|| Error::Internal("a reusable tensor was not made".into()))
}

/// Reads a `[rows, 1, vocab]` logits output into `out` (rows x vocab, row-major).
pub(crate) fn read_logits(
    graph: &Graph,
    value: &DynValue,
    rows: usize,
    out: &mut Vec<f32>,
) -> Result<()> {
    let shape = read_floats(value, out)?;
    match shape.as_slice() {
        [r, 1, v] if *r as usize == rows && *v > 0 => Ok(()),
        _ => Err(graph.error(format!(
            "logits of shape {shape:?}, expected [{rows}, 1, vocab]"
        ))),
    }
}

/// Runs `f` over host-memory versions of `values`: the tensors themselves when the device is the host,
/// copies when they live on a device. Re-packing rows (a sequence joining or leaving a batch) is done
/// on the host; it happens once per join or leave, not per step.
pub(crate) fn with_host<R>(
    values: &[&DynValue],
    device: Device,
    f: impl FnOnce(&[&DynValue]) -> Result<R>,
) -> Result<R> {
    match device {
        Device::Cpu => f(values),
        Device::Cuda { .. } => {
            let copies = values
                .iter()
                .map(|v| copy_to(v, ort::memory::AllocationDevice::CPU, 0))
                .collect::<Result<Vec<DynValue>>>()?;
            f(&copies.iter().collect::<Vec<_>>())
        }
    }
}

/// Moves host tensors made by a re-pack to the decoder's device.
pub(crate) fn to_device(values: Vec<DynValue>, device: Device) -> Result<Vec<DynValue>> {
    match device {
        Device::Cpu => Ok(values),
        Device::Cuda { device_id } => values
            .iter()
            .map(|v| copy_to(v, ort::memory::AllocationDevice::CUDA, device_id))
            .collect(),
    }
}

/// A copy of a tensor in another device's memory.
fn copy_to(value: &DynValue, device: ort::memory::AllocationDevice, id: i32) -> Result<DynValue> {
    let tensor = value.view().downcast::<DynTensorValueType>()?;
    Ok(tensor.to(device, id)?.into_dyn())
}
