//! Fused CUDA kernels for GPU inference (`kernels/fused.cu`): flash attention, residual add +
//! LayerNorm, multiway RMSNorm, bias + QuickGELU and SiLU·mul. candle's CUDA compositions write
//! every intermediate (the full score matrix per head, f32 casts, norm statistics) to memory; each
//! kernel here reads its inputs once and writes its outputs once.
//!
//! This module decides which calls a kernel takes and with what launch geometry; that part builds
//! and is tested on any machine. The launches themselves (`launch`, `cuda` feature) go through
//! candle's `CudaDevice::get_or_load_custom_func`. Every entry point returns `Ok(None)` when its
//! kernel does not apply (CPU tensors, tensors that track gradients, f32 attention, unsupported
//! shapes, a build without `cuda`, `QALIGN_CUDA_KERNELS=composed`), and the caller then runs the
//! composed reference in [`crate::nn`], which the GPU tests compare against.

use candle_core::Tensor;

use crate::error::Result;

/// Threads per row of the norm kernels, and values each keeps in registers (`NORM_THREADS`,
/// `NORM_VALUES` in `fused.cu`): rows up to 4096 wide.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) const NORM_THREADS: u32 = 256;
pub(crate) const NORM_MAX_DIM: usize = 256 * 16;
/// Query rows per attention block (4 warps × 16, `FA_ROWS` in `fused.cu`).
pub(crate) const ATTENTION_ROWS: usize = 64;
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) const ATTENTION_THREADS: u32 = 128;
/// Threads per block of the elementwise kernels, and the most blocks one launch uses (the
/// kernels stride over the rest).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) const ELEMENTWISE_THREADS: u32 = 256;
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) const ELEMENTWISE_MAX_BLOCKS: u32 = 65_535;

/// Whether the fused kernels may run on these operands: CUDA tensors, none tracking a gradient,
/// and `QALIGN_CUDA_KERNELS` not `composed` (which keeps candle's compositions, to compare the
/// two in one benchmark).
pub fn applies(operands: &[&Tensor]) -> bool {
    cfg!(feature = "cuda")
        && enabled()
        && operands
            .iter()
            .all(|t| t.device().is_cuda() && !t.track_op())
}

/// `QALIGN_CUDA_KERNELS=composed` turns the fused kernels off; read once.
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("QALIGN_CUDA_KERNELS").as_deref() != Ok("composed"))
}

/// Which keys a query sees in [`attention`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Masking<'a> {
    /// Every key (ViT, abstractor).
    None,
    /// The LLM: `prefix` shared keys first, visible to all; then the batch's own keys, causal,
    /// and only the first `lengths[b]` of sample b (right padding).
    CausalPadded { prefix: usize, lengths: &'a [usize] },
}

/// A `[B, T, H, D]` view of a tensor's storage: sizes, strides (elements) and start offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HeadView {
    pub dims: [usize; 4],
    pub strides: [usize; 4],
    pub offset: usize,
}

impl HeadView {
    /// The view of a 4-D tensor, or `None` for another rank.
    pub fn of(t: &Tensor) -> Option<Self> {
        let (dims, strides) = (t.dims(), t.stride());
        if dims.len() != 4 {
            return None;
        }
        Some(Self {
            dims: [dims[0], dims[1], dims[2], dims[3]],
            strides: [strides[0], strides[1], strides[2], strides[3]],
            offset: t.layout().start_offset(),
        })
    }
}

/// The kernel's argument block (`AttnArgs` in `fused.cu`, passed by value; same field order).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct AttnArgs {
    pub batch: i32,
    pub heads: i32,
    pub tq: i32,
    pub tk: i32,
    pub kv_group: i32,
    pub prefix: i32,
    pub causal: i32,
    pub q_strides: [i64; 3],
    pub k_strides: [i64; 3],
    pub v_strides: [i64; 3],
    pub scale_log2: f32,
}

/// A checked flash-attention launch: arguments, grid, head dim and the padding lengths (if any).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct AttentionPlan {
    pub args: AttnArgs,
    pub grid: (u32, u32, u32),
    pub head_dim: usize,
    pub lengths: Option<Vec<u32>>,
}

