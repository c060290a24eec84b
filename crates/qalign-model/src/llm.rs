//! The LLaMA-2 decoder with mPLUG-Owl2's modality-adaptive module (upstream
//! `q_align/model/modeling_llama2.py`, patched onto transformers 4.36.1's LLaMA): in every layer the two
//! RMSNorms and the K/V projections exist twice, `multiway.0` for text tokens and `multiway.1` for visual
//! tokens, chosen per token; Q, O, the MLP, the final norm, the embeddings and `lm_head` are shared.
//! Half-split ("rotate half") RoPE with f32 angles, causal attention with an f32 softmax, and a key
//! padding mask for right-padded batches. Key prefixes: `model.` and `lm_head.`.
//!
//! Scoring prompts share their text before `<|image|>`; with causal attention its K/V depend on
//! nothing after it, so [`MultiwayLlama::prefix_kv`] computes them once and
//! [`MultiwayLlama::forward_after`] runs only the rest of each sample against them.

use candle_core::{DType, Device, Tensor};

use crate::config::{LlmConfig, RopeScaling};
use crate::cuda_fused::{self, Masking};
use crate::error::{ModelError, Result};
use crate::loader::Weights;
use crate::nn::{
    Derived, Linear, attention, merge_heads, project, residual_add, rms_normalize, silu_mul,
    split_heads,
};

/// Modality indicator of text tokens (and padding).
pub const TEXT_MODALITY: u8 = 0;
/// Modality indicator of visual tokens (every image/frame token, `vit_eos` included).
pub const VISUAL_MODALITY: u8 = 1;

/// Per-row modality routing over a flattened `[rows, D]` batch. Text and visual rows are gathered into
/// two dense blocks so each multiway weight runs as one matmul over only the rows that need it.
struct Routing {
    /// Modality per row (u32), used to gather per-row norm weights.
    modality: Tensor,
    kind: RoutingKind,
}

enum RoutingKind {
    /// Every row has this modality: no gathering needed.
    Uniform(usize),
    Split {
        text_rows: Tensor,
        visual_rows: Tensor,
        /// Row r of the output is row `restore[r]` of `[text results ; visual results]`.
        restore: Tensor,
    },
}

impl Routing {
    fn new(modality: &[u8], device: &Device) -> Result<Self> {
        let mut text = Vec::new();
        let mut visual = Vec::new();
        for (row, &m) in modality.iter().enumerate() {
            match m {
                TEXT_MODALITY => text.push(row as u32),
                VISUAL_MODALITY => visual.push(row as u32),
                other => {
                    return Err(ModelError::input(format!(
                        "modality indicator {other} at row {row} (expected 0 = text or 1 = visual)"
                    )));
                }
            }
        }
        let indicators: Vec<u32> = modality.iter().map(|&m| u32::from(m)).collect();
        let modality_tensor = Tensor::new(indicators.as_slice(), device)?;
        let kind = if visual.is_empty() {
            RoutingKind::Uniform(TEXT_MODALITY as usize)
        } else if text.is_empty() {
            RoutingKind::Uniform(VISUAL_MODALITY as usize)
        } else {
            let mut restore = vec![0u32; modality.len()];
            for (rank, &row) in text.iter().enumerate() {
                restore[row as usize] = rank as u32;
            }
            for (rank, &row) in visual.iter().enumerate() {
                restore[row as usize] = (text.len() + rank) as u32;
            }
            RoutingKind::Split {
                text_rows: Tensor::new(text.as_slice(), device)?,
                visual_rows: Tensor::new(visual.as_slice(), device)?,
                restore: Tensor::new(restore.as_slice(), device)?,
            }
        };
        Ok(Self {
            modality: modality_tensor,
            kind,
        })
    }

    /// Applies `f(modality, rows)` to the rows of each modality of `x` `[rows, in]`, in original row order.
    fn route(&self, x: &Tensor, f: impl Fn(usize, &Tensor) -> Result<Tensor>) -> Result<Tensor> {
        match &self.kind {
            RoutingKind::Uniform(m) => f(*m, x),
            RoutingKind::Split {
                text_rows,
                visual_rows,
                restore,
            } => {
                let text = f(TEXT_MODALITY as usize, &x.index_select(text_rows, 0)?)?;
                let visual = f(VISUAL_MODALITY as usize, &x.index_select(visual_rows, 0)?)?;
                Ok(Tensor::cat(&[&text, &visual], 0)?.index_select(restore, 0)?)
            }
        }
    }
}

