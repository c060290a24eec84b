//! Fused CPU attention for unmasked inference: the ViT's self-attention over 1025 patches and the
//! abstractor's cross-attention.
//!
//! The composed form writes the whole `[B, H, Tq, Tk]` score tensor (16 MiB per quarter-width ViT
//! layer, 64 MiB at real width), then reads and rewrites it for the scale and the softmax, and
//! reads it again for `P·V`: memory traffic, not arithmetic, set its pace. Here each worker takes
//! one head and a block of query rows, keeps its score rows in cache, and goes straight from
//! `Q·Kᵀ` through the softmax to `P·V`, with the micro-kernels of [`crate::cpu_matmul`] and `K`,
//! `Vᵀ` packed once per head.
//!
//! The numbers are the composed form's: f32 scores, scaled, a max-shifted softmax in f32 and f32
//! sums, the output rounded once. bf16 inputs go through `vdpbf16ps` where the CPU has it (the
//! probabilities rounded to bf16 before `P·V`, as the composed form rounds them), and are widened
//! to f32 elsewhere.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use half::bf16;
use rayon::prelude::*;

use crate::cpu_matmul::{
    F32Kernel, has_avx512_bf16, matmul_bf16_dp_serial, matmul_f32_serial, pack_bf16_pairs,
    pack_bf16_pairs_transposed, pack_panels, pack_transposed,
};
use crate::cpu_simd::{bf16_to_f32, divide, exp_shifted_sum, f32_to_bf16, scale_max};

/// Query rows per task: 64 rows of 1025 scores stay in a core's L2.
const QUERY_BLOCK: usize = 64;
/// Values per task when converting between bf16 and f32.
const CONVERT_CHUNK: usize = 64 * 1024;

/// `softmax(q·kᵀ·scale)·v` for CPU `q` `[B, H, Tq, d]`, `k` `[B, H, Tk, d]`, `v` `[B, H, Tk, dv]`
/// (f32 or bf16, none tracking a gradient), or `None` where this kernel does not apply.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> candle_core::Result<Option<Tensor>> {
    match F32Kernel::detect() {
        Some(kernel) => attention_on(q, k, v, scale, kernel, has_avx512_bf16()),
        None => Ok(None),
    }
}

/// [`attention`] with the f32 `kernel`, and `vdpbf16ps` for bf16 inputs where `bf16_dp`.
fn attention_on(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    kernel: F32Kernel,
    bf16_dp: bool,
) -> candle_core::Result<Option<Tensor>> {
    let dtype = q.dtype();
    if !matches!(dtype, DType::F32 | DType::BF16)
        || k.dtype() != dtype
        || v.dtype() != dtype
        || !crate::cpu_kernels::applies(&[q, k, v])
    {
        return Ok(None);
    }
    let (b, h, _, d) = q.dims4()?;
    let (kb, kh, tk, kd) = k.dims4()?;
    let (vb, vh, vt, _) = v.dims4()?;
    if (kb, kh, kd) != (b, h, d) || (vb, vh, vt) != (b, h, tk) || tk == 0 || d == 0 {
        return Ok(None);
    }
    let op = AttentionOp {
        scale: scale as f32,
        kernel,
        bf16_dp,
    };
    Ok(Some(q.contiguous()?.apply_op3_no_bwd(
        &k.contiguous()?,
        &v.contiguous()?,
        &op,
    )?))
}

struct AttentionOp {
    scale: f32,
    kernel: F32Kernel,
    /// bf16 inputs multiply through `vdpbf16ps` (else they are widened to f32).
    bf16_dp: bool,
}

/// The values of a contiguous f32 or bf16 tensor, widened to f32 where needed.
fn widened<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
) -> candle_core::Result<std::borrow::Cow<'a, [f32]>> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("fused attention: input is not contiguous");
    };
    Ok(match storage {
        CpuStorage::F32(data) => std::borrow::Cow::Borrowed(&data[start..end]),
        CpuStorage::BF16(data) => {
            let data = &data[start..end];
            let mut wide = vec![0f32; data.len()];
            wide.par_chunks_mut(CONVERT_CHUNK)
                .zip(data.par_chunks(CONVERT_CHUNK))
                .for_each(|(w, d)| bf16_to_f32(d, w));
            std::borrow::Cow::Owned(wide)
        }
        _ => candle_core::bail!("fused attention: unsupported dtype {:?}", storage.dtype()),
    })
}

