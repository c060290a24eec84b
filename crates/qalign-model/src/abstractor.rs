//! The visual abstractor (`MplugOwlVisualAbstractorModel`, upstream `q_align/model/visual_encoder.py`):
//! learned queries cross-attend to the ViT tokens, with keys/values over `[normed queries ; normed ViT
//! tokens]`, fixed sin-cos positions on queries and keys (never values), the residual taken from the
//! *normed* queries, and a SwiGLU MLP with an inner LayerNorm. `visual_fc` then maps to the LLM width and
//! the learned `vit_eos` is appended. Key prefix: `model.visual_abstractor.`.

use candle_core::{DType, Device, Tensor};

use crate::config::AbstractorConfig;
use crate::cuda_fused::{self, Masking};
use crate::error::Result;
use crate::loader::Weights;
use crate::nn::{LayerNorm, Linear, attention, merge_heads, split_heads};

/// 1-D sin-cos code of `positions` with `dim` columns: `[sin(p·ω) | cos(p·ω)]`, ω_j = 10000^(−j/(dim/2)),
/// computed in f32 as upstream's numpy code does.
fn sincos_1d(dim: usize, positions: impl Iterator<Item = usize>) -> Vec<Vec<f32>> {
    let half = dim / 2;
    let omega: Vec<f32> = (0..half)
        .map(|j| 1.0f32 / 10000f32.powf(j as f32 / half as f32))
        .collect();
    positions
        .map(|p| {
            let angles = omega.iter().map(|w| p as f32 * w);
            angles
                .clone()
                .map(f32::sin)
                .chain(angles.map(f32::cos))
                .collect()
        })
        .collect()
}

/// `q_pos_embed` `[num_queries, dim]`: the 1-D code of query positions 0..num_queries.
pub fn query_position_table(num_queries: usize, dim: usize) -> Vec<f32> {
    sincos_1d(dim, 0..num_queries).concat()
}

/// `k_pos_embed` `[grid² + 1, dim]`: a zero row for the class token, then for grid cell (row r, column c)
/// in row-major order `[code(c) | code(r)]`, each half the 1-D code with `dim/2` columns.
pub fn key_position_table(grid: usize, dim: usize) -> Vec<f32> {
    let code = sincos_1d(dim / 2, 0..grid);
    let mut table = vec![0f32; dim];
    for r in 0..grid {
        for c in 0..grid {
            table.extend_from_slice(&code[c]);
            table.extend_from_slice(&code[r]);
        }
    }
    table
}

/// Loads a position table stored in the checkpoint, or computes it when absent. Upstream keeps these as
/// persistent buffers, saved in the checkpoint's dtype, so a computed table is rounded through that dtype
/// (bf16 for the released OneAlign) to reproduce what the released model actually uses.
fn position_table(
    w: &Weights,
    name: &str,
    shape: [usize; 2],
    checkpoint_dtype: DType,
    compute: impl FnOnce() -> Vec<f32>,
) -> Result<Tensor> {
    if w.contains(name) {
        return w.get(&shape, name);
    }
    let table = Tensor::from_vec(compute(), &shape[..], &Device::Cpu)?
        .to_dtype(checkpoint_dtype)?
        .to_dtype(w.dtype())?;
    Ok(table.to_device(w.device())?)
}

/// Cross-attention of the queries over `[Xn ; En]` (prefix `crossattention.attention.`).
#[derive(Debug, Clone)]
struct AbstractorAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    /// `q_pos_embed` `[Q, D]`.
    query_positions: Tensor,
    /// `[q_pos_embed ; k_pos_embed]` `[Q + P, D]`, the position term of the keys.
    key_positions: Tensor,
    num_heads: usize,
    head_dim: usize,
}

impl AbstractorAttention {
    fn load(w: &Weights, cfg: &AbstractorConfig, checkpoint_dtype: DType) -> Result<Self> {
        let d = cfg.hidden_size;
        let q_pos = position_table(
            w,
            "q_pos_embed",
            [cfg.num_queries, d],
            checkpoint_dtype,
            || query_position_table(cfg.num_queries, d),
        )?;
        let k_pos = position_table(
            w,
            "k_pos_embed",
            [cfg.grid_size * cfg.grid_size + 1, d],
            checkpoint_dtype,
            || key_position_table(cfg.grid_size, d),
        )?;
        Ok(Self {
            query: Linear::load(&w.pp("query"), d, d, true)?,
            key: Linear::load(&w.pp("key"), d, d, true)?,
            value: Linear::load(&w.pp("value"), d, d, true)?,
            key_positions: Tensor::cat(&[&q_pos, &k_pos], 0)?,
            query_positions: q_pos,
            num_heads: cfg.num_heads,
            head_dim: cfg.head_dim,
        })
    }

    /// `queries_normed` `[N, Q, D]`, `kv_input` `[N, Q + P, D]` → context `[N, Q, D]`.
    fn forward(&self, queries_normed: &Tensor, kv_input: &Tensor) -> Result<Tensor> {
        let q = self
            .query
            .forward(&queries_normed.broadcast_add(&self.query_positions)?)?;
        let k = self
            .key
            .forward(&kv_input.broadcast_add(&self.key_positions)?)?;
        let v = self.value.forward(kv_input)?;
        let (h, hd) = (self.num_heads, self.head_dim);
        let scale = 1.0 / (hd as f64).sqrt();
        let heads = |t: &Tensor| -> Result<Tensor> {
            let (n, len, _) = t.dims3()?;
            Ok(t.reshape((n, len, h, hd))?)
        };
        if let Some(context) =
            cuda_fused::attention(&heads(&q)?, &heads(&k)?, &heads(&v)?, scale, Masking::None)?
        {
            return Ok(context);
        }
        let context = attention(
            &split_heads(&q, h, hd)?,
            &split_heads(&k, h, hd)?,
            &split_heads(&v, h, hd)?,
            scale,
            None,
        )?;
        merge_heads(&context)
    }
}