/// What every layer of one decoder pass shares: row routing, RoPE tables, the additive mask
/// and the samples' lengths.
struct Pass<'a> {
    routing: Routing,
    rope: (Tensor, Tensor),
    mask: Tensor,
    lengths: &'a [usize],
}

/// The rows a decoder layer carries on after attention when only some are needed (each sample's
/// last real token, for its level logits): the rest of the last layer (o_proj, the MLP, about
/// three quarters of its work) then runs on those rows alone.
struct OutputRows {
    /// Indices into the flattened `[B·L]` rows.
    index: Tensor,
    /// Routing of the selected rows.
    routing: Routing,
}

impl OutputRows {
    /// Row `lengths[b] - 1` of every sample b of a `[B, L]` batch.
    fn last_of(lengths: &[usize], l: usize, modality: &[u8], device: &Device) -> Result<Self> {
        let rows: Vec<u32> = lengths
            .iter()
            .enumerate()
            .map(|(b, &n)| (b * l + n - 1) as u32)
            .collect();
        let selected: Vec<u8> = rows.iter().map(|&r| modality[r as usize]).collect();
        Ok(Self {
            index: Tensor::new(rows.as_slice(), device)?,
            routing: Routing::new(&selected, device)?,
        })
    }

    /// `[B, L, D]` → the selected rows as `[rows, 1, D]`.
    fn select(&self, x: &Tensor) -> Result<Tensor> {
        let (b, l, d) = x.dims3()?;
        let n = self.index.dim(0)?;
        Ok(x.reshape((b * l, d))?
            .index_select(&self.index, 0)?
            .reshape((n, 1, d))?)
    }
}

/// RMSNorm with one weight per modality (`<name>.multiway.{0,1}.weight`).
#[derive(Debug, Clone)]
struct MultiwayRmsNorm {
    /// `[2, D]`: row 0 text, row 1 visual.
    weights: Derived,
    eps: f64,
}

impl MultiwayRmsNorm {
    fn load(w: &Weights, dim: usize, eps: f64) -> Result<Self> {
        let text = w.pp("multiway.0").get(&[dim], "weight")?;
        let visual = w.pp("multiway.1").get(&[dim], "weight")?;
        Ok(Self {
            weights: Derived::new(vec![text, visual], |t| Tensor::stack(t, 0))?,
            eps,
        })
    }

    /// `x` `[B, L, D]`.
    fn forward(&self, x: &Tensor, routing: &Routing) -> Result<Tensor> {
        let weights = self.weights.get()?;
        let (modality, uniform_row) = match routing.kind {
            RoutingKind::Uniform(m) => (None, m),
            RoutingKind::Split { .. } => (Some(&routing.modality), 0),
        };
        if let Some(fused) =
            cuda_fused::multiway_rms_norm(x, &weights, modality, uniform_row, self.eps)?
        {
            return Ok(fused);
        }
        let normed = rms_normalize(x, self.eps)?;
        let weight = match routing.kind {
            RoutingKind::Uniform(m) => weights.get(m)?,
            RoutingKind::Split { .. } => weights
                .index_select(&routing.modality, 0)?
                .reshape(x.shape())?,
        };
        Ok(normed.broadcast_mul(&weight)?)
    }
}

/// RoPE in the "rotate half" layout: dimension i pairs with i + head_dim/2; angles computed in f32.
#[derive(Debug, Clone)]
struct RotaryEmbedding {
    inv_freq: Vec<f32>,
    position_scale: f32,
}

impl RotaryEmbedding {
    fn new(cfg: &LlmConfig) -> Self {
        let dim = cfg.head_dim;
        let base = cfg.rope_theta as f32;
        let inv_freq = (0..dim / 2)
            .map(|i| 1.0 / base.powf((2 * i) as f32 / dim as f32))
            .collect();
        let position_scale = match cfg.rope_scaling {
            RopeScaling::None => 1.0,
            RopeScaling::Linear { factor } => factor as f32,
        };
        Self {
            inv_freq,
            position_scale,
        }
    }

