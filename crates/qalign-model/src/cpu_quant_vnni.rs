//! Q4K and Q8_0 matrix products in 8-bit integers on CPUs with AVX512-VNNI or AVX-VNNI, reading
//! the weight blocks as they are stored.
//!
//! An f32 FMA does one multiply-add per lane; `vpdpbusd` does four (u8 × i8 into i32), so on
//! these CPUs integer products can run up to twice as fast as the f32 ones of [`crate::cpu_quant`]
//! (which decode the blocks to f32). candle's VNNI kernels get that speed by keeping a repacked
//! copy of every weight beside its blocks; here each worker unpacks its weight rows into a u8
//! scratch in cache (the order along `k` stays), so only the blocks stay in memory:
//! - Q4K: the nibbles (a mask and a shift), with each 32-value sub-block's `d·scale` and
//!   `dmin·min` (value = `d·scale·q − dmin·min`);
//! - Q8_0: `q + 128` as u8 (vpdpbusd's unsigned operand), so value = `d·(q + 128) − 128·d`, the
//!   same form with scale `d` and min `128·d`.
//!
//! As in ggml's and candle's products, each activation row is rounded to 8 bits per block
//! (`q = round(x·127/max|x|)`): per 256 values for Q4K (ggml's Q8K), per 32 for Q8_0 (ggml's
//! Q8_0), so the error is the weights' quantisation plus that rounding.
//!
//! Two kernels share that layout: 512-bit (AVX512-VNNI: servers, AMD Zen 4 and later) and
//! 256-bit (AVX-VNNI: Intel's laptop and desktop cores since Alder Lake, which have no AVX-512).
//! They sum the same products in the same order, so their outputs are equal to the last bit.

use std::arch::x86_64::*;

use rayon::prelude::*;

use crate::cpu_matmul::OutPtr;
use crate::cpu_quant::{Format, Q4K_BYTES, Q4K_VALUES, q4k_factors};

/// Values per sub-block (one weight scale and min, and one activation step, each).
const SUB: usize = 32;
/// Activation rows per panel: the 16 i32 lanes of a vector.
const LANES: usize = 16;
/// Weight rows per micro-kernel call (each broadcast against 1 or 2 panels).
const MR: usize = 4;
/// Weight rows a worker unpacks at a time.
const GROUP: usize = 32;
/// Activation rows a worker multiplies with one unpacked group.
const CHUNK: usize = 128;

/// Which integer kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    /// `vpdpbusd` on 512-bit vectors (AVX-512F, BW and VNNI).
    Avx512,
    /// `vpdpbusd` on 256-bit vectors (AVX2, FMA and AVX-VNNI).
    Avx256,
}

impl Isa {
    /// The kernel this CPU and `QALIGN_CPU_KERNELS` allow, if any: 512-bit where AVX-512 may run,
    /// else 256-bit unless the mode is `avx2` (CPUs without AVX-VNNI) or `composed`.
    pub(crate) fn detect() -> Option<Self> {
        use crate::cpu_kernels::{KernelMode, mode};
        if Self::Avx512.supported() {
            Some(Self::Avx512)
        } else if matches!(mode(), KernelMode::Best | KernelMode::AvxVnni)
            && Self::Avx256.supported()
        {
            Some(Self::Avx256)
        } else {
            None
        }
    }

    /// Whether this CPU has the instructions (the 512-bit ones only where AVX-512 may run).
    pub(crate) fn supported(self) -> bool {
        match self {
            Self::Avx512 => {
                crate::cpu_matmul::has_avx512f()
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vnni")
            }
            Self::Avx256 => {
                crate::cpu_matmul::has_avx2_fma() && std::arch::is_x86_feature_detected!("avxvnni")
            }
        }
    }
}

/// Activations rounded to 8 bits per block of `block` values (256 or 32) and row, in panels of
/// 16 rows (zero past `m`).
struct Activations {
    /// `[panel][k/4][16 rows][4]`: one 64-byte vector per 4 values of `k`.
    qs: Vec<i8>,
    /// `[panel][k/32][16]`: each row's step (`max|x|/127` of its block) per sub-block.
    steps: Vec<f32>,
    /// `[panel][k/32][16]`: the sum of each row's `q` over each sub-block.
    sums: Vec<f32>,
}

