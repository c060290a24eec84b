//! A model loaded *with* changes on top of its checkpoint. For scoring with an adapter: replacement
//! tensors (`non_lora_trainables`) and LoRA deltas merged into their base weights, W' = W + s·B·A. For
//! training: which checkpoint tensors become trainable variables, and which modules get an unmerged
//! LoRA branch. [`crate::Weights`] consults it for every key, so no layer needs to know how it is adapted.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{ModelError, Result};

/// Checkpoint buffers that are never parameters (fixed sin-cos tables).
const BUFFER_SUFFIXES: [&str; 2] = ["q_pos_embed", "k_pos_embed"];

/// LoRA matrices of one module: `a` `[r, in]`, `b` `[out, r]`.
#[derive(Debug, Clone)]
pub struct LoraPair {
    pub a: Tensor,
    pub b: Tensor,
}

/// A LoRA branch as a layer runs it: `scale·(x·Aᵀ)·Bᵀ` (dropout is applied to `x` by the caller).
#[derive(Debug, Clone)]
pub struct LoraBranch {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
    pub dropout: f32,
}

impl LoraBranch {
    /// `x` `[rows, in]` → `[rows, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let a = self.a.to_dtype(x.dtype())?;
        let b = self.b.to_dtype(x.dtype())?;
        Ok((x.matmul(&a.t()?)?.matmul(&b.t()?)? * self.scale)?)
    }
}

/// Which checkpoint tensors are trained.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Trainable {
    /// None (inference, or LoRA branches only).
    #[default]
    None,
    /// Every parameter (full fine-tuning).
    All,
    /// Keys starting with one of these prefixes (e.g. `model.visual_abstractor.`).
    Prefixes(Vec<String>),
}

impl Trainable {
    fn covers(&self, key: &str) -> bool {
        if BUFFER_SUFFIXES.iter().any(|s| key.ends_with(s)) {
            return false;
        }
        match self {
            Self::None => false,
            Self::All => true,
            Self::Prefixes(prefixes) => prefixes.iter().any(|p| key.starts_with(p.as_str())),
        }
    }
}

/// How a training LoRA branch starts.
#[derive(Debug, Clone)]
struct BranchSpec {
    /// Initial matrices (from `--lora-init`), or `None` for PEFT's initialisation (A uniform in
    /// ±1/√in, B zero).
    init: Option<LoraPair>,
    rank: usize,
    scale: f64,
    dropout: f32,
}

/// A trainable tensor created at load: its checkpoint-style name and its variable.
#[derive(Debug, Clone)]
pub struct Param {
    pub name: String,
    pub var: Var,
}

/// The changes a model is loaded with (see the module docs). Build it with the `with_*` methods, wrap it
/// in an `Arc`, and pass it to [`crate::LoadOptions::adaptation`].
#[derive(Debug)]
pub struct Adaptation {
    overrides: HashMap<String, Tensor>,
    merged: HashMap<String, (LoraPair, f64)>,
    branches: HashMap<String, BranchSpec>,
    trainable: Trainable,
    params: Mutex<Vec<Param>>,
    used_modules: Mutex<HashSet<String>>,
    training: AtomicBool,
    rng: Mutex<ChaCha8Rng>,
}

impl Default for Adaptation {
    fn default() -> Self {
        Self::new(0)
    }
}

