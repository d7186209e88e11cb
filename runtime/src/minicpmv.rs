//! The MiniCPM-Llama3-V 2.5 layout (`"layout": "minicpmv"` in the manifest): image slicing, the
//! per-slice pixel values and the prompt layout, exactly as the published 2.5 code does them.
//!
//! * **Slicing** (`slice_image` in 2.5): the slice count is `ceil(w * h / scale²)` capped at
//!   `max_slice_nums`; at most 1 means no grid, only an overview resized (up or down) to about
//!   `scale²` pixels. Otherwise the grid is the factorisation `columns x rows` of `count - 1`,
//!   `count` or `count + 1` slices whose `log(columns / rows)` is closest to `log(w / h)` (the first
//!   such in that order wins ties), the overview is the image shrunk to about `scale²` pixels, and
//!   the grid's slices are cut from the image resized so each cell is about `scale²` pixels. Every
//!   size is a multiple of the patch size, rounded half to even as Python's `round` does; the
//!   arithmetic is the same `f64` operations in the same order, so the sizes are equal.
//! * **Pixels**: Pillow-exact bicubic resize ([`resize_bicubic`]), crop, then `ToTensor` (level /
//!   255 in `f32`) and `Normalize(mean, std)`; channel-major per slice.
//! * **Prompt**: each image becomes `<image>` + `<unk>` x query_num + `</image>` for the overview,
//!   then the grid's placeholders inside `<slice>` ... `</slice>`, rows joined by newlines; a
//!   message's parts (images and texts in order) are joined by newlines into one string, and the
//!   chat template is rendered with `add_generation_prompt = false` (2.5's template always ends with
//!   the assistant header). Slice features replace the `<unk>` rows in order.

use image::{imageops, RgbImage};

use crate::chat_template::{ChatMessage, ChatTemplate, ContentPart};
use crate::error::{Error, Result};
use crate::manifest::MiniCpmvSettings;
use crate::preprocess::resize_bicubic;
use crate::vision::ImageBatch;

/// How one image is cut: the overview's size, and the grid if the image is sliced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlicePlan {
    /// (width, height) of the overview.
    pub overview: (u32, u32),
    pub grid: Option<Grid>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grid {
    pub columns: u32,
    pub rows: u32,
    /// (width, height) the image is resized to before it is cut into `columns x rows` cells.
    pub refined: (u32, u32),
}

impl SlicePlan {
    pub fn slices(&self) -> usize {
        1 + self.grid.map_or(0, |g| (g.columns * g.rows) as usize)
    }
}

/// 2.5's `ensure_divide`: the nearest multiple of `step` (half to even, as Python's `round`), at
/// least `step`.
fn ensure_divide(length: f64, step: u32) -> u32 {
    let multiples = (length / f64::from(step)).round_ties_even().max(0.0);
    // Sizes come from images within the decode limits, far below u32::MAX.
    let rounded = (multiples as u64).saturating_mul(u64::from(step));
    u32::try_from(rounded).unwrap_or(u32::MAX).max(step)
}

/// 2.5's `find_best_resize`: about `scale²` pixels at the aspect ratio of `(width, height)` (when
/// the area is over `scale²` or `upscale`), each side a multiple of `patch`.
fn best_resize(width: f64, height: f64, scale: u32, patch: u32, upscale: bool) -> (u32, u32) {
    let (mut w, mut h) = (width, height);
    let scale = f64::from(scale);
    if w * h > scale * scale || upscale {
        let ratio = w / h;
        h = (scale / ratio.sqrt()).trunc();
        w = (h * ratio).trunc();
    }
    (ensure_divide(w, patch), ensure_divide(h, patch))
}

/// The slicing of a `width x height` image.
pub fn slice_plan(width: u32, height: u32, s: &MiniCpmvSettings) -> SlicePlan {
    let (w, h) = (f64::from(width.max(1)), f64::from(height.max(1)));
    let scale = f64::from(s.scale_resolution);
    let ratio = w * h / (scale * scale);
    let multiple = ratio.ceil().min(f64::from(s.max_slice_nums)) as u32;
    if multiple <= 1 {
        let overview = best_resize(w, h, s.scale_resolution, s.patch_size, true);
        return SlicePlan {
            overview,
            grid: None,
        };
    }
    let overview = best_resize(w, h, s.scale_resolution, s.patch_size, false);
    let log_ratio = (w / h).ln();
    let mut best = (1, 1);
    let mut min_error = f64::INFINITY;
    for count in [multiple - 1, multiple, multiple + 1] {
        if count == 1 || count > s.max_slice_nums {
            continue;
        }
        for m in (1..=count).filter(|m| count % m == 0) {
            let error = (log_ratio - (f64::from(m) / f64::from(count / m)).ln()).abs();
            if error < min_error {
                best = (m, count / m);
                min_error = error;
            }
        }
    }
    let (columns, rows) = best;
    let cell_w = f64::from(ensure_divide(w, columns)) / f64::from(columns);
    let cell_h = f64::from(ensure_divide(h, rows)) / f64::from(rows);
    let cell = best_resize(cell_w, cell_h, s.scale_resolution, s.patch_size, true);
    SlicePlan {
        overview,
        grid: Some(Grid {
            columns,
            rows,
            refined: (cell.0 * columns, cell.1 * rows),
        }),
    }
}