impl Activations {
    fn quantise(a: &[f32], m: usize, k: usize, block: usize) -> Self {
        debug_assert!(block.is_multiple_of(SUB) && k.is_multiple_of(block));
        let panels = m.div_ceil(LANES);
        let (kq, ks) = (k / 4, k / SUB);
        let mut qs = vec![0i8; panels * kq * LANES * 4];
        let mut steps = vec![0f32; panels * ks * LANES];
        let mut sums = vec![0f32; panels * ks * LANES];
        qs.par_chunks_mut(kq * LANES * 4)
            .zip(steps.par_chunks_mut(ks * LANES))
            .zip(sums.par_chunks_mut(ks * LANES))
            .enumerate()
            .for_each(|(p, ((qs, steps), sums))| {
                let mut row_q = vec![0i8; k];
                for lane in 0..LANES.min(m - p * LANES) {
                    let row = &a[(p * LANES + lane) * k..][..k];
                    for (b, values) in row.chunks_exact(block).enumerate() {
                        let max = values.iter().fold(0f32, |acc, x| acc.max(x.abs()));
                        let inv = if max > 0.0 { 127.0 / max } else { 0.0 };
                        for s in 0..block / SUB {
                            steps[(b * block / SUB + s) * LANES + lane] = max / 127.0;
                        }
                        for (q, &x) in row_q[b * block..][..block].iter_mut().zip(values) {
                            *q = (x * inv).round().clamp(-127.0, 127.0) as i8;
                        }
                    }
                    for (s, sub) in row_q.chunks_exact(SUB).enumerate() {
                        sums[s * LANES + lane] = sub.iter().map(|&q| q as i32).sum::<i32>() as f32;
                    }
                    for (quad, q) in row_q.chunks_exact(4).enumerate() {
                        qs[(quad * LANES + lane) * 4..][..4].copy_from_slice(q);
                    }
                }
            });
        Self { qs, steps, sums }
    }
}

/// Weight rows unpacked for the kernel: `q` as u8 in `k` order, and per sub-block the factors
/// `scale` and `min` (value = `scale·q − min`; see the module comment for each format).
struct Unpacked {
    q: Vec<u8>,
    scales: Vec<f32>,
    mins: Vec<f32>,
}

impl Unpacked {
    fn new(k: usize) -> Self {
        Self {
            q: vec![0; GROUP * k],
            scales: vec![0.0; GROUP * (k / SUB)],
            mins: vec![0.0; GROUP * (k / SUB)],
        }
    }

    /// Unpacks weight rows `j0..j0+rows` of `blocks`; rows past them are zeroed.
    fn fill(&mut self, format: Format, blocks: &[u8], k: usize, j0: usize, rows: usize) {
        let ks = k / SUB;
        let row_bytes = k / format.values() * format.bytes();
        for r in 0..GROUP {
            let (q, scales, mins) = (
                &mut self.q[r * k..][..k],
                &mut self.scales[r * ks..][..ks],
                &mut self.mins[r * ks..][..ks],
            );
            if r >= rows {
                scales.fill(0.0);
                mins.fill(0.0);
                continue;
            }
            let row = &blocks[(j0 + r) * row_bytes..][..row_bytes];
            match format {
                Format::Q4K => {
                    for (b, block) in row.chunks_exact(Q4K_BYTES).enumerate() {
                        let (block_scales, block_mins) = q4k_factors(block);
                        scales[b * 8..][..8].copy_from_slice(&block_scales);
                        mins[b * 8..][..8].copy_from_slice(&block_mins);
                        unpack_nibbles(&block[16..], &mut q[b * Q4K_VALUES..][..Q4K_VALUES]);
                    }
                }
                Format::Q8_0 => {
                    for (b, block) in row.chunks_exact(34).enumerate() {
                        let d = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
                        scales[b] = d;
                        mins[b] = 128.0 * d;
                        for (u, &v) in q[b * SUB..][..SUB].iter_mut().zip(&block[2..]) {
                            *u = v ^ 0x80; // i8 q + 128 as u8
                        }
                    }
                }
            }
        }
    }
}