impl Adaptation {
    /// No changes yet; `seed` drives LoRA initialisation and dropout.
    pub fn new(seed: u64) -> Self {
        Self {
            overrides: HashMap::new(),
            merged: HashMap::new(),
            branches: HashMap::new(),
            trainable: Trainable::None,
            params: Mutex::new(Vec::new()),
            used_modules: Mutex::new(HashSet::new()),
            training: AtomicBool::new(false),
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)),
        }
    }

    /// Tensors that replace the checkpoint's under the same keys (shapes must match).
    pub fn with_overrides(mut self, overrides: HashMap<String, Tensor>) -> Self {
        self.overrides.extend(overrides);
        self
    }

    /// Merges `scale·B·A` into `<module>.weight` as it loads.
    pub fn with_merged_lora(
        mut self,
        module: impl Into<String>,
        pair: LoraPair,
        scale: f64,
    ) -> Self {
        self.merged.insert(module.into(), (pair, scale));
        self
    }

    /// Gives `module` a trainable LoRA branch of rank `rank`, starting from `init` or from PEFT's
    /// initialisation.
    pub fn with_lora_branch(
        mut self,
        module: impl Into<String>,
        rank: usize,
        scale: f64,
        dropout: f32,
        init: Option<LoraPair>,
    ) -> Self {
        self.branches.insert(
            module.into(),
            BranchSpec {
                init,
                rank,
                scale,
                dropout,
            },
        );
        self
    }

    /// Which checkpoint tensors become trainable variables.
    pub fn with_trainable(mut self, trainable: Trainable) -> Self {
        self.trainable = trainable;
        self
    }

    /// Turns LoRA dropout on (training) or off (evaluation).
    pub fn set_training(&self, on: bool) {
        self.training.store(on, Ordering::Relaxed);
    }

    /// Whether this adaptation trains anything (trainable tensors or LoRA branches), rather than
    /// only merging changes into the weights.
    pub fn trains(&self) -> bool {
        self.trainable != Trainable::None || !self.branches.is_empty()
    }

    pub fn is_training(&self) -> bool {
        self.training.load(Ordering::Relaxed)
    }

    /// The trainable tensors created so far, in load order.
    pub fn params(&self) -> Vec<Param> {
        self.params.lock().map(|p| p.clone()).unwrap_or_default()
    }

    /// The modules that LoRA was asked for (merged or trained), sorted.
    pub fn lora_modules(&self) -> Vec<String> {
        let mut modules: Vec<String> = self
            .merged
            .keys()
            .chain(self.branches.keys())
            .cloned()
            .collect();
        modules.sort();
        modules.dedup();
        modules
    }

    /// Fails when a LoRA module or an override named something the loaded model never read: an adapter
    /// for another architecture, or a target the base does not have.
    pub fn check_all_used(&self) -> Result<()> {
        let used = self
            .used_modules
            .lock()
            .map_err(|_| ModelError::input("adaptation lock poisoned"))?;
        let missing: Vec<String> = self
            .lora_modules()
            .into_iter()
            .filter(|m| !used.contains(m))
            .collect();
        let mut missing_overrides: Vec<&str> = self
            .overrides
            .keys()
            .filter(|k| !used.contains(k.as_str()))
            .map(String::as_str)
            .collect();
        missing_overrides.sort_unstable();
        if !missing.is_empty() {
            return Err(ModelError::input(format!(
                "LoRA target module(s) not found in the base model (or not a supported linear layer): {}",
                missing.join(", ")
            )));
        }
        if !missing_overrides.is_empty() {
            return Err(ModelError::input(format!(
                "adapter tensor(s) not found in the base model: {}",
                missing_overrides.join(", ")
            )));
        }
        Ok(())
    }

    fn mark_used(&self, name: &str) {
        if let Ok(mut used) = self.used_modules.lock() {
            used.insert(name.to_owned());
        }
    }

    pub(crate) fn has_override(&self, key: &str) -> bool {
        self.overrides.contains_key(key)
    }

    /// The variable already made for `key`, so a tensor read twice is one parameter.
    pub(crate) fn existing_param(&self, key: &str) -> Option<Tensor> {
        let params = self.params.lock().ok()?;
        params
            .iter()
            .find(|p| p.name == key)
            .map(|p| p.var.as_tensor().clone())
    }

    /// Applies the override, the merged delta and trainability to the tensor of `key`; `load` reads the
    /// checkpoint's own tensor (only called when nothing overrides it).
    pub(crate) fn adapt(
        &self,
        key: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
        load: impl FnOnce() -> Result<Tensor>,
    ) -> Result<Tensor> {
        if let Some(existing) = self.existing_param(key) {
            return Ok(existing);
        }
        let mut tensor = match self.overrides.get(key) {
            Some(t) => {
                if t.dims() != shape {
                    return Err(ModelError::input(format!(
                        "adapter tensor `{key}` has shape {:?}, the base model expects {shape:?}",
                        t.dims()
                    )));
                }
                self.mark_used(key);
                t.to_device(device)?.to_dtype(dtype)?.contiguous()?
            }
            None => load()?,
        };
        if let Some(module) = key.strip_suffix(".weight")
            && let Some((pair, scale)) = self.merged.get(module)
        {
            let delta = lora_delta(pair, *scale, shape, module, device)?;
            tensor = (tensor.to_dtype(DType::F32)? + delta)?
                .to_dtype(dtype)?
                .contiguous()?;
            self.mark_used(module);
        }
        if self.trainable.covers(key) {
            let var = Var::from_tensor(&tensor.detach())?;
            let out = var.as_tensor().clone();
            self.params
                .lock()
                .map_err(|_| ModelError::input("adaptation lock poisoned"))?
                .push(Param {
                    name: key.to_owned(),
                    var,
                });
            tensor = out;
        }
        Ok(tensor)
    }

    /// The training branch of `module` (a Linear `[out, in]`), created as variables on first use.
    pub(crate) fn branch(
        &self,
        module: &str,
        in_dim: usize,
        out_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Option<LoraBranch>> {
        let Some(spec) = self.branches.get(module) else {
            return Ok(None);
        };
        let (a_name, b_name) = (
            format!("{module}.lora_A.weight"),
            format!("{module}.lora_B.weight"),
        );
        let (a, b) = match (self.existing_param(&a_name), self.existing_param(&b_name)) {
            (Some(a), Some(b)) => (a, b),
            _ => {
                let pair = match &spec.init {
                    Some(pair) => {
                        let ok = pair.a.dims() == [spec.rank, in_dim]
                            && pair.b.dims() == [out_dim, spec.rank];
                        if !ok {
                            return Err(ModelError::input(format!(
                                "LoRA matrices of `{module}` have shapes {:?} and {:?}, expected [{}, {in_dim}] and [{out_dim}, {}]",
                                pair.a.dims(),
                                pair.b.dims(),
                                spec.rank,
                                spec.rank
                            )));
                        }
                        pair.clone()
                    }
                    None => self.fresh_pair(spec.rank, in_dim, out_dim)?,
                };
                let a =
                    Var::from_tensor(&pair.a.to_device(device)?.to_dtype(dtype)?.contiguous()?)?;
                let b =
                    Var::from_tensor(&pair.b.to_device(device)?.to_dtype(dtype)?.contiguous()?)?;
                let tensors = (a.as_tensor().clone(), b.as_tensor().clone());
                let mut params = self
                    .params
                    .lock()
                    .map_err(|_| ModelError::input("adaptation lock poisoned"))?;
                params.push(Param {
                    name: a_name,
                    var: a,
                });
                params.push(Param {
                    name: b_name,
                    var: b,
                });
                tensors
            }
        };
        self.mark_used(module);
        Ok(Some(LoraBranch {
            a,
            b,
            scale: spec.scale,
            dropout: spec.dropout,
        }))
    }

    /// PEFT's default initialisation: A = kaiming_uniform(a = √5), i.e. U(−1/√in, 1/√in); B = 0.
    fn fresh_pair(&self, rank: usize, in_dim: usize, out_dim: usize) -> Result<LoraPair> {
        let bound = 1.0 / (in_dim as f32).sqrt();
        let mut rng = self
            .rng
            .lock()
            .map_err(|_| ModelError::input("adaptation lock poisoned"))?;
        let a: Vec<f32> = (0..rank * in_dim)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        Ok(LoraPair {
            a: Tensor::from_vec(a, (rank, in_dim), &Device::Cpu)?,
            b: Tensor::zeros((out_dim, rank), DType::F32, &Device::Cpu)?,
        })
    }

    /// Draws the dropout masks of optimizer step `step` (1-based) from stream `step` of the seed's
    /// generator, from its start: a step's masks then depend on the seed and the step alone, so
    /// a run resumed from a checkpoint draws what the uninterrupted run drew. (Stream 0 is the
    /// LoRA initialisation's.)
    pub fn begin_step(&self, step: u64) -> Result<()> {
        let mut rng = self
            .rng
            .lock()
            .map_err(|_| ModelError::input("adaptation lock poisoned"))?;
        rng.set_stream(step);
        rng.set_word_pos(0);
        Ok(())
    }

    /// Inverted dropout with probability `p` while training; `x` unchanged otherwise.
    pub fn lora_dropout(&self, x: &Tensor, p: f32) -> Result<Tensor> {
        if !self.is_training() || p <= 0.0 {
            return Ok(x.clone());
        }
        let keep = 1.0 - p;
        let mut rng = self
            .rng
            .lock()
            .map_err(|_| ModelError::input("adaptation lock poisoned"))?;
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| {
                if rng.random::<f32>() < keep {
                    1.0 / keep
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, x.shape(), &Device::Cpu)?
            .to_device(x.device())?
            .to_dtype(x.dtype())?;
        Ok((x * mask)?)
    }
}

/// `scale·B·A` in f32 on `device`, checked against the `[out, in]` weight shape.
fn lora_delta(
    pair: &LoraPair,
    scale: f64,
    shape: &[usize],
    module: &str,
    device: &Device,
) -> Result<Tensor> {
    let (a, b) = (pair.a.dims(), pair.b.dims());
    let ok = shape.len() == 2 && a.len() == 2 && b.len() == 2 && b[1] == a[0];
    if !ok || b[0] != shape[0] || a[1] != shape[1] {
        return Err(ModelError::input(format!(
            "LoRA matrices of `{module}` have shapes A {a:?} and B {b:?}, which do not fit its weight {shape:?}"
        )));
    }
    let a = pair.a.to_device(device)?.to_dtype(DType::F32)?;
    let b = pair.b.to_device(device)?.to_dtype(DType::F32)?;
    Ok((b.matmul(&a)? * scale)?)
}
