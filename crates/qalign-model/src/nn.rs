//! Small building blocks shared by the three sub-networks: a bias-optional Linear on any leading shape
//! (with optional LoRA branches for fine-tuning), a two-pass LayerNorm computed in f32, the unit-weight RMS
//! normalisation of transformers' LlamaRMSNorm, and an attention core whose softmax always runs in f32 (as
//! upstream does for the LLM, and as fp16 PyTorch kernels effectively do elsewhere).
//!
//! Inference runs the norms, QuickGELU and SiLU·mul as fused kernels, on the CPU (`cpu_kernels`)
//! and on CUDA GPUs (`cuda_fused`); the compositions below are the reference they are tested
//! against, and what runs everywhere else.
//!
//! Everything here also runs under candle's autograd: when an input tracks gradients, fused kernels without
//! a backward pass are swapped for differentiable compositions, and frozen weights go through
//! [`frozen_matmul`], whose backward returns only the input gradient.

use std::sync::{Arc, Mutex};

use candle_core::quantized::QMatMul;
use candle_core::{CpuStorage, CustomOp1, D, DType, Layout, Shape, Tensor};

use crate::adapt::{Adaptation, LoraBranch};
use crate::cpu_kernels;
use crate::cpu_matmul::PackedLinear;
use crate::cuda_fused;
use crate::device::Quant;
use crate::error::{ModelError, Result};
use crate::gguf::StoredKernel;
use crate::loader::Weights;
use crate::quant::QuantLayer;

/// How a [`Derived`] weight is computed from its sources.
type Combine = Arc<dyn Fn(&[Tensor]) -> candle_core::Result<Tensor> + Send + Sync>;

/// A weight computed from checkpoint tensors (fused, regrouped, stacked). Frozen sources are combined once
/// at load; trainable ones at every use, so the layer always sees the optimizer's latest values.
#[derive(Clone)]
pub struct Derived {
    sources: Vec<Tensor>,
    combine: Option<Combine>,
    fixed: Option<Tensor>,
}

impl std::fmt::Debug for Derived {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Derived")
            .field("live", &self.fixed.is_none())
            .finish()
    }
}

impl Derived {
    /// A tensor used as it is.
    pub fn fixed(tensor: Tensor) -> Self {
        Self {
            sources: Vec::new(),
            combine: None,
            fixed: Some(tensor),
        }
    }

    /// `combine(sources)`, computed now unless a source is trainable.
    pub fn new(
        sources: Vec<Tensor>,
        combine: impl Fn(&[Tensor]) -> candle_core::Result<Tensor> + Send + Sync + 'static,
    ) -> Result<Self> {
        if sources.iter().any(Tensor::track_op) {
            Ok(Self {
                sources,
                combine: Some(Arc::new(combine)),
                fixed: None,
            })
        } else {
            Ok(Self::fixed(combine(&sources)?))
        }
    }

    /// The current value.
    pub fn get(&self) -> Result<Tensor> {
        match (&self.fixed, &self.combine) {
            (Some(t), _) => Ok(t.clone()),
            (None, Some(combine)) => Ok(combine(&self.sources)?),
            (None, None) => Err(ModelError::input("derived weight without sources")),
        }
    }
}

/// `x·Wᵀ` for a weight that receives no gradient: the forward is an ordinary matmul, the backward returns
/// only `grad·W` (candle's own matmul backward would also materialise a full gradient for `W`).
pub fn frozen_matmul(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let out = x.detach().matmul(&weight.t()?)?;
    if !x.track_op() {
        return Ok(out);
    }
    let op = FrozenMatmul {
        weight: weight.clone(),
        out: Mutex::new(Some(out)),
    };
    Ok(x.apply_op1(op)?)
}

/// `x·Wᵀ` for `x` `[rows, in]` and `W` `[out, in]`: gradients reach `W` only when it is trainable.
pub fn project(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    if weight.track_op() {
        Ok(x.matmul(&weight.t()?)?)
    } else {
        frozen_matmul(x, weight)
    }
}

