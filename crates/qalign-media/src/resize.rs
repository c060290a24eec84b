//! Pillow's convolution resampler (`Image.resize` with BICUBIC and friends, `libImaging/Resample.c`),
//! reproduced bit for bit. The model was trained and evaluated on Pillow-resized pixels, and a
//! generic bicubic interpolation (OpenCV, torch) differs in many pixels.
//!
//! What makes it Pillow's:
//! * filter support widened by the downscale factor (antialiasing): support = filter_support ·
//!   max(in/out, 1), taps `xmin = max(0, trunc(center − support + 0.5))`,
//!   `xmax = min(in, trunc(center + support + 0.5))` around `center = (i + 0.5)·in/out`;
//! * weights `K((x + xmin − center + 0.5) / filterscale)` normalised to sum 1 in f64, then
//!   converted to 22-bit fixed point, rounded half away from zero;
//! * integer accumulation starting at 2^21, `>> 22`, clamped to 0..=255;
//! * the horizontal pass first, into an 8-bit intermediate holding only the rows the vertical
//!   pass reads, then the vertical pass; a pass whose dimension is unchanged is skipped, and an
//!   unchanged size returns a copy.

use image::RgbImage;

use crate::image::{SquareLayout, expand2square, square_layout};

/// Fractional bits of the fixed-point weights (Pillow's `PRECISION_BITS`).
const PRECISION_BITS: u32 = 32 - 8 - 2;
/// Rounding offset the accumulators start from.
const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Pillow's convolution filters. NEAREST (code 0) is a different algorithm in Pillow and is not
/// provided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResampleFilter {
    Box,
    Bilinear,
    Hamming,
    Bicubic,
    Lanczos,
}

impl ResampleFilter {
    /// Maps Pillow's `Image.Resampling` value (as stored in `preprocessor_config.json`).
    pub fn from_pillow_code(code: u32) -> Option<Self> {
        match code {
            1 => Some(Self::Lanczos),
            2 => Some(Self::Bilinear),
            3 => Some(Self::Bicubic),
            4 => Some(Self::Box),
            5 => Some(Self::Hamming),
            _ => None,
        }
    }

    /// Pillow's `Image.Resampling` value.
    pub fn pillow_code(self) -> u32 {
        match self {
            Self::Lanczos => 1,
            Self::Bilinear => 2,
            Self::Bicubic => 3,
            Self::Box => 4,
            Self::Hamming => 5,
        }
    }

    fn support(self) -> f64 {
        match self {
            Self::Box => 0.5,
            Self::Bilinear | Self::Hamming => 1.0,
            Self::Bicubic => 2.0,
            Self::Lanczos => 3.0,
        }
    }

