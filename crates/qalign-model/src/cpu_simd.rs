//! Vectorised inner loops shared by the fused CPU kernels: `exp` for softmax and QuickGELU, and
//! bf16 ↔ f32 conversion of whole rows.
//!
//! Scalar `f32::exp` is a libm call per value, and `half`'s conversions go one value at a time:
//! in the ViT's attention (1025² scores per head and layer) and at every bf16 matmul's output
//! they cost as much as the arithmetic around them. Each function here has an AVX-512 body, used
//! where the CPU has it, and a scalar body that gives the same results (conversions) or results
//! within the stated error (`exp`) everywhere else; the softmax's `exp` also has an AVX2 body.

use half::bf16;

use crate::cpu_matmul::{has_avx2_fma, has_avx512f};

/// Cephes' `expf`: ln 2 in two parts for the reduction `r = x − n·ln 2`, and the coefficients of its
/// polynomial for `(exp(r) − 1 − r)/r²`, highest degree first.
#[cfg(target_arch = "x86_64")]
const LN2_HI: f32 = 0.693_359_4;
#[cfg(target_arch = "x86_64")]
const LN2_LO: f32 = -2.121_944_4e-4;
#[cfg(target_arch = "x86_64")]
const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// `row[i] ← exp(row[i] − shift)`, returning the sum of the new values (f32 lanes, then summed).
/// The vector `exp` is within 2 ulp of the exact value (Cephes' `expf` polynomial); it keeps NaN,
/// and flushes to zero below the smallest subnormal.
pub(crate) fn exp_shifted_sum(row: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx512f() {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { avx512::exp_shifted_sum(row, shift) };
        }
        if has_avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { avx2::exp_shifted_sum(row, shift) };
        }
    }
    let mut sum = 0f32;
    for x in row.iter_mut() {
        *x = (*x - shift).exp();
        sum += *x;
    }
    sum
}

/// `row[i] ← row[i]·scale`, returning the largest new value (−∞ for an empty row).
pub(crate) fn scale_max(row: &mut [f32], scale: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx512f() {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { avx512::scale_max(row, scale) };
    }
    let mut max = f32::NEG_INFINITY;
    for x in row.iter_mut() {
        *x *= scale;
        max = max.max(*x);
    }
    max
}

/// `row[i] ← row[i] / divisor` (a true division, as candle's softmax does).
pub(crate) fn divide(row: &mut [f32], divisor: f32) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512f() {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { avx512::divide(row, divisor) };
    }
    for x in row.iter_mut() {
        *x /= divisor;
    }
}

/// QuickGELU, `z·sigmoid(1.702·z) = z / (1 + exp(−1.702·z))`, in place.
pub(crate) fn quick_gelu(row: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512f() {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { avx512::sigmoid_scaled(row, -1.702) };
    }
    for z in row.iter_mut() {
        *z = *z / (1.0 + (-1.702 * *z).exp());
    }
}

/// SiLU, `z / (1 + exp(−z))`, in place.
pub(crate) fn silu(row: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512f() {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { avx512::sigmoid_scaled(row, -1.0) };
    }
    for z in row.iter_mut() {
        *z = *z / (1.0 + (-*z).exp());
    }
}