/// `w2(ffn_ln(silu(w1·x) ⊙ w3·x))` (prefix `crossattention.output.mlp.`).
#[derive(Debug, Clone)]
struct AbstractorMlp {
    w1: Linear,
    w2: Linear,
    w3: Linear,
    ffn_ln: LayerNorm,
}

impl AbstractorMlp {
    fn load(w: &Weights, cfg: &AbstractorConfig) -> Result<Self> {
        let (d, m) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            w1: Linear::load(&w.pp("w1"), d, m, true)?,
            w2: Linear::load(&w.pp("w2"), m, d, true)?,
            w3: Linear::load(&w.pp("w3"), d, m, true)?,
            ffn_ln: LayerNorm::load(&w.pp("ffn_ln"), m, cfg.ffn_layer_norm_eps)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gated = (self.w1.forward(x)?.silu()? * self.w3.forward(x)?)?;
        self.w2.forward(&self.ffn_ln.forward(&gated)?)
    }
}

/// One abstractor layer (prefix `encoder.layers.N.crossattention.`).
#[derive(Debug, Clone)]
struct AbstractorLayer {
    norm1: LayerNorm,
    normk: LayerNorm,
    attention: AbstractorAttention,
    out_proj: Linear,
    norm2: LayerNorm,
    mlp: AbstractorMlp,
}

impl AbstractorLayer {
    fn load(w: &Weights, cfg: &AbstractorConfig, checkpoint_dtype: DType) -> Result<Self> {
        let (d, eps) = (cfg.hidden_size, cfg.attention_layer_norm_eps);
        let output = w.pp("output");
        Ok(Self {
            norm1: LayerNorm::load(&w.pp("norm1"), d, eps)?,
            normk: LayerNorm::load(&w.pp("normk"), cfg.encoder_hidden_size, eps)?,
            attention: AbstractorAttention::load(&w.pp("attention"), cfg, checkpoint_dtype)?,
            out_proj: Linear::load(&output.pp("out_proj"), d, d, true)?,
            norm2: LayerNorm::load(&output.pp("norm2"), d, eps)?,
            mlp: AbstractorMlp::load(&output.pp("mlp"), cfg)?,
        })
    }

    /// `queries` `[N, Q, D]`, `vision` `[N, P, D]` → new queries `[N, Q, D]`.
    fn forward(&self, queries: &Tensor, vision: &Tensor) -> Result<Tensor> {
        let queries_normed = self.norm1.forward(queries)?;
        let vision_normed = self.normk.forward(vision)?;
        let kv_input = Tensor::cat(&[&queries_normed, &vision_normed], 1)?;
        let context = self.attention.forward(&queries_normed, &kv_input)?;
        let y = (&queries_normed + self.out_proj.forward(&context)?)?;
        Ok((&y + self.mlp.forward(&self.norm2.forward(&y)?)?)?)
    }
}

/// The whole abstractor: ViT tokens → `num_queries + 1` LLM-width visual tokens per image.
#[derive(Debug, Clone)]
pub struct VisualAbstractor {
    query_embeds: Tensor,
    layers: Vec<AbstractorLayer>,
    visual_fc: Linear,
    vit_eos: Tensor,
}

impl VisualAbstractor {
    /// Loads the abstractor from `w` (prefix `model.visual_abstractor`).
    pub fn load(w: &Weights, cfg: &AbstractorConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        // The dtype the checkpoint's parameters are stored in; computed position tables are rounded to it.
        let checkpoint_dtype = w.stored_dtype("query_embeds").unwrap_or(DType::F32);
        let layers = (0..cfg.num_layers)
            .map(|i| {
                let layer = AbstractorLayer::load(
                    &w.pp("encoder.layers").pp(i).pp("crossattention"),
                    cfg,
                    checkpoint_dtype,
                )?;
                w.layer_done();
                Ok(layer)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            query_embeds: w.get(&[1, cfg.num_queries, d], "query_embeds")?,
            layers,
            visual_fc: Linear::load(&w.pp("visual_fc"), d, cfg.output_size, true)?,
            vit_eos: w.get(&[1, 1, cfg.output_size], "vit_eos")?,
        })
    }

    /// `vision_hidden` `[N, P, D_vision]` (the ViT `last_hidden_state`) → `[N, Q + 1, D_llm]`.
    pub fn forward(&self, vision_hidden: &Tensor) -> Result<Tensor> {
        let vision_hidden = vision_hidden
            .to_device(self.query_embeds.device())?
            .to_dtype(self.query_embeds.dtype())?;
        let vision_hidden = &vision_hidden;
        let (n, _, _) = vision_hidden.dims3()?;
        let (_, q, d) = self.query_embeds.dims3()?;
        let mut queries = self.query_embeds.broadcast_as((n, q, d))?.contiguous()?;
        for layer in &self.layers {
            queries = layer.forward(&queries, vision_hidden)?;
        }
        let projected = self.visual_fc.forward(&queries)?;
        let eos = self.vit_eos.broadcast_as((n, 1, self.vit_eos.dim(2)?))?;
        Ok(Tensor::cat(&[&projected, &eos], 1)?)
    }
}
