//! A faster decoder for the most common PNGs: 8-bit RGB or RGBA, not interlaced.
//!
//! A PNG's two costly steps, inflating the zlib stream and unfiltering the rows, are both
//! sequential, but they can overlap: one thread inflates while another unfilters the rows
//! already inflated and turns them into RGB (alpha composited over white, as in
//! [`super::to_rgb_like_pillow`]). With one thread the same steps run in turn.
//!
//! Anything else, and anything irregular (a bad checksum, an unknown chunk, a `tRNS`
//! chunk, a stream that is too short or too long, data after `IEND`, a size over the
//! limits), returns `None`, and the `image` crate decodes the file as before: errors and
//! unusual files behave exactly as they did. For the files this path accepts, the pixels
//! are the unfiltered samples themselves, so both paths give the same bytes (the tests
//! compare them).

use std::sync::mpsc;
use std::time::{Duration, Instant};

use image::RgbImage;

use super::{check_size, over_white, timed, DecodeLimits, RowResizer, StageTimes};

const SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

/// Chunks that change nothing in the pixels the reference sees (Pillow applies neither
/// gamma nor colour profiles here) and that the `image` crate ignores too.
const IGNORED_CHUNKS: [&[u8; 4]; 12] = [
    b"gAMA", b"cHRM", b"sRGB", b"iCCP", b"sBIT", b"pHYs", b"tEXt", b"zTXt", b"iTXt", b"tIME",
    b"bKGD", b"eXIf",
];

/// Filtered bytes handed from the inflating thread to the unfiltering one at a time.
const BAND_BYTES: usize = 64 * 1024;

struct Header {
    width: u32,
    height: u32,
    /// 3 (RGB) or 4 (RGBA).
    channels: usize,
}

impl Header {
    /// Bytes of one filtered row: the filter type, then the samples.
    fn stride(&self) -> usize {
        1 + self.width as usize * self.channels
    }
}

/// Decodes `bytes` if it is a PNG this path handles; `None` means "use the general decoder".
///
/// With `resize_to`, decoding on one thread, and a resize that runs horizontally first,
/// each row goes through the horizontal pass as soon as it is unfiltered and the image
/// comes back resized (see [`super::preprocess_image`]); otherwise it comes back at its
/// own size.
pub(super) fn decode(
    bytes: &[u8],
    limits: &DecodeLimits,
    resize_to: Option<(u32, u32)>,
    times: &mut StageTimes,
) -> Option<RgbImage> {
    let start = Instant::now();
    let decoded = decode_rows(bytes, limits, resize_to);
    let elapsed = start.elapsed();
    let Some((rows, header, overlapped)) = decoded else {
        times.decode += elapsed;
        return None;
    };
    // In turn, the horizontal pass's time is part of `elapsed`; overlapped, it ran on the
    // other thread while this one inflated.
    let resized_inline = if overlapped {
        Duration::ZERO
    } else {
        rows.resize_time
    };
    times.decode += elapsed.saturating_sub(resized_inline);
    times.resize += resized_inline;
    rows.finish(&header, times)
}

/// The unfiltered rows (and whether that ran on a second thread).
fn decode_rows(
    bytes: &[u8],
    limits: &DecodeLimits,
    resize_to: Option<(u32, u32)>,
) -> Option<(Rows, Header, bool)> {
    let (header, idat) = parse(bytes)?;
    let (w, h) = (u64::from(header.width), u64::from(header.height));
    check_size(w, h, header.channels as u64 + 3, limits).ok()?;
    let overlapped = if rayon::current_num_threads() > 1 {
        std::thread::scope(|s| {
            let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(16);
            let unfilter = std::thread::Builder::new()
                .name("png-unfilter".into())
                .spawn_scoped(s, || {
                    // Rows are not resized here: with two threads or more, the resize
                    // afterwards runs over all of them, which measured faster than this
                    // thread doing the horizontal pass too (docs/PERFORMANCE.md).
                    let mut rows = Rows::new(&header, None);
                    for band in rx {
                        if !rows.push(&band) {
                            return None;
                        }
                    }
                    Some(rows)
                });
            // Without a second thread (the system refused one), decode in turn below.
            let unfilter = unfilter.ok()?;
            let inflated = inflate(&idat, &header, |band| tx.send(band.to_vec()).is_ok());
            drop(tx);
            let rows = unfilter.join().ok().flatten();
            Some(inflated.and(rows))
        })
    } else {
        None
    };
    match overlapped {
        Some(rows) => Some((rows?, header, true)),
        None => {
            let mut rows = Rows::new(&header, resize_to);
            inflate(&idat, &header, |band| rows.push(band))?;
            Some((rows, header, false))
        }
    }
}

