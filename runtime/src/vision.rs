//! The vision graph: pixel_values [n,3,H,W] -> image_features [n,N_img,D], one run per group of
//! equally sized images (LLaVA: all images; MiniCPM-V: the slices of one size).

use std::ops::Deref;

use crate::error::Result;
use crate::graph::{float_tensor, read_floats, Graph, Release};
use crate::manifest::TensorDtype;

/// `count` consecutive images (or slices) of one size: one vision run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SliceRun {
    pub count: usize,
    pub height: u32,
    pub width: u32,
}

/// Preprocessed pixel values of a request's images, CHW each, concatenated in prompt order, with
/// the runs the vision graph takes them in. Dereferences to the values.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImageBatch {
    pub values: Vec<f32>,
    pub runs: Vec<SliceRun>,
    /// How many images the slices came from.
    pub images: usize,
}

impl ImageBatch {
    /// `count` images of one size (the LLaVA layout: one slice per image).
    pub fn uniform(values: Vec<f32>, count: usize, height: u32, width: u32) -> Self {
        let runs = if count == 0 {
            Vec::new()
        } else {
            vec![SliceRun {
                count,
                height,
                width,
            }]
        };
        ImageBatch {
            values,
            runs,
            images: count,
        }
    }

    /// Appends one slice's size (its values go to `values`), extending the last run when it has the
    /// same size.
    pub fn push_slice(&mut self, height: u32, width: u32) {
        match self.runs.last_mut() {
            Some(run) if run.height == height && run.width == width => run.count += 1,
            _ => self.runs.push(SliceRun {
                count: 1,
                height,
                width,
            }),
        }
    }

    /// Values the runs account for.
    pub fn expected_len(&self) -> usize {
        self.runs
            .iter()
            .map(|r| r.count * 3 * r.height as usize * r.width as usize)
            .sum()
    }
}

impl Deref for ImageBatch {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        &self.values
    }
}

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

/// Encodes every run of `batch` (its length already checked against the runs) in order.
pub fn encode_batch(graph: &Graph, dtype: TensorDtype, batch: &ImageBatch) -> Result<Vec<f32>> {
    let mut features = Vec::new();
    let mut offset = 0;
    for run in &batch.runs {
        let len = run.count * 3 * run.height as usize * run.width as usize;
        let values = &batch.values[offset..offset + len];
        features.extend(encode_images(
            graph, dtype, values, run.count, run.height, run.width,
        )?);
        offset += len;
    }
    Ok(features)
}
