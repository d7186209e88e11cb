//! Pillow's bicubic resize (`libImaging/Resample.c`, `ImagingResampleInner`), bit for bit.
//!
//! Every output value is an integer sum over input values with fixed coefficients, so the
//! work splits freely: rows of each pass are computed in parallel (rayon, over the current
//! thread pool), and on x86-64 with AVX2 the sums are taken eight lanes at a time. Integer
//! addition wraps identically in any order, so neither changes a single output value; the
//! tests compare every kernel against the plain one.

use image::RgbImage;
use rayon::prelude::*;

/// Fixed-point fraction bits of Pillow's 8-bit resampling (`32 - 8 - 2`).
const PRECISION_BITS: u32 = 22;

/// Rounding bias added before the fixed-point sum is shifted back to 8 bits.
const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Rows handed to one parallel task at least: fewer would cost more in scheduling than
/// they save.
const MIN_ROWS_PER_TASK: usize = 8;

/// Pillow's `bicubic_filter` with `a = -0.5`, written in the same operation order.
#[inline]
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per-output-pixel filter taps along one axis, as `precompute_coeffs` +
/// `normalize_coeffs_8bpc` compute them.
struct Taps {
    /// First input index and number of taps for each output index.
    bounds: Vec<(usize, usize)>,
    /// `ksize` fixed-point coefficients per output index.
    coeffs: Vec<i32>,
    ksize: usize,
}

impl Taps {
    fn new(in_size: u32, out_size: u32) -> Taps {
        const SUPPORT: f64 = 2.0;
        // Pillow takes the box edges as C floats.
        let scale = f64::from(in_size as f32) / f64::from(out_size);
        let filterscale = scale.max(1.0);
        let support = SUPPORT * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let ss = 1.0 / filterscale;
        let in_len = i64::from(in_size);

        let mut bounds = Vec::with_capacity(out_size as usize);
        let mut coeffs = vec![0i32; out_size as usize * ksize];
        let mut weights = vec![0f64; ksize];
        for (xx, k) in coeffs.chunks_exact_mut(ksize).enumerate() {
            let center = (xx as f64 + 0.5) * scale;
            // `(int)` in C truncates toward zero, as `as` does.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(in_len);
            let count = (xmax - xmin).clamp(0, ksize as i64) as usize;
            let mut ww = 0.0;
            for (x, w) in weights.iter_mut().take(count).enumerate() {
                *w = bicubic(((x as i64 + xmin) as f64 - center + 0.5) * ss);
                ww += *w;
            }
            for (w, c) in weights.iter().take(count).zip(k.iter_mut()) {
                let w = if ww != 0.0 { w / ww } else { *w };
                let fixed = w * f64::from(1u32 << PRECISION_BITS);
                *c = if w < 0.0 {
                    (fixed - 0.5) as i32
                } else {
                    (fixed + 0.5) as i32
                };
            }
            bounds.push((xmin as usize, count));
        }
        Taps {
            bounds,
            coeffs,
            ksize,
        }
    }

    #[inline]
    fn taps(&self, i: usize) -> (usize, &[i32]) {
        let (start, count) = self.bounds[i];
        (start, &self.coeffs[i * self.ksize..i * self.ksize + count])
    }
}

#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Which implementation of the inner loops this CPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Plain,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Kernel {
    fn detect() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            return Kernel::Avx2;
        }
        Kernel::Plain
    }
}

/// Resizes like Pillow's `Image.resize((width, height), Image.BICUBIC)` on an RGB image.
///
/// Bit-exact with Pillow 13's C implementation (`ImagingResampleInner`), including its
/// choice of pass order. A zero target size gives an empty image, an empty source a black
/// one. Runs on the current rayon thread pool.
pub fn resize_bicubic(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    resize_with(Kernel::detect(), img, width, height)
}