/// The autograd node of [`frozen_matmul`]: its forward hands over the product computed beforehand.
struct FrozenMatmul {
    weight: Tensor,
    out: Mutex<Option<Tensor>>,
}

impl FrozenMatmul {
    fn take(&self) -> candle_core::Result<Tensor> {
        self.out
            .lock()
            .map_err(|_| candle_core::Error::Msg("frozen-matmul lock poisoned".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("frozen-matmul forward ran twice".into()))
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = self.take()?.contiguous()?;
        let (storage, layout) = out.storage_and_layout();
        match &*storage {
            candle_core::Storage::Cpu(cpu) if layout.start_offset() == 0 => {
                Ok((cpu.clone(), layout.shape().clone()))
            }
            _ => Err(candle_core::Error::Msg(
                "frozen-matmul: product is not a plain CPU tensor".into(),
            )),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let out = self.take()?.contiguous()?;
        let (storage, layout) = out.storage_and_layout();
        match &*storage {
            candle_core::Storage::Cuda(cuda) => {
                Ok((cuda.try_clone(layout)?, layout.shape().clone()))
            }
            _ => Err(candle_core::Error::Msg(
                "frozen-matmul: product is not a CUDA tensor".into(),
            )),
        }
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.weight.to_dtype(grad.dtype())?)?))
    }
}

/// A LoRA branch placed on output columns `offset..offset + B.rows` of a (possibly fused) Linear.
#[derive(Debug, Clone)]
struct PlacedBranch {
    branch: LoraBranch,
    offset: usize,
}

/// The weight of a [`Linear`]: a dense tensor in the compute dtype (possibly derived, possibly
/// trainable), ggml blocks for candle's quantised matmul, or a frozen CPU weight packed for
/// [`PackedLinear`]'s kernels (the last two for inference only).
#[derive(Debug, Clone)]
enum Kernel {
    Dense(Derived),
    Quantized { matmul: QMatMul, out_dim: usize },
    Packed(Arc<PackedLinear>),
}

/// `y = x·Wᵀ + b` over the last dimension; weights kept in PyTorch's `[out, in]` layout. Fine-tuning adds
/// LoRA branches `scale·(dropout(x)·Aᵀ)·Bᵀ`, kept apart from `W`. Loaded with quantisation
/// (`Weights::with_quant`), `W` is quantised once, right after it is read (adapters already merged
/// into it), and the dense tensor is dropped.
#[derive(Debug, Clone)]
pub struct Linear {
    kernel: Kernel,
    bias: Option<Derived>,
    branches: Vec<PlacedBranch>,
    adaptation: Option<Arc<Adaptation>>,
}

impl Linear {
    /// Reads `<prefix>.weight` `[out, in]` and, when `bias`, `<prefix>.bias` `[out]`; picks up the LoRA
    /// branch the model is being trained with for this module, if any, or quantises the weight when
    /// `w` asks for it.
    pub fn load(w: &Weights, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let bias = if bias {
            Some(w.get(&[out_dim], "bias")?)
        } else {
            None
        };
        if let Some(stored) = Self::from_store(
            w,
            w.prefix(),
            in_dim,
            out_dim,
            bias.clone().map(Derived::fixed),
        )? {
            return Ok(stored);
        }
        let weight = w.get(&[out_dim, in_dim], "weight")?;
        let mut linear = Self::from_parts(weight, bias);
        linear.attach_branch(w, in_dim, out_dim, 0)?;
        linear.quantize_for(w, w.prefix())
    }

    /// Builds a layer from tensors already in the compute dtype (`weight` is `[out, in]`).
    pub fn from_parts(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self::from_derived(Derived::fixed(weight), bias.map(Derived::fixed))
    }

    /// Builds a layer from derived (fused or regrouped) weights; call [`Linear::quantize_for`]
    /// once it is complete.
    pub fn from_derived(weight: Derived, bias: Option<Derived>) -> Self {
        Self {
            kernel: Kernel::Dense(weight),
            bias,
            branches: Vec::new(),
            adaptation: None,
        }
    }

