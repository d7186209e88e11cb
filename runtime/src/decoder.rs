//! One decoder run: new embeddings + the cache in, logits + the grown cache out.
//
// inputs_embeds [1,S,D], attention_mask [1,P+S], position_ids [1,S], past.{i} [1,KV,P,Hd]
//   -> logits [1,S,V], present.{i} [1,KV,P+S,Hd]

use std::borrow::Cow;
use std::time::Instant;

use ort::session::SessionInputValue;

use crate::error::Result;
use crate::graph::{float_tensor, int64_tensor, read_last_row, Graph};
use crate::kv_cache::KvCache;
use crate::manifest::TensorDtype;

/// Runs `embeds` (`seq` rows of `hidden`) through the decoder after the cached positions, stores the
/// grown cache back into `cache` and the last position's logits into `logits`.
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
    let hidden = embeds.len() / seq;
    let past = cache.len();
    let total = past + seq;
    let spec = &graph.spec;

    let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> =
        Vec::with_capacity(spec.inputs.len());
    inputs.push((
        spec.inputs[0].name.as_str().into(),
        float_tensor(dtype, vec![1, seq as i64, hidden as i64], embeds)?.into(),
    ));
    inputs.push((
        spec.inputs[1].name.as_str().into(),
        int64_tensor(vec![1, total as i64], vec![1; total])?.into(),
    ));
    inputs.push((
        spec.inputs[2].name.as_str().into(),
        int64_tensor(vec![1, seq as i64], (past as i64..total as i64).collect())?.into(),
    ));
    for (spec, value) in spec.inputs[3..].iter().zip(cache.take()) {
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
