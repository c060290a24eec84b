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

/// The PEFT settings of `adapter_config.json` (the fields the official adapters carry).
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
    #[serde(default = "yes")]
    pub init_lora_weights: bool,
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
    pub target_modules: Vec<String>,
    #[serde(default = "default_task_type")]
    pub task_type: String,
}

fn default_bias() -> String {
    "none".into()
}
fn default_peft_type() -> String {
    "LORA".into()
}
fn default_task_type() -> String {
    "CAUSAL_LM".into()
}
fn yes() -> bool {
    true
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
            init_lora_weights: true,
            layers_pattern: None,
            layers_to_transform: None,
            lora_alpha,
            lora_dropout,
            modules_to_save: None,
            peft_type: default_peft_type(),
            r,
            revision: None,
            target_modules,
            task_type: default_task_type(),
        }
    }

    /// `lora_alpha / r`, the factor of B·A.
    pub fn scale(&self) -> f64 {
        self.lora_alpha / self.r as f64
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
        if config.peft_type != "LORA" {
            return Err(adapter_error(
                dir,
                format!(
                    "peft_type is {}, only LORA adapters are supported",
                    config.peft_type
                ),
            ));
        }
        if config.r == 0 || !config.lora_alpha.is_finite() {
            return Err(adapter_error(dir, "r must be ≥ 1 and lora_alpha finite"));
        }
        if config.bias != "none" {
            return Err(adapter_error(
                dir,
                format!("bias = {:?} is not supported (only \"none\")", config.bias),
            ));
        }
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
        for (module, pair) in halves {
            match pair {
                (Some(a), Some(b)) => {
                    let ok = a.rank() == 2
                        && b.rank() == 2
                        && a.dim(0)? == config.r
                        && b.dim(1)? == config.r;
                    if !ok {
                        return Err(adapter_error(
                            dir,
                            format!(
                                "`{module}`: lora_A {:?} / lora_B {:?} do not have rank r = {}",
                                a.dims(),
                                b.dims(),
                                config.r
                            ),
                        ));
                    }
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
            non_lora,
        })
    }

    /// The adaptation that scores with this adapter: its other tensors replace the base's, and every
    /// LoRA delta is merged into its weight as the model loads (the official `merge_and_unload`).
    pub fn merged_adaptation(&self) -> Adaptation {
        let scale = self.config.scale();
        self.lora.iter().fold(
            Adaptation::new(0).with_overrides(self.non_lora.clone()),
            |adaptation, (module, pair)| {
                adaptation.with_merged_lora(module.clone(), pair.clone(), scale)
            },
        )
    }
}
