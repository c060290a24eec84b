//! The training loop: loads the base model with what is trained (LoRA branches + the visual abstractor,
//! or everything), runs deterministic shuffled epochs of micro-batches with gradient accumulation,
//! clips, steps AdamW on the HF schedule, logs every optimizer step, writes resumable checkpoints, and
//! finally the adapter (official layout) or the full checkpoint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use qalign_core::LevelSet;
use qalign_media::{PreprocessConfig, SamplingOptions};
use qalign_model::adapter::{
    ADAPTER_CONFIG, ADAPTER_SAFETENSORS, Adapter, AdapterConfig, NON_LORA_TRAINABLES,
};
use qalign_model::scorer::{folder_preprocess, folder_tokenizer};
use qalign_model::{
    Adaptation, LoadOptions, ModelConfig, OneAlignModel, Param, Trainable, TrainingSample,
    WeightFormat,
};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::data::{DataOptions, Dataset, Sample, load_pixels};
use crate::error::{Result, TrainError};
use crate::optim::{AdamW, AdamWConfig, Schedule, clip, grad_norm, lr_factor, warmup_steps};
use crate::save;
use crate::soft::SoftTargets;

/// An error from writing into `path` that names it, unless it already names the file.
fn naming(path: &Path, err: TrainError) -> TrainError {
    match err {
        TrainError::Write { .. } | TrainError::Io { .. } | TrainError::Overwrite(_) => err,
        other => wrapped(path, other),
    }
}

/// `err` as a failure to write `path`.
fn wrapped(path: &Path, err: TrainError) -> TrainError {
    TrainError::Write {
        path: path.to_owned(),
        source: std::io::Error::other(err.to_string()),
    }
}

/// The official LoRA targets: every LLM query projection and the visual value projection.
pub const DEFAULT_LORA_TARGETS: [&str; 2] = ["self_attn.q_proj", "self_attn.v_proj.multiway.1"];

/// What is trained.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    /// LoRA branches on `targets` (module names or suffixes) plus the whole visual abstractor.
    Lora {
        rank: usize,
        alpha: f64,
        dropout: f32,
        targets: Vec<String>,
        /// Continue from this adapter (its r, alpha, targets, matrices and abstractor).
        init: Option<PathBuf>,
    },
    /// Every parameter.
    Full,
}

/// The training objective.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LossKind {
    /// Cross-entropy on the answer tokens (the official objective).
    Hard,
    /// At the level word, cross-entropy against a Gaussian over the levels around the sample's MOS
    /// (DeQA-Score style); elsewhere as `Hard`.
    Soft { sigma: f64 },
}

/// A validated training run.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub model_dir: PathBuf,
    /// How the base model was named (a hub id or a folder), for `base_model_name_or_path`.
    pub model_name: String,
    /// The hub revision the base was resolved at, for the adapter's `revision`.
    pub model_revision: Option<String>,
    /// Build the base with random weights of `config.json`'s shapes (benchmarks).
    pub random_weights: bool,
    pub data: PathBuf,
    pub image_folder: PathBuf,
    pub output: PathBuf,
    pub mode: Mode,
    pub lr: f64,
    pub schedule: Schedule,
    pub warmup_ratio: f64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub epochs: usize,
    pub max_steps: Option<usize>,
    pub seed: u64,
    pub save_steps: Option<usize>,
    pub resume: Option<PathBuf>,
    /// One JSON line per optimizer step. The file is started afresh by each run (with `resume`,
    /// rewritten with the checkpoint's log), so it always holds exactly this run's steps.
    pub log_json: Option<PathBuf>,
    pub device: Device,
    pub dtype: DType,
    pub loss: LossKind,
    pub sampling: SamplingOptions,
}