    /// `(cos, sin)`, each `[len, head_dim/2]`, for positions `start..start + len`, in `dtype`.
    fn tables(
        &self,
        start: usize,
        len: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for p in start..start + len {
            let t = p as f32 / self.position_scale;
            for &f in &self.inv_freq {
                let angle = t * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (len, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (len, half), device)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }
}

/// Additive f32 mask `[B, 1, L, P + L]` for `L` new rows after `P` shared prefix keys: 0 where the
/// key is in the prefix, or is new key j ≤ query i and a real token of its sample; −∞ elsewhere.
pub(crate) fn causal_padding_mask(
    lengths: &[usize],
    len: usize,
    prefix: usize,
    device: &Device,
) -> Result<Tensor> {
    let keys = prefix + len;
    let mut mask = vec![0f32; lengths.len() * len * keys];
    for (b, &real) in lengths.iter().enumerate() {
        for i in 0..len {
            let row = &mut mask[(b * len + i) * keys + prefix..(b * len + i + 1) * keys];
            for (j, m) in row.iter_mut().enumerate() {
                if j > i || j >= real {
                    *m = f32::NEG_INFINITY;
                }
            }
        }
    }
    Ok(Tensor::from_vec(
        mask,
        (lengths.len(), 1, len, keys),
        device,
    )?)
}

/// The K/V of a text prefix that every sample of a batch shares (a prompt's text before
/// `<|image|>`), computed once by [`MultiwayLlama::prefix_kv`].
#[derive(Debug, Clone)]
pub struct PrefixKv {
    ids: Vec<u32>,
    /// Per layer, K and V after RoPE and before the grouped heads are repeated: `[1, kv_heads, P, head_dim]`.
    layers: Vec<(Tensor, Tensor)>,
}

impl PrefixKv {
    /// The prefix's token ids.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Its length in tokens.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// Rotate-half RoPE on `[B, H, L, head_dim]`: candle's fused kernel, or under autograd (it has no
/// backward) the same formula from differentiable ops.
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if x.track_op() {
        Ok(candle_nn::rotary_emb::rope_slow(x, cos, sin)?)
    } else {
        Ok(candle_nn::rotary_emb::rope(x, cos, sin)?)
    }
}

/// Self-attention with shared Q/O and per-modality K/V (`self_attn.`).
#[derive(Debug, Clone)]
struct MultiwayAttention {
    q_proj: Linear,
    /// Per modality, K and V fused: `[2·kv_dim, D]` (rows 0..kv_dim are K).
    kv_proj: [Linear; 2],
    o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl MultiwayAttention {
    fn load(w: &Weights, cfg: &LlmConfig) -> Result<Self> {
        let (d, hd) = (cfg.hidden_size, cfg.head_dim);
        let kv_dim = cfg.num_kv_heads * hd;
        let fused = |m: usize| -> Result<Linear> {
            let name = format!("{}.{{k,v}}_proj.multiway.{m}", w.prefix());
            if let Some(stored) = Linear::from_store(w, &name, d, 2 * kv_dim, None)? {
                return Ok(stored);
            }
            let k_w = w.pp("k_proj").pp("multiway").pp(m);
            let v_w = w.pp("v_proj").pp("multiway").pp(m);
            let k = k_w.get(&[kv_dim, d], "weight")?;
            let v = v_w.get(&[kv_dim, d], "weight")?;
            let mut linear = Linear::from_derived(
                Derived::new(vec![k, v], |t| Tensor::cat(&[&t[0], &t[1]], 0))?,
                None,
            );
            linear.attach_branch(&k_w, d, kv_dim, 0)?;
            linear.attach_branch(&v_w, d, kv_dim, kv_dim)?;
            linear.quantize_for(w, &name)
        };
        Ok(Self {
            q_proj: Linear::load(&w.pp("q_proj"), d, cfg.num_heads * hd, false)?,
            kv_proj: [fused(0)?, fused(1)?],
            o_proj: Linear::load(&w.pp("o_proj"), cfg.num_heads * hd, d, false)?,
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: hd,
        })
    }

    fn repeat_kv(&self, x: Tensor) -> Result<Tensor> {
        let groups = self.num_heads / self.num_kv_heads;
        if groups == 1 {
            return Ok(x);
        }
        let (b, kvh, l, d) = x.dims4()?;
        Ok(x.unsqueeze(2)?
            .broadcast_as((b, kvh, groups, l, d))?
            .contiguous()?
            .reshape((b, kvh * groups, l, d))?)
    }

    /// `a` `[B, L, D]` (already normed) → `[B, L, D]`, attending to the shared `prefix` K/V
    /// (`[1, kv_heads, P, head_dim]`) before its own; also returns its own K/V for a prefix to keep.
    fn forward(
        &self,
        a: &Tensor,
        pass: &Pass,
        prefix: Option<&(Tensor, Tensor)>,
        rows: Option<&OutputRows>,
    ) -> Result<(Tensor, (Tensor, Tensor))> {
        let Pass {
            routing,
            rope,
            mask,
            lengths,
        } = pass;
        let (b, l, d) = a.dims3()?;
        let (hd, kv_dim) = (self.head_dim, self.num_kv_heads * self.head_dim);
        let q = split_heads(&self.q_proj.forward(a)?, self.num_heads, hd)?;
        let kv = routing
            .route(&a.reshape((b * l, d))?, |m, rows| {
                self.kv_proj[m].forward(rows)
            })?
            .reshape((b, l, 2 * kv_dim))?;
        let k = split_heads(&kv.narrow(2, 0, kv_dim)?, self.num_kv_heads, hd)?;
        let v = split_heads(&kv.narrow(2, kv_dim, kv_dim)?, self.num_kv_heads, hd)?;
        let (cos, sin) = rope;
        let q = apply_rope(&q, cos, sin)?;
        let k = apply_rope(&k, cos, sin)?;
        let (k_all, v_all) = match prefix {
            Some((pk, pv)) => {
                let shared = |t: &Tensor| -> Result<Tensor> {
                    let (_, kvh, p, _) = t.dims4()?;
                    Ok(t.broadcast_as((b, kvh, p, hd))?.contiguous()?)
                };
                (
                    Tensor::cat(&[&shared(pk)?, &k], 2)?,
                    Tensor::cat(&[&shared(pv)?, &v], 2)?,
                )
            }
            None => (k.clone(), v.clone()),
        };
        let scale = 1.0 / (hd as f64).sqrt();
        // On the GPU: [B, T, H, hd] views of the heads, grouped K/V heads read without repeats,
        // and the mask from the lengths instead of the additive tensor.
        let masking = Masking::CausalPadded {
            prefix: k_all.dim(2)? - l,
            lengths,
        };
        let fused = cuda_fused::attention(
            &q.transpose(1, 2)?,
            &k_all.transpose(1, 2)?,
            &v_all.transpose(1, 2)?,
            scale,
            masking,
        )?;
        let context = match fused {
            Some(context) => context,
            None => {
                let (k_all, v_all) = (self.repeat_kv(k_all)?, self.repeat_kv(v_all)?);
                merge_heads(&attention(&q, &k_all, &v_all, scale, Some(mask))?)?
            }
        };
        let context = match rows {
            Some(rows) => rows.select(&context)?,
            None => context,
        };
        Ok((self.o_proj.forward(&context)?, (k, v)))
    }
}

/// `down(silu(gate·x) ⊙ up·x)` (`mlp.`).
#[derive(Debug, Clone)]
struct LlamaMlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl LlamaMlp {
    fn load(w: &Weights, cfg: &LlmConfig) -> Result<Self> {
        let (d, m) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: Linear::load(&w.pp("gate_proj"), d, m, false)?,
            up_proj: Linear::load(&w.pp("up_proj"), d, m, false)?,
            down_proj: Linear::load(&w.pp("down_proj"), m, d, false)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gated = silu_mul(&self.gate_proj.forward(x)?, &self.up_proj.forward(x)?)?;
        self.down_proj.forward(&gated)
    }
}

/// One decoder layer (`model.layers.N.`).
#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: MultiwayRmsNorm,
    self_attn: MultiwayAttention,
    post_attention_layernorm: MultiwayRmsNorm,
    mlp: LlamaMlp,
}

impl DecoderLayer {
    fn load(w: &Weights, cfg: &LlmConfig) -> Result<Self> {
        let (d, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Self {
            input_layernorm: MultiwayRmsNorm::load(&w.pp("input_layernorm"), d, eps)?,
            self_attn: MultiwayAttention::load(&w.pp("self_attn"), cfg)?,
            post_attention_layernorm: MultiwayRmsNorm::load(
                &w.pp("post_attention_layernorm"),
                d,
                eps,
            )?,
            mlp: LlamaMlp::load(&w.pp("mlp"), cfg)?,
        })
    }

    /// `x` `[B, L, D]` → `[B, L, D]` and this layer's K/V of `x` (see [`MultiwayAttention::forward`]).
    /// With `rows`, only those rows go on after attention (which needs every row's K/V): the
    /// output is `[rows, 1, D]`.
    fn forward(
        &self,
        x: &Tensor,
        pass: &Pass,
        prefix: Option<&(Tensor, Tensor)>,
        rows: Option<&OutputRows>,
    ) -> Result<(Tensor, (Tensor, Tensor))> {
        let (attn, kv) = self.self_attn.forward(
            &self.input_layernorm.forward(x, &pass.routing)?,
            pass,
            prefix,
            rows,
        )?;
        let (x, routing) = match rows {
            Some(rows) => (&rows.select(x)?, &rows.routing),
            None => (x, &pass.routing),
        };
        let h = residual_add(x, &attn)?;
        let mlp = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&h, routing)?)?;
        Ok((residual_add(&h, &mlp)?, kv))
    }
}

