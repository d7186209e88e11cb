//! Image preprocessing for the vision tower: decode, convert to RGB, resize, rescale, normalize.
//!
//! The reference is transformers' `SiglipImageProcessorPil` (PIL backend, Pillow 13) given
//! the image as `PIL.Image.open(path)`. Every step reproduces that path bit for bit:
//!
//! * **Conversion to RGB** follows `transformers.image_transforms.convert_to_rgb` on a PIL
//!   image: an image with an alpha band or a `transparency` entry is converted to RGBA and
//!   alpha-composited over opaque white with Pillow's integer `alpha_composite`; anything
//!   else goes through `convert("RGB")`. What Pillow's decoders hand to that step is matched
//!   too: 16-bit RGB(A) and grey+alpha PNGs keep the high byte of each sample, while a
//!   16-bit greyscale PNG (Pillow mode `I;16`) is *clipped* to 255, not scaled, because that
//!   is what Pillow's `I;16 -> RGB` conversion does. CMYK JPEGs are read as Adobe-inverted
//!   and converted with Pillow's `cmyk2rgb`.
//! * **EXIF orientation is not applied.** `Image.open` does not rotate and neither does the
//!   processor, so a photo whose EXIF says "rotate 90°" reaches the model unrotated. We do
//!   the same so that the runtime sees exactly what the reference model saw.
//!   (transformers' `load_image(path_string)` would rotate, and would drop alpha instead of
//!   compositing it; the reference does not go through it.)
//! * **Resize** is Pillow's `Image.resize(size, BICUBIC)` with `reducing_gap=None` (no
//!   `reduce` step): the separable two-pass convolution of `libImaging/Resample.c`, bicubic
//!   `a = -0.5`, support widened by the downscale factor, coefficients normalized in `f64`
//!   and rounded to 22-bit fixed point, 32-bit integer sums with a rounding bias, clipping
//!   to 0..=255 after each pass. The horizontal pass runs first, over only the rows the
//!   vertical pass reads, unless the height shrinks by more than twice as many pixels as
//!   the width (then vertical first, as Pillow 13 does). A same-size resize is a copy.
//! * **Rescale** is `(x as f64 * rescale_factor) as f32` (transformers upcasts to float64,
//!   multiplies, then downcasts); **normalize** is `(x - mean) / std` in `f32`.
//!
//! JPEG is decoded with libjpeg-turbo's decoder (as vendored by MozJPEG, with its SIMD
//! paths, which are bit-exact with its C ones), the decoder Pillow wraps, so IDCT, chroma
//! upsampling and colour conversion match exactly; the pure-Rust JPEG decoders differ from
//! it by up to 4 levels in 5-20% of the pixels. Like Pillow, a JPEG that ends before its
//! image does is an error; other libjpeg warnings are not. 8-bit RGB and RGBA PNGs go
//! through a faster decoder of our own (`fast_png.rs`); other PNGs, GIF, BMP and WebP
//! (lossy included) through the `image` crate, whose output matches Pillow's on every
//! case in `tests/python/test_preprocess.py`.
//!
//! Speed without changing a value: the resize's passes run over row bands in parallel on
//! the current rayon pool, with AVX2 kernels where the CPU has them (`resize.rs`). And
//! [`decode_image_resized`] (the path `generate` and `serve` take, through
//! `request_limits::load_images`, and [`preprocess_image`]) feeds decoded rows of JPEGs and
//! fast-path PNGs to the horizontal pass as they come out of the decoder, on a second
//! thread when the pool has one, so the full-size image is never held and decoding
//! overlaps resizing (docs/PERFORMANCE.md, "Preprocessing on the request path").
//!
//! Known differences from the reference: Pillow 12 and older always resize horizontally
//! first, so against references made with them, images whose height shrinks much more than
//! their width differ by one level in some pixels; a 16-bit greyscale PNG whose tRNS value
//! is 255 or more gets different transparent pixels (Pillow compares after clipping); and
//! damaged files that one decoder repairs and the other rejects.

use std::any::Any;
use std::cell::Cell;
use std::io::{BufRead, Cursor, Read};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::time::{Duration, Instant};

use image::{DynamicImage, ImageDecoder, ImageError, ImageFormat, ImageReader, RgbImage};

use crate::{Error, Result};

mod fast_png;
mod resize;

pub use resize::resize_bicubic;
use resize::RowResizer;

/// Everything the vision tower's preprocessing needs; mirrors `preprocessor_config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessConfig {
    pub height: u32,
    pub width: u32,
    /// Kept for parity with the processor config. Decoding always yields RGB with alpha
    /// composited over white, which is what `do_convert_rgb: true` means.
    pub do_convert_rgb: bool,
    pub do_rescale: bool,
    /// transformers multiplies in float64 by the JSON value (0.00392156862745098). An `f32`
    /// cannot hold that value, so [`pixel_values`] recovers it when the factor is `1/n`.
    pub rescale_factor: f32,
    pub do_normalize: bool,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl PreprocessConfig {
    /// SigLIP's defaults (`IMAGENET_STANDARD_MEAN/STD`, rescale 1/255) at the given size.
    pub fn siglip(height: u32, width: u32) -> Self {
        PreprocessConfig {
            height,
            width,
            do_convert_rgb: true,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            mean: [0.5; 3],
            std: [0.5; 3],
        }
    }
}

/// Bounds on what an input may make the decoder allocate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    pub max_width: u32,
    pub max_height: u32,
    /// Cap on what a decode holds at once (decoded pixels, the RGB copy, a progressive
    /// JPEG's coefficients), checked from the header before decoding; also caps file size.
    pub max_alloc_bytes: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_width: 16384,
            max_height: 16384,
            max_alloc_bytes: 512 * 1024 * 1024,
        }
    }
}