impl TrainConfig {
    fn check(&self) -> Result<()> {
        let bad = |m: String| Err(TrainError::Config(m));
        if self.batch_size == 0 || self.grad_accum == 0 {
            return bad("the batch size and the gradient accumulation steps must be ≥ 1".into());
        }
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return bad(format!(
                "the learning rate must be a non-negative number, got {}",
                self.lr
            ));
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            return bad(format!(
                "the warm-up ratio must be in [0, 1], got {}",
                self.warmup_ratio
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("the weight decay must be ≥ 0".into());
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            return bad("the gradient-norm clip must be ≥ 0 (0 turns clipping off)".into());
        }
        if self.epochs == 0 && self.max_steps.is_none() {
            return bad("training needs at least one epoch or a step limit".into());
        }
        if let Mode::Lora {
            rank,
            alpha,
            dropout,
            ..
        } = &self.mode
            && (*rank == 0 || !alpha.is_finite() || !(0.0..1.0).contains(dropout))
        {
            return bad("LoRA needs r ≥ 1, a finite alpha and dropout in [0, 1)".into());
        }
        if let LossKind::Soft { sigma } = self.loss
            && !(sigma.is_finite() && sigma > 0.0)
        {
            return bad("the soft target's sigma must be > 0".into());
        }
        Ok(())
    }
}

/// One optimizer step, as logged (`--log-json`, `training_log.jsonl`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepLog {
    pub step: usize,
    pub epoch: f64,
    /// Mean loss of the step's micro-batches, before the update.
    pub loss: f64,
    pub lr: f64,
    /// Total L2 norm of the trainable gradients before clipping.
    pub grad_norm: f64,
    pub samples_per_s: f64,
    pub elapsed_s: f64,
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    pub steps: usize,
    pub total_steps: usize,
    pub samples_seen: usize,
    pub trainable_params: usize,
    pub trainable_tensors: usize,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub seconds: f64,
    pub output: PathBuf,
}

/// Where a run stands, saved with each checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TrainerState {
    global_step: usize,
    /// Micro-batches consumed, counted over the whole run.
    micro_batches: usize,
    samples_seen: usize,
    total_steps: usize,
    seed: u64,
    batch_size: usize,
    grad_accum: usize,
    mode: String,
    /// The rest of what shapes the updates; absent in checkpoints older than it (not checked then).
    #[serde(default)]
    recipe: Option<Recipe>,
}

/// What a resumed run must share with its checkpoint besides the seed, batch size, accumulation and
/// mode: a change to any of these would silently make a different run than the one resumed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Recipe {
    lr: f64,
    schedule: String,
    warmup_ratio: f64,
    weight_decay: f64,
    max_grad_norm: f64,
    total_steps: usize,
    /// LoRA rank, alpha, dropout and targets (or `full`).
    adaptation: String,
    loss: String,
    samples: usize,
    /// SHA-256 of every sample's id, media paths, tokens and labels.
    data_sha256: String,
}

impl Recipe {
    /// The fields that differ from `other`, as `name: saved → now`.
    fn differences(&self, now: &Recipe) -> Vec<String> {
        let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
            (serde_json::to_value(self), serde_json::to_value(now))
        else {
            return vec!["the recipe".into()];
        };
        a.iter()
            .filter(|(k, v)| b.get(*k) != Some(v))
            .map(|(k, v)| {
                format!(
                    "{k}: {v} → {}",
                    b.get(k).unwrap_or(&serde_json::Value::Null)
                )
            })
            .collect()
    }
}

const STATE_FILE: &str = "trainer_state.json";
const TRAINING_LOG: &str = "training_log.jsonl";

/// A checkpoint-N folder (an older one of the same name is replaced).
const CHECKPOINT: save::OutputFolder = save::OutputFolder {
    what: "a checkpoint",
    files: &[
        ADAPTER_CONFIG,
        ADAPTER_SAFETENSORS,
        NON_LORA_TRAINABLES,
        save::MODEL_SAFETENSORS,
        save::OPTIMIZER_SAFETENSORS,
        TRAINING_LOG,
        STATE_FILE,
    ],
};

/// Called after every optimizer step.
pub type Progress<'a> = &'a mut dyn FnMut(&StepLog, usize);

/// A loaded run: the model with its trainable tensors, the data and the optimizer.
pub struct Trainer {
    config: TrainConfig,
    model: OneAlignModel,
    adaptation: Arc<Adaptation>,
    params: Vec<Param>,
    dataset: Dataset,
    preprocess: PreprocessConfig,
    adapter_config: Option<AdapterConfig>,
    soft: Option<SoftTargets>,
    log: Vec<StepLog>,
    stop: Option<Arc<AtomicBool>>,
}