fn resize_with(kernel: Kernel, img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (in_w, in_h) = img.dimensions();
    if (in_w, in_h) == (width, height) {
        return img.clone();
    }
    if width == 0 || height == 0 || in_w == 0 || in_h == 0 {
        // Nothing to sample from (or nothing to fill); decoded images are never empty.
        return RgbImage::new(width, height);
    }
    if let Some(mut rows) = RowResizer::with_kernel(kernel, in_w, in_h, width, height) {
        let stride = in_w as usize * 3;
        let (first, last) = rows.rows_read();
        let horizontal = &rows.horizontal;
        img.as_raw()[first * stride..last * stride]
            .par_chunks_exact(stride)
            .zip(rows.mid.par_chunks_exact_mut(width as usize * 3))
            .with_min_len(MIN_ROWS_PER_TASK)
            .for_each(|(row, out_row)| horizontal.row(row, out_row));
        return rows.finish();
    }
    let src = img.as_raw();
    let vert = Taps::new(in_h, height);
    let out = if in_w == width {
        vertical_pass(kernel, src, in_w, 0, &vert)
    } else {
        // Vertical first (see `RowResizer::with_kernel`).
        let mid = vertical_pass(kernel, src, in_w, 0, &vert);
        let horizontal = Horizontal::new(kernel, in_w, width);
        let (in_stride, out_stride) = (in_w as usize * 3, width as usize * 3);
        let mut out = vec![0u8; height as usize * out_stride];
        mid.par_chunks_exact(in_stride)
            .zip(out.par_chunks_exact_mut(out_stride))
            .with_min_len(MIN_ROWS_PER_TASK)
            .for_each(|(row, out_row)| horizontal.row(row, out_row));
        out
    };
    RgbImage::from_raw(width, height, out).unwrap_or_else(|| RgbImage::new(width, height))
}

/// A horizontal-first resize fed with input rows in order, as a decoder produces them, so
/// that the whole input image never needs to exist at once.
///
/// Each input row the vertical pass reads goes through the horizontal pass when it is
/// pushed; [`RowResizer::finish`] runs the vertical pass. The result equals
/// [`resize_bicubic`] of the whole image.
pub(crate) struct RowResizer {
    horizontal: Horizontal,
    vert: Taps,
    in_w: u32,
    width: u32,
    height: u32,
    need_vertical: bool,
    /// Input rows `row_first..row_last` are the ones the vertical pass reads.
    row_first: usize,
    row_last: usize,
    /// Horizontal pass output: one row of `width` pixels per input row read.
    mid: Vec<u8>,
}

impl RowResizer {
    /// `None` unless Pillow runs a horizontal pass first for this resize (other cases need
    /// the whole image: see [`resize_bicubic`]).
    pub(crate) fn new(in_w: u32, in_h: u32, width: u32, height: u32) -> Option<RowResizer> {
        RowResizer::with_kernel(Kernel::detect(), in_w, in_h, width, height)
    }

    fn with_kernel(
        kernel: Kernel,
        in_w: u32,
        in_h: u32,
        width: u32,
        height: u32,
    ) -> Option<RowResizer> {
        if in_w == 0 || in_h == 0 || width == 0 || height == 0 || in_w == width {
            return None;
        }
        // Pillow 13 runs the vertical pass first when the height shrinks by more than
        // twice as many pixels as the width does (Pillow <= 12 always went horizontal
        // first). The order matters: the intermediate image is rounded to 8 bits.
        let shrink_h = i64::from(in_h) - i64::from(height);
        let shrink_w = i64::from(in_w) - i64::from(width);
        if shrink_h > 0 && shrink_h > shrink_w * 2 {
            return None;
        }
        let vert = Taps::new(in_h, height);
        let row_first = vert.bounds.first().map_or(0, |b| b.0);
        let row_last = vert.bounds.last().map_or(0, |b| b.0 + b.1);
        Some(RowResizer {
            horizontal: Horizontal::new(kernel, in_w, width),
            vert,
            in_w,
            width,
            height,
            need_vertical: in_h != height,
            row_first,
            row_last,
            mid: vec![0u8; (row_last - row_first) * width as usize * 3],
        })
    }

    /// The input rows the result depends on: `first..last`.
    pub(crate) fn rows_read(&self) -> (usize, usize) {
        (self.row_first, self.row_last)
    }