/// The 128 nibble bytes of a Q4K block as 256 values: each 32-byte chunk holds 64 values, the
/// first 32 in its low nibbles and the next 32 in its high ones.
#[inline(always)]
fn unpack_nibbles(nibbles: &[u8], out: &mut [u8]) {
    for (chunk, out) in nibbles.chunks_exact(32).zip(out.chunks_exact_mut(64)) {
        let (low, high) = out.split_at_mut(32);
        for ((&b, lo), hi) in chunk.iter().zip(low).zip(high) {
            *lo = b & 0xF;
            *hi = b >> 4;
        }
    }
}

/// `C = A·Wᵀ` `[m, n]` for f32 `a` `[m, k]` and the Q4K or Q8_0 `blocks` of `W` `[n, k]` (`k` a
/// multiple of the block), with the `isa` kernel. The caller checks the sizes.
pub(crate) fn matmul(
    isa: Isa,
    a: &[f32],
    m: usize,
    k: usize,
    format: Format,
    blocks: &[u8],
    n: usize,
) -> Vec<f32> {
    assert!(isa.supported() && k.is_multiple_of(format.values()) && a.len() == m * k);
    assert_eq!(blocks.len(), n * (k / format.values()) * format.bytes());
    if m == 0 || n == 0 {
        return vec![0.0; m * n];
    }
    let acts = Activations::quantise(a, m, k, format.values());
    let mut c: Vec<f32> = Vec::with_capacity(m * n);
    let out = OutPtr(c.as_mut_ptr());
    let chunks = m.div_ceil(CHUNK);
    (0..n.div_ceil(GROUP) * chunks)
        .into_par_iter()
        .for_each_init(
            || (Unpacked::new(k), vec![0f32; GROUP * CHUNK]),
            |(w, ct), task| {
                let (j0, m0) = (task / chunks * GROUP, task % chunks * CHUNK);
                let (rows, m_end) = (GROUP.min(n - j0), (m0 + CHUNK).min(m));
                w.fill(format, blocks, k, j0, rows);
                // `Cᵀ` of this task: GROUP weight rows of CHUNK activation rows.
                ct.fill(0.0);
                let (first_panel, end_panel) = (m0 / LANES, m_end.div_ceil(LANES));
                let mut p = first_panel;
                while p < end_panel {
                    let nv = match isa {
                        Isa::Avx512 => (end_panel - p).min(2),
                        Isa::Avx256 => 1,
                    };
                    for r0 in (0..rows).step_by(MR) {
                        let dst = ct[r0 * CHUNK + (p - first_panel) * LANES..].as_mut_ptr();
                        // SAFETY: `isa.supported()` was asserted; the unpacked group holds
                        // GROUP ≥ r0 + MR rows of k values, panels p..p+nv exist, and `dst`
                        // starts MR rows of CHUNK with nv·16 lanes left in each.
                        unsafe {
                            match (isa, nv) {
                                (Isa::Avx256, _) => kernel_256(w, r0, k, &acts, p, dst, CHUNK),
                                (Isa::Avx512, 2) => kernel::<2>(w, r0, k, &acts, p, dst, CHUNK),
                                (Isa::Avx512, _) => kernel::<1>(w, r0, k, &acts, p, dst, CHUNK),
                            }
                        }
                    }
                    p += nv;
                }
                for i in m0..m_end {
                    // SAFETY: row i < m, columns j0..j0+rows < n; only this task writes them
                    // (rows of its chunk, columns of its group).
                    let dst = unsafe { std::slice::from_raw_parts_mut(out.at(i * n + j0), rows) };
                    for (r, v) in dst.iter_mut().enumerate() {
                        *v = ct[r * CHUNK + i - m0];
                    }
                }
            },
        );
    // SAFETY: the tasks above cover every (row chunk, column group) pair, so all m·n values.
    unsafe { c.set_len(m * n) };
    c
}