/// What a decoder pass returns besides its K/V.
#[derive(Debug, Clone, Copy)]
enum Outputs {
    /// The last layer's output, every row.
    Last,
    /// Every layer's output, every row.
    EveryLayer,
    /// The last layer's output at each sample's last real row only (the rest of that layer is skipped).
    LastRows,
}

/// Result of a decoder pass.
#[derive(Debug, Clone)]
pub struct DecoderOutput {
    /// Output of the last decoder layer, before `model.norm`: `[B, L, D]`.
    pub last_hidden_state: Tensor,
    /// Output of every decoder layer (`[B, L, D]` each), when requested; the last equals `last_hidden_state`.
    pub layer_outputs: Vec<Tensor>,
}

/// The decoder stack, final norm and language-model head.
#[derive(Debug, Clone)]
pub struct MultiwayLlama {
    cfg: LlmConfig,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    lm_head: Tensor,
    /// The token ids of `lm_head`'s rows when the load kept only some of them (for scoring:
    /// the level words), in order; `None` when it holds the whole vocabulary.
    lm_head_ids: Option<Vec<u32>>,
    rotary: RotaryEmbedding,
}

impl MultiwayLlama {
    /// Loads `model.embed_tokens`, `model.layers.*`, `model.norm` from `model` and `lm_head` from `root`
    /// (with `tie_word_embeddings` the head reuses the embeddings). With `lm_head_ids`, only those
    /// rows of the head are kept, before the layers load (so the whole head never sits beside
    /// them); full-vocabulary logits are then refused.
    pub fn load(
        model: &Weights,
        root: &Weights,
        cfg: &LlmConfig,
        lm_head_ids: Option<&[u32]>,
    ) -> Result<Self> {
        let (v, d) = (cfg.vocab_size, cfg.hidden_size);
        if let Some(&bad) = lm_head_ids.and_then(|ids| ids.iter().find(|&&id| id as usize >= v)) {
            return Err(ModelError::config(format!(
                "lm_head row {bad} asked to be kept is outside the vocabulary (size {v})"
            )));
        }
        let embed_tokens = model.pp("embed_tokens").get(&[v, d], "weight")?;
        let mut lm_head = if cfg.tie_word_embeddings && !root.contains("lm_head.weight") {
            embed_tokens.clone()
        } else {
            root.pp("lm_head").get(&[v, d], "weight")?
        };
        if let Some(ids) = lm_head_ids {
            lm_head = lm_head
                .index_select(&Tensor::new(ids, lm_head.device())?, 0)?
                .contiguous()?;
        }
        let layers = (0..cfg.num_layers)
            .map(|i| {
                let layer = DecoderLayer::load(&model.pp("layers").pp(i), cfg)?;
                model.layer_done();
                Ok(layer)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            norm: model.pp("norm").get(&[d], "weight")?,
            lm_head,
            lm_head_ids: lm_head_ids.map(<[u32]>::to_vec),
            rotary: RotaryEmbedding::new(cfg),
        })
    }