/// Wall time spent in each preprocessing stage, added up over the calls that were given it.
///
/// `read` is reading the file, `decode` the image decoder (to its native pixel layout),
/// `convert` turning that into 8-bit RGB (alpha compositing, CMYK, 16-bit), `resize` the
/// bicubic resize and `normalize` rescaling and normalizing into the channel-major output.
/// Where rows are resized as they are decoded on a second thread ([`preprocess_image`]),
/// that work overlaps `decode`, and `resize` counts only what is left once decoding ends.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StageTimes {
    pub read: Duration,
    pub decode: Duration,
    pub convert: Duration,
    pub resize: Duration,
    pub normalize: Duration,
}

impl StageTimes {
    pub fn total(&self) -> Duration {
        self.read + self.decode + self.convert + self.resize + self.normalize
    }
}

/// Runs `f`, adding its wall time to `slot`.
#[inline]
fn timed<T>(slot: &mut Duration, f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let out = f();
    *slot += start.elapsed();
    out
}

fn image_error(source_name: &str, reason: impl Into<String>) -> Error {
    Error::Image {
        source_name: source_name.to_string(),
        reason: reason.into(),
    }
}

fn describe(e: ImageError, limits: &DecodeLimits) -> String {
    match e {
        ImageError::Limits(e) => format!(
            "image exceeds the decode limits ({}x{} pixels, {} bytes): {e}",
            limits.max_width, limits.max_height, limits.max_alloc_bytes
        ),
        ImageError::IoError(e) => format!("truncated or unreadable image data: {e}"),
        ImageError::Decoding(e) => format!("corrupt image data: {e}"),
        ImageError::Unsupported(e) => format!("unsupported image: {e}"),
        other => other.to_string(),
    }
}

/// Decodes an encoded image (PNG, JPEG, WebP, GIF, BMP) to RGB the way the reference does.
///
/// `source_name` only labels errors. Transparency is composited over white; EXIF
/// orientation is ignored (see the module documentation).
pub fn decode_image(bytes: &[u8], source_name: &str, limits: &DecodeLimits) -> Result<RgbImage> {
    decode_image_timed(bytes, source_name, limits, &mut StageTimes::default())
}

/// [`decode_image`], adding the time of its stages to `times`.
pub fn decode_image_timed(
    bytes: &[u8],
    source_name: &str,
    limits: &DecodeLimits,
    times: &mut StageTimes,
) -> Result<RgbImage> {
    decode_inner(bytes, source_name, limits, None, times)
}

/// [`decode_image_timed`]; with `resize_to`, a JPEG or fast-path PNG whose resize runs
/// horizontally first comes back already resized to it (see [`preprocess_image`]),
/// anything else at its own size.
fn decode_inner(
    bytes: &[u8],
    source_name: &str,
    limits: &DecodeLimits,
    resize_to: Option<(u32, u32)>,
    times: &mut StageTimes,
) -> Result<RgbImage> {
    if bytes.is_empty() {
        return Err(image_error(source_name, "empty input (0 bytes)"));
    }
    let format = image::guess_format(bytes).map_err(|_| {
        image_error(
            source_name,
            "not a recognized image format (expected PNG, JPEG, WebP, GIF or BMP)",
        )
    })?;
    if !matches!(
        format,
        ImageFormat::Png
            | ImageFormat::Jpeg
            | ImageFormat::WebP
            | ImageFormat::Gif
            | ImageFormat::Bmp
    ) {
        return Err(image_error(
            source_name,
            format!("unsupported image format {format:?} (expected PNG, JPEG, WebP, GIF or BMP)"),
        ));
    }

    // Decoders are the code most exposed to hostile input; a bug in one must become an
    // error for this image, not take the process down. libjpeg reports fatal errors by
    // unwinding too, with the message as payload.
    let decoded = catch_unwind(AssertUnwindSafe(|| {
        if format == ImageFormat::Jpeg {
            decode_jpeg(bytes, limits, resize_to, times)
        } else {
            if format == ImageFormat::Png {
                if let Some(rgb) = fast_png::decode(bytes, limits, resize_to, times) {
                    return Ok(rgb);
                }
            }
            let grey_png = format == ImageFormat::Png && png_color_type(bytes) == Some(0);
            let img = timed(&mut times.decode, || decode_dynamic(bytes, format, limits))?;
            Ok(timed(&mut times.convert, || {
                to_rgb_like_pillow(img, grey_png)
            }))
        }
    }))
    .unwrap_or_else(|payload| Err(unwind_reason(payload)));
    decoded.map_err(|reason| image_error(source_name, reason))
}

fn unwind_reason(payload: Box<dyn Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else {
        "the image decoder failed on this input".to_string()
    }
}

/// Checks a decode of `width x height` against the limits; `bytes_per_pixel` counts every
/// buffer the decode holds at once, the RGB result included.
fn check_size(
    width: u64,
    height: u64,
    bytes_per_pixel: u64,
    limits: &DecodeLimits,
) -> std::result::Result<(), String> {
    if width == 0 || height == 0 {
        return Err(format!("image has zero size ({width}x{height})"));
    }
    if width > u64::from(limits.max_width) || height > u64::from(limits.max_height) {
        return Err(format!(
            "image is {width}x{height} pixels, which exceeds the decode limits ({}x{} pixels)",
            limits.max_width, limits.max_height
        ));
    }
    let needed = width.saturating_mul(height).saturating_mul(bytes_per_pixel);
    if needed > limits.max_alloc_bytes {
        return Err(format!(
            "decoding this {width}x{height} image needs about {needed} bytes, which exceeds \
             the decode limits ({} bytes)",
            limits.max_alloc_bytes
        ));
    }
    Ok(())
}

/// A byte slice reader that remembers whether libjpeg asked for data past its end, which
/// is how a truncated file shows (libjpeg itself only warns and pads with an EOI marker).
struct WatchEof<'a> {
    data: &'a [u8],
    hit_eof: &'a Cell<bool>,
}

impl Read for WatchEof<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.data.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.hit_eof.set(true);
        }
        Ok(n)
    }
}

impl BufRead for WatchEof<'_> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        if self.data.is_empty() {
            self.hit_eof.set(true);
        }
        Ok(self.data)
    }

    fn consume(&mut self, amt: usize) {
        self.data = &self.data[amt.min(self.data.len())..];
    }
}

