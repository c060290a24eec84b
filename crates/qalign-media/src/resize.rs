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
    let (in_w, in_h) = src.dimensions();
    if (in_w, in_h) == (width, height) {
        return src.clone();
    }
    if width == 0 || height == 0 {
        return RgbImage::new(width, height);
    }
    let (in_w, in_h, out_w, out_h) = (
        in_w as usize,
        in_h as usize,
        width as usize,
        height as usize,
    );
    let vertical = Taps::new(in_h, out_h, filter);
    let need_horizontal = out_w != in_w;
    let need_vertical = out_h != in_h;

    // Rows of the source that the vertical pass reads.
    let first_row = vertical.start[0];
    let end_row = vertical.start[out_h - 1] + vertical.len[out_h - 1];

    let (rows, rows_width, row_offset) = if need_horizontal {
        let horizontal = Taps::new(in_w, out_w, filter);
        let tmp = horizontal_pass(src.as_raw(), in_w, first_row..end_row, &horizontal);
        (std::borrow::Cow::Owned(tmp), out_w, first_row)
    } else {
        (std::borrow::Cow::Borrowed(src.as_raw().as_slice()), in_w, 0)
    };

    let data = if need_vertical {
        vertical_pass(&rows, rows_width, row_offset, &vertical)
    } else {
        rows.into_owned()
    };
    RgbImage::from_raw(width, height, data).expect("resampled buffer has width*height*3 bytes")
}

/// Resamples each of `rows` of `src` (RGB, `in_w` wide) horizontally; returns the rows packed.
fn horizontal_pass(src: &[u8], in_w: usize, rows: std::ops::Range<usize>, taps: &Taps) -> Vec<u8> {
    let out_w = taps.start.len();
    let in_stride = in_w * 3;
    let out_stride = out_w * 3;
    let mut out = vec![0u8; rows.len() * out_stride];
    let mut previous: Option<&[u8]> = None;
    for (y, dst_index) in rows.zip(0..) {
        let line = &src[y * in_stride..][..in_stride];
        let (done, dst) = out.split_at_mut(dst_index * out_stride);
        let dst = &mut dst[..out_stride];
        // Padding rows repeat: reuse the previous result (identical input, identical output).
        if previous == Some(line) {
            dst.copy_from_slice(&done[done.len() - out_stride..]);
            continue;
        }
        previous = Some(line);
        for (x, px) in dst.chunks_exact_mut(3).enumerate() {
            let weights = taps.weights(x);
            let inputs = &line[taps.start[x] * 3..][..weights.len() * 3];
            let (mut r, mut g, mut b) = (HALF, HALF, HALF);
            for (p, &w) in inputs.chunks_exact(3).zip(weights) {
                r += i32::from(p[0]) * w;
                g += i32::from(p[1]) * w;
                b += i32::from(p[2]) * w;
            }
            px[0] = clip8(r);
            px[1] = clip8(g);
            px[2] = clip8(b);
        }
    }
    out
}

/// Resamples vertically; `rows` holds source rows `row_offset..`, each `width` RGB pixels.
fn vertical_pass(rows: &[u8], width: usize, row_offset: usize, taps: &Taps) -> Vec<u8> {
    let stride = width * 3;
    let out_h = taps.start.len();
    let mut out = vec![0u8; out_h * stride];
    let mut acc = vec![0i32; stride];
    for (y, dst) in out.chunks_exact_mut(stride).enumerate() {
        acc.fill(HALF);
        let first = taps.start[y] - row_offset;
        for (j, &w) in taps.weights(y).iter().enumerate() {
            let line = &rows[(first + j) * stride..][..stride];
            for (a, &p) in acc.iter_mut().zip(line) {
                *a += i32::from(p) * w;
            }
        }
        for (d, &a) in dst.iter_mut().zip(&acc) {
            *d = clip8(a);
        }
    }
    out
}