    /// The layer `name` as a pre-quantised checkpoint stores it (its kernel as written by
    /// `qalign quantize`, recorded in the quantisation report), or `None` when `w` reads an
    /// ordinary checkpoint.
    pub fn from_store(
        w: &Weights,
        name: &str,
        in_dim: usize,
        out_dim: usize,
        bias: Option<Derived>,
    ) -> Result<Option<Self>> {
        let Some(stored) = w.stored_kernel(name, out_dim, in_dim)? else {
            return Ok(None);
        };
        let (kernel, format) = match stored {
            StoredKernel::Blocks(q) => {
                let format = Quant::from_ggml(q.dtype());
                let matmul = QMatMul::from_arc(q)?;
                (Kernel::Quantized { matmul, out_dim }, format)
            }
            StoredKernel::Dense(t) => (Kernel::Dense(Derived::fixed(t.to_dtype(w.dtype())?)), None),
        };
        if let Some(log) = w.quant_log() {
            log.record(QuantLayer {
                name: name.to_owned(),
                in_dim,
                out_dim,
                format,
            });
        }
        Ok(Some(Self {
            kernel,
            bias,
            branches: Vec::new(),
            adaptation: None,
        }))
    }

    /// Quantises the weight when `w` loads with quantisation (else returns the layer unchanged):
    /// in the asked format when the input dimension is a multiple of its block, else in the
    /// fallback of [`crate::Quant::for_in_dim`], recording the layer as `name` either way.
    pub fn quantize_for(self, w: &Weights, name: &str) -> Result<Self> {
        let Some(log) = w.quant_log() else {
            return self.pack_for(w);
        };
        let Kernel::Dense(derived) = &self.kernel else {
            return Ok(self);
        };
        if !self.branches.is_empty() || derived.fixed.is_none() {
            return Err(ModelError::Quant(format!(
                "`{name}` is being trained; training runs on dense weights"
            )));
        }
        let weight = derived.get()?;
        let (out_dim, in_dim) = weight.dims2()?;
        let format = log.asked.for_in_dim(in_dim);
        log.record(QuantLayer {
            name: name.to_owned(),
            in_dim,
            out_dim,
            format,
        });
        let Some(format) = format else {
            if let Some(capture) = log.capture() {
                capture.push(name, StoredKernel::Dense(weight));
            }
            return Ok(self);
        };
        let qtensor = Arc::new(crate::quant::quantize_weight(&weight, format)?);
        drop(weight);
        if let Some(capture) = log.capture() {
            capture.push(name, StoredKernel::Blocks(qtensor.clone()));
        }
        Ok(Self {
            kernel: Kernel::Quantized {
                matmul: QMatMul::from_arc(qtensor)?,
                out_dim,
            },
            ..self
        })
    }

    /// Packs a frozen CPU weight for [`PackedLinear`] when the model only runs inference and a
    /// packed kernel exists for its dtype on this CPU; otherwise returns the layer unchanged.
    fn pack_for(self, w: &Weights) -> Result<Self> {
        let Kernel::Dense(derived) = &self.kernel else {
            return Ok(self);
        };
        let Some(weight) = &derived.fixed else {
            return Ok(self);
        };
        if w.trains() || !self.branches.is_empty() || !w.device().is_cpu() {
            return Ok(self);
        }
        let bias = match &self.bias {
            None => None,
            Some(Derived { fixed: Some(b), .. }) => Some(b),
            Some(_) => return Ok(self),
        };
        match PackedLinear::pack(weight, bias)? {
            Some(packed) => Ok(Self {
                kernel: Kernel::Packed(Arc::new(packed)),
                bias: None,
                ..self
            }),
            None => Ok(self),
        }
    }

    /// Adds the training LoRA branch of module `w` (if the model is trained with one there) on output
    /// columns `offset..offset + out_dim`: fused layers host the branches of their parts.
    pub fn attach_branch(
        &mut self,
        w: &Weights,
        in_dim: usize,
        out_dim: usize,
        offset: usize,
    ) -> Result<()> {
        if let Some((branch, adaptation)) = w.lora_branch(in_dim, out_dim)? {
            self.branches.push(PlacedBranch { branch, offset });
            self.adaptation = Some(adaptation);
        }
        Ok(())
    }

