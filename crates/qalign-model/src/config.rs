//! The model configuration: a serde mirror of the checkpoint's `config.json` (upstream
//! `q_align/model/configuration_mplug_owl2.py`: `LlamaConfig`, `MPLUGOwl2Config`, `MplugOwlVisionConfig`,
//! `MplugOwlVisualAbstractorConfig`) with the official class defaults for absent keys, and the validated
//! runtime form ([`ModelConfig`]) every layer is built from. Nothing about the network size is hard-coded
//! elsewhere: image size, widths, depths, heads, query count, epsilons and RoPE settings all come from here.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// LayerNorm eps of the abstractor's `norm1`, `normk` and `norm2`. Upstream builds these with
/// `nn.LayerNorm(hidden)` and no eps argument, so PyTorch's default applies whatever the config says.
pub const ABSTRACTOR_TORCH_DEFAULT_LN_EPS: f64 = 1e-5;

/// `config.json` of an mPLUG-Owl2 / OneAlign checkpoint (`MPLUGOwl2Config`, a `LlamaConfig` subclass).
/// Unknown keys are ignored; absent keys take the upstream class defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct MplugOwl2Config {
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// `None` falls back to `num_attention_heads` (no grouped-query attention).
    pub num_key_value_heads: Option<usize>,
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// `null` or `{"type": "linear"|"dynamic", "factor": f}`; kept raw and checked in [`ModelConfig::resolve`].
    pub rope_scaling: Option<serde_json::Value>,
    pub attention_bias: bool,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    /// Absent means both sub-configs take their class defaults.
    pub visual_config: Option<VisualConfig>,
}

impl Default for MplugOwl2Config {
    /// `LlamaConfig()` defaults of the upstream file (note `rms_norm_eps` 1e-6, not LLaMA-2's 1e-5).
    fn default() -> Self {
        Self {
            model_type: None,
            vocab_size: 32000,
            hidden_size: 4096,
            intermediate_size: 11008,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: None,
            hidden_act: "silu".to_owned(),
            max_position_embeddings: 2048,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            rope_scaling: None,
            attention_bias: false,
            tie_word_embeddings: false,
            bos_token_id: Some(1),
            eos_token_id: Some(2),
            pad_token_id: None,
            visual_config: None,
        }
    }
}

/// `visual_config` of `config.json`: the two sub-model configs.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct VisualConfig {
    pub visual_model: MplugOwlVisionConfig,
    pub visual_abstractor: MplugOwlVisualAbstractorConfig,
}

/// `visual_config.visual_model` (`MplugOwlVisionConfig`). `hidden_act` and `use_flash_attn` are read but
/// ignored, as upstream hard-wires QuickGELU and the eager attention path.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct MplugOwlVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    pub use_flash_attn: bool,
}

impl Default for MplugOwlVisionConfig {
    /// The code defaults of the upstream class (its docstring's 768/12/224/32 are stale).
    fn default() -> Self {
        Self {
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            num_channels: 3,
            image_size: 448,
            patch_size: 14,
            hidden_act: "quick_gelu".to_owned(),
            layer_norm_eps: 1e-6,
            use_flash_attn: false,
        }
    }
}

/// `visual_config.visual_abstractor` (`MplugOwlVisualAbstractorConfig`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct MplugOwlVisualAbstractorConfig {
    pub num_learnable_queries: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub layer_norm_eps: f64,
    pub encoder_hidden_size: usize,
    /// `None` becomes 32 in the upstream constructor.
    pub grid_size: Option<usize>,
}

impl Default for MplugOwlVisualAbstractorConfig {
    fn default() -> Self {
        Self {
            num_learnable_queries: 64,
            hidden_size: 1024,
            num_hidden_layers: 6,
            num_attention_heads: 16,
            intermediate_size: 2816,
            layer_norm_eps: 1e-6,
            encoder_hidden_size: 1024,
            grid_size: None,
        }
    }
}

impl MplugOwl2Config {
    /// Parses `config.json` text.
    pub fn from_json_str(text: &str) -> std::result::Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// Reads and parses a `config.json` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_json_str(&text).map_err(|source| ModelError::Json {
            path: path.to_owned(),
            source,
        })
    }
}