impl AttentionPlan {
    /// Plans `softmax(q·kᵀ·scale)·v` for `q` `[B, Tq, H, D]` and `k`/`v` `[B, Tk, H/g, D]`, or
    /// says why the kernel does not take it.
    pub fn new(
        q: &HeadView,
        k: &HeadView,
        v: &HeadView,
        scale: f64,
        masking: Masking<'_>,
    ) -> std::result::Result<Self, &'static str> {
        let [b, tq, h, d] = q.dims;
        let [kb, tk, kvh, kd] = k.dims;
        if v.dims != k.dims || kb != b || kd != d {
            return Err("q, k and v disagree in batch, keys or head size");
        }
        if d != 64 && d != 128 {
            return Err("head size is not 64 or 128");
        }
        if b == 0 || tq == 0 || tk == 0 || h == 0 || kvh == 0 || h % kvh != 0 {
            return Err("empty dimension, or heads not a multiple of the K/V heads");
        }
        for view in [q, k, v] {
            if view.strides[3] != 1 {
                return Err("the head dimension is not contiguous");
            }
            // The kernel reads values in pairs as 32-bit words.
            if view.offset % 2 != 0 || view.strides[..3].iter().any(|s| s % 2 != 0) {
                return Err("a stride or the offset is odd");
            }
        }
        let fits = |n: usize| i32::try_from(n).is_ok();
        if ![b, tq, tk, h].into_iter().all(fits) || h > 65_535 || b > 65_535 {
            return Err("a dimension exceeds the launch limits");
        }
        let (prefix, causal, lengths) = match masking {
            Masking::None => (0, false, None),
            Masking::CausalPadded { prefix, lengths } => {
                if prefix + tq != tk {
                    return Err("causal attention needs keys = prefix + queries");
                }
                if lengths.len() != b || lengths.iter().any(|&l| l > tq) {
                    return Err("one padding length per sample, at most the query count");
                }
                let lengths = lengths.iter().map(|&l| l as u32).collect();
                (prefix, true, Some(lengths))
            }
        };
        let strides = |view: &HeadView| {
            [
                view.strides[0] as i64,
                view.strides[1] as i64,
                view.strides[2] as i64,
            ]
        };
        Ok(Self {
            args: AttnArgs {
                batch: b as i32,
                heads: h as i32,
                tq: tq as i32,
                tk: tk as i32,
                kv_group: (h / kvh) as i32,
                prefix: prefix as i32,
                causal: i32::from(causal),
                q_strides: strides(q),
                k_strides: strides(k),
                v_strides: strides(v),
                scale_log2: (scale * std::f64::consts::LOG2_E) as f32,
            },
            grid: (tq.div_ceil(ATTENTION_ROWS) as u32, h as u32, b as u32),
            head_dim: d,
            lengths,
        })
    }
}

/// The rows and width of a row kernel (one block per row), or why it does not apply.
pub(crate) fn row_plan(t: &Tensor) -> std::result::Result<(u32, usize), &'static str> {
    let dim = *t.dims().last().ok_or("a scalar has no rows")?;
    if dim == 0 || dim > NORM_MAX_DIM {
        return Err("row width is 0 or above 4096");
    }
    let rows = t.elem_count() / dim;
    match u32::try_from(rows) {
        Ok(rows) if rows > 0 && rows <= i32::MAX as u32 => Ok((rows, dim)),
        _ => Err("no rows, or too many for one launch"),
    }
}

/// Blocks for an elementwise kernel over `n` values.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn elementwise_blocks(n: usize) -> u32 {
    n.div_ceil(ELEMENTWISE_THREADS as usize)
        .clamp(1, ELEMENTWISE_MAX_BLOCKS as usize) as u32
}

/// Whether [`attention`]'s kernel runs for activations on `device` in `dtype` (a CUDA build,
/// kernels on, a GPU, f16 or bf16).
pub fn attention_runs_on(device: &candle_core::Device, dtype: candle_core::DType) -> bool {
    cfg!(feature = "cuda") && enabled() && device.is_cuda() && launch::attention_dtype(dtype)
}