    /// The current `[out, in]` weight (without LoRA branches); a quantised one dequantised to f32.
    pub fn weight(&self) -> Result<Tensor> {
        match &self.kernel {
            Kernel::Dense(weight) => weight.get(),
            Kernel::Quantized { matmul, .. } => Ok(match matmul {
                QMatMul::QTensor(q) => q.dequantize(&q.device())?,
                QMatMul::Tensor(t) => t.clone(),
                QMatMul::TensorF16(t) => t.to_dtype(DType::F32)?,
            }),
            Kernel::Packed(packed) => Ok(packed.unpack()?),
        }
    }

    /// Whether the weight is held as quantised blocks.
    pub fn is_quantized(&self) -> bool {
        matches!(self.kernel, Kernel::Quantized { .. })
    }

    /// `x·Wᵀ` (plus any LoRA branches) and the bias still to add, for a fused epilogue that adds
    /// it in the same pass as what follows. Layers whose kernel adds the bias itself, or that carry
    /// branches, return their whole output and `None`.
    pub fn forward_unbiased(&self, x: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        match (&self.bias, &self.kernel) {
            (Some(bias), Kernel::Dense(_) | Kernel::Quantized { .. })
                if self.branches.is_empty() =>
            {
                let unbiased = Self {
                    bias: None,
                    ..self.clone()
                };
                Ok((unbiased.forward(x)?, Some(bias.get()?)))
            }
            _ => Ok((self.forward(x)?, None)),
        }
    }

    /// Applies the layer to `[..., in]`, giving `[..., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let Some((&in_dim, leading)) = x.dims().split_last() else {
            return Err(ModelError::input("Linear applied to a scalar"));
        };
        let rows = leading.iter().product::<usize>();
        let x2 = x.contiguous()?.reshape((rows, in_dim))?;
        let (mut y, out_dim) = match &self.kernel {
            Kernel::Dense(weight) => {
                let weight = weight.get()?;
                (project(&x2, &weight)?, weight.dim(0)?)
            }
            Kernel::Quantized { matmul, out_dim } => {
                (crate::cpu_quant::forward(matmul, &x2)?, *out_dim)
            }
            // Packed only for inference; a gradient through it (never expected) takes the
            // unpacked weight.
            Kernel::Packed(packed) if x2.track_op() => {
                (frozen_matmul(&x2, &packed.unpack()?)?, packed.out_dim())
            }
            Kernel::Packed(packed) => (packed.forward(&x2)?, packed.out_dim()),
        };
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(&bias.get()?)?;
        }
        for placed in &self.branches {
            let input = match &self.adaptation {
                Some(adaptation) => adaptation.lora_dropout(&x2, placed.branch.dropout)?,
                None => x2.clone(),
            };
            let delta = placed.branch.forward(&input)?;
            let width = delta.dim(1)?;
            let delta = if width == out_dim {
                delta
            } else {
                let mut parts = Vec::with_capacity(3);
                if placed.offset > 0 {
                    parts.push(Tensor::zeros(
                        (rows, placed.offset),
                        delta.dtype(),
                        delta.device(),
                    )?);
                }
                let rest = out_dim - placed.offset - width;
                parts.push(delta.clone());
                if rest > 0 {
                    parts.push(Tensor::zeros((rows, rest), delta.dtype(), delta.device())?);
                }
                Tensor::cat(&parts, 1)?
            };
            y = (y + delta)?;
        }
        let mut out_dims = leading.to_vec();
        out_dims.push(out_dim);
        Ok(y.reshape(out_dims)?)
    }
}

