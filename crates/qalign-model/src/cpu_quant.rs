//! Matrix products with quantised (Q8_0 / Q4K) weights in CPU inference that keep only the
//! blocks in memory.
//!
//! candle's CPU kernels for these formats repack every weight, on its first product, into tiles
//! they keep beside the original blocks (6 bits per weight for Q4K next to its 4.5), so the real
//! OneAlign in Q4K needs over 15 GiB. Here each worker decodes a 256-deep slice of its weight rows
//! (ggml's block layouts, vectorised) into an f32 buffer in cache and multiplies it with the
//! activations through the f32 micro-kernels of [`crate::cpu_matmul`] (AVX-512 8×48 or AVX2 6×16).
//! The activations stay f32, so the only error is the weights' quantisation (candle's kernels also
//! round the activations to 8 bits). On CPUs with AVX512-VNNI or AVX-VNNI, Q4K and Q8_0 weights go
//! to the 8-bit integer products of [`crate::cpu_quant_vnni`] instead (faster; they round the
//! activations as candle does). `QALIGN_CPU_KERNELS=composed` keeps candle's kernels, and `avx2`
//! this file's.

use std::borrow::Cow;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{CpuStorage, DType, Device, Module, Storage, Tensor};
use half::f16;
use rayon::prelude::*;

use crate::cpu_matmul::{
    F32Kernel, KC, MR, MR_AVX2, OutPtr, has_avx2_fma, kernel_avx2, kernel_f32, pack_panels,
};

/// `x·Wᵀ` for a quantised layer and `x` `[rows, in]`: through [`matmul`] where it applies (an f32
/// CPU input, a Q8_0 or Q4K weight, an AVX2 or AVX-512 CPU, kernels on), else candle's.
pub(crate) fn forward(layer: &QMatMul, x: &Tensor) -> candle_core::Result<Tensor> {
    if let QMatMul::QTensor(q) = layer
        && let Some(y) = matmul(q, x)?
    {
        return Ok(y);
    }
    layer.forward(x)
}

/// `x·Wᵀ` `[rows, out]` for a Q8_0/Q4K weight `[out, in]` on the CPU and f32 `x` `[rows, in]`, or
/// `None` where this path does not apply.
pub(crate) fn matmul(q: &QTensor, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
    matmul_on(q, x, F32Kernel::detect(), int8_kernel())
}

/// The 8-bit integer kernel Q4K and Q8_0 products may run on ([`crate::cpu_quant_vnni`]).
#[cfg(target_arch = "x86_64")]
type Int8 = Option<crate::cpu_quant_vnni::Isa>;
#[cfg(not(target_arch = "x86_64"))]
type Int8 = Option<std::convert::Infallible>;