/// `softmax(q·kᵀ·scale)·v` for `q` `[B, Tq, H, D]` and `k`/`v` `[B, Tk, H/g, D]` (views with
/// any strides, e.g. slices of a fused QKV projection), written as `[B, Tq, H·D]`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    masking: Masking<'_>,
) -> Result<Option<Tensor>> {
    if !applies(&[q, k, v]) || !attention_runs_on(q.device(), q.dtype()) {
        return Ok(None);
    }
    if q.dtype() != k.dtype() || q.dtype() != v.dtype() {
        return Ok(None);
    }
    let (Some(qv), Some(kv), Some(vv)) = (HeadView::of(q), HeadView::of(k), HeadView::of(v)) else {
        return Ok(None);
    };
    match AttentionPlan::new(&qv, &kv, &vv, scale, masking) {
        Ok(plan) => launch::attention(q, k, v, &plan).map(Some),
        Err(_) => Ok(None),
    }
}

/// LayerNorm of `x + (y + y_bias)` over the last dimension (`w`, `b` f32 `[dim]`): returns the
/// sum (the next residual) and the normalised rows. Without `y`, the sum is `x` itself.
pub fn add_layer_norm(
    x: &Tensor,
    y: Option<(&Tensor, Option<&Tensor>)>,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
) -> Result<Option<(Tensor, Tensor)>> {
    let mut operands = vec![x, w, b];
    if let Some((y, bias)) = y {
        operands.push(y);
        operands.extend(bias);
    }
    if !applies(&operands) {
        return Ok(None);
    }
    let Ok((_, dim)) = row_plan(x) else {
        return Ok(None);
    };
    // The kernel reads `dim` f32 values of `w` and `b`, and `dim` of the bias in x's dtype.
    let f32_row = |t: &Tensor| t.dims() == [dim] && t.dtype() == candle_core::DType::F32;
    if !f32_row(w) || !f32_row(b) {
        return Ok(None);
    }
    if let Some((y, bias)) = y {
        if y.dims() != x.dims() || y.dtype() != x.dtype() {
            return Ok(None);
        }
        if bias.is_some_and(|bias| bias.dims() != [dim] || bias.dtype() != x.dtype()) {
            return Ok(None);
        }
    }
    launch::add_layer_norm(x, y, w, b, eps).map(Some)
}

/// RMSNorm whose weight row is picked per row: `weights` `[R, dim]` in the activation dtype,
/// `modality` `[rows]` u32 row indices below `R` (the caller's routing checks them), or every row
/// `uniform_row` when `None`.
pub fn multiway_rms_norm(
    x: &Tensor,
    weights: &Tensor,
    modality: Option<&Tensor>,
    uniform_row: usize,
    eps: f64,
) -> Result<Option<Tensor>> {
    let mut operands = vec![x, weights];
    operands.extend(modality);
    if !applies(&operands) || weights.dtype() != x.dtype() {
        return Ok(None);
    }
    let Ok((rows, dim)) = row_plan(x) else {
        return Ok(None);
    };
    let Ok((weight_rows, weight_dim)) = weights.dims2() else {
        return Ok(None);
    };
    if weight_dim != dim || uniform_row >= weight_rows {
        return Ok(None);
    }
    if let Some(m) = modality
        && (m.dtype() != candle_core::DType::U32 || m.elem_count() != rows as usize)
    {
        return Ok(None);
    }
    launch::multiway_rms_norm(x, weights, modality, uniform_row, eps).map(Some)
}

/// QuickGELU of `y + bias` (bias `[cols]`, the Linear's, added here instead of in its own pass).
pub fn bias_quick_gelu(y: &Tensor, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
    let mut operands = vec![y];
    operands.extend(bias);
    if !applies(&operands) {
        return Ok(None);
    }
    let cols = *y.dims().last().unwrap_or(&0);
    if cols == 0 || i32::try_from(cols).is_err() {
        return Ok(None);
    }
    if let Some(bias) = bias
        && (bias.dims() != [cols] || bias.dtype() != y.dtype())
    {
        return Ok(None);
    }
    launch::bias_quick_gelu(y, bias).map(Some)
}