/// Every LLM linear layer of a configuration, by module name (the LoRA candidates).
pub fn llm_linear_modules(config: &ModelConfig) -> Vec<String> {
    let mut out = Vec::new();
    for i in 0..config.llm.num_layers {
        let p = format!("model.layers.{i}");
        out.push(format!("{p}.self_attn.q_proj"));
        for m in 0..2 {
            out.push(format!("{p}.self_attn.k_proj.multiway.{m}"));
            out.push(format!("{p}.self_attn.v_proj.multiway.{m}"));
        }
        out.push(format!("{p}.self_attn.o_proj"));
        for name in ["gate_proj", "up_proj", "down_proj"] {
            out.push(format!("{p}.mlp.{name}"));
        }
    }
    out
}

/// An f32 flag value as the user wrote it (0.05, not 0.05000000074505806), for adapter_config.json.
fn as_written(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(f64::from(x))
}

/// PEFT's matching: a target names a module exactly or is a dotted suffix of its name.
pub fn resolve_targets(targets: &[String], modules: &[String]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for target in targets {
        let target = target.trim();
        let hits: Vec<&String> = modules
            .iter()
            .filter(|m| m.as_str() == target || m.ends_with(&format!(".{target}")))
            .collect();
        if hits.is_empty() {
            return Err(TrainError::Target {
                target: target.to_owned(),
                known: "q_proj, k_proj.multiway.0/1, v_proj.multiway.0/1, o_proj, gate_proj, up_proj, down_proj (each `model.layers.N.…`)".into(),
            });
        }
        out.extend(hits.into_iter().cloned());
    }
    out.sort();
    out.dedup();
    Ok(out)
}

impl Trainer {
    /// Reads the data, loads the model with its trainable tensors, and checks everything.
    pub fn new(config: TrainConfig) -> Result<Self> {
        Self::with_progress(config, &mut |_, _| {})
    }

    /// [`Trainer::new`], calling `checked(done, total)` as the data's samples are checked.
    pub fn with_progress(
        config: TrainConfig,
        checked: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        config.check()?;
        // Before anything is read: a full run would write model.safetensors over the base's.
        save::refuse_model_folder(&config.output, &config.model_dir, "the training output")?;
        let dir = &config.model_dir;
        let model_config = ModelConfig::from_file(&dir.join("config.json"))?;
        let (tokenizer, _) = folder_tokenizer(dir)?;
        let preprocess = folder_preprocess(dir, model_config.vision.image_size)?;
        // Resolved before the data's media are all checked, so a mistyped target fails first.
        let lora_modules = match &config.mode {
            Mode::Lora {
                targets,
                init: None,
                ..
            } => Some(resolve_targets(
                targets,
                &llm_linear_modules(&model_config),
            )?),
            _ => None,
        };
        let levels = LevelSet::itu();
        let data_opts = DataOptions {
            image_folder: config.image_folder.clone(),
            max_positions: model_config.llm.max_position_embeddings,
            tokens_per_image: model_config.abstractor.tokens_per_image(),
            sampling: config.sampling,
            level_words: levels.words().to_vec(),
        };
        let dataset = Dataset::load_with_progress(&config.data, &tokenizer, &data_opts, checked)?;
        let soft = match config.loss {
            LossKind::Hard => None,
            LossKind::Soft { sigma } => {
                Some(SoftTargets::new(&dataset, &tokenizer, &levels, sigma)?)
            }
        };

        let (adaptation, adapter_config) = match &config.mode {
            Mode::Full => (
                Adaptation::new(config.seed).with_trainable(Trainable::All),
                None,
            ),
            Mode::Lora {
                rank,
                alpha,
                dropout,
                init,
                ..
            } => {
                let abstractor = Trainable::Prefixes(vec!["model.visual_abstractor.".into()]);
                match init {
                    Some(adapter_dir) => {
                        let adapter = Adapter::load(adapter_dir)?;
                        // Each module keeps its own rank and factor (`rank_pattern`,
                        // `alpha_pattern`, `use_rslora`), which the saved config carries on.
                        let adaptation = adapter.lora.iter().fold(
                            Adaptation::new(config.seed)
                                .with_overrides(adapter.non_lora.clone())
                                .with_trainable(abstractor),
                            |a, (module, pair)| {
                                a.with_lora_branch(
                                    module.clone(),
                                    pair.a.dims()[0],
                                    adapter.scales[module],
                                    *dropout,
                                    Some(pair.clone()),
                                )
                            },
                        );
                        let mut cfg = adapter.config.clone();
                        cfg.lora_dropout = as_written(*dropout);
                        cfg.base_model_name_or_path = Some(config.model_name.clone());
                        cfg.revision = config.model_revision.clone();
                        (adaptation, Some(cfg))
                    }
                    None => {
                        // Resolved above for exactly this case (LoRA without an initial adapter).
                        let modules = lora_modules.unwrap_or_default();
                        let scale = alpha / *rank as f64;
                        let adaptation = modules.iter().fold(
                            Adaptation::new(config.seed).with_trainable(abstractor),
                            |a, m| a.with_lora_branch(m.clone(), *rank, scale, *dropout, None),
                        );
                        let mut cfg = AdapterConfig::new(
                            Some(config.model_name.clone()),
                            *rank,
                            *alpha,
                            as_written(*dropout),
                            modules,
                        );
                        cfg.revision = config.model_revision.clone();
                        (adaptation, Some(cfg))
                    }
                }
            }
        };
        let adaptation = Arc::new(adaptation);
        let opts = LoadOptions {
            device: config.device.clone(),
            dtype: config.dtype,
            format: WeightFormat::Auto,
            adaptation: Some(adaptation.clone()),
            quant: None,
            lm_head_rows: None,
            on_progress: None,
        };
        let model = if config.random_weights {
            OneAlignModel::random_init(dir, &opts)?
        } else {
            OneAlignModel::load(dir, &opts)?
        };
        let params = adaptation.params();
        if params.is_empty() {
            return Err(TrainError::Config("nothing to train".into()));
        }
        Ok(Self {
            config,
            model,
            adaptation,
            params,
            dataset,
            preprocess,
            adapter_config,
            soft,
            log: Vec::new(),
            stop: None,
        })
    }

