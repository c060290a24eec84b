//! Fused CPU kernels for the elementwise and row-wise steps of inference. candle composes a
//! LayerNorm from about ten whole-tensor passes (casts, mean, subtract, square, mean, add, sqrt,
//! reciprocal, two multiplies, add); here each is one pass per row, in f32 (sums in f64), parallel
//! over rows, reading half-precision inputs without widening the whole tensor first.
//!
//! They have no backward pass and no GPU version: [`crate::nn`] calls them only for CPU tensors
//! that track no gradient, and keeps its composed forms as the reference for everything else.

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, WithDType,
};
use half::{bf16, f16};
use rayon::prelude::*;

/// Rows shorter than this are not worth a task of their own.
const MIN_ROW_CHUNK_ELEMS: usize = 16 * 1024;

/// Whether the operands can go through the fused kernels: CPU tensors of which none tracks a
/// gradient (a trainable norm weight on a frozen input still needs the composed form).
/// `QALIGN_CPU_KERNELS=composed` turns the kernels off, to compare the two in one benchmark.
pub fn applies(operands: &[&Tensor]) -> bool {
    enabled()
        && operands
            .iter()
            .all(|t| t.device().is_cpu() && !t.track_op())
}

/// Which CPU kernels run, from `QALIGN_CPU_KERNELS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelMode {
    /// The fastest kernels this CPU has (the default).
    Best,
    /// `avx2`: only the kernels a CPU with AVX2 and FMA but neither AVX-512 nor AVX-VNNI has
    /// (AMD before Zen 4, Intel before Alder Lake), to measure that fallback on a newer CPU
    /// (candle's own ops still use whatever the CPU has).
    Avx2,
    /// `avx-vnni`: as `avx2`, plus the 256-bit 8-bit integer products of `--quant` weights that a
    /// CPU with AVX-VNNI but no AVX-512 has (Intel's laptop and desktop cores since Alder Lake).
    AvxVnni,
    /// `composed`: none; candle's composed ops and matmuls, to compare against in one benchmark.
    Composed,
}

/// The [`KernelMode`] `QALIGN_CPU_KERNELS` asks for, read once.
pub fn mode() -> KernelMode {
    static MODE: OnceLock<KernelMode> = OnceLock::new();
    *MODE.get_or_init(|| match std::env::var("QALIGN_CPU_KERNELS").as_deref() {
        Ok("composed") => KernelMode::Composed,
        Ok("avx2") => KernelMode::Avx2,
        Ok("avx-vnni") => KernelMode::AvxVnni,
        Ok("best") | Err(std::env::VarError::NotPresent) => KernelMode::Best,
        Ok(other) => {
            // A mistyped knob would otherwise measure the default without a word.
            eprintln!(
                "warning: QALIGN_CPU_KERNELS={other:?} is not one of best, avx2, avx-vnni, \
                 composed; using best"
            );
            KernelMode::Best
        }
        Err(std::env::VarError::NotUnicode(_)) => {
            eprintln!("warning: QALIGN_CPU_KERNELS is not UTF-8; using best");
            KernelMode::Best
        }
    })
}

/// Whether the fused kernels (and packed matmuls, `crate::cpu_matmul`) are on: they are unless
/// `QALIGN_CPU_KERNELS=composed`.
pub fn enabled() -> bool {
    mode() != KernelMode::Composed
}

/// The matrix-product kernels CPU inference picks on this machine under `QALIGN_CPU_KERNELS`,
/// for benchmark records (`candle` where candle's own runs).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CpuKernels {
    /// `best`, `avx2`, `avx-vnni` or `composed`.
    pub mode: &'static str,
    /// f32 weights: `avx512` or `avx2` panels.
    pub f32_matmul: &'static str,
    /// bf16 weights: `amx`, `avx512-bf16` or `avx2` tiles.
    pub bf16_matmul: &'static str,
    /// Q8_0/Q4K weights: `avx512-vnni` or `avx-vnni` 8-bit integer products, or `f32-decode`.
    pub quant_matmul: &'static str,
}