/// How RoPE positions are scaled (`rope_scaling` in `config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum RopeScaling {
    /// `rope_scaling: null`, the OneAlign setting.
    None,
    /// `{"type": "linear", "factor": f}`: positions are divided by `f`.
    Linear { factor: f64 },
}

/// Validated dimensions of the vision tower.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub head_dim: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    /// Patches per side: `image_size / patch_size`.
    pub grid_size: usize,
    /// Tokens per image: `grid_size² + 1` (the CLS token).
    pub num_positions: usize,
    pub layer_norm_eps: f64,
}

/// Validated dimensions of the visual abstractor.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AbstractorConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub head_dim: usize,
    pub num_queries: usize,
    /// Width of the vision tokens the keys and values come from.
    pub encoder_hidden_size: usize,
    /// Side of the 2-D sin-cos key position grid.
    pub grid_size: usize,
    /// Eps of `norm1`, `normk` and `norm2` (PyTorch default, see [`ABSTRACTOR_TORCH_DEFAULT_LN_EPS`]).
    pub attention_layer_norm_eps: f64,
    /// Eps of the MLP's `ffn_ln` (from the config).
    pub ffn_layer_norm_eps: f64,
    /// Width after `visual_fc` (= the LLM hidden size).
    pub output_size: usize,
}

impl AbstractorConfig {
    /// Visual tokens per image handed to the LLM: the queries plus the appended `vit_eos`.
    pub fn tokens_per_image(&self) -> usize {
        self.num_queries + 1
    }
}

/// Validated dimensions of the LLaMA decoder with the modality-adaptive module.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LlmConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    /// Size of upstream's initial RoPE cache; longer sequences extend it with the same formula.
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
}

/// The validated runtime configuration all layers are built from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelConfig {
    pub vision: VisionConfig,
    pub abstractor: AbstractorConfig,
    pub llm: LlmConfig,
}

fn head_dim(width: usize, heads: usize, what: &str) -> Result<usize> {
    if heads == 0 || width == 0 || !width.is_multiple_of(heads) {
        return Err(ModelError::config(format!(
            "{what}: hidden size {width} is not a positive multiple of {heads} attention heads"
        )));
    }
    Ok(width / heads)
}

fn positive(value: usize, what: &str) -> Result<usize> {
    if value == 0 {
        return Err(ModelError::config(format!("{what} must be positive")));
    }
    Ok(value)
}

fn parse_rope_scaling(raw: Option<&serde_json::Value>) -> Result<RopeScaling> {
    let Some(value) = raw.filter(|v| !v.is_null()) else {
        return Ok(RopeScaling::None);
    };
    let kind = value.get("type").and_then(|t| t.as_str());
    let factor = value.get("factor").and_then(|f| f.as_f64());
    match (kind, factor) {
        (Some("linear"), Some(factor)) if factor > 1.0 => Ok(RopeScaling::Linear { factor }),
        _ => Err(ModelError::config(format!(
            "rope_scaling {value} is not supported (only null or {{\"type\": \"linear\", \"factor\": f > 1}})"
        ))),
    }
}