    /// The kernel, with Pillow's operation order (it decides the last bits of the weights).
    fn kernel(self, x: f64) -> f64 {
        match self {
            Self::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Self::Bilinear => {
                let x = x.abs();
                if x < 1.0 { 1.0 - x } else { 0.0 }
            }
            Self::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let x = x * std::f64::consts::PI;
                    // Pillow writes these constants as C floats.
                    x.sin() / x * (f64::from(0.54f32) + f64::from(0.46f32) * x.cos())
                }
            }
            Self::Bicubic => {
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
            Self::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

/// Fixed-point taps of one resampling direction: output `i` reads `len[i]` inputs from
/// `start[i]` with weights `weights[i * ksize ..][..len[i]]`.
struct Taps {
    start: Vec<usize>,
    len: Vec<usize>,
    ksize: usize,
    weights: Vec<i32>,
}

impl Taps {
    fn new(in_size: usize, out_size: usize, filter: ResampleFilter) -> Self {
        let scale = in_size as f64 / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = filter.support() * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let inv_filterscale = 1.0 / filterscale;

        let mut start = Vec::with_capacity(out_size);
        let mut len = Vec::with_capacity(out_size);
        let mut weights = vec![0i32; out_size * ksize];
        let mut row = vec![0f64; ksize];
        for (i, dst) in weights.chunks_exact_mut(ksize).enumerate() {
            let center = (i as f64 + 0.5) * scale;
            // `as` truncates toward zero, like C's (int) cast.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let n = xmax.saturating_sub(xmin).min(ksize);
            let mut total = 0.0;
            for (x, w) in row[..n].iter_mut().enumerate() {
                *w = filter.kernel(((x + xmin) as f64 - center + 0.5) * inv_filterscale);
                total += *w;
            }
            for (w, fixed) in row[..n].iter_mut().zip(dst.iter_mut()) {
                if total != 0.0 {
                    *w /= total;
                }
                let scaled = *w * f64::from(1u32 << PRECISION_BITS);
                *fixed = if *w < 0.0 {
                    (-0.5 + scaled) as i32
                } else {
                    (0.5 + scaled) as i32
                };
            }
            start.push(xmin);
            len.push(n);
        }
        Taps {
            start,
            len,
            ksize,
            weights,
        }
    }

    fn weights(&self, i: usize) -> &[i32] {
        &self.weights[i * self.ksize..][..self.len[i]]
    }
}

#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow's `Image.resize((width, height), Image.BICUBIC)` on an RGB image.
pub fn resize_bicubic(src: &RgbImage, width: u32, height: u32) -> RgbImage {
    resize(src, width, height, ResampleFilter::Bicubic)
}

/// Pillow's `Image.resize((width, height), filter)` on an RGB image (no box, no reducing gap).
pub fn resize(src: &RgbImage, width: u32, height: u32, filter: ResampleFilter) -> RgbImage {
    if src.dimensions() == (width, height) {
        return src.clone();
    }
    resize_source(&Source::Plain(src), width, height, filter)
}

/// `resize(&expand2square(img, background), width, height, filter)` without building the padded
/// canvas: padding rows are resampled once and reused. Same bytes, less time and memory.
pub fn expand2square_and_resize(
    img: &RgbImage,
    background: [u8; 3],
    width: u32,
    height: u32,
    filter: ResampleFilter,
) -> RgbImage {
    let (w, h) = img.dimensions();
    if w == h {
        return resize(img, width, height, filter);
    }
    let layout = square_layout(w, h);
    if (layout.side, layout.side) == (width, height) {
        return expand2square(img, background);
    }
    let padded = Source::Padded {
        img,
        layout,
        background_row: background.repeat(layout.side as usize),
    };
    resize_source(&padded, width, height, filter)
}

/// Identifies a source row's content, so that identical padding rows are resampled only once.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RowKind {
    Image,
    Background,
}

/// The image being resampled: a plain image, or one seen through `expand2square`.
enum Source<'a> {
    Plain(&'a RgbImage),
    Padded {
        img: &'a RgbImage,
        layout: SquareLayout,
        background_row: Vec<u8>,
    },
}

impl Source<'_> {
    fn size(&self) -> (usize, usize) {
        match self {
            Source::Plain(img) => (img.width() as usize, img.height() as usize),
            Source::Padded { layout, .. } => (layout.side as usize, layout.side as usize),
        }
    }

    /// Row `y` as packed RGB; `scratch` (one row long) holds it when it has to be composed.
    fn row<'s>(&'s self, y: usize, scratch: &'s mut [u8]) -> (RowKind, &'s [u8]) {
        match self {
            Source::Plain(img) => {
                let stride = img.width() as usize * 3;
                (RowKind::Image, &img.as_raw()[y * stride..][..stride])
            }
            Source::Padded {
                img,
                layout,
                background_row,
            } => {
                let (w, h) = (img.width() as usize, img.height() as usize);
                let top = layout.y as usize;
                if y < top || y >= top + h {
                    return (RowKind::Background, background_row);
                }
                let stride = w * 3;
                let line = &img.as_raw()[(y - top) * stride..][..stride];
                if stride == background_row.len() {
                    return (RowKind::Image, line);
                }
                let left = layout.x as usize * 3;
                scratch.copy_from_slice(background_row);
                scratch[left..left + stride].copy_from_slice(line);
                (RowKind::Image, scratch)
            }
        }
    }
}

/// Which implementation of the row kernels runs. All give identical bytes (integer arithmetic);
/// they differ only in speed. Chosen once per resize from the CPU's features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Sse41,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Kernel {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                return Kernel::Avx2;
            }
            if std::arch::is_x86_feature_detected!("sse4.1") {
                return Kernel::Sse41;
            }
        }
        Kernel::Portable
    }
}

fn resize_source(src: &Source<'_>, width: u32, height: u32, filter: ResampleFilter) -> RgbImage {
    resize_with(src, width, height, filter, Kernel::detect())
}