impl AttentionOp {
    /// f32 throughout: `Q·Kᵀ` and `P·V` with the f32 micro-kernel (AVX-512 or AVX2), `K` and `Vᵀ`
    /// packed per head.
    fn f32_products(&self, q: &[f32], k: &[f32], v: &[f32], dims: [usize; 5]) -> Vec<f32> {
        let [heads, tq, tk, d, dv] = dims;
        let (kernel, width) = (self.kernel, self.kernel.width());
        let packed: Vec<(Vec<f32>, Vec<f32>)> = (0..heads)
            .into_par_iter()
            .map(|i| {
                (
                    pack_panels(&k[i * tk * d..][..tk * d], tk, d, width),
                    pack_transposed(&v[i * tk * dv..][..tk * dv], tk, dv, width),
                )
            })
            .collect();
        let mut out = vec![0f32; heads * tq * dv];
        query_blocks(&mut out, tq, dv).for_each_init(Vec::new, |scores, (i, blk, o)| {
            let rows = o.len() / dv;
            let q_rows = &q[(i * tq + blk * QUERY_BLOCK) * d..][..rows * d];
            scores.resize(rows * tk, 0f32);
            let (k_packed, v_packed) = &packed[i];
            matmul_f32_serial(kernel, q_rows, rows, d, k_packed, tk, scores, tk);
            for row in scores.chunks_mut(tk) {
                softmax_scaled(row, self.scale);
            }
            matmul_f32_serial(kernel, scores, rows, tk, v_packed, dv, o, dv);
        });
        out
    }

    /// bf16 inputs with `vdpbf16ps`: f32 scores and softmax, the probabilities rounded to bf16
    /// before `P·V` (as the composed form's `probs.to_dtype(bf16)` does), f32 sums.
    fn bf16_products(&self, q: &[bf16], k: &[bf16], v: &[bf16], dims: [usize; 5]) -> Vec<f32> {
        let [heads, tq, tk, d, dv] = dims;
        // P's rows padded to whole k-pairs (the padding multiplies V's zero padding).
        let tk_even = tk.next_multiple_of(2);
        let packed: Vec<(Vec<u16>, Vec<u16>)> = (0..heads)
            .into_par_iter()
            .map(|i| {
                (
                    pack_bf16_pairs(&k[i * tk * d..][..tk * d], tk, d),
                    pack_bf16_pairs_transposed(&v[i * tk * dv..][..tk * dv], tk, dv),
                )
            })
            .collect();
        let mut out = vec![0f32; heads * tq * dv];
        query_blocks(&mut out, tq, dv).for_each_init(
            || (Vec::new(), Vec::new(), Vec::new()),
            |(scores, probs, scratch), (i, blk, o)| {
                let rows = o.len() / dv;
                let q_rows = &q[(i * tq + blk * QUERY_BLOCK) * d..][..rows * d];
                scores.resize(rows * tk, 0f32);
                probs.resize(rows * tk_even, bf16::ZERO);
                let (k_packed, v_packed) = &packed[i];
                matmul_bf16_dp_serial(q_rows, rows, d, d / 2, k_packed, tk, scores, tk, scratch);
                for (row, p) in scores.chunks_mut(tk).zip(probs.chunks_mut(tk_even)) {
                    softmax_scaled(row, self.scale);
                    f32_to_bf16(row, &mut p[..tk]);
                }
                matmul_bf16_dp_serial(
                    probs,
                    rows,
                    tk_even,
                    tk_even / 2,
                    v_packed,
                    dv,
                    o,
                    dv,
                    scratch,
                );
            },
        );
        out
    }
}

/// The output split into (head, query block, rows of that block) tasks.
fn query_blocks(
    out: &mut [f32],
    tq: usize,
    dv: usize,
) -> impl ParallelIterator<Item = (usize, usize, &mut [f32])> {
    out.par_chunks_mut(tq * dv)
        .enumerate()
        .flat_map(move |(i, head_out)| {
            head_out
                .par_chunks_mut(QUERY_BLOCK * dv)
                .enumerate()
                .map(move |(blk, o)| (i, blk, o))
        })
}