    /// The embedding rows of `ids` (each < vocab size): `[n, D]`.
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
            return Err(ModelError::input(format!(
                "token id {bad} is outside the vocabulary (size {})",
                self.cfg.vocab_size
            )));
        }
        let ids = Tensor::new(ids, self.embed_tokens.device())?;
        Ok(self.embed_tokens.index_select(&ids, 0)?)
    }

    /// Runs the decoder over `embeds` `[B, L, D]`: sample b's real tokens are rows `0..lengths[b]` (the rest is
    /// right padding, masked out as keys), `modality` holds B·L indicators (0 text/padding, 1 visual).
    pub fn forward(
        &self,
        embeds: &Tensor,
        lengths: &[usize],
        modality: &[u8],
        keep_layer_outputs: bool,
    ) -> Result<DecoderOutput> {
        self.forward_after(None, embeds, lengths, modality, keep_layer_outputs)
    }

    /// The K/V of text `ids` that will open every sample of later batches: the decoder run over them
    /// alone, once. Causal attention makes them the same as inside any longer sequence.
    pub fn prefix_kv(&self, ids: &[u32]) -> Result<PrefixKv> {
        if ids.is_empty() {
            return Err(ModelError::input("empty prefix"));
        }
        let embeds = self.embed(ids)?.unsqueeze(0)?;
        let modality = vec![TEXT_MODALITY; ids.len()];
        let mut layers = Vec::with_capacity(self.layers.len());
        self.run(
            None,
            &embeds,
            &[ids.len()],
            &modality,
            Outputs::Last,
            Some(&mut layers),
        )?;
        Ok(PrefixKv {
            ids: ids.to_vec(),
            layers,
        })
    }

    /// [`forward`](Self::forward) for samples that all continue `prefix`: `embeds`, `lengths` and
    /// `modality` describe only what follows it, at positions `P..`; outputs cover those rows only.
    pub fn forward_after(
        &self,
        prefix: Option<&PrefixKv>,
        embeds: &Tensor,
        lengths: &[usize],
        modality: &[u8],
        keep_layer_outputs: bool,
    ) -> Result<DecoderOutput> {
        let outputs = if keep_layer_outputs {
            Outputs::EveryLayer
        } else {
            Outputs::Last
        };
        self.run(prefix, embeds, lengths, modality, outputs, None)
    }

    /// The last layer's output at each sample's last real token, `[B, D]` (before `model.norm`),
    /// for inputs that continue `prefix` as in [`forward_after`](Self::forward_after). The last
    /// layer runs its output projection and MLP on those rows only.
    pub fn last_rows_after(
        &self,
        prefix: Option<&PrefixKv>,
        embeds: &Tensor,
        lengths: &[usize],
        modality: &[u8],
    ) -> Result<Tensor> {
        let out = self.run(prefix, embeds, lengths, modality, Outputs::LastRows, None)?;
        let (n, _, d) = out.last_hidden_state.dims3()?;
        Ok(out.last_hidden_state.reshape((n, d))?)
    }

    /// The decoder stack; pushes each layer's K/V of `embeds` onto `kv_out` when given.
    fn run(
        &self,
        prefix: Option<&PrefixKv>,
        embeds: &Tensor,
        lengths: &[usize],
        modality: &[u8],
        outputs: Outputs,
        mut kv_out: Option<&mut Vec<(Tensor, Tensor)>>,
    ) -> Result<DecoderOutput> {
        let (b, l, _) = embeds.dims3()?;
        if lengths.len() != b || modality.len() != b * l {
            return Err(ModelError::input(format!(
                "decoder batch [{b}, {l}] got {} lengths and {} modality indicators",
                lengths.len(),
                modality.len()
            )));
        }
        if let Some(bad) = lengths.iter().find(|&&n| n == 0 || n > l) {
            return Err(ModelError::input(format!(
                "sample length {bad} outside 1..={l}"
            )));
        }
        let past = prefix.map_or(0, PrefixKv::len);
        if let Some(prefix) = prefix
            && prefix.layers.len() != self.layers.len()
        {
            return Err(ModelError::input(format!(
                "prefix K/V for {} layers, decoder has {}",
                prefix.layers.len(),
                self.layers.len()
            )));
        }
        let device = embeds.device();
        let pass = Pass {
            routing: Routing::new(modality, device)?,
            rope: self.rotary.tables(past, l, embeds.dtype(), device)?,
            mask: causal_padding_mask(lengths, l, past, device)?,
            lengths,
        };
        let last_rows = match outputs {
            Outputs::LastRows => Some(OutputRows::last_of(lengths, l, modality, device)?),
            Outputs::Last | Outputs::EveryLayer => None,
        };
        let keep_layer_outputs = matches!(outputs, Outputs::EveryLayer);
        let mut x = embeds.clone();
        let mut layer_outputs = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let shared = prefix.map(|p| &p.layers[i]);
            let rows = last_rows.as_ref().filter(|_| i + 1 == self.layers.len());
            let (out, kv) = layer.forward(&x, &pass, shared, rows)?;
            x = out;
            if let Some(kv_out) = kv_out.as_deref_mut() {
                kv_out.push(kv);
            }
            if keep_layer_outputs {
                layer_outputs.push(x.clone());
            }
        }
        Ok(DecoderOutput {
            last_hidden_state: x,
            layer_outputs,
        })
    }

    /// `model.norm` (shared RMSNorm) over any `[..., D]`.
    pub fn final_norm(&self, hidden: &Tensor) -> Result<Tensor> {
        let weight = self.norm.unsqueeze(0)?;
        let eps = self.cfg.rms_norm_eps;
        if let Some(fused) = cuda_fused::multiway_rms_norm(hidden, &weight, None, 0, eps)? {
            return Ok(fused);
        }
        Ok(rms_normalize(hidden, self.cfg.rms_norm_eps)?.broadcast_mul(&self.norm)?)
    }

    /// Logits of the `lm_head` rows `ids` for normed hidden states `[B, D]`: `[B, ids.len()]`.
    pub fn logits_for_ids(&self, normed: &Tensor, ids: &[u32]) -> Result<Tensor> {
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
            return Err(ModelError::input(format!(
                "level token id {bad} is outside the vocabulary (size {})",
                self.cfg.vocab_size
            )));
        }
        let rows = match &self.lm_head_ids {
            None => ids.to_vec(),
            Some(kept) => ids
                .iter()
                .map(|id| match kept.iter().position(|k| k == id) {
                    Some(row) => Ok(row as u32),
                    None => Err(ModelError::input(format!(
                        "token {id} is not among the lm_head rows this model kept ({kept:?}): \
                         load it with those level words, or without LoadOptions::lm_head_rows"
                    ))),
                })
                .collect::<Result<Vec<u32>>>()?,
        };
        let rows = self
            .lm_head
            .index_select(&Tensor::new(rows, self.lm_head.device())?, 0)?;
        Ok(normed.matmul(&rows.t()?)?)
    }

    /// Full-vocabulary logits for normed hidden states `[B, D]`: `[B, vocab]`.
    pub fn logits(&self, normed: &Tensor) -> Result<Tensor> {
        if let Some(kept) = &self.lm_head_ids {
            return Err(ModelError::input(format!(
                "full-vocabulary logits need the whole lm_head; this model kept rows {kept:?} only \
                 (load it without LoadOptions::lm_head_rows)"
            )));
        }
        project(normed, &self.lm_head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tagged_rows(modality: &[u8]) -> Vec<f32> {
        let device = Device::Cpu;
        let routing = Routing::new(modality, &device).unwrap();
        let rows: Vec<f32> = (0..modality.len()).map(|r| r as f32).collect();
        let x = Tensor::from_vec(rows, (modality.len(), 1), &device).unwrap();
        // Visual rows get +1000, so the result shows both which branch ran and where the row landed.
        let out = routing
            .route(&x, |m, rows| Ok((rows + 1000.0 * m as f64)?))
            .unwrap();
        out.flatten_all().unwrap().to_vec1().unwrap()
    }

    proptest! {
        #[test]
        fn routing_applies_each_rows_branch_and_keeps_row_order(modality in prop::collection::vec(0u8..2, 1..40)) {
            let out = tagged_rows(&modality);
            for (r, (&m, &v)) in modality.iter().zip(&out).enumerate() {
                prop_assert_eq!(v, r as f32 + 1000.0 * f32::from(m));
            }
        }
    }

    /// A 2-layer decoder with grouped K/V heads and made-up weights.
    fn random_decoder() -> MultiwayLlama {
        let cfg = LlmConfig {
            vocab_size: 40,
            hidden_size: 64,
            intermediate_size: 96,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 16,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            rope_scaling: RopeScaling::None,
            max_position_embeddings: 64,
            tie_word_embeddings: false,
        };
        let root = Weights::random(DType::F32, Device::Cpu);
        MultiwayLlama::load(&root.pp("model"), &root, &cfg, None).unwrap()
    }

    #[test]
    fn last_rows_only_equals_the_last_rows_of_the_full_pass() {
        let llm = random_decoder();
        let (b, l, d) = (3, 6, 64);
        let embeds = Tensor::randn(0f32, 1.0, (b, l, d), &Device::Cpu).unwrap();
        // Padding after samples 1 and 2; sample 2 ends on a visual row, the others on text.
        let lengths = [6, 4, 2];
        let modality = [0, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0];
        let prefix = llm.prefix_kv(&[3, 7, 11]).unwrap();
        for prefix in [None, Some(&prefix)] {
            let full = llm
                .forward_after(prefix, &embeds, &lengths, &modality, false)
                .unwrap()
                .last_hidden_state;
            let last = llm
                .last_rows_after(prefix, &embeds, &lengths, &modality)
                .unwrap();
            assert_eq!(last.dims(), &[b, d]);
            for (i, &n) in lengths.iter().enumerate() {
                let want: Vec<f32> = full.get(i).unwrap().get(n - 1).unwrap().to_vec1().unwrap();
                let got: Vec<f32> = last.get(i).unwrap().to_vec1().unwrap();
                let diff = want
                    .iter()
                    .zip(&got)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(diff < 1e-5, "sample {i}: max |diff| {diff}");
            }
        }
    }

    #[test]
    fn routing_rejects_unknown_modalities() {
        assert!(matches!(
            Routing::new(&[0, 2], &Device::Cpu),
            Err(ModelError::Input(_))
        ));
    }

    #[test]
    fn mask_is_causal_and_hides_padding_keys() {
        let mask = causal_padding_mask(&[2, 3], 3, 0, &Device::Cpu).unwrap();
        assert_eq!(mask.dims(), &[2, 1, 3, 3]);
        let m: Vec<Vec<Vec<f32>>> = (0..2)
            .map(|b| {
                mask.get(b)
                    .unwrap()
                    .get(0)
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap()
            })
            .collect();
        let inf = f32::NEG_INFINITY;
        assert_eq!(
            m[0],
            vec![
                vec![0.0, inf, inf],
                vec![0.0, 0.0, inf],
                vec![0.0, 0.0, inf]
            ]
        );
        assert_eq!(
            m[1],
            vec![
                vec![0.0, inf, inf],
                vec![0.0, 0.0, inf],
                vec![0.0, 0.0, 0.0]
            ]
        );
    }

    #[test]
    fn mask_lets_every_row_see_the_whole_shared_prefix() {
        let mask = causal_padding_mask(&[1, 2], 2, 2, &Device::Cpu).unwrap();
        assert_eq!(mask.dims(), &[2, 1, 2, 4]);
        let inf = f32::NEG_INFINITY;
        let rows = |b: usize| {
            mask.get(b)
                .unwrap()
                .get(0)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
        };
        assert_eq!(
            rows(0),
            vec![vec![0.0, 0.0, 0.0, inf], vec![0.0, 0.0, 0.0, inf]]
        );
        assert_eq!(
            rows(1),
            vec![vec![0.0, 0.0, 0.0, inf], vec![0.0, 0.0, 0.0, 0.0]]
        );
    }

    fn llm_config(rope_scaling: RopeScaling) -> LlmConfig {
        LlmConfig {
            vocab_size: 10,
            hidden_size: 8,
            intermediate_size: 4,
            num_layers: 0,
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 4,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            rope_scaling,
            max_position_embeddings: 16,
            tie_word_embeddings: false,
        }
    }

    #[test]
    fn rope_tables_follow_the_llama_formula() {
        let rope = RotaryEmbedding::new(&llm_config(RopeScaling::None));
        assert_eq!(rope.inv_freq, vec![1.0, 0.01]);
        let (cos, sin) = rope.tables(0, 3, DType::F32, &Device::Cpu).unwrap();
        let cos = cos.to_vec2::<f32>().unwrap();
        let sin = sin.to_vec2::<f32>().unwrap();
        assert_eq!(cos[2], vec![2f32.cos(), 0.02f32.cos()]);
        assert_eq!(sin[1], vec![1f32.sin(), 0.01f32.sin()]);
        let linear = RotaryEmbedding::new(&llm_config(RopeScaling::Linear { factor: 2.0 }));
        let (cos2, _) = linear.tables(0, 5, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(cos2.to_vec2::<f32>().unwrap()[4], cos[2]);
        let (later, _) = rope.tables(2, 1, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(later.to_vec2::<f32>().unwrap()[0], cos[2]);
    }

    #[test]
    fn grouped_kv_heads_are_repeated_per_group() {
        let cfg = llm_config(RopeScaling::None);
        let attn = MultiwayAttention {
            q_proj: Linear::from_parts(
                Tensor::zeros((8, 8), DType::F32, &Device::Cpu).unwrap(),
                None,
            ),
            kv_proj: [
                Linear::from_parts(
                    Tensor::zeros((8, 8), DType::F32, &Device::Cpu).unwrap(),
                    None,
                ),
                Linear::from_parts(
                    Tensor::zeros((8, 8), DType::F32, &Device::Cpu).unwrap(),
                    None,
                ),
            ],
            o_proj: Linear::from_parts(
                Tensor::zeros((8, 8), DType::F32, &Device::Cpu).unwrap(),
                None,
            ),
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
        };
        let kv = Tensor::arange(0f32, 8.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 2, 4))
            .unwrap();
        let repeated = attn.repeat_kv(kv.clone()).unwrap();
        assert_eq!(repeated.dims(), &[1, 2, 2, 4]);
        for h in 0..2 {
            assert_eq!(
                repeated
                    .get(0)
                    .unwrap()
                    .get(h)
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap(),
                kv.get(0).unwrap().get(0).unwrap().to_vec2::<f32>().unwrap()
            );
        }
    }
}