fn resize_with(
    src: &Source<'_>,
    width: u32,
    height: u32,
    filter: ResampleFilter,
    kernel: Kernel,
) -> RgbImage {
    if width == 0 || height == 0 {
        return RgbImage::new(width, height);
    }
    let (in_w, in_h) = src.size();
    let (out_w, out_h) = (width as usize, height as usize);
    let vertical = Taps::new(in_h, out_h, filter);
    let need_horizontal = out_w != in_w;
    let need_vertical = out_h != in_h;

    // Rows of the source that the vertical pass reads.
    let first_row = vertical.start[0];
    let end_row = vertical.start[out_h - 1] + vertical.len[out_h - 1];

    let (rows, rows_width, row_offset) = match src {
        Source::Plain(img) if !need_horizontal => {
            (std::borrow::Cow::Borrowed(img.as_raw().as_slice()), in_w, 0)
        }
        _ if !need_horizontal => {
            // Only the vertical pass: lay out the rows it reads.
            let mut scratch = vec![0u8; in_w * 3];
            let mut rows = Vec::with_capacity((end_row - first_row) * in_w * 3);
            for y in first_row..end_row {
                rows.extend_from_slice(src.row(y, &mut scratch).1);
            }
            (std::borrow::Cow::Owned(rows), in_w, first_row)
        }
        _ => {
            let horizontal = Taps::new(in_w, out_w, filter);
            let tmp = horizontal_pass(src, first_row..end_row, &horizontal, kernel);
            (std::borrow::Cow::Owned(tmp), out_w, first_row)
        }
    };

    let data = if need_vertical {
        vertical_pass(&rows, rows_width, row_offset, &vertical, kernel)
    } else {
        rows.into_owned()
    };
    RgbImage::from_raw(width, height, data).expect("resampled buffer has width*height*3 bytes")
}

/// Resamples `rows` of `src` horizontally; returns the rows packed.
fn horizontal_pass(
    src: &Source<'_>,
    rows: std::ops::Range<usize>,
    taps: &Taps,
    kernel: Kernel,
) -> Vec<u8> {
    let (in_w, _) = src.size();
    let out_stride = taps.start.len() * 3;
    let mut out = vec![0u8; rows.len() * out_stride];

    // Padding rows are identical: resample the first, copy it to the others.
    let mut to_compute = Vec::with_capacity(rows.len());
    let mut copies = Vec::new();
    let mut background: Option<usize> = None;
    let mut scratch = vec![0u8; in_w * 3];
    for (y, dst_index) in rows.zip(0..) {
        match (src.row(y, &mut scratch).0, background) {
            (RowKind::Background, Some(first)) => copies.push((dst_index, first)),
            (kind, _) => {
                if kind == RowKind::Background {
                    background = Some(dst_index);
                }
                to_compute.push((y, dst_index));
            }
        }
    }

    match kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => {
            let mut scratch_b = vec![0u8; in_w * 3];
            // Two rows per instruction: lanes [r g b _ | r g b _] share each tap's weight.
            let mut widened = vec![[0i32; 8]; in_w];
            for pair in to_compute.chunks(2) {
                let &[(ya, da), (yb, db)] = pair else {
                    let (y, d) = pair[0];
                    let line = src.row(y, &mut scratch).1;
                    let dst = &mut out[d * out_stride..][..out_stride];
                    let mut single = vec![[0i32; 4]; in_w];
                    widen(line, &mut single);
                    // SAFETY: AVX2 (hence SSE4.1) is supported; `kernel` came from detection.
                    unsafe { sse41::horizontal_row(&single, taps, dst.as_chunks_mut::<3>().0) };
                    continue;
                };
                let line_a = src.row(ya, &mut scratch).1;
                let line_b = src.row(yb, &mut scratch_b).1;
                for ((wide, a), b) in widened
                    .iter_mut()
                    .zip(line_a.as_chunks::<3>().0)
                    .zip(line_b.as_chunks::<3>().0)
                {
                    *wide = [
                        i32::from(a[0]),
                        i32::from(a[1]),
                        i32::from(a[2]),
                        0,
                        i32::from(b[0]),
                        i32::from(b[1]),
                        i32::from(b[2]),
                        0,
                    ];
                }
                // `to_compute` is in increasing row order, so da < db.
                let (low, high) = out.split_at_mut(db * out_stride);
                let dst_a = low[da * out_stride..][..out_stride].as_chunks_mut::<3>().0;
                let dst_b = high[..out_stride].as_chunks_mut::<3>().0;
                // SAFETY: the CPU supports AVX2; `kernel` came from detection.
                unsafe { avx2::horizontal_row_pair(&widened, taps, dst_a, dst_b) };
            }
        }
        _ => {
            let mut widened = vec![[0i32; 4]; in_w];
            for &(y, d) in &to_compute {
                widen(src.row(y, &mut scratch).1, &mut widened);
                let dst = out[d * out_stride..][..out_stride].as_chunks_mut::<3>().0;
                match kernel {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: the CPU supports SSE4.1; `kernel` came from detection.
                    Kernel::Sse41 => unsafe { sse41::horizontal_row(&widened, taps, dst) },
                    _ => horizontal_row(&widened, taps, dst),
                }
            }
        }
    }
    for (dst_index, src_index) in copies {
        out.copy_within(
            src_index * out_stride..(src_index + 1) * out_stride,
            dst_index * out_stride,
        );
    }
    out
}

