//! Small building blocks shared by the three sub-networks: a bias-optional Linear on any leading shape,
//! a two-pass LayerNorm computed in f32, the unit-weight RMS normalisation of transformers' LlamaRMSNorm,
//! and an attention core whose softmax always runs in f32 (as upstream does for the LLM, and as fp16
//! PyTorch kernels effectively do elsewhere).

use candle_core::{D, DType, Tensor};

use crate::error::{ModelError, Result};
use crate::loader::Weights;

/// `y = x·Wᵀ + b` over the last dimension; weights kept in PyTorch's `[out, in]` layout.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// Reads `<prefix>.weight` `[out, in]` and, when `bias`, `<prefix>.bias` `[out]`.
    pub fn load(w: &Weights, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = w.get(&[out_dim, in_dim], "weight")?;
        let bias = if bias {
            Some(w.get(&[out_dim], "bias")?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    /// Builds a layer from tensors already in the compute dtype (`weight` is `[out, in]`).
    pub fn from_parts(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// The `[out, in]` weight.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Applies the layer to `[..., in]`, giving `[..., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let Some((&in_dim, leading)) = x.dims().split_last() else {
            return Err(ModelError::input("Linear applied to a scalar"));
        };
        let rows = leading.iter().product::<usize>();
        let x2 = x.contiguous()?.reshape((rows, in_dim))?;
        let mut y = x2.matmul(&self.weight.t()?)?;
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(bias)?;
        }
        let mut out_dims = leading.to_vec();
        out_dims.push(self.weight.dim(0)?);
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
}

/// `x·rsqrt(mean(x²) + eps)` computed in f32 and cast back to the input dtype, before any weight is
/// applied (transformers 4.36 LlamaRMSNorm casts first, then multiplies by the weight).
pub fn rms_normalize(x: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let mean_sq = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv_rms = (mean_sq + eps)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&inv_rms)?.to_dtype(dtype)?)
}

/// QuickGELU: `z·sigmoid(1.702·z)`.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    Ok((x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)?)
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
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
    Ok(probs.matmul(v)?)
}
