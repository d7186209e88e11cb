//! The embedding graph: input_ids [1,S] int64 -> inputs_embeds [1,S,D].

use crate::error::Result;
use crate::graph::{int64_tensor, read_floats, Graph};

/// Embeds one sequence of token ids; returns `ids.len()` rows of the model's hidden width as f32.
pub fn embed_tokens(graph: &mut Graph, ids: &[u32]) -> Result<Vec<f32>> {
    let ids64: Vec<i64> = ids.iter().map(|&id| i64::from(id)).collect();
    let input = int64_tensor(vec![1, ids.len() as i64], ids64)?;
    let name = graph.spec.inputs[0].name.as_str();
    let outputs = graph.session.run(vec![(name, input)])?;
    let out_name = graph.spec.outputs[0].name.as_str();
    let value = outputs.get(out_name).ok_or_else(|| crate::Error::Graph {
        graph: "embed".into(),
        reason: format!("output {out_name:?} is missing"),
    })?;
    let mut embeds = Vec::new();
    read_floats(value, &mut embeds)?;
    Ok(embeds)
}