/// Whether the frame header (SOFn) says progressive, whose decode keeps every DCT
/// coefficient in memory. Unknown layouts count as progressive, the costlier case.
fn jpeg_is_progressive(bytes: &[u8]) -> bool {
    let mut i = 2;
    while i + 4 <= bytes.len() {
        if bytes[i] != 0xFF {
            return true;
        }
        let marker = bytes[i + 1];
        if marker == 0xFF {
            i += 1; // fill byte
            continue;
        }
        match marker {
            0xC0..=0xCF if !matches!(marker, 0xC4 | 0xC8 | 0xCC) => {
                return matches!(marker, 0xC2 | 0xC6 | 0xCA | 0xCE);
            }
            0xD0..=0xD9 | 0x01 => i += 2,
            _ => i += 2 + usize::from(u16::from_be_bytes([bytes[i + 2], bytes[i + 3]])),
        }
    }
    true
}

/// Pillow's `MULDIV255`: `a * b / 255`, rounded.
#[inline]
fn muldiv255(a: i32, b: i32) -> i32 {
    let t = a * b + 128;
    ((t >> 8) + t) >> 8
}

/// One pixel of libjpeg's CMYK output as Pillow turns it into RGB: the "CMYK;I" unpacker
/// inverts each sample (Adobe files store them inverted), then `cmyk2rgb` computes
/// `(255 - k) - c * (255 - k) / 255` per channel.
#[inline]
fn adobe_cmyk_to_rgb(px: &[u8]) -> [u8; 3] {
    let nk = i32::from(px[3]);
    let channel = |v: u8| (nk - muldiv255(255 - i32::from(v), nk)).clamp(0, 255) as u8;
    [channel(px[0]), channel(px[1]), channel(px[2])]
}

fn decode_jpeg(
    bytes: &[u8],
    limits: &DecodeLimits,
    resize_to: Option<(u32, u32)>,
    times: &mut StageTimes,
) -> std::result::Result<RgbImage, String> {
    use mozjpeg::ColorSpace;

    let start = Instant::now();
    let hit_eof = Cell::new(false);
    let reader = WatchEof {
        data: bytes,
        hit_eof: &hit_eof,
    };
    let jpeg_error = |e: std::io::Error| format!("corrupt JPEG data: {e}");
    let decompress = mozjpeg::Decompress::builder()
        .from_reader(reader)
        .map_err(jpeg_error)?;
    let (width, height) = decompress.size();
    let components = decompress.components().len() as u64;
    let cmyk = matches!(
        decompress.color_space(),
        ColorSpace::JCS_CMYK | ColorSpace::JCS_YCCK
    );
    let coefficients = if jpeg_is_progressive(bytes) {
        2 * components
    } else {
        0
    };
    let decoded = if cmyk { 4 } else { 3 };
    // The same budget whether or not the whole image is kept (see `preprocess_image`),
    // so that both paths accept and refuse the same files.
    check_size(
        width as u64,
        height as u64,
        decoded + 3 + coefficients,
        limits,
    )?;
    if !matches!(components, 1 | 3 | 4) {
        // Pillow has no mode for other layer counts either.
        return Err(format!(
            "JPEG with {components} components is not supported"
        ));
    }
    let (w, h) = (width as u32, height as u32);

    // Pillow asks libjpeg for RGB (or grey, replicated by `convert`), and for CMYK from
    // 4-component files, which it then reads as Adobe-inverted and converts itself.
    let target = if cmyk {
        ColorSpace::JCS_CMYK
    } else {
        ColorSpace::JCS_RGB
    };
    let mut started = decompress.to_colorspace(target).map_err(jpeg_error)?;
    let streamed = resize_to.and_then(|(out_w, out_h)| RowResizer::new(w, h, out_w, out_h));
    let (image, decode_time) = if let Some(resizer) = streamed {
        times.decode += start.elapsed();
        let mut read_rows = |rows: &mut [u8]| started.read_scanlines_into(rows).map(|_| ());
        let image =
            stream_jpeg_rows(&mut read_rows, resizer, w, h, cmyk, times).map_err(jpeg_error)?;
        (image, Instant::now())
    } else {
        let pixels = started.read_scanlines::<u8>().map_err(jpeg_error)?;
        let decode_end = Instant::now();
        times.decode += decode_end - start;
        let rgb = timed(&mut times.convert, || {
            if cmyk {
                cmyk_rows_to_rgb(&pixels)
            } else {
                pixels
            }
        });
        let image = RgbImage::from_raw(w, h, rgb)
            .ok_or_else(|| "JPEG decoder returned a short image".to_string())?;
        (image, Instant::now())
    };
    started.finish().map_err(jpeg_error)?;
    times.decode += decode_time.elapsed();
    if hit_eof.get() {
        return Err("truncated JPEG data: the file ends before the image does".to_string());
    }
    Ok(image)
}

fn cmyk_rows_to_rgb(pixels: &[u8]) -> Vec<u8> {
    let mut rgb = Vec::with_capacity(pixels.len() / 4 * 3);
    for px in pixels.chunks_exact(4) {
        rgb.extend_from_slice(&adobe_cmyk_to_rgb(px));
    }
    rgb
}

/// Decoded rows handed to the resize at a time.
const BAND_BYTES: usize = 256 * 1024;

