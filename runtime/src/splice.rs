//! Splicing image features into the embedding sequence: the rows at image-token positions are replaced,
//! in order, by the rows of the image features.

use crate::error::{Error, Result};

/// Replaces the embedding row of every `image_token_id` in `ids` with the next row of `features`.
///
/// `embeds` holds `ids.len()` rows of `hidden` values; `features` holds whole rows of `hidden` values.
/// The number of image-token positions must equal the number of feature rows.
pub fn splice_image_features(
    embeds: &mut [f32],
    hidden: usize,
    ids: &[u32],
    image_token_id: u32,
    features: &[f32],
) -> Result<()> {
    let markers = ids.iter().filter(|&&id| id == image_token_id).count();
    let rows = features.len().checked_div(hidden).unwrap_or(0);
    if hidden == 0 || !features.len().is_multiple_of(hidden) || rows != markers {
        return Err(Error::Splice { rows, markers });
    }
    if embeds.len() != ids.len() * hidden {
        return Err(Error::Graph {
            graph: "embed".into(),
            reason: format!(
                "returned {} values for {} tokens of width {hidden}",
                embeds.len(),
                ids.len()
            ),
        });
    }
    let positions = ids
        .iter()
        .enumerate()
        .filter(|(_, &id)| id == image_token_id)
        .map(|(pos, _)| pos);
    for (row, pos) in features.chunks_exact(hidden).zip(positions) {
        embeds[pos * hidden..(pos + 1) * hidden].copy_from_slice(row);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const IMG: u32 = 9;

    #[test]
    fn rows_land_at_image_positions_in_order() {
        let ids = [1, IMG, 2, IMG];
        let mut embeds: Vec<f32> = (0..8).map(|v| v as f32).collect();
        let features = [10.0, 11.0, 20.0, 21.0];
        splice_image_features(&mut embeds, 2, &ids, IMG, &features).unwrap();
        assert_eq!(embeds, vec![0.0, 1.0, 10.0, 11.0, 4.0, 5.0, 20.0, 21.0]);
    }

    #[test]
    fn no_images_leaves_embeddings_alone() {
        let mut embeds = vec![1.0, 2.0];
        splice_image_features(&mut embeds, 2, &[5], IMG, &[]).unwrap();
        assert_eq!(embeds, vec![1.0, 2.0]);
    }

    #[test]
    fn a_count_mismatch_names_both_counts() {
        let mut embeds = vec![0.0; 6];
        let err = splice_image_features(&mut embeds, 2, &[IMG, IMG, 1], IMG, &[1.0, 2.0])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("1 rows") && err.contains("2 image-token"),
            "{err}"
        );
    }
}