/// See [`CpuKernels`].
pub fn cpu_kernels() -> CpuKernels {
    use crate::cpu_matmul::{Bf16Kernel, has_avx2_fma, has_avx512f};
    let mode = match mode() {
        KernelMode::Best => "best",
        KernelMode::Avx2 => "avx2",
        KernelMode::AvxVnni => "avx-vnni",
        KernelMode::Composed => "composed",
    };
    if !enabled() || !has_avx2_fma() {
        return CpuKernels {
            mode,
            f32_matmul: "candle",
            bf16_matmul: "candle",
            quant_matmul: "candle",
        };
    }
    #[cfg(target_arch = "x86_64")]
    let int8 = crate::cpu_quant_vnni::Isa::detect().map(|isa| match isa {
        crate::cpu_quant_vnni::Isa::Avx512 => "avx512-vnni",
        crate::cpu_quant_vnni::Isa::Avx256 => "avx-vnni",
    });
    #[cfg(not(target_arch = "x86_64"))]
    let int8: Option<&'static str> = None;
    CpuKernels {
        mode,
        f32_matmul: if has_avx512f() { "avx512" } else { "avx2" },
        bf16_matmul: match Bf16Kernel::detect() {
            Some(Bf16Kernel::Amx) => "amx",
            Some(Bf16Kernel::DotProduct) => "avx512-bf16",
            Some(Bf16Kernel::Avx2) | None => "avx2",
        },
        quant_matmul: int8.unwrap_or("f32-decode"),
    }
}

/// LayerNorm over the last dimension: `(x − mean)/√(var + eps)·weight + bias`, with a centred
/// variance; `weight` and `bias` are f32 `[dim]`.
pub fn layer_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    x.contiguous()?
        .apply_op3_no_bwd(weight, bias, &LayerNormOp { eps })
}

/// `x·rsqrt(mean(x²) + eps)` over the last dimension (LlamaRMSNorm before its weight).
pub fn rms_normalize(x: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&RmsNormalizeOp { eps })
}

/// QuickGELU, `z·sigmoid(1.702·z)`, elementwise.
pub fn quick_gelu(x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&QuickGeluOp)
}

/// `silu(gate)·up` elementwise, `silu(z) = z / (1 + exp(−z))` (the LLaMA MLP's gate); in half
/// precision `silu(gate)` is rounded before the product, as the composed form rounds it.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    gate.contiguous()?
        .apply_op2_no_bwd(&up.contiguous()?, &SiluMulOp)
}

/// The contiguous slice of `storage` that `layout` describes.
fn slice<'a, T: WithDType>(
    storage: &'a CpuStorage,
    layout: &Layout,
) -> candle_core::Result<&'a [T]> {
    let data = storage.as_slice::<T>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("fused CPU kernel: input is not contiguous"),
    }
}

/// Element types the kernels read and write, through f32.
trait Element: WithDType + Copy + Send + Sync {
    fn load(self) -> f32;
    fn store(v: f32) -> Self;
    fn wrap(data: Vec<Self>) -> CpuStorage;
    fn load_row(src: &[Self], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.load();
        }
    }
    fn store_row(src: &[f32], dst: &mut [Self]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = Self::store(s);
        }
    }
    /// Rounds f32 values to this type's precision (and back), in place.
    fn round_row(row: &mut [f32]) {
        for v in row.iter_mut() {
            *v = Self::store(*v).load();
        }
    }
}

impl Element for f32 {
    fn load(self) -> f32 {
        self
    }
    fn store(v: f32) -> Self {
        v
    }
    fn wrap(data: Vec<Self>) -> CpuStorage {
        CpuStorage::F32(data)
    }
    fn round_row(_: &mut [f32]) {}
}

impl Element for f16 {
    fn load(self) -> f32 {
        self.to_f32()
    }
    fn store(v: f32) -> Self {
        f16::from_f32(v)
    }
    fn wrap(data: Vec<Self>) -> CpuStorage {
        CpuStorage::F16(data)
    }
}

impl Element for bf16 {
    fn load(self) -> f32 {
        self.to_f32()
    }
    fn store(v: f32) -> Self {
        bf16::from_f32(v)
    }
    fn wrap(data: Vec<Self>) -> CpuStorage {
        CpuStorage::BF16(data)
    }
    fn load_row(src: &[Self], dst: &mut [f32]) {
        crate::cpu_simd::bf16_to_f32(src, dst);
    }
    fn store_row(src: &[f32], dst: &mut [Self]) {
        crate::cpu_simd::f32_to_bf16(src, dst);
    }
    fn round_row(row: &mut [f32]) {
        let mut narrow = [bf16::ZERO; BLOCK];
        for part in row.chunks_mut(BLOCK) {
            let narrow = &mut narrow[..part.len()];
            crate::cpu_simd::f32_to_bf16(part, narrow);
            crate::cpu_simd::bf16_to_f32(narrow, part);
        }
    }
}

