//! LoRA adapters in the official Q-Align layout (PEFT 0.4, `train_mem.py --lora_enable True`), so that
//! adapters trained by the official code and by qalign are interchangeable: `adapter_config.json`,
//! `adapter_model.bin` or `.safetensors` with keys `base_model.model.<module>.lora_{A,B}.weight`, and
//! `non_lora_trainables.bin` with the other trained tensors (the visual abstractor) under
//! `base_model.model.<key>`. This module owns the key layout; the trainer writes through it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::adapt::{Adaptation, LoraPair};
use crate::error::{ModelError, Result};

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_SAFETENSORS: &str = "adapter_model.safetensors";
pub const ADAPTER_BIN: &str = "adapter_model.bin";
pub const NON_LORA_TRAINABLES: &str = "non_lora_trainables.bin";

/// The prefix PEFT puts before every module name in a saved adapter.
const PEFT_PREFIX: &str = "base_model.model.";

/// `target_modules` as PEFT writes it: a list of module names (suffixes), or one regex string. Only
/// informative when loading: the saved matrices name their modules.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    Pattern(String),
}

/// The PEFT settings of `adapter_config.json`: the fields the official adapters (PEFT 0.4) carry, the
/// per-module rank / alpha settings of later PEFT versions, and every other field as read (checked by
/// [`AdapterConfig::check_supported`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    #[serde(default)]
    pub auto_mapping: Option<serde_json::Value>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default = "default_bias")]
    pub bias: String,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default = "yes")]
    pub inference_mode: bool,
    /// `true`, `false` or the name of a PEFT initialisation (`"gaussian"`, `"pissa"`, …).
    #[serde(default = "init_default")]
    pub init_lora_weights: serde_json::Value,
    #[serde(default)]
    pub layers_pattern: Option<serde_json::Value>,
    #[serde(default)]
    pub layers_to_transform: Option<serde_json::Value>,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default)]
    pub modules_to_save: Option<serde_json::Value>,
    #[serde(default = "default_peft_type")]
    pub peft_type: String,
    pub r: usize,
    #[serde(default)]
    pub revision: Option<String>,
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    #[serde(default = "default_task_type")]
    pub task_type: Option<String>,
    /// Per-module ranks (PEFT ≥ 0.6): pattern → r, matched as PEFT's `get_pattern_key` does.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alphas (PEFT ≥ 0.6): pattern → lora_alpha.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub alpha_pattern: BTreeMap<String, f64>,
    /// Rank-stabilised scaling alpha/√r instead of alpha/r (PEFT ≥ 0.7).
    #[serde(default, skip_serializing_if = "is_false")]
    pub use_rslora: bool,
    /// The fields of later PEFT versions not named above, as read (not written back: PEFT 0.4, which
    /// the official code pins, refuses fields it does not know).
    #[serde(flatten, skip_serializing)]
    pub other: BTreeMap<String, serde_json::Value>,
}

fn default_bias() -> String {
    "none".into()
}
fn default_peft_type() -> String {
    "LORA".into()
}
fn default_task_type() -> Option<String> {
    Some("CAUSAL_LM".into())
}
fn yes() -> bool {
    true
}
fn init_default() -> serde_json::Value {
    serde_json::Value::Bool(true)
}
fn is_false(b: &bool) -> bool {
    !*b
}

/// Settings of later PEFT versions that change what the adapter computes (or what it is applied to)
/// and that qalign does not implement: an adapter with any of them set is refused, naming it, rather
/// than scored as a plain LoRA.
const UNSUPPORTED_WHEN_SET: [(&str, &str); 12] = [
    (
        "use_dora",
        "DoRA rescales each merged weight by a learned magnitude",
    ),
    ("lora_bias", "lora_B has a bias"),
    ("use_qalora", "QA-LoRA pools the input"),
    ("use_bdlora", "a LoRA variant"),
    ("layer_replication", "it duplicates layers of the base"),
    (
        "target_parameters",
        "it adapts nn.Parameters rather than Linear layers",
    ),
    ("trainable_token_indices", "it trains embedding rows"),
    (
        "alora_invocation_tokens",
        "activated LoRA applies only after its invocation tokens",
    ),
    ("arrow_config", "Arrow routes between adapters"),
    ("velora_config", "a LoRA variant"),
    ("monteclora_config", "a LoRA variant"),
    ("kasa_config", "a LoRA variant"),
];