/// The header and the IDAT payloads of a PNG made only of IHDR, IDATs, [`IGNORED_CHUNKS`]
/// and IEND, every chunk's CRC checked.
fn parse(bytes: &[u8]) -> Option<(Header, Vec<&[u8]>)> {
    let mut rest = bytes.strip_prefix(SIGNATURE)?;
    let mut next_chunk = || -> Option<(&[u8], &[u8])> {
        let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        let kind_and_data = rest.get(4..8 + len)?;
        let crc = u32::from_be_bytes(rest.get(8 + len..12 + len)?.try_into().ok()?);
        if crc32fast::hash(kind_and_data) != crc {
            return None;
        }
        rest = &rest[12 + len..];
        Some(kind_and_data.split_at(4))
    };

    let (kind, ihdr) = next_chunk()?;
    if kind != b"IHDR" || ihdr.len() != 13 {
        return None;
    }
    let width = u32::from_be_bytes(ihdr[0..4].try_into().ok()?);
    let height = u32::from_be_bytes(ihdr[4..8].try_into().ok()?);
    // Bit depth 8; colour type 2 (RGB) or 6 (RGBA); compression, filter method and
    // interlace all 0.
    let channels = match ihdr[8..13] {
        [8, 2, 0, 0, 0] => 3,
        [8, 6, 0, 0, 0] => 4,
        _ => return None,
    };
    if width == 0 || height == 0 || width > i32::MAX as u32 || height > i32::MAX as u32 {
        return None;
    }

    let mut idat = Vec::new();
    let mut idat_done = false;
    loop {
        let (kind, data) = next_chunk()?;
        match kind {
            b"IDAT" if !idat_done => idat.push(data),
            b"IEND" => break,
            _ if IGNORED_CHUNKS.iter().any(|k| &k[..] == kind) => idat_done = !idat.is_empty(),
            _ => return None,
        }
    }
    if idat.is_empty() || !rest.is_empty() {
        return None;
    }
    let header = Header {
        width,
        height,
        channels,
    };
    Some((header, idat))
}

/// Inflates the concatenated IDAT payloads, calling `emit` with each run of whole filtered
/// rows as soon as it is complete; stops when `emit` returns false. `None` unless the
/// stream ends exactly at the end of the image and `emit` accepted every row.
fn inflate(idat: &[&[u8]], header: &Header, mut emit: impl FnMut(&[u8]) -> bool) -> Option<()> {
    let stride = header.stride();
    let total = stride.checked_mul(header.height as usize)?;
    // Inflating needs only the last 32 KiB of output (the deflate window) besides the row
    // not yet complete, so a small buffer, compacted as it fills, stays in cache and
    // spares allocating the whole image twice.
    const WINDOW: usize = 32 * 1024;
    let capacity = WINDOW + stride + 4 * BAND_BYTES;
    let mut buf = vec![0u8; capacity];
    let mut decompressor = fdeflate::Decompressor::new();
    // `pos`: end of the output in `buf`; `row_start`: first byte in `buf` not yet emitted.
    let (mut pos, mut row_start, mut produced) = (0usize, 0usize, 0usize);
    for (i, chunk) in idat.iter().enumerate() {
        let last = i + 1 == idat.len();
        let mut input = *chunk;
        loop {
            if capacity - pos < BAND_BYTES {
                let keep = row_start.min(pos.saturating_sub(WINDOW));
                buf.copy_within(keep..pos, 0);
                pos -= keep;
                row_start -= keep;
            }
            // Producing at most a band per call lets rows go out while inflating goes on;
            // never more than the image holds.
            let end = pos + BAND_BYTES.min(total - produced);
            let (used, made) = decompressor.read(input, &mut buf[..end], pos, last).ok()?;
            input = &input[used..];
            pos += made;
            produced += made;
            let complete = (pos - row_start) / stride * stride;
            if complete > 0 {
                if !emit(&buf[row_start..row_start + complete]) {
                    return None;
                }
                row_start += complete;
            }
            if decompressor.is_done() || (input.is_empty() && !last) {
                break;
            }
            if used == 0 && made == 0 {
                // Neither input taken nor output made: the stream holds more than the
                // image (no room left) or is cut short.
                return None;
            }
        }
        if decompressor.is_done() && (!input.is_empty() || !last) {
            // Data after the end of the zlib stream.
            return None;
        }
    }
    (decompressor.is_done() && produced == total && row_start == pos).then_some(())
}

