//! The vision tower (`MplugOwlVisionModel`, upstream `q_align/model/visual_encoder.py`): a CLIP-style
//! pre-LN ViT with a bias-free conv patch embedding, a class token, learned absolute positions,
//! QuickGELU MLPs and a head-interleaved fused QKV projection. Output: `post_layernorm` over all tokens.
//! Key prefix: `model.vision_model.`.

use candle_core::{DType, Device, IndexOp, Tensor};

use crate::config::VisionConfig;
use crate::cuda_fused::{self, Masking};
use crate::error::{ModelError, Result};
use crate::loader::Weights;
use crate::nn::{
    Derived, LayerNorm, Linear, attention, bias_quick_gelu, merge_heads, quick_gelu, residual_add,
    split_heads,
};

/// Conv2d(kernel = stride = patch, no bias) computed as one matmul over flattened patches.
#[derive(Debug, Clone)]
struct PatchEmbedding {
    /// `[hidden, channels·patch·patch]`, the conv kernel flattened in (channel, row, col) order.
    weight: Tensor,
    channels: usize,
    patch: usize,
    grid: usize,
}

impl PatchEmbedding {
    fn load(w: &Weights, cfg: &VisionConfig) -> Result<Self> {
        let (c, p, d) = (cfg.num_channels, cfg.patch_size, cfg.hidden_size);
        let weight = w.get(&[d, c, p, p], "weight")?.reshape((d, c * p * p))?;
        Ok(Self {
            weight,
            channels: c,
            patch: p,
            grid: cfg.grid_size,
        })
    }

    /// `[N, C, H, W]` → `[N, grid², hidden]`, patches in row-major order.
    fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (n, c, g, p) = (pixels.dim(0)?, self.channels, self.grid, self.patch);
        let patches = pixels
            .reshape((n, c, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((n * g * g, c * p * p))?;
        Ok(patches.matmul(&self.weight.t()?)?.reshape((n, g * g, ()))?)
    }
}

/// Patch embedding, class token, position embedding and `pre_layernorm` (prefix `embeddings.`).
#[derive(Debug, Clone)]
struct VisionEmbeddings {
    patch_embed: PatchEmbedding,
    cls_token: Tensor,
    position_embedding: Tensor,
    pre_layernorm: LayerNorm,
}

impl VisionEmbeddings {
    fn load(w: &Weights, cfg: &VisionConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            patch_embed: PatchEmbedding::load(&w.pp("patch_embed"), cfg)?,
            cls_token: w.get(&[1, 1, d], "cls_token")?,
            position_embedding: w.get(&[1, cfg.num_positions, d], "position_embedding")?,
            pre_layernorm: LayerNorm::load(&w.pp("pre_layernorm"), d, cfg.layer_norm_eps)?,
        })
    }

    fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let patches = self.patch_embed.forward(pixels)?;
        let (n, _, d) = patches.dims3()?;
        let cls = self.cls_token.broadcast_as((n, 1, d))?;
        let tokens = Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.position_embedding)?;
        self.pre_layernorm.forward(&tokens)
    }
}

/// Self-attention with the fused `query_key_value` projection. Upstream reads its 3·hidden outputs as
/// `(heads, {q,k,v}, head_dim)`; at load the rows are regrouped to `[all q | all k | all v]` so one matmul
/// and three slices give ordinary contiguous heads.
#[derive(Debug, Clone)]
struct VisionAttention {
    qkv: Linear,
    dense: Linear,
    num_heads: usize,
    head_dim: usize,
}

