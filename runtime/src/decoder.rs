//! One decoder run: new embeddings + the cache in, logits + the grown cache out.
//
// inputs_embeds [1,S,D], attention_mask [1,P+S], position_ids [1,S], past.{i} [1,KV,P,Hd]
//   -> logits [1,1,V] (last position), present.{i} [1,KV,P+S,Hd]

use std::borrow::Cow;
use std::time::Instant;

use half::f16;
use ort::session::SessionInputValue;
use ort::value::TensorRef;

use crate::error::Result;
use crate::graph::{read_last_row, Graph};
use crate::kv_cache::KvCache;
use crate::manifest::TensorDtype;

/// Runs `embeds` (`seq` rows of `hidden`) through the decoder after the cached positions, stores the
/// grown cache back into `cache` and the last position's logits into `logits`.
///
/// The embeddings (float32), attention mask and position ids go to ONNX Runtime as views of buffers
/// the caller and the cache keep, so a decode step copies none of them into fresh tensors.
pub fn decoder_step(
    graph: &Graph,
    dtype: TensorDtype,
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
    let presents = graph.run(inputs, |outputs| {
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