/// `MR` unpacked weight rows from `r0` against `NV` activation panels from `p`, over all of `k`:
/// adds Σ_k W[r0+r, k]·A[16p + lane, k] (with `A` as rounded) to `acc[r·ld + lane]`.
///
/// # Safety
/// The CPU has AVX-512F, BW and VNNI; `w` holds `r0 + MR` rows, `acts` panels `p..p+NV`, and `acc`
/// `MR` rows `ld` apart of `NV·16` values.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn kernel<const NV: usize>(
    w: &Unpacked,
    r0: usize,
    k: usize,
    acts: &Activations,
    p: usize,
    acc: *mut f32,
    ld: usize,
) {
    let (kq, ks) = (k / 4, k / SUB);
    debug_assert!((p + NV) * kq * 64 <= acts.qs.len() && (r0 + MR) * k <= w.q.len());
    // SAFETY (all pointer arithmetic below): offsets stay inside the row, panel and sub-block
    // ranges the caller vouches for.
    unsafe {
        let qa: [*const i8; NV] = std::array::from_fn(|v| acts.qs.as_ptr().add((p + v) * kq * 64));
        let mut total = [[_mm512_setzero_ps(); NV]; MR];
        for sub in 0..ks {
            let mut isum = [[_mm512_setzero_si512(); NV]; MR];
            for quad in sub * 8..sub * 8 + 8 {
                let av: [__m512i; NV] =
                    std::array::from_fn(|v| _mm512_loadu_si512(qa[v].add(quad * 64).cast()));
                for (r, isum) in isum.iter_mut().enumerate() {
                    let wq = w.q.as_ptr().add((r0 + r) * k + quad * 4);
                    let wb = _mm512_set1_epi32(std::ptr::read_unaligned(wq.cast::<i32>()));
                    for v in 0..NV {
                        isum[v] = _mm512_dpbusd_epi32(isum[v], wb, av[v]);
                    }
                }
            }
            let at = |v: usize| ((p + v) * ks + sub) * LANES;
            let sums: [__m512; NV] =
                std::array::from_fn(|v| _mm512_loadu_ps(acts.sums.as_ptr().add(at(v))));
            let steps: [__m512; NV] =
                std::array::from_fn(|v| _mm512_loadu_ps(acts.steps.as_ptr().add(at(v))));
            for r in 0..MR {
                let scale = _mm512_set1_ps(*w.scales.get_unchecked((r0 + r) * ks + sub));
                let min = _mm512_set1_ps(*w.mins.get_unchecked((r0 + r) * ks + sub));
                for v in 0..NV {
                    // (scale·Σ w·q − min·Σ q)·step for this sub-block.
                    let part = _mm512_fmsub_ps(
                        _mm512_cvtepi32_ps(isum[r][v]),
                        scale,
                        _mm512_mul_ps(min, sums[v]),
                    );
                    total[r][v] = _mm512_fmadd_ps(part, steps[v], total[r][v]);
                }
            }
        }
        for (r, total) in total.iter().enumerate() {
            for (v, total) in total.iter().enumerate() {
                let dst = acc.add(r * ld + v * LANES);
                _mm512_storeu_ps(dst, _mm512_add_ps(*total, _mm512_loadu_ps(dst)));
            }
        }
    }
}