/// Decodes a JPEG band by band with `read_rows` (whole rows of RGB, or CMYK when `cmyk`)
/// into `resizer`'s horizontal pass; the whole image never exists at once. With more than
/// one thread in the pool the horizontal pass runs on a second thread while decoding goes
/// on, and only what it has left when decoding ends counts as resize time.
fn stream_jpeg_rows(
    read_rows: &mut dyn FnMut(&mut [u8]) -> std::io::Result<()>,
    resizer: RowResizer,
    width: u32,
    height: u32,
    cmyk: bool,
    times: &mut StageTimes,
) -> std::io::Result<RgbImage> {
    let row_bytes = width as usize * if cmyk { 4 } else { 3 };
    let band_rows = (BAND_BYTES / row_bytes).clamp(1, height as usize);
    let (first_read, last_read) = resizer.rows_read();
    // Decodes every row (a damaged file must fail as it does when decoded whole) and
    // passes on, as RGB, the bands the resize reads.
    let mut decode = |times: &mut StageTimes,
                      emit: &mut dyn FnMut(usize, Vec<u8>) -> bool|
     -> std::io::Result<()> {
        let mut y = 0;
        while y < height as usize {
            let n = band_rows.min(height as usize - y);
            let mut band = vec![0u8; n * row_bytes];
            timed(&mut times.decode, || read_rows(&mut band))?;
            if y < last_read && y + n > first_read {
                let band = if cmyk {
                    timed(&mut times.convert, || cmyk_rows_to_rgb(&band))
                } else {
                    band
                };
                if !emit(y, band) {
                    break;
                }
            }
            y += n;
        }
        Ok(())
    };

    let mut resizer = resizer;
    if rayon::current_num_threads() > 1 {
        let overlapped = std::thread::scope(|s| {
            // The resizer goes to the worker only once it runs; if the system refuses a
            // thread, it stays here and the bands are resized in turn below.
            let (start_tx, start_rx) = std::sync::mpsc::sync_channel::<RowResizer>(1);
            let (tx, rx) = std::sync::mpsc::sync_channel::<(usize, Vec<u8>)>(4);
            let worker = std::thread::Builder::new()
                .name("resize".into())
                .spawn_scoped(s, move || {
                    let mut resizer = start_rx.recv().ok()?;
                    for (y, band) in rx {
                        resizer.push(y, &band);
                    }
                    Some(resizer)
                });
            let Ok(worker) = worker else {
                return Err(Box::new(resizer));
            };
            if let Err(returned) = start_tx.send(resizer) {
                return Err(Box::new(returned.0));
            }
            let decoded = decode(times, &mut |y, band| tx.send((y, band)).is_ok());
            drop(tx);
            let start = Instant::now();
            let resizer = worker.join();
            times.resize += start.elapsed();
            Ok((decoded, resizer))
        });
        match overlapped {
            Ok((decoded, resizer)) => {
                decoded?;
                let resizer = resizer
                    .ok()
                    .flatten()
                    .ok_or_else(|| std::io::Error::other("the resize thread failed"))?;
                return Ok(timed(&mut times.resize, || resizer.finish()));
            }
            Err(returned) => resizer = *returned,
        }
    }
    let mut resize_time = Duration::ZERO;
    decode(times, &mut |y, band| {
        timed(&mut resize_time, || resizer.push(y, &band));
        true
    })?;
    times.resize += resize_time;
    Ok(timed(&mut times.resize, || resizer.finish()))
}

fn decode_dynamic(
    bytes: &[u8],
    format: ImageFormat,
    limits: &DecodeLimits,
) -> std::result::Result<DynamicImage, String> {
    // No width/height caps here: `check_size` below applies them and names the size the
    // header claims, which the `image` crate's own limit error does not.
    let mut image_limits = image::Limits::default();
    image_limits.max_alloc = Some(limits.max_alloc_bytes);

    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    reader.limits(image_limits);
    // Reading only the header here lets a size-bomb fail before any pixel buffer exists.
    let decoder = reader.into_decoder().map_err(|e| describe(e, limits))?;
    let (width, height) = decoder.dimensions();
    let pixels = u64::from(width) * u64::from(height);
    let decoded_per_pixel = decoder.total_bytes().div_ceil(pixels.max(1));
    check_size(
        u64::from(width),
        u64::from(height),
        decoded_per_pixel + 3,
        limits,
    )?;
    DynamicImage::from_decoder(decoder).map_err(|e| describe(e, limits))
}

/// An encoded image decoded and resized to `width x height`, the image the vision tower's
/// preprocessing takes: the same pixels as [`resize_bicubic`] of [`decode_image`].
///
/// For a JPEG or an 8-bit RGB(A) PNG whose resize starts with the horizontal pass
/// (downscaling photos), decoded rows go through that pass as they come out of the
/// decoder, on a second thread when the current rayon pool has more than one: the
/// full-size image is never held, and decoding and resizing overlap. This is the path
/// `generate` and `serve` take (docs/PERFORMANCE.md, "Preprocessing on the request path").
pub fn decode_image_resized(
    bytes: &[u8],
    source_name: &str,
    limits: &DecodeLimits,
    (width, height): (u32, u32),
    times: &mut StageTimes,
) -> Result<RgbImage> {
    let img = decode_inner(bytes, source_name, limits, Some((width, height)), times)?;
    if img.dimensions() == (width, height) {
        return Ok(img);
    }
    Ok(timed(&mut times.resize, || {
        resize_bicubic(&img, width, height)
    }))
}

/// The vision tower's input for one encoded image: [`pixel_values`] of
/// [`decode_image_resized`], the same values as [`pixel_values`] of [`decode_image`],
/// adding the time of its stages to `times`.
pub fn preprocess_image(
    bytes: &[u8],
    source_name: &str,
    cfg: &PreprocessConfig,
    limits: &DecodeLimits,
    times: &mut StageTimes,
) -> Result<Vec<f32>> {
    let img = decode_image_resized(bytes, source_name, limits, (cfg.width, cfg.height), times)?;
    Ok(pixel_values_timed(&img, cfg, times))
}

/// [`preprocess_image`] of a file.
pub fn preprocess_file(
    path: &Path,
    cfg: &PreprocessConfig,
    limits: &DecodeLimits,
    times: &mut StageTimes,
) -> Result<Vec<f32>> {
    let bytes = timed(&mut times.read, || read_image_file(path, limits))?;
    preprocess_image(&bytes, &path.display().to_string(), cfg, limits, times)
}

/// Reads and decodes an image file; see [`decode_image`].
pub fn load_image(path: &Path, limits: &DecodeLimits) -> Result<RgbImage> {
    load_image_timed(path, limits, &mut StageTimes::default())
}