    /// A flag that, once raised (by a signal handler), stops [`Trainer::run`] before its next
    /// micro-batch: the unfinished step is dropped, a checkpoint of the last completed one is
    /// written, and the run returns [`TrainError::Interrupted`] wrapped in [`TrainError::Stopped`].
    pub fn set_stop(&mut self, flag: Arc<AtomicBool>) {
        self.stop = Some(flag);
    }

    /// The trainable tensors.
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    pub fn dataset(&self) -> &Dataset {
        &self.dataset
    }

    /// With the soft loss, how many samples fall back to the one-hot answer.
    pub fn one_hot_soft_samples(&self) -> Option<usize> {
        self.soft.as_ref().map(|s| s.one_hot_samples(&self.dataset))
    }

    pub fn model(&self) -> &OneAlignModel {
        &self.model
    }

    fn micro_batches_per_epoch(&self) -> usize {
        self.dataset.samples.len().div_ceil(self.config.batch_size)
    }

    /// Optimizer steps of the whole run.
    pub fn total_steps(&self) -> usize {
        let per_epoch = self
            .micro_batches_per_epoch()
            .div_ceil(self.config.grad_accum);
        self.config
            .max_steps
            .unwrap_or(per_epoch * self.config.epochs)
    }

    /// The sample order of epoch `epoch` (deterministic in the seed).
    fn epoch_order(&self, epoch: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.dataset.samples.len()).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(self.config.seed.wrapping_add(epoch as u64));
        order.shuffle(&mut rng);
        order
    }

    /// Loss of a micro-batch (scalar, differentiable) and its sample count.
    fn micro_loss(&self, samples: &[&Sample]) -> Result<Tensor> {
        // Decoding and resizing run in parallel, one thread per sample, as many at a time as there are CPUs.
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut decoded: Vec<Result<_>> = Vec::with_capacity(samples.len());
        for chunk in samples.chunks(threads) {
            std::thread::scope(|scope| {
                let handles: Vec<_> = chunk
                    .iter()
                    .map(|s| {
                        scope.spawn(|| {
                            load_pixels(
                                s,
                                &self.preprocess,
                                &self.config.sampling,
                                &self.dataset.path,
                            )
                        })
                    })
                    .collect();
                decoded.extend(handles.into_iter().map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(TrainError::Internal("a decoder thread panicked".into()))
                    })
                }));
            });
        }
        let mut pixels = Vec::with_capacity(samples.len());
        for d in decoded {
            let (data, n, [c, h, w]) = d?;
            pixels.push(Tensor::from_vec(data, (n, c, h, w), self.model.device())?);
        }
        let batch: Vec<TrainingSample> = samples
            .iter()
            .zip(&pixels)
            .map(|(s, p)| TrainingSample {
                input_ids: &s.input_ids,
                labels: &s.labels,
                pixels: p,
            })
            .collect();
        match &self.soft {
            None => Ok(self.model.training_loss(&batch)?.loss),
            Some(soft) => soft.loss(&self.model, &batch, samples),
        }
    }

    /// Runs the whole training and writes the output; `progress` sees every step.
    pub fn run(&mut self, progress: Progress) -> Result<TrainSummary> {
        let start = Instant::now();
        let total = self.total_steps();
        let warmup = warmup_steps(total, self.config.warmup_ratio);
        let mut opt = AdamW::new(
            &self.params,
            AdamWConfig {
                weight_decay: self.config.weight_decay,
                ..AdamWConfig::default()
            },
        )?;
        let mut state = TrainerState {
            global_step: 0,
            micro_batches: 0,
            samples_seen: 0,
            total_steps: total,
            seed: self.config.seed,
            batch_size: self.config.batch_size,
            grad_accum: self.config.grad_accum,
            mode: self.mode_name().into(),
            recipe: Some(self.recipe(total)),
        };
        if let Some(dir) = self.config.resume.clone() {
            state = self.resume(&dir, &mut opt, &state)?;
        }
        // A resumed run's clock goes on from its checkpoint's last step.
        let elapsed_before = self.log.last().map_or(0.0, |l| l.elapsed_s);
        if let Some(path) = &self.config.log_json
            && state.global_step == 0
        {
            save::write_atomic(path, b"")?;
        }
        // A run that fails before its first step removes the (empty) output folder it made.
        let made_output = !self.config.output.exists();
        std::fs::create_dir_all(&self.config.output).map_err(|source| TrainError::Write {
            path: self.config.output.clone(),
            source,
        })?;
        self.adaptation.set_training(true);
        let per_epoch = self.micro_batches_per_epoch();
        let bs = self.config.batch_size;
        let mut first_loss = None;
        let mut step_start = Instant::now();
        let mut step_samples = 0usize;
        let mut acc: Vec<Option<Tensor>> = vec![None; self.params.len()];
        let mut losses = Vec::new();
        // The step of the newest checkpoint this run wrote or resumed from.
        let mut saved_step = if self.config.resume.is_some() {
            state.global_step
        } else {
            0
        };
        let mut tried_step = saved_step;
        let result = (|| -> Result<()> {
            while state.global_step < total {
                if self.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst)) {
                    return Err(TrainError::Interrupted(state.global_step + 1));
                }
                let epoch = state.micro_batches / per_epoch;
                let in_epoch = state.micro_batches % per_epoch;
                let order = self.epoch_order(epoch);
                let ids = &order[in_epoch * bs..((in_epoch + 1) * bs).min(order.len())];
                let samples: Vec<&Sample> = ids.iter().map(|&i| &self.dataset.samples[i]).collect();
                // A step's dropout masks depend on the seed and the step alone, so a resumed run
                // draws what the uninterrupted one drew.
                if in_epoch.is_multiple_of(self.config.grad_accum) {
                    self.adaptation.begin_step(state.global_step as u64 + 1)?;
                }
                let loss = self.micro_loss(&samples)?;
                let value = f64::from(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?);
                if !value.is_finite() {
                    return Err(TrainError::Config(format!(
                        "the loss became {value} at step {} (lower --lr?)",
                        state.global_step + 1
                    )));
                }
                // Micro-batches are grouped into steps of `accum` within an epoch; the last step of an
                // epoch takes what is left.
                let accum = self.config.grad_accum;
                let group_start = in_epoch - in_epoch % accum;
                let n_in_step = accum.min(per_epoch - group_start);
                let step_done = in_epoch + 1 == group_start + n_in_step;
                let grads = (loss / n_in_step as f64)?.backward()?;
                for (slot, p) in acc.iter_mut().zip(&self.params) {
                    if let Some(g) = grads.get(p.var.as_tensor()) {
                        let g = g.to_dtype(DType::F32)?;
                        *slot = Some(match slot.take() {
                            Some(a) => (a + g)?,
                            None => g,
                        });
                    }
                }
                drop(grads);
                losses.push(value);
                state.micro_batches += 1;
                state.samples_seen += samples.len();
                step_samples += samples.len();
                if !step_done {
                    continue;
                }
                let mut grads = std::mem::replace(&mut acc, vec![None; self.params.len()]);
                let norm = grad_norm(&grads)?;
                clip(&mut grads, norm, self.config.max_grad_norm)?;
                let lr = self.config.lr
                    * lr_factor(self.config.schedule, state.global_step, warmup, total);
                opt.step(&grads, lr)?;
                drop(grads);
                state.global_step += 1;
                let mean_loss = losses.iter().sum::<f64>() / losses.len() as f64;
                losses.clear();
                first_loss.get_or_insert(mean_loss);
                let secs = step_start.elapsed().as_secs_f64();
                let entry = StepLog {
                    step: state.global_step,
                    epoch: state.micro_batches as f64 / per_epoch as f64,
                    loss: mean_loss,
                    lr,
                    grad_norm: norm,
                    samples_per_s: step_samples as f64 / secs.max(1e-9),
                    elapsed_s: elapsed_before + start.elapsed().as_secs_f64(),
                };
                step_start = Instant::now();
                step_samples = 0;
                self.append_log(&entry)?;
                progress(&entry, total);
                if let Some(every) = self.config.save_steps
                    && state.global_step.is_multiple_of(every)
                    && state.global_step < total
                {
                    tried_step = state.global_step;
                    self.save_checkpoint(&state, &opt)?;
                    saved_step = state.global_step;
                }
            }
            Ok(())
        })();
        self.adaptation.set_training(false);
        if let Err(err) = result {
            if state.global_step == 0 {
                if made_output {
                    let _ = std::fs::remove_dir(&self.config.output);
                }
                return Err(err);
            }
            // Keep what was learnt: a checkpoint of the last completed step (unless writing that
            // very checkpoint is what failed), then the error, saying what there is to resume from.
            let step = state.global_step;
            let kept = if saved_step == step || tried_step == step {
                self.resume_hint(saved_step)
            } else {
                match self.save_checkpoint(&state, &opt) {
                    Ok(()) => self.resume_hint(step),
                    Err(e) => format!(
                        "the checkpoint of step {step} could not be written either ({e}); {}",
                        self.resume_hint(saved_step)
                    ),
                }
            };
            return Err(TrainError::Stopped {
                source: Box::new(err),
                kept,
            });
        }
        self.write_output(&opt)
            .map_err(|e| naming(&self.config.output, e))?;
        Ok(TrainSummary {
            steps: state.global_step,
            total_steps: total,
            samples_seen: state.samples_seen,
            trainable_params: self.params.iter().map(|p| p.var.elem_count()).sum(),
            trainable_tensors: self.params.len(),
            first_loss,
            last_loss: self.log.last().map(|l| l.loss),
            seconds: start.elapsed().as_secs_f64(),
            output: self.config.output.clone(),
        })
    }

    /// This run's [`Recipe`], `total` optimizer steps long.
    fn recipe(&self, total: usize) -> Recipe {
        use sha2::{Digest, Sha256};
        let mut hash = Sha256::new();
        for s in &self.dataset.samples {
            // Media paths as the data names them, so that another spelling of the image folder
            // (or another working directory) is the same data.
            let media: Vec<&Path> = s
                .visual
                .paths()
                .into_iter()
                .map(|p| p.strip_prefix(&self.config.image_folder).unwrap_or(p))
                .collect();
            hash.update(format!(
                "{}\0{:?}\0{}\0{:?}\0{:?}\n",
                s.id,
                media,
                s.visual.n_frames(),
                s.input_ids,
                s.labels
            ));
        }
        let adaptation = match &self.config.mode {
            Mode::Full => "full".to_string(),
            Mode::Lora {
                rank,
                alpha,
                dropout,
                targets,
                ..
            } => format!("r {rank}, alpha {alpha}, dropout {dropout}, targets {targets:?}"),
        };
        Recipe {
            lr: self.config.lr,
            schedule: format!("{:?}", self.config.schedule),
            warmup_ratio: self.config.warmup_ratio,
            weight_decay: self.config.weight_decay,
            max_grad_norm: self.config.max_grad_norm,
            total_steps: total,
            adaptation,
            loss: format!("{:?}", self.config.loss),
            samples: self.dataset.samples.len(),
            data_sha256: format!("{:x}", hash.finalize()),
        }
    }

    fn mode_name(&self) -> &'static str {
        match self.config.mode {
            Mode::Full => "full",
            Mode::Lora { .. } => "lora",
        }
    }

    fn append_log(&mut self, entry: &StepLog) -> Result<()> {
        let line = serde_json::to_string(entry).map_err(|e| TrainError::Internal(e.to_string()))?;
        if let Some(path) = &self.config.log_json {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| TrainError::Write {
                    path: path.clone(),
                    source,
                })?;
            writeln!(f, "{line}").map_err(|source| TrainError::Write {
                path: path.clone(),
                source,
            })?;
        }
        self.log.push(entry.clone());
        Ok(())
    }

    fn log_bytes(&self) -> Vec<u8> {
        self.log
            .iter()
            .filter_map(|l| serde_json::to_string(l).ok())
            .flat_map(|l| (l + "\n").into_bytes())
            .collect()
    }

    /// The trained weights into `dir` (adapter files, or a full checkpoint).
    fn write_weights(&self, dir: &Path, opt: &AdamW) -> Result<()> {
        let model_dir = (!self.config.random_weights).then_some(self.config.model_dir.as_path());
        let masters = opt.masters();
        match &self.adapter_config {
            Some(cfg) => {
                save::write_adapter(dir, cfg, &self.params, &masters, &self.config.model_dir)
            }
            None => save::write_full(dir, &self.params, &masters, model_dir),
        }
    }

    fn checkpoint_dir(&self, step: usize) -> PathBuf {
        self.config.output.join(format!("checkpoint-{step}"))
    }

    /// Where a stopped run goes on from: the checkpoint of step `saved` (0: none), the one this
    /// run resumed from included.
    fn resume_hint(&self, saved: usize) -> String {
        let dir = match &self.config.resume {
            Some(from) if !self.checkpoint_dir(saved).is_dir() => from.clone(),
            _ => self.checkpoint_dir(saved),
        };
        if saved == 0 {
            "no checkpoint was written, so nothing is kept".into()
        } else {
            format!(
                "training can go on from step {saved}: --resume {}",
                dir.display()
            )
        }
    }

    /// Writes `checkpoint-N` for the state's step.
    fn save_checkpoint(&self, state: &TrainerState, opt: &AdamW) -> Result<()> {
        let dest = self.checkpoint_dir(state.global_step);
        save::write_dir_atomic(&dest, &CHECKPOINT, |dir| {
            self.write_weights(dir, opt)?;
            save::write_optimizer(dir, &opt.state())?;
            save::write_atomic(&dir.join(TRAINING_LOG), &self.log_bytes())?;
            let json = serde_json::to_vec_pretty(state)
                .map_err(|e| TrainError::Internal(e.to_string()))?;
            save::write_atomic(&dir.join(STATE_FILE), &json)
        })
        // Its files are written under a temporary folder name: the message names the checkpoint.
        .map_err(|e| wrapped(&dest, e))
    }

    fn write_output(&self, opt: &AdamW) -> Result<()> {
        let out = &self.config.output;
        self.write_weights(out, opt)?;
        save::write_atomic(&out.join(TRAINING_LOG), &self.log_bytes())
    }

    /// Restores parameters, optimizer state, position in the data and the log from a checkpoint.
    fn resume(
        &mut self,
        dir: &Path,
        opt: &mut AdamW,
        fresh: &TrainerState,
    ) -> Result<TrainerState> {
        let read = |name: &str| -> Result<String> {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| TrainError::Io { path, source })
        };
        if !dir.join(STATE_FILE).is_file() {
            return Err(TrainError::Resume(format!(
                "{} has no {STATE_FILE}: it is not a checkpoint-N folder of `qalign train --save-steps`",
                dir.display()
            )));
        }
        let state: TrainerState =
            serde_json::from_str(&read(STATE_FILE)?).map_err(|source| TrainError::Json {
                path: dir.join(STATE_FILE),
                source,
            })?;
        let same = state.seed == fresh.seed
            && state.batch_size == fresh.batch_size
            && state.grad_accum == fresh.grad_accum
            && state.mode == fresh.mode;
        if !same {
            return Err(TrainError::Resume(format!(
                "{} was made with seed {}, batch size {}, grad accum {}, mode {}; this run uses {}, {}, {}, {}",
                dir.display(),
                state.seed,
                state.batch_size,
                state.grad_accum,
                state.mode,
                fresh.seed,
                fresh.batch_size,
                fresh.grad_accum,
                fresh.mode
            )));
        }
        if let (Some(saved), Some(now)) = (&state.recipe, &fresh.recipe) {
            let changed = saved.differences(now);
            if !changed.is_empty() {
                return Err(TrainError::Resume(format!(
                    "{} belongs to a run with other settings ({}); resume it with the same ones, \
                     or start a new run (--lora-init continues from an adapter)",
                    dir.display(),
                    changed.join("; ")
                )));
            }
        }
        if state.global_step == 0 || state.global_step >= fresh.total_steps {
            return Err(TrainError::Resume(format!(
                "{} is damaged: step {} of a {}-step run",
                dir.join(STATE_FILE).display(),
                state.global_step,
                fresh.total_steps
            )));
        }
        let saved = self.saved_params(dir)?;
        for p in &self.params {
            let t = saved.get(&p.name).ok_or_else(|| {
                TrainError::Resume(format!("{} has no tensor `{}`", dir.display(), p.name))
            })?;
            if t.dims() != p.var.dims() {
                return Err(TrainError::Resume(format!(
                    "`{}` has shape {:?} in the checkpoint, {:?} in the model",
                    p.name,
                    t.dims(),
                    p.var.dims()
                )));
            }
            p.var
                .set(&t.to_device(p.var.device())?.to_dtype(p.var.dtype())?)?;
        }
        let opt_path = dir.join(save::OPTIMIZER_SAFETENSORS);
        let damaged = |path: &Path, e: &dyn std::fmt::Display| {
            TrainError::Resume(format!("{} is damaged: {e}", path.display()))
        };
        let opt_state = candle_core::safetensors::load(&opt_path, &Device::Cpu)
            .map_err(|e| damaged(&opt_path, &e))?;
        opt.load_state(&opt_state, state.global_step)
            .map_err(|e| damaged(&opt_path, &e))?;
        let log_path = dir.join(TRAINING_LOG);
        self.log = read(TRAINING_LOG)?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).map_err(|e| damaged(&log_path, &e)))
            .collect::<Result<_>>()?;
        if self.log.len() != state.global_step {
            return Err(damaged(
                &log_path,
                &format!(
                    "{} steps logged, {} done",
                    self.log.len(),
                    state.global_step
                ),
            ));
        }
        if let Some(path) = &self.config.log_json {
            save::write_atomic(path, &self.log_bytes())?;
        }
        Ok(TrainerState {
            total_steps: fresh.total_steps,
            ..state
        })
    }

    /// The trained tensors of a checkpoint folder, by parameter name.
    fn saved_params(&self, dir: &Path) -> Result<HashMap<String, Tensor>> {
        if self.adapter_config.is_some() {
            let adapter = Adapter::load(dir)?;
            let mut out = adapter.non_lora;
            for (module, pair) in adapter.lora {
                out.insert(format!("{module}.lora_A.weight"), pair.a);
                out.insert(format!("{module}.lora_B.weight"), pair.b);
            }
            Ok(out)
        } else {
            Ok(candle_core::safetensors::load(
                dir.join(save::MODEL_SAFETENSORS),
                &Device::Cpu,
            )?)
        }
    }
}