fn int8_kernel() -> Int8 {
    #[cfg(target_arch = "x86_64")]
    {
        crate::cpu_quant_vnni::Isa::detect()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// [`matmul`] on a given f32 tier; an `int8` kernel takes the weights instead.
fn matmul_on(
    q: &QTensor,
    x: &Tensor,
    tier: Option<F32Kernel>,
    int8: Int8,
) -> candle_core::Result<Option<Tensor>> {
    let Some(tier) = tier else {
        return Ok(None);
    };
    if !q.device().is_cpu() || !x.device().is_cpu() || x.dtype() != DType::F32 {
        return Ok(None);
    }
    let (n, k) = q.shape().dims2()?;
    let (m, in_dim) = x.dims2()?;
    if in_dim != k {
        candle_core::bail!("quantised linear [{n}, {k}] applied to {:?}", x.dims());
    }
    let Some(format) = Format::of(q.dtype()) else {
        return Ok(None);
    };
    let data = q.data()?;
    let Cow::Borrowed(bytes) = data else {
        return Ok(None);
    };
    if !k.is_multiple_of(format.values())
        || bytes.len() != n * (k / format.values()) * format.bytes()
    {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F32(a)), Some((start, end))) =
        (&*storage, layout.contiguous_offsets())
    else {
        return Ok(None);
    };
    let a = &a[start..end];
    #[cfg(target_arch = "x86_64")]
    if let Some(isa) = int8 {
        let c = crate::cpu_quant_vnni::matmul(isa, a, m, k, format, bytes, n);
        return Ok(Some(Tensor::from_vec(c, (m, n), &Device::Cpu)?));
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = int8;
    let c = run(a, m, k, format, bytes, n, tier);
    Ok(Some(Tensor::from_vec(c, (m, n), &Device::Cpu)?))
}

/// The block formats decoded here (ggml's layouts, as candle stores them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    /// 34 bytes per 32 values: an f16 scale `d`, then 32 `i8`; value = `d·q`.
    Q8_0,
    /// 144 bytes per 256 values: f16 `d` and `dmin`, 12 bytes of eight 6-bit (scale, min) pairs, then
    /// 128 bytes of 4-bit `q`; value = `d·scale·q − dmin·min` per 32-value sub-block.
    Q4K,
}

impl Format {
    fn of(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            GgmlDType::Q4K => Some(Self::Q4K),
            _ => None,
        }
    }

    /// Values per block.
    pub(crate) fn values(self) -> usize {
        match self {
            Self::Q8_0 => 32,
            Self::Q4K => Q4K_VALUES,
        }
    }

    /// Bytes per block.
    pub(crate) fn bytes(self) -> usize {
        match self {
            Self::Q8_0 => 34,
            Self::Q4K => Q4K_BYTES,
        }
    }

    /// Decodes whole blocks `bytes` into `out` (`values()` per block).
    fn decode(self, bytes: &[u8], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { self.decode_avx2(bytes, out) };
        }
        self.decode_portable(bytes, out)
    }

    /// [`Self::decode_portable`] compiled for AVX2, which vectorises its loops.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn decode_avx2(self, bytes: &[u8], out: &mut [f32]) {
        self.decode_portable(bytes, out)
    }

    #[inline(always)]
    fn decode_portable(self, bytes: &[u8], out: &mut [f32]) {
        let scale = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f32();
        match self {
            Self::Q8_0 => {
                for (block, out) in bytes.chunks_exact(34).zip(out.chunks_exact_mut(32)) {
                    let d = scale(block);
                    for (o, &q) in out.iter_mut().zip(&block[2..34]) {
                        *o = (q as i8) as f32 * d;
                    }
                }
            }
            Self::Q4K => {
                for (block, out) in bytes
                    .chunks_exact(Q4K_BYTES)
                    .zip(out.chunks_exact_mut(Q4K_VALUES))
                {
                    let (scales, mins) = q4k_factors(block);
                    for (c, (q, out)) in block[16..Q4K_BYTES]
                        .chunks_exact(32)
                        .zip(out.chunks_exact_mut(64))
                        .enumerate()
                    {
                        let (d1, m1) = (scales[2 * c], mins[2 * c]);
                        let (d2, m2) = (scales[2 * c + 1], mins[2 * c + 1]);
                        let (low, high) = out.split_at_mut(32);
                        for ((&q, lo), hi) in q.iter().zip(low).zip(high) {
                            *lo = d1 * (q & 0xF) as f32 - m1;
                            *hi = d2 * (q >> 4) as f32 - m2;
                        }
                    }
                }
            }
        }
    }
}

/// Values per Q4K block.
pub(crate) const Q4K_VALUES: usize = 256;
/// Bytes per Q4K block: f16 `d`, f16 `dmin`, 12 bytes of 6-bit (scale, min), 128 of nibbles.
pub(crate) const Q4K_BYTES: usize = 144;

/// The factors of a Q4K block's eight 32-value sub-blocks: `d·scale` and `dmin·min`
/// (value = `d·scale·q − dmin·min`).
#[inline(always)]
pub(crate) fn q4k_factors(block: &[u8]) -> ([f32; 8], [f32; 8]) {
    let half = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f32();
    let (d, dmin) = (half(block), half(&block[2..]));
    let packed: &[u8; 12] = block[4..16].try_into().expect("12 bytes");
    let (mut scales, mut mins) = ([0f32; 8], [0f32; 8]);
    for j in 0..8 {
        let (s, m) = scale_min(j, packed);
        scales[j] = d * s as f32;
        mins[j] = dmin * m as f32;
    }
    (scales, mins)
}