/// [`load_image`], adding the time of its stages to `times`.
pub fn load_image_timed(
    path: &Path,
    limits: &DecodeLimits,
    times: &mut StageTimes,
) -> Result<RgbImage> {
    let bytes = timed(&mut times.read, || read_image_file(path, limits))?;
    decode_image_timed(&bytes, &path.display().to_string(), limits, times)
}

/// Width and height an encoded image declares, read from its header alone (nothing is
/// decoded), so that a request's images can be checked against a pixel budget before any
/// of them costs memory. An image whose header cannot be read gets the error its decode
/// would give.
pub fn image_dimensions(
    bytes: &[u8],
    source_name: &str,
    limits: &DecodeLimits,
) -> Result<(u32, u32)> {
    let header = catch_unwind(AssertUnwindSafe(|| -> Option<(u32, u32)> {
        if image::guess_format(bytes).ok()? == ImageFormat::Jpeg {
            // The decoder the pixels come from (see `decode_jpeg`), reading the header only.
            let (w, h) = mozjpeg::Decompress::builder().from_mem(bytes).ok()?.size();
            return Some((u32::try_from(w).ok()?, u32::try_from(h).ok()?));
        }
        ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .ok()?
            .into_dimensions()
            .ok()
    }))
    .ok()
    .flatten();
    match header {
        Some((w, h)) => {
            // The side limits, as the decode would apply them (the byte budget needs the decoder).
            check_size(u64::from(w), u64::from(h), 0, limits)
                .map_err(|reason| image_error(source_name, reason))?;
            Ok((w, h))
        }
        // Unreadable header: the decode fails on it too, with the message users know.
        None => match decode_image(bytes, source_name, limits) {
            Err(err) => Err(err),
            Ok(img) => Ok(img.dimensions()),
        },
    }
}

/// Reads an image file of at most `limits.max_alloc_bytes` (an encoded file bigger than
/// the decode budget would decode to more than it anyway).
///
/// Only a regular file is read: a FIFO, a device (`/dev/zero`) or a directory is refused
/// before a byte is read. The file is opened non-blocking (opening a FIFO would otherwise
/// wait for a writer), checked again on the open handle (a path swapped after the first
/// check is caught), and read through a cap (a file that grows while read is refused).
pub fn read_image_file(path: &Path, limits: &DecodeLimits) -> Result<Vec<u8>> {
    read_image_file_checked(path, limits, |_| Ok(()))
}

/// [`read_image_file`] with a further check of the open file's metadata (a server refuses
/// files with several hard links); `check`'s message becomes the error's reason.
pub fn read_image_file_checked(
    path: &Path,
    limits: &DecodeLimits,
    check: impl FnOnce(&std::fs::Metadata) -> std::result::Result<(), String>,
) -> Result<Vec<u8>> {
    let name = path.display().to_string();
    let not_regular = || {
        image_error(
            &name,
            "not a regular file (a FIFO, device, socket or directory is not read)",
        )
    };
    if !std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .is_file()
    {
        return Err(not_regular());
    }
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options.open(path).map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(not_regular());
    }
    check(&meta).map_err(|reason| image_error(&name, reason))?;
    let too_big = |len: u64| {
        image_error(
            &name,
            format!(
                "file is {len} bytes, more than the decode limit of {} bytes",
                limits.max_alloc_bytes
            ),
        )
    };
    if meta.len() > limits.max_alloc_bytes {
        return Err(too_big(meta.len()));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(limits.max_alloc_bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > limits.max_alloc_bytes {
        return Err(too_big(bytes.len() as u64));
    }
    Ok(bytes)
}

/// Pillow's `alpha_composite(white, src)` for one channel: `AlphaComposite.c` with the
/// destination opaque white, where `coef1 = a << 7` exactly.
#[inline]
fn over_white(v: u8, a: u8) -> u8 {
    if a == 0 {
        return 255;
    }
    let a = u32::from(a);
    let coef1 = a << 7;
    let coef2 = (255 << 7) - coef1;
    let tmp = u32::from(v) * coef1 + 255 * coef2 + (0x80 << 7);
    // SHIFTFORDIV255 then drop the 7 precision bits; the result is at most 255.
    ((((tmp >> 8) + tmp) >> 8) >> 7) as u8
}

/// Pillow's `I;16 -> RGB` conversion saturates instead of scaling.
#[inline]
fn clip16(v: u16) -> u8 {
    v.min(255) as u8
}

/// Pillow unpacks 16-bit RGB(A)/LA PNG samples by keeping the most significant byte.
#[inline]
fn high_byte(v: u16) -> u8 {
    (v >> 8) as u8
}

fn map_pixels<P, const N: usize>(
    width: u32,
    height: u32,
    src: &[P],
    f: impl Fn(&[P]) -> [u8; 3],
) -> RgbImage {
    let mut out = Vec::with_capacity(src.len() / N * 3);
    for px in src.chunks_exact(N) {
        out.extend_from_slice(&f(px));
    }
    RgbImage::from_raw(width, height, out).unwrap_or_else(|| RgbImage::new(width, height))
}

/// The colour type in a PNG's IHDR (0 grey, 2 RGB, 3 palette, 4 grey+alpha, 6 RGBA).
fn png_color_type(bytes: &[u8]) -> Option<u8> {
    if bytes.get(12..16)? == b"IHDR" {
        bytes.get(25).copied()
    } else {
        None
    }
}

/// `grey_png`: the image is a greyscale PNG, whose transparency (tRNS) the decoder turned
/// into an alpha channel; Pillow keeps such a 16-bit image as `I;16`, not as grey+alpha.
fn to_rgb_like_pillow(img: DynamicImage, grey_png: bool) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    match img {
        DynamicImage::ImageRgb8(rgb) => rgb,
        DynamicImage::ImageLuma8(l) => map_pixels::<u8, 1>(w, h, l.as_raw(), |p| [p[0]; 3]),
        DynamicImage::ImageLumaA8(la) => {
            map_pixels::<u8, 2>(w, h, la.as_raw(), |p| [over_white(p[0], p[1]); 3])
        }
        DynamicImage::ImageRgba8(rgba) => map_pixels::<u8, 4>(w, h, rgba.as_raw(), |p| {
            [
                over_white(p[0], p[3]),
                over_white(p[1], p[3]),
                over_white(p[2], p[3]),
            ]
        }),
        DynamicImage::ImageLuma16(l) => {
            map_pixels::<u16, 1>(w, h, l.as_raw(), |p| [clip16(p[0]); 3])
        }
        // Pillow's `I;16 -> RGBA` with a transparent value clips like `I;16 -> RGB`; the
        // pixels equal to the tRNS value become transparent (the same pixels, as long as
        // that value is below 255).
        DynamicImage::ImageLumaA16(la) if grey_png => {
            map_pixels::<u16, 2>(w, h, la.as_raw(), |p| {
                [if p[1] == 0 { 255 } else { clip16(p[0]) }; 3]
            })
        }
        DynamicImage::ImageLumaA16(la) => map_pixels::<u16, 2>(w, h, la.as_raw(), |p| {
            [over_white(high_byte(p[0]), high_byte(p[1])); 3]
        }),
        DynamicImage::ImageRgb16(rgb) => map_pixels::<u16, 3>(w, h, rgb.as_raw(), |p| {
            [high_byte(p[0]), high_byte(p[1]), high_byte(p[2])]
        }),
        DynamicImage::ImageRgba16(rgba) => map_pixels::<u16, 4>(w, h, rgba.as_raw(), |p| {
            let a = high_byte(p[3]);
            [
                over_white(high_byte(p[0]), a),
                over_white(high_byte(p[1]), a),
                over_white(high_byte(p[2]), a),
            ]
        }),
        // Float images come only from formats this crate is not built with.
        other => {
            let rgba = other.to_rgba8();
            map_pixels::<u8, 4>(w, h, rgba.as_raw(), |p| {
                [
                    over_white(p[0], p[3]),
                    over_white(p[1], p[3]),
                    over_white(p[2], p[3]),
                ]
            })
        }
    }
}

