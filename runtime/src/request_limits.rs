//! Bounds on what one request may cost, checked before the work that costs it: the messages' text
//! before the chat template and the tokenizer see it (a 30 MB word costs gigabytes to tokenize), and
//! the pixels of all a request's images, read from their headers before any is decoded.
//!
//! Images are then decoded one at a time, each straight to the model's size when the model takes one
//! size ([`load_images`]), so a request holds at most one decode at once (for JPEG and 8-bit PNG not
//! even one full-size image: rows are resized as they are decoded). A MiniCPM-V model slices each
//! image from its full size, so there the decoded images are kept, within the pixel budget. The
//! per-image bounds are [`DecodeLimits`]. [`crate::request::admit`] checks the rest (image count,
//! prompt tokens, context) once the prompt is tokenized.

use image::RgbImage;

use crate::chat_template::{ChatMessage, ContentPart};
use crate::error::{Error, Result};
use crate::preprocess::{
    decode_image, decode_image_resized, image_dimensions, DecodeLimits, StageTimes,
};

/// A request's bounds; `serve` and `generate` share the defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Bytes of text over all messages (UTF-8), before rendering and tokenizing.
    pub max_prompt_bytes: u64,
    /// Pixels (width x height) over all images of a request, before decoding.
    pub max_request_pixels: u64,
}

/// 1 MiB of text: about 250k tokens of English, beyond the context of the models served here.
pub const DEFAULT_MAX_PROMPT_BYTES: u64 = 1 << 20;
/// As many pixels as one 8192 x 8192 image (serve's largest side), or five 12-megapixel photos.
pub const DEFAULT_MAX_REQUEST_PIXELS: u64 = 8192 * 8192;

impl Default for RequestLimits {
    fn default() -> Self {
        RequestLimits {
            max_prompt_bytes: DEFAULT_MAX_PROMPT_BYTES,
            max_request_pixels: DEFAULT_MAX_REQUEST_PIXELS,
        }
    }
}

/// Bytes of text over all messages' text parts.
pub fn prompt_text_bytes(messages: &[ChatMessage]) -> u64 {
    messages
        .iter()
        .flat_map(|m| &m.content)
        .map(|part| match part {
            ContentPart::Text(text) => text.len() as u64,
            ContentPart::Image => 0,
        })
        .sum()
}

impl RequestLimits {
    /// Refuses messages whose text is over `max_prompt_bytes`, before it is rendered or tokenized.
    pub fn check_prompt(&self, messages: &[ChatMessage]) -> Result<()> {
        let found = prompt_text_bytes(messages);
        if found > self.max_prompt_bytes {
            return Err(Error::RequestLimit {
                what: "the messages' text".into(),
                found,
                limit: self.max_prompt_bytes,
                unit: "bytes",
            });
        }
        Ok(())
    }

    /// Refuses a request's images when their headers claim more than `max_request_pixels` together
    /// (or a header breaks a per-image bound of `decode`); nothing is decoded. What passes is what
    /// [`load_images`] decodes, so every header is read once.
    pub fn check_images(
        &self,
        encoded: Vec<EncodedImage>,
        decode: &DecodeLimits,
    ) -> Result<CheckedImages> {
        let dims = encoded
            .iter()
            .map(|image| image_dimensions(&image.bytes, &image.name, decode))
            .collect::<Result<Vec<_>>>()?;
        self.check_pixels(&dims)?;
        Ok(CheckedImages { encoded, dims })
    }

    /// Refuses images whose headers claim more than `max_request_pixels` together.
    pub fn check_pixels(&self, dims: &[(u32, u32)]) -> Result<()> {
        let found: u64 = dims.iter().map(|&(w, h)| u64::from(w) * u64::from(h)).sum();
        if found > self.max_request_pixels {
            return Err(Error::RequestLimit {
                what: format!("{} image(s) together", dims.len()),
                found,
                limit: self.max_request_pixels,
                unit: "pixels",
            });
        }
        Ok(())
    }
}