/// The values of a contiguous bf16 tensor.
fn bf16_slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<&'a [bf16]> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("fused attention: input is not contiguous");
    };
    Ok(&storage.as_slice::<bf16>()?[start..end])
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "qalign-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_layout: &Layout,
        k: &CpuStorage,
        k_layout: &Layout,
        v: &CpuStorage,
        v_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, h, tq, d) = q_layout.shape().dims4()?;
        let (_, _, tk, _) = k_layout.shape().dims4()?;
        let (_, _, _, dv) = v_layout.shape().dims4()?;
        let heads = b * h;
        let dtype = q.dtype();
        let out = if dtype == DType::BF16 && d % 2 == 0 && self.bf16_dp {
            self.bf16_products(
                bf16_slice(q, q_layout)?,
                bf16_slice(k, k_layout)?,
                bf16_slice(v, v_layout)?,
                [heads, tq, tk, d, dv],
            )
        } else {
            let (q, k, v) = (
                widened(q, q_layout)?,
                widened(k, k_layout)?,
                widened(v, v_layout)?,
            );
            self.f32_products(&q, &k, &v, [heads, tq, tk, d, dv])
        };
        let storage = match dtype {
            DType::BF16 => {
                let mut narrow = vec![bf16::ZERO; out.len()];
                narrow
                    .par_chunks_mut(CONVERT_CHUNK)
                    .zip(out.par_chunks(CONVERT_CHUNK))
                    .for_each(|(n, o)| f32_to_bf16(o, n));
                CpuStorage::BF16(narrow)
            }
            _ => CpuStorage::F32(out),
        };
        Ok((storage, Shape::from((b, h, tq, dv))))
    }
}

/// `row ← softmax(row·scale)`, as candle's softmax does it: shift by the max, exponentiate, divide by
/// the sum (all f32; the sum in 16 lanes, `exp` within 2 ulp).
fn softmax_scaled(row: &mut [f32], scale: f32) {
    let max = scale_max(row, scale);
    let sum = exp_shifted_sum(row, max);
    divide(row, sum);
}

#[cfg(test)]
mod tests {
    use candle_core::Device;
    use proptest::prelude::*;

    use super::*;