impl ModelConfig {
    /// Checks the parsed config for consistency and derives the runtime dimensions.
    pub fn resolve(raw: &MplugOwl2Config) -> Result<Self> {
        let visual = raw.visual_config.clone().unwrap_or_default();
        let vm = &visual.visual_model;
        let va = &visual.visual_abstractor;

        positive(vm.patch_size, "visual_model.patch_size")?;
        positive(vm.image_size, "visual_model.image_size")?;
        positive(vm.num_channels, "visual_model.num_channels")?;
        if !vm.image_size.is_multiple_of(vm.patch_size) {
            return Err(ModelError::config(format!(
                "visual_model.image_size {} is not a multiple of patch_size {}",
                vm.image_size, vm.patch_size
            )));
        }
        let vision_grid = vm.image_size / vm.patch_size;
        let vision = VisionConfig {
            hidden_size: vm.hidden_size,
            intermediate_size: positive(vm.intermediate_size, "visual_model.intermediate_size")?,
            num_layers: vm.num_hidden_layers,
            num_heads: vm.num_attention_heads,
            head_dim: head_dim(vm.hidden_size, vm.num_attention_heads, "visual_model")?,
            num_channels: vm.num_channels,
            image_size: vm.image_size,
            patch_size: vm.patch_size,
            grid_size: vision_grid,
            num_positions: vision_grid * vision_grid + 1,
            layer_norm_eps: vm.layer_norm_eps,
        };

        let abstractor_grid = va.grid_size.unwrap_or(32);
        if va.encoder_hidden_size != vision.hidden_size {
            return Err(ModelError::config(format!(
                "visual_abstractor.encoder_hidden_size {} differs from visual_model.hidden_size {}",
                va.encoder_hidden_size, vision.hidden_size
            )));
        }
        if abstractor_grid != vision_grid {
            return Err(ModelError::config(format!(
                "visual_abstractor.grid_size {abstractor_grid} differs from the vision grid {vision_grid} \
                 (image_size {} / patch_size {}): the key position table would not fit the vision tokens",
                vm.image_size, vm.patch_size
            )));
        }
        if !va.hidden_size.is_multiple_of(4) {
            return Err(ModelError::config(format!(
                "visual_abstractor.hidden_size {} must be a multiple of 4 for the 2-D sin-cos position table",
                va.hidden_size
            )));
        }
        let abstractor = AbstractorConfig {
            hidden_size: va.hidden_size,
            intermediate_size: positive(
                va.intermediate_size,
                "visual_abstractor.intermediate_size",
            )?,
            num_layers: va.num_hidden_layers,
            num_heads: va.num_attention_heads,
            head_dim: head_dim(va.hidden_size, va.num_attention_heads, "visual_abstractor")?,
            num_queries: positive(
                va.num_learnable_queries,
                "visual_abstractor.num_learnable_queries",
            )?,
            encoder_hidden_size: va.encoder_hidden_size,
            grid_size: abstractor_grid,
            attention_layer_norm_eps: ABSTRACTOR_TORCH_DEFAULT_LN_EPS,
            ffn_layer_norm_eps: va.layer_norm_eps,
            output_size: raw.hidden_size,
        };

        if raw.hidden_act != "silu" {
            return Err(ModelError::config(format!(
                "hidden_act {:?} is not supported (LLaMA uses \"silu\")",
                raw.hidden_act
            )));
        }
        if raw.attention_bias {
            return Err(ModelError::config(
                "attention_bias true is not supported (mPLUG-Owl2's LLaMA has no attention biases)",
            ));
        }
        let num_heads = raw.num_attention_heads;
        let llm_head_dim = head_dim(raw.hidden_size, num_heads, "LLM")?;
        if llm_head_dim % 2 != 0 {
            return Err(ModelError::config(format!(
                "LLM head dim {llm_head_dim} must be even for RoPE"
            )));
        }
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(num_heads);
        if num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) {
            return Err(ModelError::config(format!(
                "num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"
            )));
        }
        if !raw.rope_theta.is_finite() || raw.rope_theta <= 0.0 {
            return Err(ModelError::config(format!(
                "rope_theta {} must be positive",
                raw.rope_theta
            )));
        }
        let llm = LlmConfig {
            vocab_size: positive(raw.vocab_size, "vocab_size")?,
            hidden_size: raw.hidden_size,
            intermediate_size: positive(raw.intermediate_size, "intermediate_size")?,
            num_layers: raw.num_hidden_layers,
            num_heads,
            num_kv_heads,
            head_dim: llm_head_dim,
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta: raw.rope_theta,
            rope_scaling: parse_rope_scaling(raw.rope_scaling.as_ref())?,
            max_position_embeddings: raw.max_position_embeddings,
            tie_word_embeddings: raw.tie_word_embeddings,
        };
        Ok(Self {
            vision,
            abstractor,
            llm,
        })
    }

    /// Reads, parses and validates `config.json`; errors name the file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let raw = MplugOwl2Config::from_file(path)?;
        Self::resolve(&raw).map_err(|err| match err {
            ModelError::Config { message, .. } => ModelError::Config {
                path: Some(path.to_owned()),
                message,
            },
            other => other,
        })
    }
}
