//! The vision graph: pixel_values [n,3,H,W] -> image_features [n,N_img,D], all images in one run.

use crate::error::Result;
use crate::graph::{float_tensor, read_floats, Graph, Release};
use crate::manifest::TensorDtype;

/// Encodes `count` preprocessed images (CHW, concatenated) of `height` x `width` into feature rows,
/// returned as one `[count * N_img, D]` block of f32.
pub fn encode_images(
    graph: &Graph,
    dtype: TensorDtype,
    pixel_values: &[f32],
    count: usize,
    height: u32,
    width: u32,
) -> Result<Vec<f32>> {
    let mut features = Vec::new();
    if count == 0 {
        return Ok(features);
    }
    let shape = vec![count as i64, 3, height as i64, width as i64];
    let input = float_tensor(dtype, shape, pixel_values)?;
    let inputs = vec![(graph.input_name(0), input)];
    graph.run(inputs, Release::FreeMemory, |outputs| {
        read_floats(&graph.take_output(outputs, 0)?, &mut features)
    })?;
    Ok(features)
}