/// LayerNorm over the last dimension, computed in f32 with a centred (two-pass) variance;
/// the affine parameters stay in f32 and the result is cast back to the input dtype.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Reads `<prefix>.weight` and `<prefix>.bias`, both `[dim]`.
    pub fn load(w: &Weights, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: w.get_as(&[dim], "weight", DType::F32)?,
            bias: w.get_as(&[dim], "bias", DType::F32)?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some((_, normed)) =
            cuda_fused::add_layer_norm(x, None, &self.weight, &self.bias, self.eps)?
        {
            return Ok(normed);
        }
        if cpu_kernels::applies(&[x, &self.weight, &self.bias]) {
            return Ok(cpu_kernels::layer_norm(
                x,
                &self.weight,
                &self.bias,
                self.eps,
            )?);
        }
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let centred = x.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let inv_std = (var + self.eps)?.sqrt()?.recip()?;
        let y = centred
            .broadcast_mul(&inv_std)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)?;
        Ok(y.to_dtype(dtype)?)
    }

    /// The residual connection and this norm in one: `h = x + (y + y_bias)` and `(h, norm(h))`.
    /// On the GPU one fused kernel; elsewhere the same steps as [`residual_add`] and
    /// [`LayerNorm::forward`].
    pub fn forward_residual(
        &self,
        x: &Tensor,
        y: &Tensor,
        y_bias: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        if let Some(fused) =
            cuda_fused::add_layer_norm(x, Some((y, y_bias)), &self.weight, &self.bias, self.eps)?
        {
            return Ok(fused);
        }
        let y = match y_bias {
            Some(bias) => y.broadcast_add(bias)?,
            None => y.clone(),
        };
        let h = residual_add(x, &y)?;
        let normed = self.forward(&h)?;
        Ok((h, normed))
    }
}

/// `x·rsqrt(mean(x²) + eps)` computed in f32 and cast back to the input dtype, before any weight is
/// applied (transformers 4.36 LlamaRMSNorm casts first, then multiplies by the weight).
pub fn rms_normalize(x: &Tensor, eps: f64) -> Result<Tensor> {
    if cpu_kernels::applies(&[x]) {
        return Ok(cpu_kernels::rms_normalize(x, eps)?);
    }
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let mean_sq = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv_rms = (mean_sq + eps)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&inv_rms)?.to_dtype(dtype)?)
}

/// QuickGELU of `y + bias` (a Linear's output before its bias, see [`Linear::forward_unbiased`]):
/// one fused pass on the GPU.
pub fn bias_quick_gelu(y: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    if let Some(fused) = cuda_fused::bias_quick_gelu(y, bias)? {
        return Ok(fused);
    }
    match bias {
        Some(bias) => quick_gelu(&y.broadcast_add(bias)?),
        None => quick_gelu(y),
    }
}

/// QuickGELU: `z·sigmoid(1.702·z)`.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    if cpu_kernels::applies(&[x]) {
        return Ok(cpu_kernels::quick_gelu(x)?);
    }
    Ok((x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)?)
}

/// `a + b` for two tensors of one shape and dtype (the residual connections).
pub fn residual_add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if cpu_kernels::applies(&[a, b]) && a.dims() == b.dims() && a.dtype() == b.dtype() {
        return Ok(cpu_kernels::add(a, b)?);
    }
    Ok((a + b)?)
}

/// `silu(gate)·up`, the gated activation of the LLaMA MLP.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if let Some(fused) = cuda_fused::silu_mul(gate, up)? {
        return Ok(fused);
    }
    if cpu_kernels::applies(&[gate, up]) && gate.dims() == up.dims() && gate.dtype() == up.dtype() {
        return Ok(cpu_kernels::silu_mul(gate, up)?);
    }
    Ok((gate.silu()? * up)?)
}

/// Splits `[B, T, heads·head_dim]` into contiguous heads `[B, heads, T, head_dim]`.
pub fn split_heads(x: &Tensor, heads: usize, head_dim: usize) -> Result<Tensor> {
    let (b, t, _) = x.dims3()?;
    Ok(x.reshape((b, t, heads, head_dim))?
        .transpose(1, 2)?
        .contiguous()?)
}

/// Inverse of [`split_heads`]: `[B, heads, T, head_dim]` → `[B, T, heads·head_dim]`.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = x.dims4()?;
    Ok(x.transpose(1, 2)?.contiguous()?.reshape((b, t, h * d))?)
}