/// The unfiltering side: takes filtered rows in order, keeps the previous unfiltered row,
/// and writes each row's RGB pixels, or hands them to the horizontal pass.
struct Rows {
    channels: usize,
    /// The previous row, unfiltered (zeros before the first row).
    prev: Vec<u8>,
    /// The row being unfiltered.
    cur: Vec<u8>,
    /// One RGB row, for RGBA input going to `resizer`.
    rgb_row: Vec<u8>,
    /// The next row's index.
    y: usize,
    /// The whole image, when not resized on the fly.
    rgb: Vec<u8>,
    resizer: Option<RowResizer>,
    /// Time spent in `resizer`'s horizontal pass.
    resize_time: Duration,
}

impl Rows {
    fn new(header: &Header, resize_to: Option<(u32, u32)>) -> Rows {
        let samples = header.stride() - 1;
        let resizer =
            resize_to.and_then(|(w, h)| RowResizer::new(header.width, header.height, w, h));
        let whole = if resizer.is_some() {
            0
        } else {
            header.width as usize * header.height as usize * 3
        };
        Rows {
            channels: header.channels,
            prev: vec![0; samples],
            cur: vec![0; samples],
            rgb_row: Vec::with_capacity(header.width as usize * 3),
            y: 0,
            rgb: Vec::with_capacity(whole),
            resizer,
            resize_time: Duration::ZERO,
        }
    }

    /// Unfilters whole filtered rows; false on an unknown filter type.
    fn push(&mut self, band: &[u8]) -> bool {
        for row in band.chunks_exact(self.cur.len() + 1) {
            self.cur.copy_from_slice(&row[1..]);
            let ok = match self.channels {
                3 => unfilter::<3>(row[0], &self.prev, &mut self.cur),
                _ => unfilter::<4>(row[0], &self.prev, &mut self.cur),
            };
            if !ok {
                return false;
            }
            let rgb = if self.channels == 3 {
                &self.cur
            } else {
                self.rgb_row.clear();
                for p in self.cur.chunks_exact(4) {
                    let a = p[3];
                    self.rgb_row.extend_from_slice(&[
                        over_white(p[0], a),
                        over_white(p[1], a),
                        over_white(p[2], a),
                    ]);
                }
                &self.rgb_row
            };
            match &mut self.resizer {
                Some(resizer) => {
                    timed(&mut self.resize_time, || resizer.push(self.y, rgb));
                }
                None => self.rgb.extend_from_slice(rgb),
            }
            self.y += 1;
            std::mem::swap(&mut self.prev, &mut self.cur);
        }
        true
    }

    fn finish(self, header: &Header, times: &mut StageTimes) -> Option<RgbImage> {
        match self.resizer {
            Some(resizer) => Some(timed(&mut times.resize, || resizer.finish())),
            None => RgbImage::from_raw(header.width, header.height, self.rgb),
        }
    }
}

/// Undoes one row's PNG filter in place (`prev` is the previous row, unfiltered); false
/// for a filter type other than 0-4.
fn unfilter<const BPP: usize>(filter: u8, prev: &[u8], row: &mut [u8]) -> bool {
    match filter {
        0 => {}
        1 => {
            for i in BPP..row.len() {
                row[i] = row[i].wrapping_add(row[i - BPP]);
            }
        }
        2 => {
            for (x, &b) in row.iter_mut().zip(prev) {
                *x = x.wrapping_add(b);
            }
        }
        3 => {
            let mut left = [0u8; BPP];
            for (px, up) in row.chunks_exact_mut(BPP).zip(prev.chunks_exact(BPP)) {
                for i in 0..BPP {
                    let avg = ((u16::from(left[i]) + u16::from(up[i])) / 2) as u8;
                    px[i] = px[i].wrapping_add(avg);
                    left[i] = px[i];
                }
            }
        }
        4 => {
            let (mut left, mut up_left) = ([0i16; BPP], [0i16; BPP]);
            for (px, up) in row.chunks_exact_mut(BPP).zip(prev.chunks_exact(BPP)) {
                for i in 0..BPP {
                    let b = i16::from(up[i]);
                    px[i] = px[i].wrapping_add(paeth(left[i], b, up_left[i]));
                    left[i] = i16::from(px[i]);
                    up_left[i] = b;
                }
            }
        }
        _ => return false,
    }
    true
}