/// One encoded image of a request and the name its errors carry (a path, or its index).
pub struct EncodedImage {
    pub name: String,
    pub bytes: Vec<u8>,
}

impl std::fmt::Debug for EncodedImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncodedImage")
            .field("name", &self.name)
            .field("bytes", &self.bytes.len())
            .finish()
    }
}

/// A request's encoded images whose headers passed [`RequestLimits::check_images`], with the size
/// each header claims.
#[derive(Debug)]
pub struct CheckedImages {
    encoded: Vec<EncodedImage>,
    dims: Vec<(u32, u32)>,
}

impl CheckedImages {
    /// Each image's (width, height), from its header.
    pub fn dims(&self) -> &[(u32, u32)] {
        &self.dims
    }
}

/// A request's checked images -> decoded images, in order: each image is decoded in turn (resized
/// to `size`, the model's (width, height), when given: [`crate::manifest::Manifest::image_size`]) and
/// its encoded bytes dropped. `on_image` runs after each image (a server checks there whether its
/// client is still waiting) and may stop the work with an error.
pub fn load_images(
    checked: CheckedImages,
    decode: &DecodeLimits,
    size: Option<(u32, u32)>,
    on_image: &mut dyn FnMut() -> Result<()>,
) -> Result<Vec<RgbImage>> {
    let mut images = Vec::with_capacity(checked.encoded.len());
    for image in checked.encoded {
        images.push(match size {
            Some(size) => decode_image_resized(
                &image.bytes,
                &image.name,
                decode,
                size,
                &mut StageTimes::default(),
            )?,
            None => decode_image(&image.bytes, &image.name, decode)?,
        });
        drop(image);
        on_image()?;
    }
    Ok(images)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_bytes_count_every_text_part() {
        let limits = RequestLimits {
            max_prompt_bytes: 5,
            ..RequestLimits::default()
        };
        let ok = [ChatMessage {
            role: "user".into(),
            content: vec![
                ContentPart::Text("ab".into()),
                ContentPart::Image,
                ContentPart::Text("cde".into()),
            ],
        }];
        assert!(limits.check_prompt(&ok).is_ok());
        let over = [ok[0].clone(), ChatMessage::text("assistant", "é")];
        let err = limits.check_prompt(&over).err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("request too large: the messages' text: 7 bytes, more than the limit of 5 bytes")
        );
    }

    #[test]
    fn pixels_add_up_over_the_images() {
        let limits = RequestLimits {
            max_request_pixels: 100,
            ..RequestLimits::default()
        };
        assert!(limits.check_pixels(&[(10, 5), (5, 10)]).is_ok());
        let err = limits.check_pixels(&[(10, 5), (5, 11)]).err();
        assert!(
            err.as_ref()
                .is_some_and(|e| e.to_string().contains("105 pixels")),
            "{err:?}"
        );
    }

    #[test]
    fn images_over_the_budget_are_refused_before_decoding() {
        // A PNG claiming 4000 x 4000 pixels whose image data is garbage: only the header is read.
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut chunk = |kind: &[u8], data: &[u8]| {
            let body = [kind, data].concat();
            png.extend((data.len() as u32).to_be_bytes());
            png.extend(&body);
            png.extend(crc32fast::hash(&body).to_be_bytes());
        };
        let ihdr = [4000u32.to_be_bytes(), 4000u32.to_be_bytes()].concat();
        chunk(b"IHDR", &[&ihdr[..], &[8, 2, 0, 0, 0]].concat());
        chunk(b"IDAT", b"not zlib data");
        chunk(b"IEND", b"");
        let encoded = vec![EncodedImage {
            name: "0".into(),
            bytes: png,
        }];
        let limits = RequestLimits {
            max_request_pixels: 1000 * 1000,
            ..RequestLimits::default()
        };
        let err = limits.check_images(encoded, &DecodeLimits::default()).err();
        assert!(
            matches!(
                err,
                Some(Error::RequestLimit {
                    found: 16_000_000,
                    ..
                })
            ),
            "{err:?}"
        );
    }
}