/// The overview, then the grid's cells row by row, as RGB images.
pub fn slice_images(img: &RgbImage, plan: &SlicePlan) -> Vec<RgbImage> {
    let resize = |(w, h): (u32, u32)| {
        if img.dimensions() == (w, h) {
            img.clone()
        } else {
            resize_bicubic(img, w, h)
        }
    };
    let mut slices = vec![resize(plan.overview)];
    if let Some(grid) = plan.grid {
        let refined = resize(grid.refined);
        let (cell_w, cell_h) = (grid.refined.0 / grid.columns, grid.refined.1 / grid.rows);
        for row in 0..grid.rows {
            for column in 0..grid.columns {
                let cell =
                    imageops::crop_imm(&refined, column * cell_w, row * cell_h, cell_w, cell_h);
                slices.push(cell.to_image());
            }
        }
    }
    slices
}

/// `ToTensor` then `Normalize(mean, std)`: `[3, H, W]` in `f32`, each level computed as torch does
/// (`level / 255`, then `(x - mean) / std`, all in `f32`).
pub fn normalized_pixels(img: &RgbImage, mean: [f32; 3], std: [f32; 3]) -> Vec<f32> {
    let mut lut = [[0f32; 256]; 3];
    for (c, table) in lut.iter_mut().enumerate() {
        for (level, v) in table.iter_mut().enumerate() {
            *v = (level as f32 / 255.0 - mean[c]) / std[c];
        }
    }
    let plane = img.width() as usize * img.height() as usize;
    let mut out = vec![0f32; 3 * plane];
    for (i, px) in img.as_raw().chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * plane + i] = lut[c][usize::from(px[c])];
        }
    }
    out
}

/// Every slice of every image, in prompt order, grouped into runs of one size for the vision graph.
pub fn image_batch(
    images: &[RgbImage],
    s: &MiniCpmvSettings,
    mean: [f32; 3],
    std: [f32; 3],
) -> ImageBatch {
    let mut batch = ImageBatch {
        images: images.len(),
        ..ImageBatch::default()
    };
    for img in images {
        for slice in slice_images(img, &slice_plan(img.width(), img.height(), s)) {
            batch.values.extend(normalized_pixels(&slice, mean, std));
            batch.push_slice(slice.height(), slice.width());
        }
    }
    batch
}

/// One image's placeholder text: the overview's, then the grid's inside `<slice>` ... `</slice>`.
pub fn placeholder(plan: &SlicePlan, s: &MiniCpmvSettings, unk: &str) -> String {
    let one = format!(
        "{}{}{}",
        s.image_start_token,
        unk.repeat(s.query_num),
        s.image_end_token
    );
    let mut text = one.clone();
    if let Some(grid) = plan.grid {
        let row = one.repeat(grid.columns as usize);
        let rows = vec![row; grid.rows as usize];
        text.push_str(&s.slice_start_token);
        text.push_str(&rows.join("\n"));
        text.push_str(&s.slice_end_token);
    }
    text
}

/// The prompt text: each message's parts joined by newlines, image parts replaced by their
/// placeholders, rendered by the chat template as 2.5 does (string content, no generation prompt
/// flag). The number of image parts must equal `images`.
pub fn render_prompt(
    template: &ChatTemplate,
    messages: &[ChatMessage],
    images: &[RgbImage],
    s: &MiniCpmvSettings,
    unk: &str,
) -> Result<String> {
    let markers = messages
        .iter()
        .flat_map(|m| &m.content)
        .filter(|p| matches!(p, ContentPart::Image))
        .count();
    if markers != images.len() {
        return Err(Error::ImageCount {
            markers,
            images: images.len(),
        });
    }
    let mut next = images.iter();
    let mut rendered = Vec::with_capacity(messages.len());
    for message in messages {
        let parts: Vec<String> = message
            .content
            .iter()
            .map(|part| match part {
                ContentPart::Text(text) => text.clone(),
                ContentPart::Image => next.next().map_or_else(String::new, |img| {
                    placeholder(&slice_plan(img.width(), img.height(), s), s, unk)
                }),
            })
            .collect();
        rendered.push(serde_json::json!({"role": message.role, "content": parts.join("\n")}));
    }
    let json = serde_json::Value::Array(rendered).to_string();
    template.render_json(&json, false)
}