/// `silu(gate)·up` for two tensors of one shape and dtype.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Option<Tensor>> {
    if !applies(&[gate, up]) || gate.dims() != up.dims() || gate.dtype() != up.dtype() {
        return Ok(None);
    }
    launch::silu_mul(gate, up).map(Some)
}

#[cfg(feature = "cuda")]
#[path = "cuda_fused_launch.rs"]
mod launch;

/// Without the `cuda` feature nothing launches: [`applies`] is false, so these are never reached.
#[cfg(not(feature = "cuda"))]
mod launch {
    use super::AttentionPlan;
    use crate::error::{ModelError, Result};
    use candle_core::{DType, Tensor};

    fn unavailable<T>() -> Result<T> {
        Err(ModelError::input(
            "qalign was built without the `cuda` feature",
        ))
    }

    pub fn attention_dtype(_: DType) -> bool {
        false
    }
    pub fn attention(_: &Tensor, _: &Tensor, _: &Tensor, _: &AttentionPlan) -> Result<Tensor> {
        unavailable()
    }
    pub fn add_layer_norm(
        _: &Tensor,
        _: Option<(&Tensor, Option<&Tensor>)>,
        _: &Tensor,
        _: &Tensor,
        _: f64,
    ) -> Result<(Tensor, Tensor)> {
        unavailable()
    }
    pub fn multiway_rms_norm(
        _: &Tensor,
        _: &Tensor,
        _: Option<&Tensor>,
        _: usize,
        _: f64,
    ) -> Result<Tensor> {
        unavailable()
    }
    pub fn bias_quick_gelu(_: &Tensor, _: Option<&Tensor>) -> Result<Tensor> {
        unavailable()
    }
    pub fn silu_mul(_: &Tensor, _: &Tensor) -> Result<Tensor> {
        unavailable()
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, IndexOp};

    use super::*;

    fn view(t: &Tensor) -> HeadView {
        HeadView::of(t).unwrap()
    }

    #[test]
    fn a_fused_qkv_projection_is_read_in_place() {
        // [B=2, T=5, 3·H·D] with H=4, D=64, viewed as q/k/v [B, T, H, D] without a copy.
        let qkv = Tensor::zeros((2, 5, 3 * 4 * 64), DType::F16, &Device::Cpu).unwrap();
        let parts = qkv.reshape((2, 5, 3, 4, 64)).unwrap();
        let (q, k, v) = (
            parts.i((.., .., 0)).unwrap(),
            parts.i((.., .., 1)).unwrap(),
            parts.i((.., .., 2)).unwrap(),
        );
        let (qv, kv, vv) = (view(&q), view(&k), view(&v));
        assert_eq!(qv.strides, [5 * 768, 768, 64, 1]);
        assert_eq!((qv.offset, kv.offset, vv.offset), (0, 256, 512));
        let plan = AttentionPlan::new(&qv, &kv, &vv, 0.125, Masking::None).unwrap();
        assert_eq!(plan.grid, (1, 4, 2));
        assert_eq!(plan.head_dim, 64);
        assert_eq!(plan.args.q_strides, [3840, 768, 64]);
        assert_eq!((plan.args.tq, plan.args.tk, plan.args.kv_group), (5, 5, 1));
        assert_eq!((plan.args.causal, plan.args.prefix), (0, 0));
        assert!((plan.args.scale_log2 - (0.125 * std::f32::consts::LOG2_E)).abs() < 1e-7);
        assert_eq!(plan.lengths, None);
    }