/// Runs `row_op(input_row, output_row)` over the rows of the last dimension, in parallel.
fn map_rows<T: Element>(
    input: &[T],
    dim: usize,
    row_op: impl Fn(&[T], &mut [T]) + Sync,
) -> candle_core::Result<CpuStorage> {
    if dim == 0 {
        return Ok(T::wrap(Vec::new()));
    }
    let mut out = vec![T::store(0.0); input.len()];
    let rows_per_task = (MIN_ROW_CHUNK_ELEMS / dim).max(1);
    out.par_chunks_mut(rows_per_task * dim)
        .zip(input.par_chunks(rows_per_task * dim))
        .for_each(|(out, input)| {
            for (o, x) in out.chunks_mut(dim).zip(input.chunks(dim)) {
                row_op(x, o);
            }
        });
    Ok(T::wrap(out))
}

fn last_dim(layout: &Layout) -> candle_core::Result<usize> {
    layout
        .dims()
        .last()
        .copied()
        .ok_or_else(|| candle_core::Error::Msg("fused CPU kernel: a scalar has no rows".into()))
}

struct LayerNormOp {
    eps: f64,
}

impl LayerNormOp {
    fn run<T: Element>(
        &self,
        x: &[T],
        dim: usize,
        weight: &[f32],
        bias: &[f32],
    ) -> candle_core::Result<CpuStorage> {
        let n = dim as f64;
        map_rows(x, dim, |x, out| {
            let mean = x.iter().map(|&v| f64::from(v.load())).sum::<f64>() / n;
            let var = x
                .iter()
                .map(|&v| {
                    let d = f64::from(v.load()) - mean;
                    d * d
                })
                .sum::<f64>()
                / n;
            let inv_std = (1.0 / (var + self.eps).sqrt()) as f32;
            let mean = mean as f32;
            let mut row = vec![0f32; x.len()];
            T::load_row(x, &mut row);
            for ((v, &w), &b) in row.iter_mut().zip(weight).zip(bias) {
                *v = (*v - mean) * inv_std * w + b;
            }
            T::store_row(&row, out);
        })
    }
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "qalign-layer-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dim = last_dim(x_layout)?;
        let weight = slice::<f32>(weight, weight_layout)?;
        let bias = slice::<f32>(bias, bias_layout)?;
        if weight.len() != dim || bias.len() != dim {
            candle_core::bail!(
                "layer norm: weight/bias of {}/{} values for rows of {dim}",
                weight.len(),
                bias.len()
            );
        }
        let out = match x.dtype() {
            DType::F32 => self.run(slice::<f32>(x, x_layout)?, dim, weight, bias)?,
            DType::F16 => self.run(slice::<f16>(x, x_layout)?, dim, weight, bias)?,
            DType::BF16 => self.run(slice::<bf16>(x, x_layout)?, dim, weight, bias)?,
            other => candle_core::bail!("layer norm: unsupported dtype {other:?}"),
        };
        Ok((out, x_layout.shape().clone()))
    }
}

struct RmsNormalizeOp {
    eps: f64,
}

impl RmsNormalizeOp {
    fn run<T: Element>(&self, x: &[T], dim: usize) -> candle_core::Result<CpuStorage> {
        let n = dim as f64;
        map_rows(x, dim, |x, out| {
            let mean_sq = x
                .iter()
                .map(|&v| {
                    let v = f64::from(v.load());
                    v * v
                })
                .sum::<f64>()
                / n;
            let inv_rms = (1.0 / (mean_sq + self.eps).sqrt()) as f32;
            let mut row = vec![0f32; x.len()];
            T::load_row(x, &mut row);
            for v in row.iter_mut() {
                *v *= inv_rms;
            }
            T::store_row(&row, out);
        })
    }
}

impl CustomOp1 for RmsNormalizeOp {
    fn name(&self) -> &'static str {
        "qalign-rms-normalize"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dim = last_dim(layout)?;
        let out = match x.dtype() {
            DType::F32 => self.run(slice::<f32>(x, layout)?, dim)?,
            DType::F16 => self.run(slice::<f16>(x, layout)?, dim)?,
            DType::BF16 => self.run(slice::<bf16>(x, layout)?, dim)?,
            other => candle_core::bail!("rms normalize: unsupported dtype {other:?}"),
        };
        Ok((out, layout.shape().clone()))
    }
}

struct QuickGeluOp;

impl QuickGeluOp {
    fn run<T: Element>(x: &[T], layout: &Layout) -> candle_core::Result<CpuStorage> {
        // Rows do not matter to an elementwise map; any chunking of the flat data will do.
        let chunk = last_dim(layout)?.max(1);
        map_rows(x, chunk, |x, out| {
            let mut row = vec![0f32; x.len()];
            T::load_row(x, &mut row);
            crate::cpu_simd::quick_gelu(&mut row);
            T::store_row(&row, out);
        })
    }
}