    fn values(len: usize, seed: u32, amplitude: f32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let h = (i as u32)
                    .wrapping_mul(2_654_435_761)
                    .wrapping_add(seed.wrapping_mul(40_503));
                ((h >> 8) as f32 / (1 << 24) as f32 * 2.0 - 1.0) * amplitude
            })
            .collect()
    }

    /// The attention of one head in f64.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        tq: usize,
        tk: usize,
        d: usize,
        dv: usize,
        scale: f64,
    ) -> Vec<f64> {
        let mut out = vec![0f64; tq * dv];
        for i in 0..tq {
            let scores: Vec<f64> = (0..tk)
                .map(|j| {
                    (0..d)
                        .map(|x| q[i * d + x] as f64 * k[j * d + x] as f64)
                        .sum::<f64>()
                        * scale
                })
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let exp: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = exp.iter().sum();
            for (j, e) in exp.iter().enumerate() {
                for x in 0..dv {
                    out[i * dv + x] += e / sum * v[j * dv + x] as f64;
                }
            }
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn check(
        b: usize,
        h: usize,
        tq: usize,
        tk: usize,
        d: usize,
        dv: usize,
        dtype: DType,
        seed: u32,
    ) {
        let tensor = |dims: (usize, usize, usize, usize), seed: u32, amplitude: f32| {
            let len = dims.0 * dims.1 * dims.2 * dims.3;
            Tensor::from_vec(values(len, seed, amplitude), dims, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        };
        let q = tensor((b, h, tq, d), seed, 2.0);
        let k = tensor((b, h, tk, d), seed + 1, 2.0);
        let v = tensor((b, h, tk, dv), seed + 2, 1.0);
        let scale = (d as f64).powf(-0.5);
        if F32Kernel::detect().is_none() {
            assert!(attention(&q, &k, &v, scale).unwrap().is_none());
        }
        for (kernel, bf16_dp) in kernels() {
            let got = attention_on(&q, &k, &v, scale, kernel, bf16_dp)
                .unwrap()
                .expect("the kernel applies to f32 and bf16");
            check_against_reference(&got, &q, &k, &v, dv, scale, dtype);
        }
    }

    /// The kernel variants this CPU can run: each f32 kernel, and `vdpbf16ps` where it exists.
    fn kernels() -> Vec<(F32Kernel, bool)> {
        let mut out = Vec::new();
        if crate::cpu_matmul::has_avx512f() {
            out.push((F32Kernel::Avx512, false));
            if has_avx512_bf16() {
                out.push((F32Kernel::Avx512, true));
            }
        }
        if crate::cpu_matmul::has_avx2_fma() {
            out.push((F32Kernel::Avx2, false));
        }
        out
    }

    fn check_against_reference(
        got: &Tensor,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        dv: usize,
        scale: f64,
        dtype: DType,
    ) {
        let (b, h, tq, d) = q.dims4().unwrap();
        let tk = k.dims4().unwrap().2;
        assert_eq!(got.dims(), &[b, h, tq, dv]);
        assert_eq!(got.dtype(), dtype);
        let flat = crate::cpu_matmul::tests::f32_values;
        let (got, q, k, v) = (flat(got), flat(q), flat(k), flat(v));
        for head in 0..b * h {
            let want = reference(
                &q[head * tq * d..][..tq * d],
                &k[head * tk * d..][..tk * d],
                &v[head * tk * dv..][..tk * dv],
                tq,
                tk,
                d,
                dv,
                scale,
            );
            for (i, &w) in want.iter().enumerate() {
                let g = got[head * tq * dv + i] as f64;
                // Outputs are convex combinations of values in [-1, 1]; f32 scores and sums are
                // good to a few ulps of the largest terms. In bf16 the output rounding is 2⁻⁸
                // relative, and the probabilities rounded to bf16 before P·V (as in the composed
                // form; bf16's unit roundoff is 2⁻⁸, each probability moving by up to 2⁻⁸ of
                // itself) move a combination of |v| ≤ 1 by up to 2⁻⁸. (h 1, tq 38, tk 46, d 56,
                // seed 609 moves it by 0.00257 > 2⁻⁹, with the kernel equal to a reference that
                // rounds the probabilities.)
                let tol = match dtype {
                    DType::F32 => 1e-5 * (d as f64).sqrt().max(1.0) + 1e-6 * (tk as f64).sqrt(),
                    _ => w.abs() / 256.0 + 1.0 / 256.0 + 1e-5 * (d as f64).sqrt(),
                };
                assert!(
                    (g - w).abs() <= tol,
                    "head {head} value {i}: {g} vs {w} (tol {tol})"
                );
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn f32_attention_matches_the_reference(b in 1usize..3, h in 1usize..4, tq in 1usize..150, tk in 1usize..150, d in 1usize..80, dv in 1usize..80, seed in 0u32..1000) {
            check(b, h, tq, tk, d, dv, DType::F32, seed);
        }

        #[test]
        fn bf16_attention_matches_the_reference(h in 1usize..3, tq in 1usize..100, tk in 1usize..100, d in 1usize..70, seed in 0u32..1000) {
            check(1, h, tq, tk, d, d, DType::BF16, seed);
        }
    }

    #[test]
    fn a_vit_sized_head_matches_the_reference() {
        check(1, 2, 1025, 1025, 64, 64, DType::F32, 7);
        check(1, 1, 1025, 1025, 64, 64, DType::BF16, 8);
    }

    #[test]
    fn other_dtypes_and_shapes_are_left_to_the_composed_form() {
        let t = |dims: (usize, usize, usize, usize), dtype| {
            Tensor::zeros(dims, dtype, &Device::Cpu).unwrap()
        };
        let f16 = t((1, 1, 4, 8), DType::F16);
        assert!(attention(&f16, &f16, &f16, 1.0).unwrap().is_none());
        let q = t((1, 1, 4, 8), DType::F32);
        let k = t((1, 1, 5, 8), DType::F32);
        let v_short = t((1, 1, 4, 8), DType::F32);
        assert!(attention(&q, &k, &v_short, 1.0).unwrap().is_none());
    }
}