/// `dst[i] = src[i]` widened (exact).
pub(crate) fn bf16_to_f32(src: &[bf16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "bf16 → f32: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if has_avx512f() {
        // SAFETY: the CPU has AVX-512F; the lengths match.
        return unsafe { avx512::bf16_to_f32(src, dst) };
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

/// `dst[i] = src[i]` rounded to nearest-even, bit for bit as `bf16::from_f32` (NaN stays NaN).
pub(crate) fn f32_to_bf16(src: &[f32], dst: &mut [bf16]) {
    f32_plus_to_bf16(src, None, dst);
}

/// `dst[i] = src[i] + bias[i]` (f32 sum) rounded as [`f32_to_bf16`] rounds.
pub(crate) fn f32_plus_to_bf16(src: &[f32], bias: Option<&[f32]>, dst: &mut [bf16]) {
    assert_eq!(src.len(), dst.len(), "f32 → bf16: lengths differ");
    assert!(
        bias.is_none_or(|b| b.len() == src.len()),
        "f32 → bf16: bias length differs"
    );
    #[cfg(target_arch = "x86_64")]
    if has_avx512f() {
        // SAFETY: the CPU has AVX-512F; the lengths match.
        return unsafe { avx512::f32_plus_to_bf16(src, bias, dst) };
    }
    for (i, (d, s)) in dst.iter_mut().zip(src).enumerate() {
        *d = bf16::from_f32(s + bias.map_or(0.0, |b| b[i]));
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use half::bf16;

    /// Lanes of the last, partial vector of a row of `len` values starting at `i`.
    fn tail_mask(len: usize, i: usize) -> __mmask16 {
        let left = len - i;
        if left >= 16 {
            0xffff
        } else {
            (1u16 << left) - 1
        }
    }

    /// `exp(x)` per lane: `x = n·ln2 + r` with |r| ≤ ln2/2, Cephes' degree-6 polynomial for
    /// `exp(r)`, and `2ⁿ` applied by `vscalefps` (which rounds subnormals and overflows to ∞).
    #[target_feature(enable = "avx512f")]
    fn exp(x: __m512) -> __m512 {
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
        let clamped = _mm512_min_ps(
            _mm512_max_ps(x, _mm512_set1_ps(-104.0)),
            _mm512_set1_ps(89.0),
        );
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(clamped, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(super::LN2_HI), clamped);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(super::LN2_LO), r);
        let mut p = _mm512_set1_ps(super::EXP_POLY[0]);
        for c in &super::EXP_POLY[1..] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
        }
        let r2 = _mm512_mul_ps(r, r);
        let y = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0)));
        _mm512_mask_blend_ps(nan, _mm512_scalef_ps(y, n), x)
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn exp_shifted_sum(row: &mut [f32], shift: f32) -> f32 {
        let len = row.len();
        let ptr = row.as_mut_ptr();
        let shift = _mm512_set1_ps(shift);
        let mut sum = _mm512_setzero_ps();
        let mut i = 0;
        while i < len {
            let mask = tail_mask(len, i);
            // SAFETY: the mask keeps every access inside the row.
            unsafe {
                let x = _mm512_maskz_loadu_ps(mask, ptr.add(i));
                let e = _mm512_maskz_mov_ps(mask, exp(_mm512_sub_ps(x, shift)));
                _mm512_mask_storeu_ps(ptr.add(i), mask, e);
                sum = _mm512_add_ps(sum, e);
            }
            i += 16;
        }
        _mm512_reduce_add_ps(sum)
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn divide(row: &mut [f32], divisor: f32) {
        let len = row.len();
        let ptr = row.as_mut_ptr();
        let divisor = _mm512_set1_ps(divisor);
        let mut i = 0;
        while i < len {
            let mask = tail_mask(len, i);
            // SAFETY: the mask keeps every access inside the row.
            unsafe {
                let x = _mm512_maskz_loadu_ps(mask, ptr.add(i));
                _mm512_mask_storeu_ps(ptr.add(i), mask, _mm512_div_ps(x, divisor));
            }
            i += 16;
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn scale_max(row: &mut [f32], scale: f32) -> f32 {
        let len = row.len();
        let ptr = row.as_mut_ptr();
        let scale = _mm512_set1_ps(scale);
        let mut max = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut i = 0;
        while i < len {
            let mask = tail_mask(len, i);
            // SAFETY: the mask keeps every access inside the row.
            unsafe {
                let x = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, ptr.add(i)), scale);
                _mm512_mask_storeu_ps(ptr.add(i), mask, x);
                max = _mm512_mask_max_ps(max, mask, max, x);
            }
            i += 16;
        }
        _mm512_reduce_max_ps(max)
    }

    /// `z ← z / (1 + exp(k·z))`: SiLU for `k = −1`, QuickGELU for `k = −1.702`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn sigmoid_scaled(row: &mut [f32], k: f32) {
        let len = row.len();
        let ptr = row.as_mut_ptr();
        let one = _mm512_set1_ps(1.0);
        let k = _mm512_set1_ps(k);
        let mut i = 0;
        while i < len {
            let mask = tail_mask(len, i);
            // SAFETY: the mask keeps every access inside the row.
            unsafe {
                let z = _mm512_maskz_loadu_ps(mask, ptr.add(i));
                let e = exp(_mm512_mul_ps(k, z));
                _mm512_mask_storeu_ps(ptr.add(i), mask, _mm512_div_ps(z, _mm512_add_ps(one, e)));
            }
            i += 16;
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn bf16_to_f32(src: &[bf16], dst: &mut [f32]) {
        let whole = src.len() / 16 * 16;
        let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
        for i in (0..whole).step_by(16) {
            // SAFETY: 16 values from i lie inside both slices (of equal length).
            unsafe {
                let half = _mm256_loadu_si256(s.add(i).cast());
                let wide = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(half));
                _mm512_storeu_ps(d.add(i), _mm512_castsi512_ps(wide));
            }
        }
        for (d, s) in dst[whole..].iter_mut().zip(&src[whole..]) {
            *d = s.to_f32();
        }
    }

    /// Full vectors only (a masked narrowing store is slow on some CPUs); the tail goes through
    /// `bf16::from_f32`, which rounds the same way.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn f32_plus_to_bf16(src: &[f32], bias: Option<&[f32]>, dst: &mut [bf16]) {
        let whole = src.len() / 16 * 16;
        let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
        let one = _mm512_set1_epi32(1);
        let half_ulp = _mm512_set1_epi32(0x7fff);
        let quiet = _mm512_set1_epi32(0x40);
        for i in (0..whole).step_by(16) {
            // SAFETY: 16 values from i lie inside both slices (of equal length).
            unsafe {
                let mut v = _mm512_loadu_ps(s.add(i));
                if let Some(b) = bias {
                    v = _mm512_add_ps(v, _mm512_loadu_ps(b.as_ptr().add(i)));
                }
                let bits = _mm512_castps_si512(v);
                let high = _mm512_srli_epi32::<16>(bits);
                let lsb = _mm512_and_si512(high, one);
                let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(
                    bits,
                    _mm512_add_epi32(half_ulp, lsb),
                ));
                let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
                let out = _mm512_mask_or_epi32(rounded, nan, high, quiet);
                _mm256_storeu_si256(d.add(i).cast(), _mm512_cvtepi32_epi16(out));
            }
        }
        for i in whole..src.len() {
            dst[i] = bf16::from_f32(src[i] + bias.map_or(0.0, |b| b[i]));
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// `exp(x)` per lane, as [`super::avx512`]'s: the same reduction and polynomial, with `2ⁿ`
    /// applied as two exact powers of two, `2^⌊n/2⌋` then `2^(n−⌊n/2⌋)` (each a normal number for
    /// n in −150..=128), so a result is rounded once, as `vscalefps` rounds it.
    #[target_feature(enable = "avx2,fma")]
    fn exp(x: __m256) -> __m256 {
        let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x);
        let clamped = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(-104.0)),
            _mm256_set1_ps(89.0),
        );
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(clamped, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(super::LN2_HI), clamped);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(super::LN2_LO), r);
        let mut p = _mm256_set1_ps(super::EXP_POLY[0]);
        for c in &super::EXP_POLY[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
        }
        let r2 = _mm256_mul_ps(r, r);
        let y = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0)));
        let n = _mm256_cvtps_epi32(n);
        let half = _mm256_srai_epi32::<1>(n);
        let pow2 = |e: __m256i| {
            _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
                e,
                _mm256_set1_epi32(127),
            )))
        };
        let e = _mm256_mul_ps(
            _mm256_mul_ps(y, pow2(half)),
            pow2(_mm256_sub_epi32(n, half)),
        );
        _mm256_blendv_ps(e, x, nan)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_shifted_sum(row: &mut [f32], shift: f32) -> f32 {
        let shift = _mm256_set1_ps(shift);
        let mut sum = _mm256_setzero_ps();
        let mut chunks = row.chunks_exact_mut(8);
        for chunk in &mut chunks {
            // SAFETY: the chunk holds 8 values.
            unsafe {
                let e = exp(_mm256_sub_ps(_mm256_loadu_ps(chunk.as_ptr()), shift));
                _mm256_storeu_ps(chunk.as_mut_ptr(), e);
                sum = _mm256_add_ps(sum, e);
            }
        }
        let tail = chunks.into_remainder();
        if !tail.is_empty() {
            let mut lanes = [0f32; 8];
            lanes[..tail.len()].copy_from_slice(tail);
            // SAFETY: `lanes` holds 8 values.
            unsafe {
                let e = exp(_mm256_sub_ps(_mm256_loadu_ps(lanes.as_ptr()), shift));
                _mm256_storeu_ps(lanes.as_mut_ptr(), e);
            }
            lanes[tail.len()..].fill(0.0);
            tail.copy_from_slice(&lanes[..tail.len()]);
            // SAFETY: as above.
            sum = _mm256_add_ps(sum, unsafe { _mm256_loadu_ps(lanes.as_ptr()) });
        }
        let mut lanes = [0f32; 8];
        // SAFETY: as above.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
        lanes.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn exp_is_within_two_ulp(values in prop::collection::vec(-84.0f32..85.0, 1..70), shift in -3.0f32..3.0) {
            for exp_sum in exp_bodies() {
            let mut row = values.clone();
            let sum = exp_sum(&mut row, shift);
            let mut want_sum = 0f64;
            for (&x, &got) in values.iter().zip(&row) {
                let want = ((x - shift) as f64).exp();
                want_sum += want;
                if want < f32::MAX as f64 && want > f32::MIN_POSITIVE as f64 {
                    prop_assert!(ulps(got, want as f32) <= 2, "exp({}) = {got}, want {want}", x - shift);
                }
            }
            prop_assert!(((sum as f64) - want_sum).abs() <= want_sum * 1e-5);
            }
        }

        #[test]
        fn conversions_match_half(bits in prop::collection::vec(any::<u32>(), 0..70)) {
            let values: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
            let mut narrow = vec![bf16::ZERO; values.len()];
            f32_to_bf16(&values, &mut narrow);
            for (&v, n) in values.iter().zip(&narrow) {
                prop_assert_eq!(n.to_bits(), bf16::from_f32(v).to_bits(), "{}", v);
            }
            let bias: Vec<f32> = (0..values.len()).map(|i| i as f32 * 0.25 - 3.0).collect();
            let mut biased = vec![bf16::ZERO; values.len()];
            f32_plus_to_bf16(&values, Some(&bias), &mut biased);
            for ((&v, &b), n) in values.iter().zip(&bias).zip(&biased) {
                prop_assert_eq!(n.to_bits(), bf16::from_f32(v + b).to_bits(), "{} + {}", v, b);
            }
            let mut wide = vec![0f32; narrow.len()];
            bf16_to_f32(&narrow, &mut wide);
            for (n, w) in narrow.iter().zip(&wide) {
                prop_assert_eq!(w.to_bits(), n.to_f32().to_bits());
            }
        }

        #[test]
        fn scale_max_silu_and_quick_gelu_match_scalar(values in prop::collection::vec(-30.0f32..30.0, 0..70), scale in 0.01f32..2.0) {
            let mut row = values.clone();
            let max = scale_max(&mut row, scale);
            let want: Vec<f32> = values.iter().map(|v| v * scale).collect();
            prop_assert_eq!(&row, &want);
            prop_assert_eq!(max, want.iter().copied().fold(f32::NEG_INFINITY, f32::max));
            let mut divided = values.clone();
            divide(&mut divided, scale);
            let want: Vec<f32> = values.iter().map(|v| v / scale).collect();
            prop_assert_eq!(&divided, &want);
            let mut gelu = values.clone();
            quick_gelu(&mut gelu);
            for (&z, &g) in values.iter().zip(&gelu) {
                // The product is rounded to f32 before the exponential, as in the scalar form.
                let want = z as f64 / (1.0 + ((-1.702 * z) as f64).exp());
                prop_assert!((g as f64 - want).abs() <= want.abs() * 1e-6 + 1e-30, "{z}: {g} vs {want}");
            }
            let mut silu_row = values.clone();
            silu(&mut silu_row);
            for (&z, &g) in values.iter().zip(&silu_row) {
                let want = z as f64 / (1.0 + (-z as f64).exp());
                prop_assert!((g as f64 - want).abs() <= want.abs() * 1e-6 + 1e-30, "{z}: {g} vs {want}");
            }
        }
    }

    /// `exp_shifted_sum` and each of its vector bodies this CPU can run.
    fn exp_bodies() -> Vec<fn(&mut [f32], f32) -> f32> {
        let mut out: Vec<fn(&mut [f32], f32) -> f32> = vec![exp_shifted_sum];
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA.
            out.push(|row, shift| unsafe { avx2::exp_shifted_sum(row, shift) });
        }
        out
    }

    #[test]
    fn exp_handles_the_edges() {
        for exp_sum in exp_bodies() {
            let mut row = [
                f32::NAN,
                f32::NEG_INFINITY,
                -200.0,
                0.0,
                100.0,
                f32::INFINITY,
            ];
            exp_sum(&mut row, 0.0);
            assert!(row[0].is_nan());
            assert_eq!(&row[1..4], &[0.0, 0.0, 1.0]);
            assert_eq!(row[4], f32::INFINITY);
            assert_eq!(row[5], f32::INFINITY);
        }
    }

    #[test]
    fn the_avx2_exp_equals_the_avx512_exp() {
        #[cfg(target_arch = "x86_64")]
        if has_avx512f() && has_avx2_fma() {
            // Every 997th f32 from −110 to 95 (subnormal, overflowing and ordinary results), and
            // rows of every tail length.
            let values: Vec<f32> = (0..f32::to_bits(110.0) / 997)
                .flat_map(|i| {
                    let v = f32::from_bits(i * 997);
                    [v, -v]
                })
                .filter(|v| (-110.0..95.0).contains(v))
                .collect();
            for len in [values.len(), 1, 7, 9, 15] {
                let (mut wide, mut narrow) = (values[..len].to_vec(), values[..len].to_vec());
                // SAFETY: the CPU has both.
                unsafe {
                    avx512::exp_shifted_sum(&mut wide, 0.5);
                    avx2::exp_shifted_sum(&mut narrow, 0.5);
                }
                for (i, (w, n)) in wide.iter().zip(&narrow).enumerate() {
                    assert_eq!(w.to_bits(), n.to_bits(), "exp({} − 0.5)", values[i]);
                }
            }
        }
    }
}