/// Fields of later PEFT versions that only matter while training or initialising (or that PEFT itself
/// ignores for Linear layers): accepted whatever their value.
const HARMLESS: [&str; 12] = [
    "peft_version",
    "exclude_modules",
    "megatron_config",
    "megatron_core",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "astra_config",
    "qalora_group_size",
    "ensure_weight_tying",
    "runtime_config",
];

/// Whether a config value is "not set": null, false, 0, "", [] or {}.
fn is_unset(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Null => true,
        serde_json::Value::Bool(b) => !b,
        serde_json::Value::Number(n) => n.as_f64() == Some(0.0),
        serde_json::Value::String(s) => s.is_empty(),
        serde_json::Value::Array(a) => a.is_empty(),
        serde_json::Value::Object(o) => o.is_empty(),
    }
}

/// PEFT's `get_pattern_key` test, `re.match(rf"(.*\.)?({key})$", module)`, for keys that are plain
/// module names (letters, digits, `_`, `-` and `.`, where `.` matches any character as in the regex).
/// `None` for a key with other regex syntax.
fn pattern_matches(key: &str, module: &str) -> Option<bool> {
    if key.is_empty()
        || !key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        return None;
    }
    let (k, m) = (key.as_bytes(), module.as_bytes());
    let fits = |start: usize| {
        m.len() - start == k.len()
            && k.iter()
                .zip(&m[start..])
                .all(|(kc, mc)| *kc == b'.' || kc == mc)
    };
    Some(
        (0..=m.len().saturating_sub(k.len()))
            .any(|start| m.len() >= k.len() && (start == 0 || m[start - 1] == b'.') && fits(start)),
    )
}

/// The value of the one pattern of `patterns` that matches `module` (PEFT takes the first in the
/// file's order; several matching patterns with different values are refused as ambiguous).
fn pattern_value<T: Copy + PartialEq + std::fmt::Debug>(
    field: &str,
    patterns: &BTreeMap<String, T>,
    module: &str,
) -> std::result::Result<Option<T>, String> {
    let mut found: Option<(&str, T)> = None;
    for (key, value) in patterns {
        let hit = pattern_matches(key, module).ok_or_else(|| {
            format!(
                "{field} key `{key}` is a regular expression; only module names (suffixes) are supported"
            )
        })?;
        if hit {
            match found {
                Some((other, v)) if v != *value => {
                    return Err(format!(
                        "{field} keys `{other}` and `{key}` both match `{module}` with different values"
                    ));
                }
                _ => found = Some((key, *value)),
            }
        }
    }
    Ok(found.map(|(_, v)| v))
}

impl AdapterConfig {
    /// A LoRA config as the official trainer writes it.
    pub fn new(
        base: Option<String>,
        r: usize,
        lora_alpha: f64,
        lora_dropout: f64,
        target_modules: Vec<String>,
    ) -> Self {
        Self {
            auto_mapping: None,
            base_model_name_or_path: base,
            bias: default_bias(),
            fan_in_fan_out: false,
            inference_mode: true,
            init_lora_weights: init_default(),
            layers_pattern: None,
            layers_to_transform: None,
            lora_alpha,
            lora_dropout,
            modules_to_save: None,
            peft_type: default_peft_type(),
            r,
            revision: None,
            target_modules: Some(TargetModules::List(target_modules)),
            task_type: default_task_type(),
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            use_rslora: false,
            other: BTreeMap::new(),
        }
    }

    /// `lora_alpha / r`, the factor of B·A for a module without a `rank_pattern` / `alpha_pattern`
    /// entry and without rsLoRA; see [`AdapterConfig::module_scale`] for any module.
    pub fn scale(&self) -> f64 {
        self.lora_alpha / self.r as f64
    }

    /// The rank of `module`: its `rank_pattern` entry, else `r`.
    pub fn module_rank(&self, module: &str) -> std::result::Result<usize, String> {
        Ok(pattern_value("rank_pattern", &self.rank_pattern, module)?.unwrap_or(self.r))
    }