/// The Paeth predictor of left `a`, up `b` and up-left `c`, in stb_image's branch-free
/// form (equal to the specification's for all 8-bit inputs).
#[inline(always)]
fn paeth(a: i16, b: i16, c: i16) -> u8 {
    let thresh = c * 3 - (a + b);
    let lo = a.min(b);
    let hi = a.max(b);
    let t0 = if hi <= thresh { lo } else { c };
    let t1 = if thresh <= lo { hi } else { t0 };
    t1 as u8
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preprocess::{decode_dynamic, to_rgb_like_pillow};
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    use image::{ExtendedColorType, ImageEncoder, ImageFormat};

    /// Pseudo-random pixels with runs, so every filter sees both flat and busy areas.
    fn pixels(len: usize, seed: u32) -> Vec<u8> {
        let mut state = seed.wrapping_mul(2_654_435_761) | 1;
        let mut value = 0u8;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                if state.is_multiple_of(3) {
                    value = (state >> 8) as u8;
                }
                value
            })
            .collect()
    }

    fn encode(w: u32, h: u32, channels: usize, filter: FilterType, seed: u32) -> Vec<u8> {
        let data = pixels(w as usize * h as usize * channels, seed);
        let color = if channels == 3 {
            ExtendedColorType::Rgb8
        } else {
            ExtendedColorType::Rgba8
        };
        let mut png = Vec::new();
        PngEncoder::new_with_quality(&mut png, CompressionType::Default, filter)
            .write_image(&data, w, h, color)
            .unwrap();
        png
    }

    /// What the general path (the `image` crate) decodes.
    fn general(png: &[u8]) -> RgbImage {
        let img = decode_dynamic(png, ImageFormat::Png, &DecodeLimits::default()).unwrap();
        to_rgb_like_pillow(img, false)
    }

    fn with_threads<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(f)
    }

    #[test]
    fn equals_the_general_decoder_for_every_filter_and_thread_count() {
        let filters = [
            FilterType::NoFilter,
            FilterType::Sub,
            FilterType::Up,
            FilterType::Avg,
            FilterType::Paeth,
            FilterType::Adaptive,
        ];
        let sizes = [(1, 1), (3, 2), (1, 40), (257, 3), (300, 211)];
        let limits = DecodeLimits::default();
        for (seed, filter) in filters.into_iter().enumerate() {
            for (w, h) in sizes {
                for channels in [3, 4] {
                    let png = encode(w, h, channels, filter, seed as u32 + w);
                    let want = general(&png);
                    for threads in [1, 2] {
                        let got = with_threads(threads, || {
                            decode(&png, &limits, None, &mut StageTimes::default())
                        });
                        let got = got.unwrap_or_else(|| {
                            panic!("{filter:?} {w}x{h}x{channels}: fast path declined")
                        });
                        let differing = got
                            .as_raw()
                            .iter()
                            .zip(want.as_raw())
                            .filter(|(a, b)| a != b)
                            .count();
                        assert_eq!(got.dimensions(), want.dimensions());
                        assert_eq!(
                            differing, 0,
                            "{filter:?} {w}x{h}x{channels}, {threads} thread(s): {differing} \
                             differing values (allowed 0)"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_big_image_in_many_idat_chunks() {
        // The `png` encoder splits IDAT; a band boundary falls inside rows and chunks.
        // The second image has rows longer than a band.
        for (w, h, channels) in [(1500, 700, 3), (16384, 6, 4)] {
            let png = split_idat(&encode(w, h, channels, FilterType::Adaptive, 9), 9999);
            let idat_chunks = png.windows(4).filter(|w| w == b"IDAT").count();
            println!("{w}x{h}x{channels}: {idat_chunks} IDAT chunks");
            let want = general(&png);
            for threads in [1, 2] {
                let got = with_threads(threads, || {
                    decode(
                        &png,
                        &DecodeLimits::default(),
                        None,
                        &mut StageTimes::default(),
                    )
                });
                assert!(got.as_ref() == Some(&want), "{w}x{h}, {threads} thread(s)");
            }
        }
    }

    /// The same PNG with its (single) IDAT payload cut into chunks of `piece` bytes.
    fn split_idat(png: &[u8], piece: usize) -> Vec<u8> {
        let at = png.windows(4).position(|w| w == b"IDAT").unwrap();
        let len = u32::from_be_bytes(png[at - 4..at].try_into().unwrap()) as usize;
        let mut out = png[..at - 4].to_vec();
        for data in png[at + 4..at + 4 + len].chunks(piece) {
            out.extend(chunk(b"IDAT", data));
        }
        out.extend_from_slice(&png[at + 8 + len..]);
        out
    }

    /// Rewrites the CRC of the chunk whose type starts at `kind_at`.
    fn fix_crc(png: &mut [u8], kind_at: usize) {
        let len = u32::from_be_bytes(png[kind_at - 4..kind_at].try_into().unwrap()) as usize;
        let crc = crc32fast::hash(&png[kind_at..kind_at + 4 + len]);
        png[kind_at + 4 + len..kind_at + 8 + len].copy_from_slice(&crc.to_be_bytes());
    }

    fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
        let mut out = (data.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let crc = crc32fast::hash(&out[4..]);
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }

    #[test]
    fn declines_what_it_does_not_handle() {
        let limits = DecodeLimits::default();
        let png = encode(40, 30, 3, FilterType::Adaptive, 1);
        assert!(decode(&png, &limits, None, &mut StageTimes::default()).is_some());
        let iend = png.len() - 12;

        let mut bad_crc = png.clone();
        let last = bad_crc.len() - 1;
        bad_crc[last] ^= 1;
        let mut trailing = png.clone();
        trailing.extend_from_slice(b"junk");
        let mut with_trns = png[..iend].to_vec();
        with_trns.extend(chunk(b"tRNS", &[0, 1, 0, 2, 0, 3]));
        with_trns.extend_from_slice(&png[iend..]);
        let mut unknown = png[..33].to_vec();
        unknown.extend(chunk(b"abCD", b"x"));
        unknown.extend_from_slice(&png[33..]);
        let mut ignored = png[..33].to_vec();
        ignored.extend(chunk(b"tEXt", b"Comment\0hello"));
        ignored.extend_from_slice(&png[33..]);
        // Rows of 40 black pixels behind filter type `filter`, in a stored zlib stream.
        let with_filter = |filter: u8| {
            let mut raw = Vec::new();
            for _ in 0..30 {
                raw.push(filter);
                raw.extend_from_slice(&[0u8; 120]);
            }
            let mut file = png[..33].to_vec();
            file.extend(chunk(b"IDAT", &stored_zlib(&raw)));
            file.extend_from_slice(&png[iend..]);
            file
        };
        let black = decode(&with_filter(0), &limits, None, &mut StageTimes::default())
            .expect("filter type 0 is accepted");
        assert!(black.as_raw().iter().all(|&v| v == 0));
        let bad_filter = with_filter(7);
        let mut grey = png.clone();
        grey[25] = 0; // colour type 0
        fix_crc(&mut grey, 12);

        assert!(decode(&ignored, &limits, None, &mut StageTimes::default()).is_some());
        for (name, file) in [
            ("bad CRC", &bad_crc),
            ("data after IEND", &trailing),
            ("tRNS", &with_trns),
            ("unknown chunk", &unknown),
            ("filter type 7", &bad_filter),
            ("greyscale", &grey),
            ("cut short", &png[..png.len() / 2].to_vec()),
        ] {
            assert!(
                decode(file, &limits, None, &mut StageTimes::default()).is_none(),
                "{name}"
            );
        }
        let tight = DecodeLimits {
            max_width: 39,
            ..limits
        };
        assert!(
            decode(&png, &tight, None, &mut StageTimes::default()).is_none(),
            "over the limits"
        );
    }

    /// Damaged files whose chunk checksums still hold (as a hostile file would have):
    /// wherever the fast path decodes one, the general decoder must give the same pixels.
    #[test]
    fn damaged_files_decode_as_the_general_decoder_does_or_are_declined() {
        let limits = DecodeLimits::default();
        let originals = [
            encode(37, 23, 3, FilterType::Adaptive, 3),
            encode(16, 40, 4, FilterType::Paeth, 4),
            split_idat(&encode(64, 64, 3, FilterType::Avg, 5), 300),
        ];
        let mut state = 0x9e37_79b9u32;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as usize
        };
        let (mut accepted, mut declined) = (0, 0);
        for round in 0..600 {
            let original = &originals[round % originals.len()];
            let mut png = original.clone();
            if round % 2 == 0 {
                // Damage the file's bytes (header, chunk lengths and kinds, zlib stream).
                for _ in 0..1 + next() % 3 {
                    let at = 8 + next() % (png.len() - 8);
                    png[at] ^= 1 << (next() % 8);
                }
            } else {
                // Damage the filtered rows themselves (filter types included), sometimes
                // their length, and store them again with valid zlib checksums.
                let (_, idat) = parse(original).unwrap();
                let mut raw = fdeflate::decompress_to_vec(&idat.concat()).unwrap();
                for _ in 0..1 + next() % 4 {
                    let at = next() % raw.len();
                    raw[at] = next() as u8;
                }
                match next() % 6 {
                    0 => raw.truncate(raw.len() - 1 - next() % 5),
                    1 => raw.extend_from_slice(&[0, 1, 2]),
                    _ => {}
                }
                let iend = png.len() - 12;
                let first_idat = png.windows(4).position(|w| w == b"IDAT").unwrap() - 4;
                let mut rebuilt = png[..first_idat].to_vec();
                rebuilt.extend(chunk(b"IDAT", &stored_zlib(&raw)));
                rebuilt.extend_from_slice(&png[iend..]);
                png = rebuilt;
            }
            // Recompute every chunk's CRC so that only the contents are damaged.
            let mut at = 8;
            while at + 12 <= png.len() {
                let len = u32::from_be_bytes(png[at..at + 4].try_into().unwrap()) as usize;
                if at + 12 + len > png.len() {
                    break;
                }
                fix_crc(&mut png, at + 4);
                at += 12 + len;
            }
            match decode(&png, &limits, None, &mut StageTimes::default()) {
                Some(fast) => {
                    accepted += 1;
                    let general = decode_dynamic(&png, ImageFormat::Png, &limits)
                        .map(|img| to_rgb_like_pillow(img, false));
                    assert!(
                        general.as_ref().ok() == Some(&fast),
                        "round {round}: the fast path decoded a file the general decoder \
                         decodes differently or refuses: {:?}",
                        general.err()
                    );
                }
                None => declined += 1,
            }
        }
        println!("damaged files: {accepted} decoded (all equal to the general decoder), {declined} declined");
    }

    /// A zlib stream holding `data` in stored (uncompressed) deflate blocks.
    fn stored_zlib(data: &[u8]) -> Vec<u8> {
        let mut out = vec![0x78, 0x01];
        let blocks: Vec<&[u8]> = data.chunks(65535).collect();
        for (i, block) in blocks.iter().enumerate() {
            out.push(u8::from(i + 1 == blocks.len()));
            let len = block.len() as u16;
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&(!len).to_le_bytes());
            out.extend_from_slice(block);
        }
        let (mut a, mut b) = (1u32, 0u32);
        for &byte in data {
            a = (a + u32::from(byte)) % 65521;
            b = (b + a) % 65521;
        }
        out.extend_from_slice(&((b << 16) | a).to_be_bytes());
        out
    }

    /// The specification's Paeth predictor.
    fn paeth_spec(a: u8, b: u8, c: u8) -> u8 {
        let p = i16::from(a) + i16::from(b) - i16::from(c);
        let (pa, pb, pc) = (
            (p - i16::from(a)).abs(),
            (p - i16::from(b)).abs(),
            (p - i16::from(c)).abs(),
        );
        if pa <= pb && pa <= pc {
            a
        } else if pb <= pc {
            b
        } else {
            c
        }
    }

    #[test]
    fn paeth_equals_the_specification() {
        let mut differing = 0;
        for a in 0..=255u8 {
            for b in 0..=255u8 {
                for c in 0..=255u8 {
                    let got = paeth(i16::from(a), i16::from(b), i16::from(c));
                    differing += usize::from(got != paeth_spec(a, b, c));
                }
            }
        }
        println!("paeth: {differing} of 2^24 inputs differ from the specification (allowed 0)");
        assert_eq!(differing, 0);
    }
}