/// One RGB row as i32 lanes `[r, g, b, 0]`.
fn widen(line: &[u8], widened: &mut [[i32; 4]]) {
    for (wide, p) in widened.iter_mut().zip(line.as_chunks::<3>().0) {
        *wide = [i32::from(p[0]), i32::from(p[1]), i32::from(p[2]), 0];
    }
}

/// The portable horizontal kernel (the reference the SIMD kernels must equal).
fn horizontal_row(pixels: &[[i32; 4]], taps: &Taps, out: &mut [[u8; 3]]) {
    for (x, px) in out.iter_mut().enumerate() {
        let weights = taps.weights(x);
        let inputs = &pixels[taps.start[x]..][..weights.len()];
        let mut acc = [HALF; 4];
        for (p, &w) in inputs.iter().zip(weights) {
            for (a, &v) in acc.iter_mut().zip(p) {
                *a += v * w;
            }
        }
        *px = [clip8(acc[0]), clip8(acc[1]), clip8(acc[2])];
    }
}

/// Resamples vertically; `rows` holds source rows `row_offset..`, each `width` RGB pixels.
fn vertical_pass(
    rows: &[u8],
    width: usize,
    row_offset: usize,
    taps: &Taps,
    kernel: Kernel,
) -> Vec<u8> {
    let stride = width * 3;
    let out_h = taps.start.len();
    let mut out = vec![0u8; out_h * stride];
    let mut acc = vec![0i32; stride];
    for (y, dst) in out.chunks_exact_mut(stride).enumerate() {
        let first = (taps.start[y] - row_offset) * stride;
        let used = &rows[first..][..taps.len[y] * stride];
        match kernel {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU supports AVX2; `kernel` came from detection.
            Kernel::Avx2 => unsafe { avx2::vertical_row(used, taps.weights(y), &mut acc, dst) },
            _ => vertical_row(used, taps.weights(y), &mut acc, dst),
        }
    }
    out
}

/// The vertical kernel: contiguous rows, so the compiler vectorises it on its own.
#[inline(always)]
fn vertical_row(rows: &[u8], weights: &[i32], acc: &mut [i32], out: &mut [u8]) {
    acc.fill(HALF);
    for (line, &w) in rows.chunks_exact(acc.len()).zip(weights) {
        for (a, &p) in acc.iter_mut().zip(line) {
            *a += i32::from(p) * w;
        }
    }
    for (d, &a) in out.iter_mut().zip(acc.iter()) {
        *d = clip8(a);
    }
}

/// Kernels compiled with AVX2: the vertical one auto-vectorised with 8-lane i32 multiplies, the
/// horizontal one written out, resampling two rows at once.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::{
        _mm_cvtsi128_si64, _mm_packs_epi32, _mm_packus_epi16, _mm256_add_epi32,
        _mm256_castsi256_si128, _mm256_extracti128_si256, _mm256_loadu_si256, _mm256_mullo_epi32,
        _mm256_set1_epi32, _mm256_srai_epi32,
    };

    use super::{HALF, PRECISION_BITS, Taps};

    #[target_feature(enable = "avx2")]
    pub(super) fn vertical_row(rows: &[u8], weights: &[i32], acc: &mut [i32], out: &mut [u8]) {
        super::vertical_row(rows, weights, acc, out);
    }

    #[target_feature(enable = "avx2")]
    pub(super) fn horizontal_row_pair(
        pixels: &[[i32; 8]],
        taps: &Taps,
        out_a: &mut [[u8; 3]],
        out_b: &mut [[u8; 3]],
    ) {
        for (x, (pa, pb)) in out_a.iter_mut().zip(out_b.iter_mut()).enumerate() {
            let weights = taps.weights(x);
            let inputs = &pixels[taps.start[x]..][..weights.len()];
            let mut acc = _mm256_set1_epi32(HALF);
            for (p, &w) in inputs.iter().zip(weights) {
                // SAFETY: `p` is a valid, readable [i32; 8] (32 bytes); unaligned load.
                let v = unsafe { _mm256_loadu_si256(p.as_ptr().cast()) };
                acc = _mm256_add_epi32(acc, _mm256_mullo_epi32(v, _mm256_set1_epi32(w)));
            }
            // >> 22 then saturate to i16 and u8: the same as clamping to 0..=255.
            let shifted = _mm256_srai_epi32::<{ PRECISION_BITS as i32 }>(acc);
            let low = _mm256_castsi256_si128(shifted);
            let high = _mm256_extracti128_si256::<1>(shifted);
            let words = _mm_packs_epi32(low, high);
            let bytes = _mm_packus_epi16(words, words);
            let [r0, g0, b0, _, r1, g1, b1, _] = _mm_cvtsi128_si64(bytes).to_le_bytes();
            *pa = [r0, g0, b0];
            *pb = [r1, g1, b1];
        }
    }
}