    #[test]
    fn split_heads_layout_and_grouped_kv_heads_are_planned() {
        // The LLM's [B, H, T, D] heads, transposed to [B, T, H, D] views; 8 query heads over 2.
        let q = Tensor::zeros((3, 8, 130, 128), DType::BF16, &Device::Cpu).unwrap();
        let kv = Tensor::zeros((3, 2, 137, 128), DType::BF16, &Device::Cpu).unwrap();
        let (q, kv) = (q.transpose(1, 2).unwrap(), kv.transpose(1, 2).unwrap());
        let plan = AttentionPlan::new(
            &view(&q),
            &view(&kv),
            &view(&kv),
            1.0 / 128f64.sqrt(),
            Masking::CausalPadded {
                prefix: 7,
                lengths: &[130, 12, 1],
            },
        )
        .unwrap();
        assert_eq!(plan.grid, (3, 8, 3)); // 130 rows in blocks of 64
        assert_eq!(plan.args.kv_group, 4);
        assert_eq!(plan.args.q_strides, [8 * 130 * 128, 128, 130 * 128]);
        assert_eq!(
            (plan.args.causal, plan.args.prefix, plan.args.tk),
            (1, 7, 137)
        );
        assert_eq!(plan.lengths, Some(vec![130, 12, 1]));
    }

    #[test]
    fn shapes_the_kernel_cannot_take_fall_back() {
        let plan = |q: &Tensor, k: &Tensor, masking| {
            AttentionPlan::new(&view(q), &view(k), &view(k), 0.1, masking).err()
        };
        let t = |dims: (usize, usize, usize, usize)| {
            Tensor::zeros(dims, DType::F16, &Device::Cpu).unwrap()
        };
        assert!(plan(&t((1, 4, 2, 80)), &t((1, 4, 2, 80)), Masking::None).is_some());
        assert!(plan(&t((1, 4, 3, 64)), &t((1, 4, 2, 64)), Masking::None).is_some());
        assert!(plan(&t((1, 4, 2, 64)), &t((2, 4, 2, 64)), Masking::None).is_some());
        assert!(plan(&t((1, 0, 2, 64)), &t((1, 4, 2, 64)), Masking::None).is_some());
        // The head dimension must be contiguous, and offsets even.
        let wide = t((1, 4, 2, 65));
        let odd = wide.narrow(3, 1, 64).unwrap();
        assert!(plan(&odd, &odd, Masking::None).is_some());
        let strided = t((1, 4, 64, 2)).transpose(2, 3).unwrap();
        assert!(plan(&strided, &strided, Masking::None).is_some());
        // Causal: keys must be the prefix plus the queries, one length per sample, in range.
        let (q, k) = (t((2, 4, 2, 64)), t((2, 6, 2, 64)));
        let causal = |prefix, lengths| Masking::CausalPadded { prefix, lengths };
        assert!(plan(&q, &k, causal(2, &[4, 4])).is_none());
        assert!(plan(&q, &k, causal(1, &[4, 4])).is_some());
        assert!(plan(&q, &k, causal(2, &[4])).is_some());
        assert!(plan(&q, &k, causal(2, &[4, 5])).is_some());
    }

