//! The embedding graph: input_ids [1,S] int64 -> inputs_embeds [1,S,D].

use crate::error::Result;
use crate::graph::{int64_tensor, read_floats, Graph, Release};

/// Embeds one sequence of token ids; returns `ids.len()` rows of the model's hidden width as f32.
pub fn embed_tokens(graph: &Graph, ids: &[u32]) -> Result<Vec<f32>> {
    let ids64: Vec<i64> = ids.iter().map(|&id| i64::from(id)).collect();
    let input = int64_tensor(vec![1, ids.len() as i64], ids64)?;
    let mut embeds = Vec::new();
    graph.run(
        vec![(graph.input_name(0), input)],
        Release::Keep,
        |outputs| read_floats(&graph.take_output(outputs, 0)?, &mut embeds),
    )?;
    Ok(embeds)
}