/// [`kernel`] on 256-bit vectors, for one panel (its two 8-row halves): the same integer sums
/// and the same f32 operations in the same order, so equal results. Sixteen vector registers hold
/// the integer sums but not the f32 totals, so those accumulate in `acc` itself.
///
/// # Safety
/// The CPU has AVX2, FMA and AVX-VNNI; `w` holds `r0 + MR` rows, `acts` panel `p`, and `acc` `MR`
/// rows `ld` apart of 16 values.
#[target_feature(enable = "avx2,fma,avxvnni")]
unsafe fn kernel_256(
    w: &Unpacked,
    r0: usize,
    k: usize,
    acts: &Activations,
    p: usize,
    acc: *mut f32,
    ld: usize,
) {
    const HALF: usize = LANES / 2;
    let (kq, ks) = (k / 4, k / SUB);
    debug_assert!((p + 1) * kq * 64 <= acts.qs.len() && (r0 + MR) * k <= w.q.len());
    // SAFETY (all pointer arithmetic below): offsets stay inside the row, panel and sub-block
    // ranges the caller vouches for.
    unsafe {
        let qa = acts.qs.as_ptr().add(p * kq * 64);
        // As in `kernel`: totals from zero, added to `acc` once at the end.
        let mut total = [[0f32; LANES]; MR];
        for sub in 0..ks {
            let mut isum = [[_mm256_setzero_si256(); 2]; MR];
            for quad in sub * 8..sub * 8 + 8 {
                let av: [__m256i; 2] =
                    std::array::from_fn(|h| _mm256_loadu_si256(qa.add(quad * 64 + h * 32).cast()));
                for (r, isum) in isum.iter_mut().enumerate() {
                    let wq = w.q.as_ptr().add((r0 + r) * k + quad * 4);
                    let wb = _mm256_set1_epi32(std::ptr::read_unaligned(wq.cast::<i32>()));
                    for h in 0..2 {
                        isum[h] = _mm256_dpbusd_avx_epi32(isum[h], wb, av[h]);
                    }
                }
            }
            let at = (p * ks + sub) * LANES;
            let sums: [__m256; 2] =
                std::array::from_fn(|h| _mm256_loadu_ps(acts.sums.as_ptr().add(at + h * HALF)));
            let steps: [__m256; 2] =
                std::array::from_fn(|h| _mm256_loadu_ps(acts.steps.as_ptr().add(at + h * HALF)));
            for r in 0..MR {
                let scale = _mm256_set1_ps(*w.scales.get_unchecked((r0 + r) * ks + sub));
                let min = _mm256_set1_ps(*w.mins.get_unchecked((r0 + r) * ks + sub));
                for h in 0..2 {
                    let part = _mm256_fmsub_ps(
                        _mm256_cvtepi32_ps(isum[r][h]),
                        scale,
                        _mm256_mul_ps(min, sums[h]),
                    );
                    let t = total[r].as_mut_ptr().add(h * HALF);
                    _mm256_storeu_ps(t, _mm256_fmadd_ps(part, steps[h], _mm256_loadu_ps(t)));
                }
            }
        }
        for (r, total) in total.iter().enumerate() {
            for h in 0..2 {
                let dst = acc.add(r * ld + h * HALF);
                let t = _mm256_loadu_ps(total.as_ptr().add(h * HALF));
                _mm256_storeu_ps(dst, _mm256_add_ps(t, _mm256_loadu_ps(dst)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::GgmlDType;
    use proptest::prelude::*;

    use super::*;
    use crate::cpu_matmul::tests::values;
    use crate::cpu_quant::tests::quantised_weight;

    /// The activations as the kernel sees them: each row rounded to 8 bits per `block` values.
    fn rounded(a: &[f32], m: usize, k: usize, block: usize) -> Vec<f64> {
        let acts = Activations::quantise(a, m, k, block);
        let mut out = vec![0f64; m * k];
        for i in 0..m {
            let (p, lane) = (i / LANES, i % LANES);
            for kk in 0..k {
                let q = acts.qs[((p * (k / 4) + kk / 4) * LANES + lane) * 4 + kk % 4];
                let step = acts.steps[(p * (k / SUB) + kk / SUB) * LANES + lane];
                out[i * k + kk] = q as f64 * step as f64;
            }
        }
        out
    }

    #[test]
    fn rounding_keeps_each_value_within_half_a_step() {
        let (m, k) = (19, 512);
        let mut a = values(m * k, 3);
        a[5] = 40.0;
        a[k..2 * k].fill(0.0);
        for block in [Q4K_VALUES, SUB] {
            let r = rounded(&a, m, k, block);
            for i in 0..m * k {
                let values = &a[i / block * block..][..block];
                let step = values.iter().fold(0f32, |m, x| m.max(x.abs())) as f64 / 127.0;
                assert!((r[i] - a[i] as f64).abs() <= step / 2.0 + 1e-9, "at {i}");
            }
            let acts = Activations::quantise(&a, m, k, block);
            for i in 0..m {
                for s in 0..k / SUB {
                    let want: f64 = (0..SUB)
                        .map(|j| {
                            let kk = s * SUB + j;
                            acts.qs[(((i / LANES) * (k / 4) + kk / 4) * LANES + i % LANES) * 4
                                + kk % 4] as f64
                        })
                        .sum();
                    let got = acts.sums[((i / LANES) * (k / SUB) + s) * LANES + i % LANES];
                    assert_eq!(got as f64, want);
                }
            }
        }
    }

    /// Checks the product against the dequantised weight times the rounded activations, summed in
    /// f64.
    fn check(isa: Isa, m: usize, blocks: usize, n: usize, format: Format, seed: u32) -> Vec<f32> {
        let k = blocks * format.values();
        let dtype = match format {
            Format::Q4K => GgmlDType::Q4K,
            Format::Q8_0 => GgmlDType::Q8_0,
        };
        let (q, wd) = quantised_weight(n, k, dtype, seed);
        let a = values(m * k, seed + 11);
        let got = matmul(isa, &a, m, k, format, &q.data().unwrap(), n);
        assert_eq!(got.len(), m * n);
        let ar = rounded(&a, m, k, format.values());
        for i in 0..m {
            for j in 0..n {
                let want: f64 = (0..k)
                    .map(|kk| ar[i * k + kk] * wd[j * k + kk] as f64)
                    .sum();
                let g = got[i * n + j] as f64;
                assert!(
                    (g - want).abs() <= 8.0 * f32::EPSILON as f64 * k as f64,
                    "{isa:?} {format:?} [{m}×{k}]·[{k}×{n}] at ({i}, {j}): {g} vs {want}"
                );
            }
        }
        got
    }

    /// The kernels this CPU can run.
    fn isas() -> Vec<Isa> {
        [Isa::Avx512, Isa::Avx256]
            .into_iter()
            .filter(|isa| isa.supported())
            .collect()
    }

    #[test]
    fn several_row_chunks_and_column_groups_cover_the_whole_output() {
        for isa in isas() {
            check(isa, 2 * CHUNK + 37, 2, 3 * GROUP + 6, Format::Q4K, 5);
            check(isa, CHUNK, 1, GROUP, Format::Q4K, 6);
            check(isa, CHUNK + 5, 9, 2 * GROUP + 1, Format::Q8_0, 7);
        }
    }

    #[test]
    fn one_row_and_the_real_models_depth() {
        // OneAlign's LLM MLP input (11008 values: 43 Q4K or 344 Q8_0 blocks), odd widths.
        for isa in isas() {
            for (m, n) in [(1, 1), (1, 7), (17, 33)] {
                check(isa, m, 43, n, Format::Q4K, 3);
                check(isa, m, 344, n, Format::Q8_0, 4);
            }
        }
    }

    #[test]
    fn both_kernels_give_equal_products() {
        if Isa::Avx512.supported() && Isa::Avx256.supported() {
            for (m, blocks, n, format) in
                [(70, 2, 37, Format::Q4K), (CHUNK + 9, 11, 40, Format::Q8_0)]
            {
                let wide = check(Isa::Avx512, m, blocks, n, format, 9);
                let narrow = check(Isa::Avx256, m, blocks, n, format, 9);
                assert!(
                    wide.iter()
                        .zip(&narrow)
                        .all(|(a, b)| a.to_bits() == b.to_bits())
                );
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn products_match_the_dequantised_weight_and_rounded_activations(
            m in 1usize..70, blocks in 1usize..4, n in 1usize..80, seed in 0u32..1000,
            q8 in any::<bool>(),
        ) {
            let (format, blocks) = if q8 { (Format::Q8_0, blocks * 5) } else { (Format::Q4K, blocks) };
            for isa in isas() {
                check(isa, m, blocks, n, format, seed);
            }
        }
    }
}