    /// Takes whole input rows (RGB) starting at input row `first_row`, on this thread.
    pub(crate) fn push(&mut self, first_row: usize, rows: &[u8]) {
        let (in_stride, out_stride) = (self.in_w as usize * 3, self.width as usize * 3);
        for (i, row) in rows.chunks_exact(in_stride).enumerate() {
            let y = first_row + i;
            if (self.row_first..self.row_last).contains(&y) {
                let at = (y - self.row_first) * out_stride;
                self.horizontal.row(row, &mut self.mid[at..at + out_stride]);
            }
        }
    }

    /// The resized image (the vertical pass runs on the current rayon pool).
    pub(crate) fn finish(self) -> RgbImage {
        let kernel = self.horizontal.kernel;
        let out = if self.need_vertical {
            vertical_pass(kernel, &self.mid, self.width, self.row_first, &self.vert)
        } else {
            self.mid
        };
        RgbImage::from_raw(self.width, self.height, out)
            .unwrap_or_else(|| RgbImage::new(self.width, self.height))
    }
}

/// The horizontal pass's taps for one resize and the kernel that applies them.
struct Horizontal {
    kernel: Kernel,
    taps: Taps,
    #[cfg(target_arch = "x86_64")]
    split: Option<x86::SplitTaps>,
}

impl Horizontal {
    fn new(kernel: Kernel, in_w: u32, width: u32) -> Horizontal {
        let taps = Taps::new(in_w, width);
        Horizontal {
            kernel,
            #[cfg(target_arch = "x86_64")]
            split: (kernel == Kernel::Avx2).then(|| x86::SplitTaps::new(&taps)),
            taps,
        }
    }

    /// Resamples one row of input pixels into `out_row`.
    fn row(&self, row: &[u8], out_row: &mut [u8]) {
        #[cfg(target_arch = "x86_64")]
        if let Some(split) = &self.split {
            // SAFETY: `split` exists only for `Kernel::Avx2`, chosen only when the CPU
            // reports AVX2.
            unsafe { x86::horizontal_row_avx2(row, out_row, &self.taps, split) };
            return;
        }
        horizontal_row(row, out_row, &self.taps);
    }
}

/// One row of the horizontal pass, one output pixel at a time, as Pillow computes it.
fn horizontal_row(row: &[u8], out_row: &mut [u8], taps: &Taps) {
    for (xx, px) in out_row.chunks_exact_mut(3).enumerate() {
        px.copy_from_slice(&horizontal_pixel(row, taps, xx));
    }
}

#[inline]
fn horizontal_pixel(row: &[u8], taps: &Taps, xx: usize) -> [u8; 3] {
    let (start, k) = taps.taps(xx);
    let (mut r, mut g, mut b) = (HALF, HALF, HALF);
    for (p, &c) in row[start * 3..].chunks_exact(3).zip(k) {
        r = r.wrapping_add(i32::from(p[0]).wrapping_mul(c));
        g = g.wrapping_add(i32::from(p[1]).wrapping_mul(c));
        b = b.wrapping_add(i32::from(p[2]).wrapping_mul(c));
    }
    [clip8(r), clip8(g), clip8(b)]
}

/// Resamples the columns of `src` (rows of `width` RGB pixels, the first of which is input
/// row `row_offset`) to `taps.bounds.len()` rows.
fn vertical_pass(
    kernel: Kernel,
    src: &[u8],
    width: u32,
    row_offset: usize,
    taps: &Taps,
) -> Vec<u8> {
    let stride = width as usize * 3;
    if stride == 0 {
        return Vec::new();
    }
    let mut out = vec![0u8; taps.bounds.len() * stride];
    out.par_chunks_exact_mut(stride)
        .enumerate()
        .with_min_len(MIN_ROWS_PER_TASK)
        .for_each_init(
            || vec![0i32; stride],
            |acc, (yy, out_row)| {
                let (start, k) = taps.taps(yy);
                let rows = &src[(start - row_offset) * stride..];
                match kernel {
                    Kernel::Plain => vertical_row(rows, stride, k, acc, out_row),
                    // SAFETY: `Kernel::Avx2` is only chosen when the CPU reports AVX2.
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Avx2 => unsafe {
                        x86::vertical_row_avx2(rows, stride, k, acc, out_row)
                    },
                }
            },
        );
    out
}