impl VisionAttention {
    fn load(w: &Weights, cfg: &VisionConfig) -> Result<Self> {
        let (d, h, hd) = (cfg.hidden_size, cfg.num_heads, cfg.head_dim);
        let qkv = w.pp("query_key_value");
        let bias = Derived::new(vec![qkv.get(&[3 * d], "bias")?], move |t| {
            t[0].reshape((h, 3, hd))?
                .transpose(0, 1)?
                .contiguous()?
                .reshape(3 * d)
        })?;
        // A pre-quantised checkpoint stores the weight regrouped already.
        let qkv = match Linear::from_store(&qkv, qkv.prefix(), d, 3 * d, Some(bias.clone()))? {
            Some(stored) => stored,
            None => {
                let weight = Derived::new(vec![qkv.get(&[3 * d, d], "weight")?], move |t| {
                    t[0].reshape((h, 3, hd, d))?
                        .transpose(0, 1)?
                        .contiguous()?
                        .reshape((3 * d, d))
                })?;
                Linear::from_derived(weight, Some(bias)).quantize_for(&qkv, qkv.prefix())?
            }
        };
        Ok(Self {
            qkv,
            dense: Linear::load(&w.pp("dense"), d, d, true)?,
            num_heads: h,
            head_dim: hd,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.dense.forward(&self.context(x)?)
    }

    /// `dense`'s product and the bias still to add (for a fused residual + LayerNorm).
    fn forward_unbiased(&self, x: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        self.dense.forward_unbiased(&self.context(x)?)
    }

    /// The attention context `[N, T, hidden]`, heads merged, before `dense`.
    fn context(&self, x: &Tensor) -> Result<Tensor> {
        let (h, hd) = (self.num_heads, self.head_dim);
        let d = h * hd;
        let qkv = self.qkv.forward(x)?;
        let scale = (hd as f64).powf(-0.5);
        // On the GPU, q/k/v are read in place from the projection as [N, T, H, hd] views.
        let (n, t, _) = qkv.dims3()?;
        let parts = qkv.reshape((n, t, 3, h, hd))?;
        let (q, k, v) = (
            parts.i((.., .., 0))?,
            parts.i((.., .., 1))?,
            parts.i((.., .., 2))?,
        );
        if let Some(context) = cuda_fused::attention(&q, &k, &v, scale, Masking::None)? {
            return Ok(context);
        }
        let q = split_heads(&qkv.narrow(2, 0, d)?, h, hd)?;
        let k = split_heads(&qkv.narrow(2, d, d)?, h, hd)?;
        let v = split_heads(&qkv.narrow(2, 2 * d, d)?, h, hd)?;
        merge_heads(&attention(&q, &k, &v, scale, None)?)
    }
}

/// `fc2(QuickGELU(fc1(x)))`.
#[derive(Debug, Clone)]
struct VisionMlp {
    fc1: Linear,
    fc2: Linear,
}

impl VisionMlp {
    fn load(w: &Weights, cfg: &VisionConfig) -> Result<Self> {
        Ok(Self {
            fc1: Linear::load(&w.pp("fc1"), cfg.hidden_size, cfg.intermediate_size, true)?,
            fc2: Linear::load(&w.pp("fc2"), cfg.intermediate_size, cfg.hidden_size, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&quick_gelu(&self.fc1.forward(x)?)?)
    }

    /// `fc1`'s bias goes into the QuickGELU pass and `fc2`'s is returned, still to add.
    fn forward_unbiased(&self, x: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let (y, bias) = self.fc1.forward_unbiased(x)?;
        self.fc2
            .forward_unbiased(&bias_quick_gelu(&y, bias.as_ref())?)
    }
}

/// One pre-LN encoder layer (prefix `encoder.layers.N.`).
#[derive(Debug, Clone)]
struct VisionEncoderLayer {
    input_layernorm: LayerNorm,
    self_attn: VisionAttention,
    post_attention_layernorm: LayerNorm,
    mlp: VisionMlp,
}

impl VisionEncoderLayer {
    fn load(w: &Weights, cfg: &VisionConfig) -> Result<Self> {
        let (d, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        Ok(Self {
            input_layernorm: LayerNorm::load(&w.pp("input_layernorm"), d, eps)?,
            self_attn: VisionAttention::load(&w.pp("self_attn"), cfg)?,
            post_attention_layernorm: LayerNorm::load(&w.pp("post_attention_layernorm"), d, eps)?,
            mlp: VisionMlp::load(&w.pp("mlp"), cfg)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = residual_add(
            x,
            &self.self_attn.forward(&self.input_layernorm.forward(x)?)?,
        )?;
        residual_add(
            &h,
            &self
                .mlp
                .forward(&self.post_attention_layernorm.forward(&h)?)?,
        )
    }
}

/// The whole vision tower.
#[derive(Debug, Clone)]
pub struct VisionTransformer {
    cfg: VisionConfig,
    dtype: DType,
    device: Device,
    embeddings: VisionEmbeddings,
    layers: Vec<VisionEncoderLayer>,
    post_layernorm: LayerNorm,
}

impl VisionTransformer {
    /// Loads the tower from `w` (prefix `model.vision_model`).
    pub fn load(w: &Weights, cfg: &VisionConfig) -> Result<Self> {
        let layers = (0..cfg.num_layers)
            .map(|i| {
                let layer = VisionEncoderLayer::load(&w.pp("encoder.layers").pp(i), cfg)?;
                w.layer_done();
                Ok(layer)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            dtype: w.dtype(),
            device: w.device().clone(),
            embeddings: VisionEmbeddings::load(&w.pp("embeddings"), cfg)?,
            layers,
            post_layernorm: LayerNorm::load(
                &w.pp("post_layernorm"),
                cfg.hidden_size,
                cfg.layer_norm_eps,
            )?,
        })
    }

    /// `pixels` `[N, channels, image_size, image_size]` (any float dtype; cast before the upload,
    /// so f16 models upload half the bytes) → `last_hidden_state`
    /// `[N, grid² + 1, hidden]`, row 0 the class token.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (c, s) = (self.cfg.num_channels, self.cfg.image_size);
        match pixels.dims() {
            [n, cc, h, w] if *n > 0 && *cc == c && *h == s && *w == s => {}
            dims => {
                return Err(ModelError::input(format!(
                    "pixel tensor has shape {dims:?}, expected [N, {c}, {s}, {s}] with N ≥ 1"
                )));
            }
        }
        let mut x = self
            .embeddings
            .forward(&pixels.to_dtype(self.dtype)?.to_device(&self.device)?)?;
        if cuda_fused::applies(&[&x]) {
            return self.forward_fused(x);
        }
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        self.post_layernorm.forward(&x)
    }

    /// The encoder on the GPU: every bias add and residual connection goes into the LayerNorm
    /// that follows it (the next layer's `input_layernorm`, or `post_layernorm`), one kernel each.
    fn forward_fused(&self, mut x: Tensor) -> Result<Tensor> {
        let mut normed = match self.layers.first() {
            Some(first) => first.input_layernorm.forward(&x)?,
            None => return self.post_layernorm.forward(&x),
        };
        for (i, layer) in self.layers.iter().enumerate() {
            let (attn, attn_bias) = layer.self_attn.forward_unbiased(&normed)?;
            let (h, n2) =
                layer
                    .post_attention_layernorm
                    .forward_residual(&x, &attn, attn_bias.as_ref())?;
            let (mlp, mlp_bias) = layer.mlp.forward_unbiased(&n2)?;
            let next = self
                .layers
                .get(i + 1)
                .map_or(&self.post_layernorm, |next| &next.input_layernorm);
            (x, normed) = next.forward_residual(&h, &mlp, mlp_bias.as_ref())?;
        }
        Ok(normed)
    }
}