impl CustomOp1 for QuickGeluOp {
    fn name(&self) -> &'static str {
        "qalign-quick-gelu"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match x.dtype() {
            DType::F32 => Self::run(slice::<f32>(x, layout)?, layout)?,
            DType::F16 => Self::run(slice::<f16>(x, layout)?, layout)?,
            DType::BF16 => Self::run(slice::<bf16>(x, layout)?, layout)?,
            other => candle_core::bail!("quick gelu: unsupported dtype {other:?}"),
        };
        Ok((out, layout.shape().clone()))
    }
}

struct SiluMulOp;

/// Values per stack block of the elementwise kernels.
const BLOCK: usize = 512;

/// `out = f(a, b)` elementwise through f32 blocks on the stack, in parallel over chunks; `f` gets
/// a block of `a` to overwrite and the matching block of `b`.
fn zip_map<T: Element>(a: &[T], b: &[T], f: impl Fn(&mut [f32], &[f32]) + Sync) -> CpuStorage {
    let mut out = vec![T::store(0.0); a.len()];
    out.par_chunks_mut(MIN_ROW_CHUNK_ELEMS)
        .zip(a.par_chunks(MIN_ROW_CHUNK_ELEMS))
        .zip(b.par_chunks(MIN_ROW_CHUNK_ELEMS))
        .for_each(|((out, a), b)| {
            let (mut wa, mut wb) = ([0f32; BLOCK], [0f32; BLOCK]);
            for ((out, a), b) in out
                .chunks_mut(BLOCK)
                .zip(a.chunks(BLOCK))
                .zip(b.chunks(BLOCK))
            {
                let (wa, wb) = (&mut wa[..a.len()], &mut wb[..b.len()]);
                T::load_row(a, wa);
                T::load_row(b, wb);
                f(wa, wb);
                T::store_row(wa, out);
            }
        });
    T::wrap(out)
}

impl SiluMulOp {
    fn run<T: Element>(gate: &[T], up: &[T]) -> CpuStorage {
        zip_map(gate, up, |silu, up| {
            crate::cpu_simd::silu(silu);
            T::round_row(silu);
            for (s, &u) in silu.iter_mut().zip(up) {
                *s *= u;
            }
        })
    }
}

/// `a + b` elementwise (same shape), summed in f32 and rounded once, as candle's add does.
pub fn add(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    a.contiguous()?.apply_op2_no_bwd(&b.contiguous()?, &AddOp)
}

struct AddOp;

impl CustomOp2 for AddOp {
    fn name(&self) -> &'static str {
        "qalign-add"
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        a_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if a_layout.shape() != b_layout.shape() {
            candle_core::bail!(
                "add: {:?} and {:?} differ in shape",
                a_layout.shape(),
                b_layout.shape()
            );
        }
        fn sum(a: &mut [f32], b: &[f32]) {
            for (x, &y) in a.iter_mut().zip(b) {
                *x += y;
            }
        }
        let out = match (a.dtype(), b.dtype()) {
            (DType::F32, DType::F32) => {
                zip_map(slice::<f32>(a, a_layout)?, slice::<f32>(b, b_layout)?, sum)
            }
            (DType::F16, DType::F16) => {
                zip_map(slice::<f16>(a, a_layout)?, slice::<f16>(b, b_layout)?, sum)
            }
            (DType::BF16, DType::BF16) => zip_map(
                slice::<bf16>(a, a_layout)?,
                slice::<bf16>(b, b_layout)?,
                sum,
            ),
            (x, y) => candle_core::bail!("add: unsupported dtypes {x:?} and {y:?}"),
        };
        Ok((out, a_layout.shape().clone()))
    }
}

impl CustomOp2 for SiluMulOp {
    fn name(&self) -> &'static str {
        "qalign-silu-mul"
    }

    fn cpu_fwd(
        &self,
        gate: &CpuStorage,
        gate_layout: &Layout,
        up: &CpuStorage,
        up_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if gate_layout.shape() != up_layout.shape() {
            candle_core::bail!(
                "silu·mul: gate {:?} and up {:?} differ in shape",
                gate_layout.shape(),
                up_layout.shape()
            );
        }
        let out = match (gate.dtype(), up.dtype()) {
            (DType::F32, DType::F32) => Self::run(
                slice::<f32>(gate, gate_layout)?,
                slice::<f32>(up, up_layout)?,
            ),
            (DType::F16, DType::F16) => Self::run(
                slice::<f16>(gate, gate_layout)?,
                slice::<f16>(up, up_layout)?,
            ),
            (DType::BF16, DType::BF16) => Self::run(
                slice::<bf16>(gate, gate_layout)?,
                slice::<bf16>(up, up_layout)?,
            ),
            (g, u) => candle_core::bail!("silu·mul: unsupported dtypes {g:?} and {u:?}"),
        };
        Ok((out, gate_layout.shape().clone()))
    }
}