/// `softmax(q·kᵀ·scale + mask)·v` on `[B, H, Tq, d]` / `[B, H, Tk, d]`. Upstream scales the scores; when
/// the scale is a power of two, scaling q instead is bit-identical and touches Tq·d values instead of
/// Tq·Tk. The softmax runs in f32 and its result is cast back to the activation dtype.
/// `mask` is an additive f32 tensor broadcastable to `[B, H, Tq, Tk]`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let dtype = q.dtype();
    if mask.is_none()
        && let Some(context) = crate::cpu_attention::attention(q, k, v, scale)?
    {
        return Ok(context);
    }
    if dtype != DType::F32 && cpu_kernels::applies(&[q, k, v]) {
        // candle's CPU matmul has no half-precision kernel (it widens both operands on every
        // call): run the whole attention in f32 and round its output once.
        let wide = |t: &Tensor| t.to_dtype(DType::F32);
        return Ok(attention(&wide(q)?, &wide(k)?, &wide(v)?, scale, mask)?.to_dtype(dtype)?);
    }
    let scores = if scale.log2().fract() == 0.0 {
        (q * scale)?.matmul(&k.t()?)?
    } else {
        (q.matmul(&k.t()?)? * scale)?
    };
    let scores = scores.to_dtype(DType::F32)?;
    let scores = match mask {
        Some(mask) => scores.broadcast_add(mask)?,
        None => scores,
    };
    let probs = softmax_last_dim(&scores)?.to_dtype(dtype)?;
    Ok(probs.matmul(v)?)
}

/// Softmax over the last dimension: candle's fused kernel for inference; under autograd (it has no
/// backward) the same max-shifted formula from differentiable ops, with the shift held constant.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !x.track_op() {
        return Ok(candle_nn::ops::softmax_last_dim(x)?);
    }
    let max = x.max_keepdim(D::Minus1)?.detach();
    let exp = x.broadcast_sub(&max)?.exp()?;
    let sum = exp.sum_keepdim(D::Minus1)?;
    Ok(exp.broadcast_div(&sum)?)
}

#[cfg(test)]
pub(crate) mod tests {
    use candle_core::{Device, Var};
    use proptest::prelude::*;

    use super::*;

    /// A tensor that tracks gradients takes the composed (reference) path.
    pub(crate) fn tracked(x: &Tensor) -> Tensor {
        Var::from_tensor(x).unwrap().as_tensor().clone()
    }

    pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        let a = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
        let b = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Rows of `dim` values with an offset and spread, as activations have.
    fn input(values: &[f32], dim: usize, offset: f32, dtype: DType) -> Tensor {
        let rows = values.len() / dim;
        let shifted: Vec<f32> = values[..rows * dim].iter().map(|v| v + offset).collect();
        Tensor::from_vec(shifted, (rows, dim), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    /// An error bound of a few units in the last place of `dtype` at the output's magnitude.
    fn bound(dtype: DType, magnitude: f32) -> f32 {
        let ulp = match dtype {
            DType::F32 => f32::EPSILON,
            DType::F16 => 1.0 / 1024.0,
            _ => 1.0 / 128.0,
        };
        4.0 * ulp * magnitude.max(1.0)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn fused_norms_and_activations_match_their_compositions(
            values in prop::collection::vec(-8.0f32..8.0, 8..600),
            dim in 1usize..70,
            offset in -50.0f32..50.0,
            eps in prop::sample::select(vec![1e-5, 1e-6]),
            dtype in prop::sample::select(vec![DType::F32, DType::F16, DType::BF16]),
        ) {
            prop_assume!(values.len() >= dim);
            let x = input(&values, dim, offset, dtype);
            let weight: Vec<f32> = (0..dim).map(|i| 0.5 + (i % 7) as f32 * 0.25).collect();
            let bias: Vec<f32> = (0..dim).map(|i| (i % 5) as f32 * 0.1 - 0.2).collect();
            let norm = LayerNorm {
                weight: Tensor::new(weight.as_slice(), &Device::Cpu).unwrap(),
                bias: Tensor::new(bias.as_slice(), &Device::Cpu).unwrap(),
                eps,
            };
            let fused = norm.forward(&x).unwrap();
            prop_assert_eq!(fused.dtype(), dtype);
            prop_assert_eq!(fused.dims(), x.dims());
            let composed = norm.forward(&tracked(&x)).unwrap();
            // LayerNorm outputs are O(weight·√dim) at most.
            let scale = 2.5 * (dim as f32).sqrt();
            // f32: the composition's f32 sums of shifted rows lose digits that f64 sums keep.
            let tol = if dtype == DType::F32 { 1e-4 * scale } else { bound(dtype, scale) };
            prop_assert!(max_abs_diff(&fused, &composed) <= tol, "layer norm {dtype:?}");

            let fused = rms_normalize(&x, eps).unwrap();
            let composed = rms_normalize(&tracked(&x), eps).unwrap();
            let tol = if dtype == DType::F32 { 1e-5 * (dim as f32).sqrt() } else { bound(dtype, (dim as f32).sqrt()) };
            prop_assert!(max_abs_diff(&fused, &composed) <= tol, "rms {dtype:?}");

            let fused = quick_gelu(&x).unwrap();
            let composed = quick_gelu(&tracked(&x)).unwrap();
            let magnitude = offset.abs() + 8.0;
            // The composition rounds 1.702·z and the sigmoid to `dtype` before multiplying.
            let tol = if dtype == DType::F32 { 1e-5 * magnitude } else { 3.0 * bound(dtype, magnitude) };
            prop_assert!(max_abs_diff(&fused, &composed) <= tol, "quick gelu {dtype:?}");

            let up = (x.affine(0.5, 1.0).unwrap()).to_dtype(dtype).unwrap();
            let fused = silu_mul(&x, &up).unwrap();
            prop_assert_eq!(fused.dtype(), dtype);
            let composed = silu_mul(&tracked(&x), &up).unwrap();
            // |silu(z)·(z/2 + 1)| ≤ m·(m/2 + 1); half precision rounds silu(z) and the product.
            let product = magnitude * (magnitude / 2.0 + 1.0);
            let tol = if dtype == DType::F32 { 1e-5 * product } else { 3.0 * bound(dtype, product) };
            prop_assert!(max_abs_diff(&fused, &composed) <= tol, "silu·mul {dtype:?}");

            // The sum is rounded once either way: bit for bit.
            let fused = residual_add(&x, &up).unwrap();
            let composed = residual_add(&tracked(&x), &up).unwrap();
            prop_assert_eq!(max_abs_diff(&fused, &composed), 0.0, "add {:?}", dtype);
        }
    }

    #[test]
    fn a_trainable_norm_on_a_frozen_input_still_gets_gradients() {
        let x = Tensor::arange(0f32, 12.0, &Device::Cpu)
            .unwrap()
            .reshape((3, 4))
            .unwrap();
        let weight = Var::new(&[1f32, 2.0, 3.0, 4.0], &Device::Cpu).unwrap();
        let bias = Var::new(&[0f32; 4], &Device::Cpu).unwrap();
        let norm = LayerNorm {
            weight: weight.as_tensor().clone(),
            bias: bias.as_tensor().clone(),
            eps: 1e-5,
        };
        let grads = norm
            .forward(&x)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        // d(sum)/d(bias) is the number of rows.
        let db: Vec<f32> = grads.get(bias.as_tensor()).unwrap().to_vec1().unwrap();
        assert_eq!(db, vec![3.0; 4]);
        assert!(grads.get(weight.as_tensor()).is_some());
    }

    #[test]
    fn fused_kernels_keep_shape_and_handle_non_contiguous_input() {
        let x = Tensor::arange(0f32, 24.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3, 4))
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        assert!(!x.is_contiguous());
        let fused = rms_normalize(&x, 1e-6).unwrap();
        let composed = rms_normalize(&tracked(&x.contiguous().unwrap()), 1e-6).unwrap();
        assert_eq!(fused.dims(), &[2, 4, 3]);
        assert!(max_abs_diff(&fused, &composed) < 1e-6);
        let g = quick_gelu(&x).unwrap();
        let expected = quick_gelu(&tracked(&x.contiguous().unwrap())).unwrap();
        assert!(max_abs_diff(&g, &expected) < 1e-5);
    }
}