    #[test]
    fn row_and_elementwise_geometry() {
        let x = Tensor::zeros((3, 7, 4096), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(row_plan(&x), Ok((21, 4096)));
        let too_wide = Tensor::zeros((2, 4097), DType::F32, &Device::Cpu).unwrap();
        assert!(row_plan(&too_wide).is_err());
        let empty = Tensor::zeros((0, 16), DType::F32, &Device::Cpu).unwrap();
        assert!(row_plan(&empty).is_err());
        assert_eq!(elementwise_blocks(1), 1);
        assert_eq!(elementwise_blocks(256), 1);
        assert_eq!(elementwise_blocks(257), 2);
        assert_eq!(elementwise_blocks(usize::MAX / 2), ELEMENTWISE_MAX_BLOCKS);
    }

    #[test]
    fn cpu_tensors_never_take_the_gpu_kernels() {
        let x = Tensor::ones((2, 64), DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::ones(64, DType::F32, &Device::Cpu).unwrap();
        assert!(!applies(&[&x]));
        assert!(add_layer_norm(&x, None, &w, &w, 1e-5).unwrap().is_none());
        assert!(silu_mul(&x, &x).unwrap().is_none());
        assert!(bias_quick_gelu(&x, None).unwrap().is_none());
        let heads = Tensor::ones((1, 4, 2, 64), DType::F16, &Device::Cpu).unwrap();
        assert!(
            attention(&heads, &heads, &heads, 0.125, Masking::None)
                .unwrap()
                .is_none()
        );
    }
}

/// The kernels against candle's compositions on a real GPU (`scripts/gpu-check.sh` runs these
/// with `--features cuda`; without a CUDA device they skip). The same kernels run on the CPU
/// through `kernels/emulate.h` in `tests/cuda_kernels_emulated.rs`.
#[cfg(all(test, feature = "cuda"))]
mod gpu_tests {
    use candle_core::{D, DType, Device, IndexOp};

    use super::*;
    use crate::nn;
    use crate::nn::tests::{max_abs_diff as max_diff, tracked};

    fn gpu() -> Option<Device> {
        if !candle_core::utils::cuda_is_available() {
            eprintln!("no CUDA device: skipped");
            return None;
        }
        Some(Device::new_cuda(0).expect("CUDA device 0"))
    }

    /// `max|a − b|` relative to the reference's largest magnitude (at least 1).
    fn rel_diff(a: &Tensor, reference: &Tensor) -> f32 {
        let scale = reference
            .to_dtype(DType::F32)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        max_diff(a, reference) / scale.max(1.0)
    }

    fn randn(dims: &[usize], spread: f64, dtype: DType, dev: &Device) -> Tensor {
        Tensor::randn(0f32, spread as f32, dims, dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    fn tolerance(dtype: DType) -> f32 {
        match dtype {
            DType::F16 => 2e-3,
            DType::BF16 => 1.6e-2,
            _ => 1e-5,
        }
    }

    #[test]
    fn fused_attention_matches_the_composed_attention() {
        let Some(dev) = gpu() else { return };
        for dtype in [DType::F16, DType::BF16] {
            // ViT: q/k/v in place in a fused projection, 77 tokens, 3 heads of 64.
            let (n, t, h, hd) = (2, 77, 3, 64);
            let qkv = randn(&[n, t, 3 * h * hd], 1.5, dtype, &dev);
            let parts = qkv.reshape((n, t, 3, h, hd)).unwrap();
            let part = |i: usize| parts.i((.., .., i)).unwrap();
            let fused = attention(&part(0), &part(1), &part(2), 0.125, Masking::None)
                .unwrap()
                .expect("the kernel takes a fused projection");
            let split = |i: usize| tracked(&part(i).transpose(1, 2).unwrap().contiguous().unwrap());
            let composed = nn::attention(&split(0), &split(1), &split(2), 0.125, None).unwrap();
            let composed = nn::merge_heads(&composed).unwrap();
            let diff = max_diff(&fused, &composed);
            assert!(diff <= tolerance(dtype), "ViT attention {dtype:?}: {diff}");

            // LLM: causal after a 5-key prefix, right padding, 4 query heads over 2 K/V heads.
            let (b, heads, kv_heads, len, prefix, hd) = (3, 4, 2, 70, 5, 128);
            let lengths = [70, 33, 1];
            let q = randn(&[b, heads, len, hd], 1.5, dtype, &dev);
            let k = randn(&[b, kv_heads, prefix + len, hd], 1.5, dtype, &dev);
            let v = randn(&[b, kv_heads, prefix + len, hd], 1.0, dtype, &dev);
            let scale = 1.0 / (hd as f64).sqrt();
            let masking = Masking::CausalPadded {
                prefix,
                lengths: &lengths,
            };
            let fused = attention(
                &q.transpose(1, 2).unwrap(),
                &k.transpose(1, 2).unwrap(),
                &v.transpose(1, 2).unwrap(),
                scale,
                masking,
            )
            .unwrap()
            .expect("the kernel takes the LLM's heads");
            let repeat = |t: &Tensor| {
                let (b, kvh, l, d) = t.dims4().unwrap();
                t.unsqueeze(2)
                    .unwrap()
                    .broadcast_as((b, kvh, heads / kvh, l, d))
                    .unwrap()
                    .contiguous()
                    .unwrap()
                    .reshape((b, heads, l, d))
                    .unwrap()
            };
            let mask = crate::llm::causal_padding_mask(&lengths, len, prefix, &dev).unwrap();
            let composed = nn::attention(
                &tracked(&q),
                &tracked(&repeat(&k)),
                &tracked(&repeat(&v)),
                scale,
                Some(&mask),
            )
            .unwrap();
            let composed = nn::merge_heads(&composed).unwrap();
            let diff = max_diff(&fused, &composed);
            assert!(diff <= tolerance(dtype), "LLM attention {dtype:?}: {diff}");
        }
    }

    #[test]
    fn fused_norms_and_activations_match_their_compositions() {
        let Some(dev) = gpu() else { return };
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            // Relative to the output's magnitude: a few units in the last place of `dtype`.
            let tol = tolerance(dtype) * 4.0;
            // Residual + bias + LayerNorm at the ViT width.
            let (rows, dim) = (6, 1024);
            let x = randn(&[rows, dim], 2.0, dtype, &dev);
            let y = randn(&[rows, dim], 1.0, dtype, &dev);
            let bias = randn(&[dim], 0.5, dtype, &dev);
            let w = randn(&[dim], 1.0, DType::F32, &dev);
            let b = randn(&[dim], 0.2, DType::F32, &dev);
            let (sum, normed) = add_layer_norm(&x, Some((&y, Some(&bias))), &w, &b, 1e-5)
                .unwrap()
                .expect("the kernel takes a 1024-wide row");
            let h = (&x + y.broadcast_add(&bias).unwrap()).unwrap();
            assert_eq!(max_diff(&sum, &h), 0.0, "residual sum {dtype:?}");
            let h32 = h.to_dtype(DType::F32).unwrap();
            let centred = h32
                .broadcast_sub(&h32.mean_keepdim(D::Minus1).unwrap())
                .unwrap();
            let var = centred.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
            let composed = centred
                .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
                .unwrap()
                .broadcast_mul(&w)
                .unwrap()
                .broadcast_add(&b)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let diff = rel_diff(&normed, &composed);
            assert!(diff <= tol, "layer norm {dtype:?}: {diff}");

            // Multiway RMSNorm at the LLM width, rows alternating between the two weights.
            let (rows, dim) = (5, 4096);
            let x = randn(&[rows, dim], 3.0, dtype, &dev);
            let weights = randn(&[2, dim], 1.0, dtype, &dev);
            let modality = Tensor::new(&[0u32, 1, 1, 0, 1], &dev).unwrap();
            let fused = multiway_rms_norm(&x, &weights, Some(&modality), 0, 1e-6)
                .unwrap()
                .expect("the kernel takes a 4096-wide row");
            let composed = nn::rms_normalize(&tracked(&x), 1e-6)
                .unwrap()
                .mul(&weights.index_select(&modality, 0).unwrap())
                .unwrap();
            let diff = rel_diff(&fused, &composed);
            assert!(diff <= tol, "multiway rms norm {dtype:?}: {diff}");

            // Bias + QuickGELU and SiLU·mul.
            let y = randn(&[37, 100], 4.0, dtype, &dev);
            let bias = randn(&[100], 1.0, dtype, &dev);
            let fused = bias_quick_gelu(&y, Some(&bias)).unwrap().expect("applies");
            let composed = nn::quick_gelu(&tracked(&y.broadcast_add(&bias).unwrap())).unwrap();
            let diff = rel_diff(&fused, &composed);
            assert!(diff <= tol, "bias + quick gelu {dtype:?}: {diff}");
            let up = randn(&[37, 100], 2.0, dtype, &dev);
            let fused = silu_mul(&y, &up).unwrap().expect("applies");
            let composed = (tracked(&y).silu().unwrap() * &up).unwrap();
            let diff = rel_diff(&fused, &composed);
            assert!(diff <= tol, "silu·mul {dtype:?}: {diff}");
        }
    }
}