    /// The factor of B·A for `module`, as PEFT computes it: alpha / r, or alpha / √r with
    /// `use_rslora`, where r and alpha are the module's own (`rank_pattern`, `alpha_pattern`).
    pub fn module_scale(&self, module: &str) -> std::result::Result<f64, String> {
        let r = self.module_rank(module)? as f64;
        let alpha =
            pattern_value("alpha_pattern", &self.alpha_pattern, module)?.unwrap_or(self.lora_alpha);
        Ok(if self.use_rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        })
    }

    /// Refuses settings that would make a plain W + s·B·A merge differ from what PEFT computes, naming
    /// the field.
    pub fn check_supported(&self) -> std::result::Result<(), String> {
        if self.peft_type != "LORA" {
            return Err(format!(
                "peft_type is {}, only LORA adapters are supported",
                self.peft_type
            ));
        }
        if self.r == 0 || !self.lora_alpha.is_finite() {
            return Err("r must be ≥ 1 and lora_alpha finite".into());
        }
        if self.bias != "none" {
            return Err(format!(
                "bias = {:?} is not supported (only \"none\")",
                self.bias
            ));
        }
        if self.modules_to_save.as_ref().is_some_and(|v| !is_unset(v)) {
            return Err(format!(
                "modules_to_save = {} is not supported (only LoRA matrices and non_lora_trainables.bin)",
                self.modules_to_save
                    .as_ref()
                    .map(|v| v.to_string())
                    .unwrap_or_default()
            ));
        }
        match &self.init_lora_weights {
            serde_json::Value::Bool(_) => {}
            serde_json::Value::String(s) if s == "gaussian" || s == "eva" => {}
            other => {
                return Err(format!(
                    "init_lora_weights = {other} is not supported: PEFT re-runs that initialisation on the base \
                     weights when it loads the adapter (convert it to a plain LoRA adapter first)"
                ));
            }
        }
        if self.rank_pattern.values().any(|r| *r == 0)
            || self.alpha_pattern.values().any(|a| !a.is_finite())
        {
            return Err("rank_pattern ranks must be ≥ 1 and alpha_pattern values finite".into());
        }
        for (field, why) in UNSUPPORTED_WHEN_SET {
            if let Some(v) = self.other.get(field).filter(|v| !is_unset(v)) {
                return Err(format!("{field} = {v} is not supported ({why})"));
            }
        }
        let known =
            |k: &str| HARMLESS.contains(&k) || UNSUPPORTED_WHEN_SET.iter().any(|(f, _)| *f == k);
        if let Some((k, v)) = self.other.iter().find(|(k, v)| !known(k) && !is_unset(v)) {
            return Err(format!(
                "{k} = {v} is not a setting qalign knows (it may change what the adapter computes)"
            ));
        }
        Ok(())
    }
}

/// The saved key of a LoRA matrix: `base_model.model.<module>.lora_A.weight` (`matrix` "A" or "B").
pub fn lora_key(module: &str, matrix: &str) -> String {
    format!("{PEFT_PREFIX}{module}.lora_{matrix}.weight")
}

/// The saved key of another trained tensor: `base_model.model.<key>`.
pub fn non_lora_key(key: &str) -> String {
    format!("{PEFT_PREFIX}{key}")
}

/// The official loader's key stripping of `non_lora_trainables.bin`: drop `base_model.`, then `model.`
/// when keys start with `model.model.`.
pub fn strip_non_lora_keys(tensors: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    let stripped: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| {
            (
                k.strip_prefix("base_model.")
                    .map(str::to_owned)
                    .unwrap_or(k),
                v,
            )
        })
        .collect();
    if stripped.keys().any(|k| k.starts_with("model.model.")) {
        stripped
            .into_iter()
            .map(|(k, v)| (k.strip_prefix("model.").map(str::to_owned).unwrap_or(k), v))
            .collect()
    } else {
        stripped
    }
}

/// A loaded adapter: its settings, its LoRA matrices by module, and its other trained tensors by
/// checkpoint key (all on the CPU in their stored dtype).
#[derive(Debug, Clone)]
pub struct Adapter {
    pub dir: PathBuf,
    pub config: AdapterConfig,
    pub lora: BTreeMap<String, LoraPair>,
    /// The factor of B·A of each module of `lora` (see [`AdapterConfig::module_scale`]).
    pub scales: BTreeMap<String, f64>,
    pub non_lora: HashMap<String, Tensor>,
}

fn adapter_error(dir: &Path, message: impl Into<String>) -> ModelError {
    ModelError::Adapter {
        dir: dir.to_owned(),
        message: message.into(),
    }
}