/// The `f64` rescale factor transformers would use for a config value stored as `f32`.
///
/// transformers computes `float32(float64(x) * factor)` with the float64 from the JSON;
/// multiplying by the widened `f32` instead flips the last bit of 126 of the 256 levels
/// for 1/255. Configs use `1/n` (1/255 in practice), so when the `f32` is the rounding of
/// `1/n` for an integer `n`, `1/n` in `f64` is the value the JSON held.
fn exact_rescale_factor(factor: f32) -> f64 {
    let wide = f64::from(factor);
    if wide > 0.0 {
        let n = (1.0 / wide).round();
        if (1.0..=65536.0).contains(&n) && (1.0 / n) as f32 == factor {
            return 1.0 / n;
        }
    }
    wide
}

/// The vision tower's input for one image: resize to `cfg.height x cfg.width`, rescale,
/// normalize; channel-major (`[3, height, width]`), `3 * height * width` values.
pub fn pixel_values(img: &RgbImage, cfg: &PreprocessConfig) -> Vec<f32> {
    pixel_values_timed(img, cfg, &mut StageTimes::default())
}

/// [`pixel_values`], adding the time of its stages to `times`.
pub fn pixel_values_timed(
    img: &RgbImage,
    cfg: &PreprocessConfig,
    times: &mut StageTimes,
) -> Vec<f32> {
    let resized;
    let img = if img.dimensions() == (cfg.width, cfg.height) {
        img
    } else {
        resized = timed(&mut times.resize, || {
            resize_bicubic(img, cfg.width, cfg.height)
        });
        &resized
    };
    let start = Instant::now();

    let factor = exact_rescale_factor(cfg.rescale_factor);
    // The value of each of the 256 levels per channel, computed once.
    let mut lut = [[0f32; 256]; 3];
    for (c, table) in lut.iter_mut().enumerate() {
        for (level, v) in table.iter_mut().enumerate() {
            let mut x = if cfg.do_rescale {
                (level as f64 * factor) as f32
            } else {
                level as f32
            };
            if cfg.do_normalize {
                x = (x - cfg.mean[c]) / cfg.std[c];
            }
            *v = x;
        }
    }

    let plane = img.width() as usize * img.height() as usize;
    let mut out = vec![0f32; 3 * plane];
    let (r, rest) = out.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for (i, px) in img.as_raw().chunks_exact(3).enumerate() {
        r[i] = lut[0][usize::from(px[0])];
        g[i] = lut[1][usize::from(px[1])];
        b[i] = lut[2][usize::from(px[2])];
    }
    times.normalize += start.elapsed();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageEncoder, Rgb};

    fn encode_png(img: &DynamicImage) -> Vec<u8> {
        let mut buf = Vec::new();
        img.write_to(&mut Cursor::new(&mut buf), ImageFormat::Png)
            .unwrap();
        buf
    }

    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            Rgb([
                (x * 255 / w.max(1)) as u8,
                (y * 255 / h.max(1)) as u8,
                ((x * 7 + y * 13) % 256) as u8,
            ])
        })
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = RgbImage::from_pixel(37, 23, Rgb([10, 128, 250]));
        for (w, h) in [(384, 384), (5, 3), (1, 1), (100, 7)] {
            let out = resize_bicubic(&img, w, h);
            assert_eq!(out.dimensions(), (w, h));
            assert!(out.pixels().all(|p| *p == Rgb([10, 128, 250])), "{w}x{h}");
        }
    }

    #[test]
    fn same_size_is_identity() {
        let img = gradient(17, 9);
        assert_eq!(resize_bicubic(&img, 17, 9), img);
    }

    #[test]
    fn zero_target_is_empty_and_zero_source_does_not_panic() {
        assert_eq!(resize_bicubic(&gradient(4, 4), 0, 3).dimensions(), (0, 3));
        for (w, h) in [(0, 0), (0, 5), (5, 0)] {
            let out = resize_bicubic(&RgbImage::new(w, h), 2, 3);
            assert_eq!(out.dimensions(), (2, 3));
        }
    }

    #[test]
    fn matches_pillow_on_a_small_case() {
        // Pillow 13: Image.frombytes("L", (4, 1), bytes([0, 255, 0, 255]))
        //     .resize((3, 1), Image.BICUBIC) -> [78, 128, 177]; to (8, 1) ->
        //     [0, 54, 216, 215, 40, 39, 201, 255]
        let mut img = RgbImage::new(4, 1);
        for (x, v) in [0u8, 255, 0, 255].into_iter().enumerate() {
            img.put_pixel(x as u32, 0, Rgb([v; 3]));
        }
        let down: Vec<u8> = resize_bicubic(&img, 3, 1).pixels().map(|p| p[0]).collect();
        assert_eq!(down, [78, 128, 177]);
        let up: Vec<u8> = resize_bicubic(&img, 8, 1).pixels().map(|p| p[0]).collect();
        assert_eq!(up, [0, 54, 216, 215, 40, 39, 201, 255]);
    }

    #[test]
    fn one_axis_resize_matches_two_axis_on_the_other() {
        let img = gradient(30, 20);
        let only_w = resize_bicubic(&img, 11, 20);
        assert_eq!(only_w.dimensions(), (11, 20));
        let only_h = resize_bicubic(&img, 30, 7);
        assert_eq!(only_h.dimensions(), (30, 7));
    }

    #[test]
    fn alpha_composites_over_white() {
        assert_eq!(over_white(0, 0), 255);
        assert_eq!(over_white(0, 255), 0);
        assert_eq!(over_white(200, 255), 200);
        // Pillow: alpha_composite(white, (0, 0, 0, 128)) == (127, 127, 127)
        assert_eq!(over_white(0, 128), 127);
        let mut rgba = image::RgbaImage::new(2, 1);
        rgba.put_pixel(0, 0, image::Rgba([0, 0, 0, 0]));
        rgba.put_pixel(1, 0, image::Rgba([10, 20, 30, 255]));
        let png = encode_png(&DynamicImage::ImageRgba8(rgba));
        let rgb = decode_image(&png, "t.png", &DecodeLimits::default()).unwrap();
        assert_eq!(rgb.get_pixel(0, 0), &Rgb([255, 255, 255]));
        assert_eq!(rgb.get_pixel(1, 0), &Rgb([10, 20, 30]));
    }

    #[test]
    fn sixteen_bit_grey_is_clipped_like_pillow() {
        let l16 = image::ImageBuffer::<image::Luma<u16>, _>::from_raw(3, 1, vec![7u16, 300, 65535])
            .unwrap();
        let png = encode_png(&DynamicImage::ImageLuma16(l16));
        let rgb = decode_image(&png, "g16.png", &DecodeLimits::default()).unwrap();
        let got: Vec<u8> = rgb.pixels().map(|p| p[0]).collect();
        assert_eq!(got, [7, 255, 255]);
        assert_eq!(png_color_type(&png), Some(0));
        assert_eq!(png_color_type(b"GIF89a"), None);
    }

    #[test]
    fn pixel_values_layout_and_values() {
        let img = RgbImage::from_pixel(2, 2, Rgb([0, 255, 51]));
        let cfg = PreprocessConfig::siglip(2, 2);
        let v = pixel_values(&img, &cfg);
        assert_eq!(v.len(), 12);
        assert!(v[..4].iter().all(|&x| x == -1.0));
        assert!(v[4..8].iter().all(|&x| x == 1.0));
        // float32(float64(51) / 255) = 0.2, (0.2 - 0.5) / 0.5
        let expect = ((51.0f64 * (1.0 / 255.0)) as f32 - 0.5) / 0.5;
        assert!(v[8..].iter().all(|&x| x == expect));
    }

    #[test]
    fn rescale_factor_is_the_json_float64() {
        assert_eq!(exact_rescale_factor(1.0 / 255.0), 0.003_921_568_627_450_98);
        assert_eq!(exact_rescale_factor(0.5), 0.5);
        assert_eq!(exact_rescale_factor(0.3), f64::from(0.3f32));
        assert_eq!(exact_rescale_factor(0.0), 0.0);
    }

    #[test]
    fn pixel_values_resizes() {
        let cfg = PreprocessConfig::siglip(3, 5);
        assert_eq!(pixel_values(&gradient(40, 9), &cfg).len(), 3 * 3 * 5);
    }

    #[test]
    fn rejects_bad_input_with_the_name() {
        let limits = DecodeLimits::default();
        let err = decode_image(&[], "empty.png", &limits)
            .unwrap_err()
            .to_string();
        assert!(err.contains("empty.png") && err.contains("empty"), "{err}");
        let err = decode_image(b"hello, world", "x.txt", &limits)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("x.txt") && err.contains("not a recognized"),
            "{err}"
        );
        let png = encode_png(&DynamicImage::ImageRgb8(gradient(64, 64)));
        let err = decode_image(&png[..png.len() / 2], "half.png", &limits)
            .unwrap_err()
            .to_string();
        assert!(err.contains("half.png"), "{err}");
        let mut corrupt = png.clone();
        for b in corrupt.iter_mut().skip(60).take(40) {
            *b ^= 0x5a;
        }
        assert!(decode_image(&corrupt, "bad.png", &limits).is_err());
    }

    fn encode_jpeg(img: &RgbImage, quality: u8) -> Vec<u8> {
        let mut buf = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, quality)
            .write_image(
                img.as_raw(),
                img.width(),
                img.height(),
                image::ExtendedColorType::Rgb8,
            )
            .unwrap();
        buf
    }

    #[test]
    fn decodes_jpeg_and_rejects_a_truncated_one() {
        let img = RgbImage::from_pixel(40, 24, Rgb([200, 40, 90]));
        let jpeg = encode_jpeg(&img, 95);
        let limits = DecodeLimits::default();
        let rgb = decode_image(&jpeg, "flat.jpg", &limits).unwrap();
        assert_eq!(rgb.dimensions(), (40, 24));
        for p in rgb.pixels() {
            for (got, want) in p.0.iter().zip([200u8, 40, 90]) {
                assert!(got.abs_diff(want) <= 3, "{p:?}");
            }
        }
        let busy = encode_jpeg(&gradient(64, 48), 95);
        let err = decode_image(&busy[..busy.len() * 2 / 3], "cut.jpg", &limits)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cut.jpg") && err.contains("truncated"),
            "{err}"
        );
        let err = decode_image(&jpeg[..300], "header.jpg", &limits)
            .unwrap_err()
            .to_string();
        assert!(err.contains("header.jpg"), "{err}");
    }

    #[test]
    fn preprocess_image_equals_decode_then_pixel_values() {
        // Downscales (streamed: horizontal pass first), a vertical-first one, an upscale,
        // same width, same size; grey and colour JPEG, RGB and RGBA PNG.
        let cases = [
            ((1200, 900), (384, 384)),
            ((700, 301), (336, 512)),
            ((300, 2000), (384, 384)),
            ((40, 30), (384, 384)),
            ((384, 900), (384, 384)),
            ((384, 384), (384, 384)),
            ((4000, 7), (384, 384)),
        ];
        let limits = DecodeLimits::default();
        for (i, ((w, h), (ow, oh))) in cases.into_iter().enumerate() {
            let img = gradient(w, h);
            let mut files = vec![encode_jpeg(&img, 90)];
            let grey = image::imageops::grayscale(&img);
            let mut buf = Vec::new();
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, 90)
                .write_image(grey.as_raw(), w, h, image::ExtendedColorType::L8)
                .unwrap();
            files.push(buf);
            let rgba = DynamicImage::ImageRgb8(img.clone()).to_rgba8();
            let rgba = image::RgbaImage::from_fn(w, h, |x, y| {
                let p = rgba.get_pixel(x, y);
                image::Rgba([p[0], p[1], p[2], ((x * 5 + y * 3) % 256) as u8])
            });
            files.push(encode_png(&DynamicImage::ImageRgb8(img)));
            files.push(encode_png(&DynamicImage::ImageRgba8(rgba)));
            let cfg = PreprocessConfig::siglip(oh, ow);
            for (j, file) in files.iter().enumerate() {
                let want = pixel_values(&decode_image(file, "x", &limits).unwrap(), &cfg);
                for threads in [1, 2] {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    let mut times = StageTimes::default();
                    let got = pool
                        .install(|| preprocess_image(file, "x", &cfg, &limits, &mut times))
                        .unwrap();
                    let differing = got.iter().zip(&want).filter(|(a, b)| a != b).count();
                    println!(
                        "case {i} file {j} {w}x{h} -> {ow}x{oh}, {threads} thread(s): \
                         {differing} differing values (allowed 0)"
                    );
                    assert_eq!(got.len(), want.len());
                    assert_eq!(differing, 0);
                }
            }
        }
        // Errors are the same too.
        let busy = encode_jpeg(&gradient(640, 480), 95);
        let cut = &busy[..busy.len() * 2 / 3];
        let cfg = PreprocessConfig::siglip(384, 384);
        let whole = decode_image(cut, "cut.jpg", &limits)
            .unwrap_err()
            .to_string();
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let streamed = pool
                .install(|| {
                    preprocess_image(cut, "cut.jpg", &cfg, &limits, &mut StageTimes::default())
                })
                .unwrap_err()
                .to_string();
            assert_eq!(streamed, whole);
        }
    }

    #[test]
    fn jpeg_size_limits_apply_before_decoding() {
        let jpeg = encode_jpeg(&gradient(64, 48), 90);
        let tight = DecodeLimits {
            max_width: 32,
            ..DecodeLimits::default()
        };
        let err = decode_image(&jpeg, "wide.jpg", &tight)
            .unwrap_err()
            .to_string();
        assert!(err.contains("64x48") && err.contains("limit"), "{err}");
    }

    #[test]
    fn adobe_cmyk_follows_pillow() {
        // Stored inverted: 255 is "no ink".
        assert_eq!(adobe_cmyk_to_rgb(&[255, 255, 255, 255]), [255, 255, 255]);
        assert_eq!(adobe_cmyk_to_rgb(&[0, 0, 0, 255]), [0, 0, 0]);
        assert_eq!(adobe_cmyk_to_rgb(&[255, 128, 0, 0]), [0, 0, 0]);
        // Pillow: Image.frombytes("CMYK", (1, 1), bytes([127, 0, 255, 55])).convert("RGB")
        // == (100, 200, 0); those are the inverted samples of [128, 255, 0, 200].
        assert_eq!(adobe_cmyk_to_rgb(&[128, 255, 0, 200]), [100, 200, 0]);
    }

    #[test]
    fn progressive_flag_from_the_frame_header() {
        let baseline = encode_jpeg(&gradient(8, 8), 90);
        assert!(!jpeg_is_progressive(&baseline));
        let mut progressive = baseline.clone();
        let sof = progressive
            .windows(2)
            .position(|w| w == [0xFF, 0xC0])
            .unwrap();
        progressive[sof + 1] = 0xC2;
        assert!(jpeg_is_progressive(&progressive));
        assert!(jpeg_is_progressive(b"\xFF\xD8garbage"));
    }

    #[test]
    fn png_size_bomb_fails_before_allocating() {
        // A valid 1x1 PNG whose header claims 100000 x 100000.
        let mut png = Vec::new();
        image::codecs::png::PngEncoder::new(&mut png)
            .write_image(&[0u8, 0, 0], 1, 1, image::ExtendedColorType::Rgb8)
            .unwrap();
        png[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        png[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        let crc = crc32(&png[12..29]);
        png[29..33].copy_from_slice(&crc.to_be_bytes());
        let err = decode_image(&png, "bomb.png", &DecodeLimits::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("bomb.png")
                && err.contains("100000x100000")
                && err.contains("exceeds the decode limits"),
            "{err}"
        );
        let tight = DecodeLimits {
            max_alloc_bytes: 1 << 20,
            ..DecodeLimits::default()
        };
        let big = encode_png(&DynamicImage::ImageRgb8(RgbImage::new(1024, 1024)));
        let err = decode_image(&big, "big.png", &tight)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("big.png") && err.contains("1024x1024") && err.contains("limit"),
            "{err}"
        );
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
}