/// The number of slices `images` make (one `<image>` ... `</image>` each in the prompt).
pub fn slice_count(images: &[RgbImage], s: &MiniCpmvSettings) -> usize {
    images
        .iter()
        .map(|img| slice_plan(img.width(), img.height(), s).slices())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(scale: u32, max: u32) -> MiniCpmvSettings {
        MiniCpmvSettings {
            query_num: 2,
            max_slice_nums: max,
            scale_resolution: scale,
            patch_size: 14,
            image_start_token: "<image>".into(),
            image_start_token_id: 1,
            image_end_token: "</image>".into(),
            image_end_token_id: 2,
            slice_start_token: "<slice>".into(),
            slice_start_token_id: 3,
            slice_end_token: "</slice>".into(),
            slice_end_token_id: 4,
        }
    }

    #[test]
    fn python_rounding_is_half_to_even() {
        // round(2.5) == 2, round(3.5) == 4 in Python.
        assert_eq!(ensure_divide(35.0, 14), 28);
        assert_eq!(ensure_divide(49.0, 14), 56);
        assert_eq!(ensure_divide(3.0, 14), 14);
    }

    #[test]
    fn small_images_are_upscaled_without_a_grid() {
        let plan = slice_plan(100, 50, &settings(448, 9));
        assert_eq!(plan.grid, None);
        assert_eq!(plan.slices(), 1);
        // h = int(448 / sqrt(2)) = 316, w = int(316 * 2) = 632 -> multiples of 14.
        assert_eq!(plan.overview, (630, 322));
    }

    #[test]
    fn a_square_image_just_over_one_slice_gets_two() {
        let plan = slice_plan(449, 449, &settings(448, 9));
        let grid = plan.grid.unwrap();
        // log(1/2) and log(2/1) tie; the first candidate (1 column, 2 rows) wins as in Python.
        assert_eq!((grid.columns, grid.rows), (1, 2));
        assert_eq!(plan.slices(), 3);
    }

    #[test]
    fn wide_images_get_wide_grids_capped_at_the_limit() {
        let plan = slice_plan(4480, 448, &settings(448, 9));
        let grid = plan.grid.unwrap();
        assert!(grid.columns > grid.rows, "{grid:?}");
        assert!(grid.columns * grid.rows <= 9);
    }

    #[test]
    fn placeholder_rows_are_joined_by_newlines() {
        let s = settings(448, 9);
        let plan = SlicePlan {
            overview: (14, 14),
            grid: Some(Grid {
                columns: 2,
                rows: 2,
                refined: (28, 28),
            }),
        };
        let one = "<image>uu</image>";
        assert_eq!(
            placeholder(&plan, &s, "u"),
            format!("{one}<slice>{one}{one}\n{one}{one}</slice>")
        );
    }

    #[test]
    fn slices_are_cut_row_by_row_and_runs_group_equal_sizes() {
        let img = RgbImage::from_fn(200, 100, |x, y| image::Rgb([x as u8, y as u8, 0]));
        let s = settings(56, 9);
        let plan = slice_plan(200, 100, &s);
        let grid = plan.grid.unwrap();
        let slices = slice_images(&img, &plan);
        assert_eq!(slices.len(), plan.slices());
        let cell = (grid.refined.0 / grid.columns, grid.refined.1 / grid.rows);
        assert!(slices[1..].iter().all(|c| c.dimensions() == cell));
        let batch = image_batch(&[img], &s, [0.5; 3], [0.5; 3]);
        assert_eq!(
            batch.runs.iter().map(|r| r.count).sum::<usize>(),
            slices.len()
        );
        assert_eq!(batch.runs.last().unwrap().count, slices.len() - 1);
    }

    #[test]
    fn normalization_is_level_over_255_then_mean_std() {
        let img = RgbImage::from_pixel(1, 1, image::Rgb([0, 255, 51]));
        let v = normalized_pixels(&img, [0.5; 3], [0.5; 3]);
        assert_eq!(v, vec![-1.0, 1.0, (51f32 / 255.0 - 0.5) / 0.5]);
    }
}