/// Reads every tensor of a safetensors file or a torch zip pickle.
fn read_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    let bad = |e: candle_core::Error| ModelError::WeightFile {
        path: path.to_owned(),
        message: e.to_string(),
    };
    if path.extension().is_some_and(|e| e == "safetensors") {
        candle_core::safetensors::load(path, &Device::Cpu).map_err(bad)
    } else {
        Ok(candle_core::pickle::read_all(path)
            .map_err(bad)?
            .into_iter()
            .collect())
    }
}

impl Adapter {
    /// Loads an adapter folder (official or qalign).
    pub fn load(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(adapter_error(dir, "not a directory"));
        }
        let config_path = dir.join(ADAPTER_CONFIG);
        let text = std::fs::read_to_string(&config_path).map_err(|source| ModelError::Io {
            path: config_path.clone(),
            source,
        })?;
        let config: AdapterConfig =
            serde_json::from_str(&text).map_err(|source| ModelError::Json {
                path: config_path.clone(),
                source,
            })?;
        config
            .check_supported()
            .map_err(|m| adapter_error(dir, format!("{}: {m}", config_path.display())))?;
        let weights = [ADAPTER_SAFETENSORS, ADAPTER_BIN]
            .iter()
            .map(|name| dir.join(name))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                adapter_error(
                    dir,
                    format!("neither {ADAPTER_SAFETENSORS} nor {ADAPTER_BIN} found"),
                )
            })?;
        let mut halves: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
        for (key, tensor) in read_tensors(&weights)? {
            let name = key
                .strip_prefix(PEFT_PREFIX)
                .unwrap_or(&key)
                .replace(".default.", ".");
            let (module, slot) = if let Some(m) = name.strip_suffix(".lora_A.weight") {
                (m, 0)
            } else if let Some(m) = name.strip_suffix(".lora_B.weight") {
                (m, 1)
            } else {
                return Err(adapter_error(
                    dir,
                    format!("{}: key `{key}` is not a LoRA matrix", weights.display()),
                ));
            };
            let entry = halves.entry(module.to_owned()).or_default();
            if slot == 0 {
                entry.0 = Some(tensor);
            } else {
                entry.1 = Some(tensor);
            }
        }
        let mut lora = BTreeMap::new();
        let mut scales = BTreeMap::new();
        for (module, pair) in halves {
            match pair {
                (Some(a), Some(b)) => {
                    let bad_pattern = |m: String| adapter_error(dir, m);
                    let r = config.module_rank(&module).map_err(bad_pattern)?;
                    let scale = config.module_scale(&module).map_err(bad_pattern)?;
                    let ok = a.rank() == 2 && b.rank() == 2 && a.dim(0)? == r && b.dim(1)? == r;
                    if !ok {
                        return Err(adapter_error(
                            dir,
                            format!(
                                "`{module}`: lora_A {:?} / lora_B {:?} do not have rank {r} (r, or its rank_pattern entry)",
                                a.dims(),
                                b.dims(),
                            ),
                        ));
                    }
                    scales.insert(module.clone(), scale);
                    lora.insert(module, LoraPair { a, b });
                }
                _ => {
                    return Err(adapter_error(
                        dir,
                        format!("`{module}` has only one of lora_A / lora_B"),
                    ));
                }
            }
        }
        if lora.is_empty() {
            return Err(adapter_error(
                dir,
                format!("{} holds no LoRA matrices", weights.display()),
            ));
        }
        let non_lora_path = dir.join(NON_LORA_TRAINABLES);
        let non_lora = if non_lora_path.is_file() {
            strip_non_lora_keys(read_tensors(&non_lora_path)?)
        } else {
            HashMap::new()
        };
        Ok(Self {
            dir: dir.to_owned(),
            config,
            lora,
            scales,
            non_lora,
        })
    }

    /// The factor of B·A of `module` (`None` when the adapter has no matrices for it).
    pub fn scale_of(&self, module: &str) -> Option<f64> {
        self.scales.get(module).copied()
    }

    /// The adaptation that scores with this adapter: its other tensors replace the base's, and every
    /// LoRA delta is merged into its weight as the model loads (the official `merge_and_unload`).
    pub fn merged_adaptation(&self) -> Adaptation {
        self.lora.iter().fold(
            Adaptation::new(0).with_overrides(self.non_lora.clone()),
            |adaptation, (module, pair)| {
                let scale = self.scales[module];
                adaptation.with_merged_lora(module.clone(), pair.clone(), scale)
            },
        )
    }
}