/// One output row of the vertical pass: `rows` starts at the first input row it reads.
///
/// Summing whole rows (instead of one column at a time, as Pillow does) reads memory in
/// order; integer addition makes the result identical.
#[inline(always)]
fn vertical_row(rows: &[u8], stride: usize, k: &[i32], acc: &mut [i32], out_row: &mut [u8]) {
    acc.fill(HALF);
    for (row, &c) in rows.chunks_exact(stride).zip(k) {
        for (a, &p) in acc.iter_mut().zip(row) {
            *a = a.wrapping_add(i32::from(p).wrapping_mul(c));
        }
    }
    for (o, &a) in out_row.iter_mut().zip(acc.iter()) {
        *o = clip8(a);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{horizontal_pixel, vertical_row, Taps, HALF, PRECISION_BITS};
    use std::arch::x86_64::*;

    /// [`super::vertical_row`] compiled for AVX2, which it vectorizes eight lanes wide.
    #[target_feature(enable = "avx2")]
    pub(super) fn vertical_row_avx2(
        rows: &[u8],
        stride: usize,
        k: &[i32],
        acc: &mut [i32],
        out_row: &mut [u8],
    ) {
        vertical_row(rows, stride, k, acc, out_row);
    }

    /// Each tap's coefficient `c` as `hi * 65536 + lo` with both halves in `i16`, laid out
    /// for `_mm256_madd_epi16`: per output pixel, groups of four taps, each group one
    /// 16-lane vector of `lo` and one of `hi`. In each 128-bit half (two taps),
    /// `[c0, c1, c0, c1, c0, c1, 0, 0]` meets the pixels `[R0, R1, G0, G1, B0, B1, 0, 0]`,
    /// so one multiply-add gives the R, G and B sums of two taps. Since
    /// `p * c = (p * hi) << 16 + p * lo`, the two 32-bit sums give Pillow's sum exactly
    /// (all of it wrapping modulo 2^32, like the plain kernel).
    pub(super) struct SplitTaps {
        /// Groups of four taps per output pixel (the widest pixel's count).
        groups: usize,
        /// `groups * 2` vectors of 16 `i16` per output pixel: lo, hi, lo, hi...
        table: Vec<[i16; 16]>,
    }

    impl SplitTaps {
        pub(super) fn new(taps: &Taps) -> SplitTaps {
            let groups = taps.ksize.div_ceil(4);
            let mut table = Vec::with_capacity(taps.bounds.len() * groups * 2);
            for xx in 0..taps.bounds.len() {
                let (_, k) = taps.taps(xx);
                for g in 0..groups {
                    let (mut lo, mut hi) = ([0i16; 16], [0i16; 16]);
                    for half in 0..2 {
                        for tap in 0..2 {
                            let c = k.get(g * 4 + half * 2 + tap).copied().unwrap_or(0);
                            let low = c as i16;
                            let high = ((c - i32::from(low)) >> 16) as i16;
                            for channel in 0..3 {
                                lo[half * 8 + channel * 2 + tap] = low;
                                hi[half * 8 + channel * 2 + tap] = high;
                            }
                        }
                    }
                    table.push(lo);
                    table.push(hi);
                }
            }
            SplitTaps { groups, table }
        }
    }

    /// [`super::horizontal_row`] four taps per step with `_mm256_madd_epi16` (see
    /// [`SplitTaps`]).
    #[target_feature(enable = "avx2")]
    pub(super) fn horizontal_row_avx2(
        row: &[u8],
        out_row: &mut [u8],
        taps: &Taps,
        split: &SplitTaps,
    ) {
        // The 12 bytes of four RGB pixels, loaded into both halves, to 16-bit lanes:
        // taps 0 and 1 in the low half, 2 and 3 in the high half; -1 gives a zero byte.
        #[rustfmt::skip]
        let spread = _mm256_setr_epi8(
            0, -1, 3, -1, 1, -1, 4, -1, 2, -1, 5, -1, -1, -1, -1, -1,
            6, -1, 9, -1, 7, -1, 10, -1, 8, -1, 11, -1, -1, -1, -1, -1,
        );
        let per_pixel = split.groups * 2;
        for (xx, px) in out_row.chunks_exact_mut(3).enumerate() {
            let (start, _) = taps.taps(xx);
            // Each group loads 16 bytes, 4 past its last pixel, and the zero-padded last
            // group may reach past the last tap: near the end of the row, go plain.
            if start * 3 + split.groups * 12 + 4 > row.len() {
                px.copy_from_slice(&horizontal_pixel(row, taps, xx));
                continue;
            }
            let pixels = &row[start * 3..];
            let coeffs = &split.table[xx * per_pixel..(xx + 1) * per_pixel];
            let (mut sum_lo, mut sum_hi) = (_mm256_setzero_si256(), _mm256_setzero_si256());
            for (g, c) in coeffs.chunks_exact(2).enumerate() {
                // SAFETY: bytes g * 12 .. g * 12 + 16 of `pixels` lie in the row (checked
                // above); the coefficient vectors are whole `[i16; 16]` arrays.
                let (p, lo, hi) = unsafe {
                    (
                        _mm256_broadcastsi128_si256(_mm_loadu_si128(
                            pixels.as_ptr().add(g * 12).cast(),
                        )),
                        _mm256_loadu_si256(c[0].as_ptr().cast()),
                        _mm256_loadu_si256(c[1].as_ptr().cast()),
                    )
                };
                let p = _mm256_shuffle_epi8(p, spread);
                sum_lo = _mm256_add_epi32(sum_lo, _mm256_madd_epi16(p, lo));
                sum_hi = _mm256_add_epi32(sum_hi, _mm256_madd_epi16(p, hi));
            }
            let fold = |v: __m256i| {
                _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v))
            };
            let sum = _mm_add_epi32(
                _mm_slli_epi32::<16>(fold(sum_hi)),
                _mm_add_epi32(fold(sum_lo), _mm_set1_epi32(HALF)),
            );
            // Shift, then saturate to i16 and to u8: the same as clamping to 0..=255.
            let v = _mm_srai_epi32::<{ PRECISION_BITS as i32 }>(sum);
            let v = _mm_packus_epi16(_mm_packs_epi32(v, v), _mm_setzero_si128());
            let [r, g, b, _] = _mm_cvtsi128_si32(v).to_le_bytes();
            px.copy_from_slice(&[r, g, b]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    /// Noise with long runs, so both smooth areas and hard edges are covered.
    fn noise(w: u32, h: u32, seed: u32) -> RgbImage {
        let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        let mut value = [0u8; 3];
        RgbImage::from_fn(w, h, |_, _| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            if state.is_multiple_of(4) {
                value = [state as u8, (state >> 8) as u8, (state >> 16) as u8];
            }
            Rgb(value)
        })
    }

    #[test]
    fn every_kernel_and_thread_count_gives_the_same_pixels() {
        let kernels = [Kernel::Plain, Kernel::detect()];
        println!("kernels compared: {kernels:?}");
        let cases = [
            ((4000, 30), (384, 7)),
            ((640, 480), (384, 384)),
            ((97, 131), (384, 384)),
            ((1024, 1024), (336, 512)),
            ((5, 1500), (384, 384)),
            ((2000, 3), (384, 384)),
            ((3, 2), (2, 1)),
            ((300, 900), (299, 100)),
            ((64, 64), (8, 64)),
            ((64, 64), (64, 8)),
        ];
        let single = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        for (i, ((w, h), (ow, oh))) in cases.into_iter().enumerate() {
            let img = noise(w, h, i as u32);
            let want = single.install(|| resize_with(Kernel::Plain, &img, ow, oh));
            for kernel in kernels {
                let got = resize_with(kernel, &img, ow, oh);
                let differing = got
                    .as_raw()
                    .iter()
                    .zip(want.as_raw())
                    .filter(|(a, b)| a != b)
                    .count();
                println!(
                    "{w}x{h} -> {ow}x{oh} {kernel:?}: {differing} differing values (allowed 0)"
                );
                assert_eq!(got.dimensions(), (ow, oh));
                assert_eq!(differing, 0);
            }
        }
    }
}