/// The horizontal kernel with one SSE4.1 4-lane multiply-add per tap (R, G, B and a spare lane).
/// Left to itself the compiler vectorises across taps with costly shuffles.
#[cfg(target_arch = "x86_64")]
mod sse41 {
    use std::arch::x86_64::{
        _mm_add_epi32, _mm_cvtsi128_si32, _mm_loadu_si128, _mm_mullo_epi32, _mm_packs_epi32,
        _mm_packus_epi16, _mm_set1_epi32, _mm_srai_epi32,
    };

    use super::{HALF, PRECISION_BITS, Taps};

    #[target_feature(enable = "sse4.1")]
    pub(super) fn horizontal_row(pixels: &[[i32; 4]], taps: &Taps, out: &mut [[u8; 3]]) {
        for (x, px) in out.iter_mut().enumerate() {
            let weights = taps.weights(x);
            let inputs = &pixels[taps.start[x]..][..weights.len()];
            let mut acc = _mm_set1_epi32(HALF);
            for (p, &w) in inputs.iter().zip(weights) {
                // SAFETY: `p` is a valid, readable [i32; 4] (16 bytes); unaligned load.
                let v = unsafe { _mm_loadu_si128(p.as_ptr().cast()) };
                acc = _mm_add_epi32(acc, _mm_mullo_epi32(v, _mm_set1_epi32(w)));
            }
            // >> 22 then saturate to i16 and u8: the same as clamping to 0..=255.
            let shifted = _mm_srai_epi32::<{ PRECISION_BITS as i32 }>(acc);
            let bytes = _mm_packus_epi16(_mm_packs_epi32(shifted, shifted), shifted);
            let [r, g, b, _] = _mm_cvtsi128_si32(bytes).to_le_bytes();
            *px = [r, g, b];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const FILTERS: [ResampleFilter; 5] = [
        ResampleFilter::Box,
        ResampleFilter::Bilinear,
        ResampleFilter::Hamming,
        ResampleFilter::Bicubic,
        ResampleFilter::Lanczos,
    ];

    fn image_from(width: u32, height: u32, seed: u64) -> RgbImage {
        // Small xorshift so proptest only has to shrink the seed and the sizes.
        let mut state = seed | 1;
        RgbImage::from_fn(width, height, |_, _| {
            let mut next = || {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            };
            image::Rgb([next(), next(), next()])
        })
    }

    fn available_kernels() -> Vec<Kernel> {
        let mut kernels = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("sse4.1") {
                kernels.push(Kernel::Sse41);
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                kernels.push(Kernel::Avx2);
            }
        }
        kernels
    }

    #[test]
    fn pillow_filter_codes_round_trip() {
        for filter in FILTERS {
            assert_eq!(
                ResampleFilter::from_pillow_code(filter.pillow_code()),
                Some(filter)
            );
        }
        assert_eq!(ResampleFilter::from_pillow_code(0), None);
        assert_eq!(ResampleFilter::from_pillow_code(6), None);
        assert_eq!(ResampleFilter::Bicubic.pillow_code(), 3);
    }

    #[test]
    fn downscale_taps_follow_pillow_bounds() {
        // 1620 -> 448: scale 3.616..., support 7.23 -> up to 15 taps, 22-bit weights.
        let taps = Taps::new(1620, 448, ResampleFilter::Bicubic);
        assert_eq!(taps.ksize, 17);
        // Output 0: center 1.808, xmin = trunc(1.808 - 7.232 + 0.5) = trunc(-4.92) = -4 -> 0,
        // xmax = trunc(1.808 + 7.232 + 0.5) = 9.
        assert_eq!((taps.start[0], taps.len[0]), (0, 9));
        for i in 0..448 {
            let sum: i64 = taps.weights(i).iter().map(|&w| i64::from(w)).sum();
            assert!((sum - (1 << 22)).abs() <= 8, "output {i}: weight sum {sum}");
        }
        let last = 447;
        assert_eq!(taps.start[last] + taps.len[last], 1620);
    }

    #[test]
    fn unchanged_size_is_a_copy() {
        let img = image_from(13, 7, 5);
        for filter in FILTERS {
            assert!(resize(&img, 13, 7, filter) == img);
        }
    }

    #[test]
    fn zero_sized_requests_do_not_panic() {
        let img = image_from(5, 4, 1);
        assert_eq!(resize_bicubic(&img, 0, 3).dimensions(), (0, 3));
        let empty = RgbImage::new(0, 0);
        let out = resize_bicubic(&empty, 2, 2);
        assert!(out.as_raw().iter().all(|&v| v == 0));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn simd_kernels_equal_the_portable_kernel(
            w in 1u32..70, h in 1u32..70, ow in 1u32..90, oh in 1u32..90,
            seed in any::<u64>(), f in 0usize..5,
        ) {
            let img = image_from(w, h, seed);
            let source = Source::Plain(&img);
            let reference = resize_with(&source, ow, oh, FILTERS[f], Kernel::Portable);
            for kernel in available_kernels() {
                let out = resize_with(&source, ow, oh, FILTERS[f], kernel);
                prop_assert!(out == reference, "{:?} differs", kernel);
            }
        }

        #[test]
        fn fused_padding_equals_pad_then_resize(
            w in 1u32..60, h in 1u32..60, ow in 1u32..80, oh in 1u32..80,
            seed in any::<u64>(), bg in any::<[u8; 3]>(),
        ) {
            let img = image_from(w, h, seed);
            let two_step = resize_bicubic(&expand2square(&img, bg), ow, oh);
            let fused = expand2square_and_resize(&img, bg, ow, oh, ResampleFilter::Bicubic);
            prop_assert!(fused == two_step);
        }

        #[test]
        fn constant_images_stay_constant(
            w in 1u32..80, h in 1u32..80, ow in 1u32..120, oh in 1u32..120,
            colour in any::<[u8; 3]>(), f in 0usize..5,
        ) {
            let img = RgbImage::from_pixel(w, h, image::Rgb(colour));
            let out = resize(&img, ow, oh, FILTERS[f]);
            prop_assert_eq!(out.dimensions(), (ow, oh));
            prop_assert!(out.pixels().all(|p| p.0 == colour));
        }

        #[test]
        fn non_negative_filters_stay_within_the_input_range(
            w in 1u32..50, h in 1u32..50, ow in 1u32..70, oh in 1u32..70,
            seed in any::<u64>(), bilinear in any::<bool>(),
        ) {
            // Box and bilinear weights are all >= 0, so every output is a convex combination
            // (up to fixed-point rounding, which cannot leave the [min, max] range).
            let filter = if bilinear { ResampleFilter::Bilinear } else { ResampleFilter::Box };
            let img = image_from(w, h, seed);
            let out = resize(&img, ow, oh, filter);
            for c in 0..3 {
                let lo = img.pixels().map(|p| p[c]).min().unwrap();
                let hi = img.pixels().map(|p| p[c]).max().unwrap();
                prop_assert!(out.pixels().all(|p| (lo..=hi).contains(&p[c])));
            }
        }

        #[test]
        fn resizing_one_dimension_keeps_rows_or_columns_independent(
            w in 1u32..40, h in 1u32..40, ow in 1u32..60, seed in any::<u64>(),
        ) {
            // Height unchanged: Pillow skips the vertical pass, so each output row depends only
            // on the same input row.
            let img = image_from(w, h, seed);
            let out = resize_bicubic(&img, ow, h);
            for y in 0..h {
                let row = RgbImage::from_fn(w, 1, |x, _| *img.get_pixel(x, y));
                let single = resize_bicubic(&row, ow, 1);
                for x in 0..ow {
                    prop_assert_eq!(out.get_pixel(x, y), single.get_pixel(x, 0));
                }
            }
        }
    }
}