/// The 6-bit (scale, min) of Q4K sub-block `j` (0..8), packed in 12 bytes as ggml does.
pub(crate) fn scale_min(j: usize, s: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Weight rows per worker: a multiple of both micro-kernels' row counts (8 and 6).
const GROUP: usize = 48;
// A slice of `KC` values holds whole blocks of either format.
const _: () = assert!(KC.is_multiple_of(Q4K_VALUES) && KC.is_multiple_of(32));

/// `C = A·Wᵀ` for `a` `[m, k]` and `blocks` of `W` `[n, k]`, computed as `Cᵀ = W·Aᵀ` so that the
/// dequantised weight rows, which come out of the blocks along `k`, are the micro-kernel's
/// broadcast operand and need no transposing: `A` is packed once into panels of `Aᵀ`
/// (`tier.width()` rows of `A` each); each worker owns `GROUP` weight rows and walks `k` in slices
/// of `KC`, dequantising each slice once and multiplying it with every panel into a `Cᵀ` scratch,
/// which it finally writes into its columns of `C`.
fn run(
    a: &[f32],
    m: usize,
    k: usize,
    format: Format,
    blocks: &[u8],
    n: usize,
    tier: F32Kernel,
) -> Vec<f32> {
    if m == 0 {
        return Vec::new();
    }
    let width = tier.width();
    let panels = m.div_ceil(width);
    let m_pad = panels * width;
    // Panels of `Aᵀ`: `width` rows of `A` each, k-major.
    let at = pack_panels(a, m, k, width);
    let row_bytes = k / format.values() * format.bytes();
    let mut c: Vec<f32> = Vec::with_capacity(m * n);
    let out = OutPtr(c.as_mut_ptr());
    (0..n.div_ceil(GROUP)).into_par_iter().for_each_init(
        || (vec![0f32; GROUP * KC], vec![0f32; GROUP * m_pad]),
        |(w, ct), task| {
            let j0 = task * GROUP;
            let rows = GROUP.min(n - j0);
            for k0 in (0..k).step_by(KC) {
                let depth = KC.min(k - k0);
                let slice_bytes = depth / format.values() * format.bytes();
                for (j, dst) in w.chunks_exact_mut(depth).take(rows).enumerate() {
                    let first = (j0 + j) * row_bytes + k0 / format.values() * format.bytes();
                    format.decode(&blocks[first..][..slice_bytes], dst);
                }
                for p in 0..panels {
                    let panel = &at[(p * k + k0) * width..][..depth * width];
                    let mut j = 0;
                    while j < rows {
                        // SAFETY: the tier's instructions were detected; `w` holds `rows` rows of
                        // `depth` values, the panel depth rows of `width`, and `ct` GROUP rows of
                        // m_pad (panel p's columns p·width.. lie inside). The first slice writes
                        // every value before a later one adds to it.
                        unsafe {
                            let (wp, cp) = (
                                w.as_ptr().add(j * depth),
                                ct.as_mut_ptr().add(j * m_pad + p * width),
                            );
                            j += match tier {
                                F32Kernel::Avx512 => {
                                    let r = MR.min(rows - j);
                                    kernel_f32(
                                        r,
                                        depth,
                                        wp,
                                        depth,
                                        panel.as_ptr(),
                                        cp,
                                        m_pad,
                                        width,
                                        k0 > 0,
                                        std::ptr::null(),
                                    );
                                    r
                                }
                                F32Kernel::Avx2 => {
                                    let r = MR_AVX2.min(rows - j);
                                    kernel_avx2(
                                        r,
                                        depth,
                                        wp,
                                        depth,
                                        panel.as_ptr(),
                                        cp,
                                        m_pad,
                                        k0 > 0,
                                    );
                                    r
                                }
                            };
                        }
                    }
                }
            }
            for r in 0..m {
                // SAFETY: row r, columns j0..j0+rows lie inside the m×n output, and only this
                // worker writes them.
                let dst = unsafe { std::slice::from_raw_parts_mut(out.at(r * n + j0), rows) };
                for (j, v) in dst.iter_mut().enumerate() {
                    *v = ct[j * m_pad + r];
                }
            }
        },
    );
    // SAFETY: the workers above wrote all m·n values.
    unsafe { c.set_len(m * n) };
    c
}

#[cfg(test)]
pub(crate) mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::cpu_matmul::tests::values;

    /// A test weight `[n, k]` quantised to `format`, and its dequantised values.
    pub(crate) fn quantised_weight(
        n: usize,
        k: usize,
        format: GgmlDType,
        seed: u32,
    ) -> (QTensor, Vec<f32>) {
        let w = Tensor::from_vec(values(n * k, seed), (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, format).unwrap();
        let wd: Vec<f32> = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        (q, wd)
    }

    /// Compares the product with the dequantised weight's, summed in f64.
    fn check(m: usize, k: usize, n: usize, format: GgmlDType, tier: F32Kernel, seed: u32) {
        let (q, wd) = quantised_weight(n, k, format, seed);
        let xv = values(m * k, seed + 7);
        let x = Tensor::from_vec(xv.clone(), (m, k), &Device::Cpu).unwrap();
        let got = matmul_on(&q, &x, Some(tier), None)
            .unwrap()
            .expect("the path applies");
        assert_eq!(got.dims(), &[m, n]);
        let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
        for i in 0..m {
            for j in 0..n {
                let want: f64 = (0..k)
                    .map(|kk| xv[i * k + kk] as f64 * wd[j * k + kk] as f64)
                    .sum();
                let g = got[i * n + j] as f64;
                assert!(
                    (g - want).abs() <= 4.0 * f32::EPSILON as f64 * k as f64,
                    "{format:?} {tier:?} [{m}×{k}]·[{k}×{n}] at ({i}, {j}): {g} vs {want}"
                );
            }
        }
    }

    fn tiers() -> Vec<F32Kernel> {
        let mut tiers = Vec::new();
        if crate::cpu_matmul::has_avx512f() {
            tiers.push(F32Kernel::Avx512);
        }
        if has_avx2_fma() {
            tiers.push(F32Kernel::Avx2);
        }
        tiers
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]

        #[test]
        fn q8_0_products_match_the_dequantised_weight(m in 1usize..20, kb in 1usize..20, n in 1usize..70, seed in 0u32..1000) {
            for tier in tiers() {
                check(m, kb * 32, n, GgmlDType::Q8_0, tier, seed);
            }
        }

        #[test]
        fn q4k_products_match_the_dequantised_weight(m in 1usize..20, kb in 1usize..4, n in 1usize..70, seed in 0u32..1000) {
            for tier in tiers() {
                check(m, kb * 256, n, GgmlDType::Q4K, tier, seed);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn decoding_matches_candle_bit_for_bit(blocks in 1usize..5, seed in 0u32..10_000, amplitude in 0.001f32..100.0) {
            for (format, dtype) in [(Format::Q8_0, GgmlDType::Q8_0), (Format::Q4K, GgmlDType::Q4K)] {
                let len = blocks * format.values();
                let v: Vec<f32> = values(len, seed).iter().map(|x| x * amplitude).collect();
                let q = QTensor::quantize(&Tensor::from_vec(v, (1, len), &Device::Cpu).unwrap(), dtype).unwrap();
                let want: Vec<f32> = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                let bytes = q.data().unwrap();
                let mut got = vec![0f32; len];
                format.decode(&bytes, &mut got);
                let mut portable = vec![0f32; len];
                format.decode_portable(&bytes, &mut portable);
                for i in 0..len {
                    prop_assert_eq!(got[i].to_bits(), want[i].to_bits(), "{:?} at {}", format, i);
                    prop_assert_eq!(portable[i].to_bits(), want[i].to_bits(), "{:?} at {}", format, i);
                }
            }
        }
    }

    /// Q8_0 blocks as gguf-py 0.19 (`gguf.quants.quantize`, bit-exact with ggml's
    /// `quantize_row_q8_0_ref`) writes them for the same 64 values, halves rounding away from 0.
    #[test]
    fn q8_0_blocks_equal_ggmls_reference() {
        let mut x: Vec<f32> = vec![127.0, 0.5, -0.5, 2.5, -2.5, 1.5, -1.5, 126.5];
        x.extend((0..24).map(|i| (i - 12) as f32));
        x.extend((0..32).map(|i| ((i * 37 % 101) - 50) as f32 / 7.0));
        let w = Tensor::from_vec(x, (1, 64), &Device::Cpu).unwrap();
        let q = crate::quant::quantize_weight(&w, crate::Quant::Q8_0).unwrap();
        let want: [u8; 68] = [
            0, 60, 127, 1, 255, 3, 253, 2, 254, 127, 244, 245, 246, 247, 248, 249, 250, 251, 252,
            253, 254, 255, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 51, 43, 129, 223, 61, 154, 248,
            86, 180, 18, 112, 205, 43, 137, 231, 69, 162, 0, 94, 187, 25, 119, 213, 51, 144, 238,
            76, 170, 8, 102, 195, 33, 127, 220,
        ];
        assert_eq!(&q.data().unwrap()[..], &want[..]);
    }

    /// A Q4K block written by ggml's `quantize_row_q4_K_ref` decodes to what gguf-py 0.19's
    /// `dequantize` gives (values at a few places and the sum of all 256), on every path.
    #[test]
    fn q4k_decoding_equals_ggufs_reference() {
        let block: [u8; 144] = [
            16, 27, 53, 38, 240, 240, 255, 240, 190, 185, 192, 239, 160, 64, 255, 192, 0, 85, 170,
            255, 0, 85, 170, 255, 0, 85, 170, 255, 0, 85, 170, 255, 0, 85, 170, 255, 0, 85, 170,
            255, 0, 85, 170, 255, 0, 85, 170, 255, 3, 87, 171, 255, 3, 87, 171, 255, 3, 87, 171,
            255, 3, 87, 171, 255, 3, 87, 171, 255, 4, 87, 171, 255, 4, 87, 171, 255, 4, 87, 171,
            255, 0, 85, 170, 255, 0, 85, 170, 255, 0, 85, 170, 255, 0, 85, 170, 255, 0, 85, 170,
            255, 0, 85, 170, 255, 0, 85, 170, 255, 0, 85, 170, 255, 83, 167, 251, 15, 83, 167, 251,
            15, 83, 167, 251, 15, 84, 167, 251, 15, 84, 167, 251, 0, 84, 167, 251, 0, 84, 168, 251,
            0, 84, 168, 251, 0,
        ];
        let picks: [(usize, u32); 8] = [
            (0, 0xbfc06b00),
            (31, 0x3f7aca00),
            (32, 0xbfb0e680),
            (70, 0x4018f280),
            (95, 0x40509080),
            (130, 0x3f230e00),
            (200, 0xbf603100),
            (255, 0xbfba3600),
        ];
        let q = QTensor::new(
            candle_core::quantized::QStorage::from_data(
                Cow::Borrowed(&block[..]),
                &Device::Cpu,
                GgmlDType::Q4K,
            )
            .unwrap(),
            (1, 256),
        )
        .unwrap();
        let candle: Vec<f32> = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let (mut fast, mut portable) = (vec![0f32; 256], vec![0f32; 256]);
        Format::Q4K.decode(&block, &mut fast);
        Format::Q4K.decode_portable(&block, &mut portable);
        for got in [&candle, &fast, &portable] {
            for (i, bits) in picks {
                assert_eq!(got[i].to_bits(), bits, "at {i}");
            }
            assert_eq!(
                got.iter().map(|&v| v as f64).sum::<f64>(),
                67.88775634765625
            );
        }
    }

    #[test]
    fn one_row_and_the_real_models_depth() {
        // OneAlign's LLM MLP input (11008 = 43 Q4K blocks), one activation row, odd widths.
        for tier in tiers() {
            for (m, n) in [(1, 1), (1, 7), (3, 49)] {
                check(m, 11008, n, GgmlDType::Q4K, tier, 3);
                check(m, 11008, n, GgmlDType::Q8_0, tier, 4);
            }
        }
    }

    #[test]
    fn other_inputs_are_left_to_candle() {
        let w = Tensor::from_vec(values(32 * 64, 1), (32, 64), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let half = Tensor::zeros((2, 64), DType::F16, &Device::Cpu).unwrap();
        assert!(
            matmul_on(&q, &half, Some(F32Kernel::Avx2), None)
                .unwrap()
                .is_none()
        );
        let x = Tensor::zeros((2, 64), DType::F32, &Device::Cpu).unwrap();
        assert!(matmul_on(&q, &x, None, None).unwrap().is_none());
        let q4_0 = QTensor::quantize(&w, GgmlDType::Q4_0).unwrap();
        assert!(
            matmul_on(&q4_0, &x, Some(F32Kernel::Avx2), None)
                .unwrap()
                .is_none()
        );
        let wrong = Tensor::zeros((2, 65), DType::F32, &Device::Cpu).unwrap();
        assert!(matmul_on(&q, &wrong, Some(F32Kernel::Avx2), None).is_err());
        // Zero rows are fine.
        let empty = Tensor::zeros((0, 64), DType::F32, &Device::Cpu).unwrap();
        if has_avx2_fma() {
            let y = matmul_on(&q, &empty, Some(F32Kernel::Avx2), None)
                .unwrap()
                .unwrap();
            assert_eq!(y.dims(), &[0, 32]);
        }
    }
}
