//! The whole OneAlign network (`MPLUGOwl2LlamaForCausalLM`, upstream `q_align/model/modeling_mplug_owl2.py`):
//! loading from a model folder, image/frame encoding (ViT + abstractor), the splicing of visual tokens
//! into the token sequence at each `-200` (`prepare_inputs_labels_for_multimodal`), and batched forward
//! passes that read each sample at its own last real token (upstream reads the last *padded* position of
//! shorter videos; that bug is deliberately not reproduced).

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::abstractor::VisualAbstractor;
use crate::adapt::Adaptation;
use crate::config::ModelConfig;
use crate::device::Quant;
use crate::error::{ModelError, Result};
use crate::gguf::{self, GGUF_FILE, GgufStore, GgufSummary};
use crate::llm::{DecoderOutput, MultiwayLlama, PrefixKv, TEXT_MODALITY, VISUAL_MODALITY};
use crate::loader::{CheckpointFiles, LayerCounter, WeightFormat, WeightStore, Weights};
use crate::quant::{QuantLog, QuantReport};
use crate::vision::VisionTransformer;

pub use qalign_core::vocab::IMAGE_TOKEN_INDEX;

/// Images per ViT batch inside [`OneAlignModel::encode_images`]; bounds the attention memory for long clips.
pub const IMAGES_PER_VISION_BATCH: usize = 8;
/// The same with the fused CUDA attention (f16/bf16 on a GPU), which keeps no score matrices:
/// larger batches keep the GPU busy.
pub const IMAGES_PER_FUSED_VISION_BATCH: usize = 32;

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// Compute dtype: F32 (default, matches the fixtures), F16 or BF16.
    pub dtype: DType,
    pub format: WeightFormat,
    /// Changes on top of the checkpoint: an adapter to merge, or what to train.
    pub adaptation: Option<Arc<Adaptation>>,
    /// Quantise the weights of the linear layers as they load (inference only, f32 activations);
    /// see [`OneAlignModel::quant_report`].
    pub quant: Option<Quant>,
    /// Keep only these rows of `lm_head` (token ids, e.g. the level words'): all that scoring
    /// needs, and vocab × hidden weights less (0.5 GB in f32 at the real dims). Full-vocabulary
    /// logits (training, [`OneAlignModel::last_token_logits`]) are then refused. [`crate::Scorer`]
    /// sets it to its level words.
    pub lm_head_rows: Option<Vec<u32>>,
    /// Told of every transformer layer the load finishes, for a progress bar: loading the real
    /// OneAlign reads, converts or quantises 16 GB and can take minutes.
    pub on_progress: Option<LoadObserver>,
}

/// How far a model load has got, in transformer layers (ViT, abstractor and LLM together).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadProgress {
    pub layers_done: usize,
    pub layers: usize,
}

/// A function called with the [`LoadProgress`] when a load starts and after each layer
/// ([`LoadOptions::on_progress`]).
#[derive(Clone)]
pub struct LoadObserver(Arc<dyn Fn(LoadProgress) + Send + Sync>);

impl LoadObserver {
    pub fn new(observe: impl Fn(LoadProgress) + Send + Sync + 'static) -> Self {
        Self(Arc::new(observe))
    }

    pub(crate) fn observe(&self, progress: LoadProgress) {
        (self.0)(progress)
    }
}

impl std::fmt::Debug for LoadObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LoadObserver")
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            format: WeightFormat::Auto,
            adaptation: None,
            quant: None,
            lm_head_rows: None,
            on_progress: None,
        }
    }
}

/// Token sequences with their visual tokens spliced in, right-padded into one batch.
#[derive(Debug, Clone)]
pub struct MergedInputs {
    /// `[B, L, D]`, zero vectors after each sample's real tokens.
    pub inputs_embeds: Tensor,
    /// Real (unpadded) length of each sample.
    pub lengths: Vec<usize>,
    /// Modality of every position, B·L row-major: 0 text (and padding), 1 visual.
    pub modality: Vec<u8>,
}

impl MergedInputs {
    /// Padded sequence length L.
    pub fn padded_len(&self) -> usize {
        self.modality.len() / self.lengths.len().max(1)
    }

    /// The modality indicators of sample `b`'s real tokens (`None` past the batch).
    pub fn sample_modality(&self, b: usize) -> Option<&[u8]> {
        let l = self.padded_len();
        let len = *self.lengths.get(b)?;
        self.modality.get(b * l..b * l + len)
    }
}

/// mPLUG-Owl2 / OneAlign ready for inference.
#[derive(Debug, Clone)]
pub struct OneAlignModel {
    config: ModelConfig,
    files: CheckpointFiles,
    vision: VisionTransformer,
    abstractor: VisualAbstractor,
    llm: MultiwayLlama,
    device: Device,
    dtype: DType,
    random_weights: bool,
    quant: Option<QuantReport>,
}

impl OneAlignModel {
    /// Loads `config.json` and the weights of a Hugging Face model folder.
    /// A folder written by `qalign quantize` (`model.gguf`) loads its stored kernels.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let gguf = dir.join(GGUF_FILE);
        if opts.format == WeightFormat::Auto && gguf.is_file() {
            return Self::load_gguf(dir, &gguf, opts);
        }
        Self::check_options(opts)?;
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let store = WeightStore::open_dir(dir, opts.format)?;
        let files = store.files().clone();
        let root = Weights::new(Arc::new(store), opts.dtype, opts.device.clone())
            .with_adaptation(opts.adaptation.clone());
        let log = opts.quant.map(|q| Arc::new(QuantLog::new(q)));
        Self::build(config, files, &root, opts, log)
    }

    fn load_gguf(dir: &Path, path: &Path, opts: &LoadOptions) -> Result<Self> {
        let store = GgufStore::open(path)?;
        let stored = store.quant();
        if let Some(asked) = opts.quant
            && asked != stored
        {
            return Err(ModelError::Quant(format!(
                "{} holds {stored} weights, not {asked}: leave out the quantisation, or quantise the original checkpoint to {asked}",
                path.display()
            )));
        }
        if opts.adaptation.is_some() {
            return Err(ModelError::Quant(format!(
                "{} is quantised; adapters are merged before quantising (`qalign quantize --lora`)",
                path.display()
            )));
        }
        let opts = LoadOptions {
            quant: Some(stored),
            ..opts.clone()
        };
        Self::check_options(&opts)?;
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let files = CheckpointFiles {
            format: WeightFormat::Safetensors,
            index: None,
            shards: vec![path.to_owned()],
        };
        let root = Weights::gguf(Arc::new(store), opts.dtype, opts.device.clone());
        let log = Some(Arc::new(QuantLog::new(stored)));
        Self::build(config, files, &root, &opts, log)
    }

    /// Quantises the checkpoint in `dir` to `quant` (merging `opts.adaptation` first) and writes
    /// `model.gguf` into `out_dir`, which [`OneAlignModel::load`] then reads directly. Only the
    /// weights are written; the caller copies the configuration and tokenizer files.
    pub fn write_quantized(
        dir: &Path,
        opts: &LoadOptions,
        quant: Quant,
        out_dir: &Path,
        source: &str,
    ) -> Result<GgufSummary> {
        let opts = LoadOptions {
            quant: Some(quant),
            dtype: DType::F32,
            device: Device::Cpu,
            ..opts.clone()
        };
        Self::check_options(&opts)?;
        if dir.join(GGUF_FILE).is_file() {
            return Err(ModelError::Quant(format!(
                "{} is quantised already; quantise the original checkpoint",
                dir.display()
            )));
        }
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let store = Arc::new(WeightStore::open_dir(dir, opts.format)?);
        let files = store.files().clone();
        let root = Weights::new(store.clone(), DType::F32, opts.device.clone())
            .with_adaptation(opts.adaptation.clone());
        let log = Arc::new(QuantLog::capturing(quant));
        let model = Self::build(config, files, &root, &opts, Some(log.clone()))?;
        let Some(capture) = log.capture() else {
            unreachable!("a capturing log captures")
        };
        let keys = store
            .keys()
            .into_iter()
            .filter_map(|k| {
                store
                    .entry(k)
                    .map(|(shape, _)| (k.to_owned(), shape.to_vec()))
            })
            .collect();
        let read = |key: &str, shape: &[usize]| root.get_as(shape, key, DType::F32);
        let summary = gguf::write(
            out_dir,
            gguf::Contents {
                keys,
                read: &read,
                kernels: capture,
                quant,
                source: source.to_owned(),
            },
        )?;
        drop(model);
        Ok(summary)
    }

    /// A model of `config.json`'s shapes with random weights ([`Weights::random`], the same at
    /// every build): for timing a configuration without its checkpoint. Its scores mean nothing, and
    /// [`OneAlignModel::checkpoint_files`] lists no file.
    pub fn random_init(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        Self::check_options(opts)?;
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let files = CheckpointFiles {
            format: WeightFormat::Safetensors,
            index: None,
            shards: Vec::new(),
        };
        let root = Weights::random(opts.dtype, opts.device.clone())
            .with_adaptation(opts.adaptation.clone());
        let log = opts.quant.map(|q| Arc::new(QuantLog::new(q)));
        Self::build(config, files, &root, opts, log)
    }

    fn check_options(opts: &LoadOptions) -> Result<()> {
        let dtype = opts.dtype;
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(ModelError::config(format!(
                "compute dtype {dtype:?} is not supported (use f32, f16 or bf16)"
            )));
        }
        if let Some(quant) = opts.quant {
            if dtype != DType::F32 {
                return Err(ModelError::Quant(format!(
                    "{quant} weights run with f32 activations, not {dtype:?}"
                )));
            }
            if opts.adaptation.as_ref().is_some_and(|a| a.trains()) {
                return Err(ModelError::Quant(format!(
                    "{quant} is for inference; training runs on dense weights"
                )));
            }
        }
        Ok(())
    }

    fn build(
        config: ModelConfig,
        files: CheckpointFiles,
        root: &Weights,
        opts: &LoadOptions,
        log: Option<Arc<QuantLog>>,
    ) -> Result<Self> {
        let layers =
            config.vision.num_layers + config.abstractor.num_layers + config.llm.num_layers;
        let counter = opts
            .on_progress
            .clone()
            .map(|observer| Arc::new(LayerCounter::new(observer, layers)));
        let root = &root.clone().with_quant(log.clone()).with_progress(counter);
        let model = root.pp("model");
        let built = Self {
            vision: VisionTransformer::load(&model.pp("vision_model"), &config.vision)?,
            abstractor: VisualAbstractor::load(&model.pp("visual_abstractor"), &config.abstractor)?,
            llm: MultiwayLlama::load(&model, root, &config.llm, opts.lm_head_rows.as_deref())?,
            random_weights: root.is_random(),
            config,
            files,
            device: opts.device.clone(),
            dtype: opts.dtype,
            quant: log.map(|log| log.report()),
        };
        if let Some(adaptation) = &opts.adaptation {
            adaptation.check_all_used()?;
        }
        Ok(built)
    }

    /// Which storage each linear layer got, when loaded with [`LoadOptions::quant`].
    pub fn quant_report(&self) -> Option<&QuantReport> {
        self.quant.as_ref()
    }

    /// Whether the weights were made up by [`OneAlignModel::random_init`].
    pub fn has_random_weights(&self) -> bool {
        self.random_weights
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The weight files the model was loaded from.
    pub fn checkpoint_files(&self) -> &CheckpointFiles {
        &self.files
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Visual tokens per image or frame (`num_learnable_queries + 1`).
    pub fn tokens_per_image(&self) -> usize {
        self.config.abstractor.tokens_per_image()
    }

    /// The vision tower alone: pixels `[N, 3, S, S]` → `last_hidden_state` `[N, grid² + 1, D_vision]`.
    pub fn vision_forward(&self, pixels: &Tensor) -> Result<Tensor> {
        self.vision.forward(pixels)
    }

    /// The abstractor alone: ViT output `[N, grid² + 1, D_vision]` → `[N, Q + 1, D]`.
    pub fn abstract_visual(&self, vision_hidden: &Tensor) -> Result<Tensor> {
        self.abstractor.forward(vision_hidden)
    }

    /// Images per ViT batch in [`Self::encode_images`]: [`IMAGES_PER_FUSED_VISION_BATCH`] where
    /// the fused CUDA attention runs, else [`IMAGES_PER_VISION_BATCH`].
    pub fn images_per_vision_batch(&self) -> usize {
        if crate::cuda_fused::attention_runs_on(&self.device, self.dtype) {
            IMAGES_PER_FUSED_VISION_BATCH
        } else {
            IMAGES_PER_VISION_BATCH
        }
    }

    /// ViT + abstractor: pixels `[N, 3, S, S]` (f32, any device) → visual tokens `[N, Q + 1, D]`.
    pub fn encode_images(&self, pixels: &Tensor) -> Result<Tensor> {
        let n = pixels.dims().first().copied().unwrap_or(0);
        if n == 0 {
            return Err(ModelError::input(format!(
                "pixel tensor has shape {:?}, expected at least one image",
                pixels.dims()
            )));
        }
        let per_batch = self.images_per_vision_batch();
        let chunks = (0..n)
            .step_by(per_batch)
            .map(|start| {
                let len = per_batch.min(n - start);
                self.abstract_visual(&self.vision_forward(&pixels.narrow(0, start, len)?)?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&chunks, 0)?)
    }

    /// Splices visual blocks into token sequences. Each `-200` in `input_ids` (samples in order, left to
    /// right) takes the next block of `visual_blocks`: an image's `[Q + 1, D]` tokens, or a clip's
    /// `[T, Q + 1, D]` / `[T·(Q + 1), D]` tokens (frames in order). All blocks must be consumed.
    pub fn merge_inputs<S: AsRef<[i64]>>(
        &self,
        input_ids: &[S],
        visual_blocks: &[Tensor],
    ) -> Result<MergedInputs> {
        if input_ids.is_empty() {
            return Err(ModelError::input("empty batch"));
        }
        let placeholders: usize = input_ids
            .iter()
            .map(|ids| {
                ids.as_ref()
                    .iter()
                    .filter(|&&id| id == IMAGE_TOKEN_INDEX)
                    .count()
            })
            .sum();
        if placeholders != visual_blocks.len() {
            return Err(ModelError::input(format!(
                "{placeholders} image placeholders ({IMAGE_TOKEN_INDEX}) but {} visual blocks",
                visual_blocks.len()
            )));
        }
        let hidden = self.config.llm.hidden_size;
        let mut blocks = visual_blocks.iter().enumerate();
        let mut sequences = Vec::with_capacity(input_ids.len());
        let mut modalities = Vec::with_capacity(input_ids.len());
        for (sample, ids) in input_ids.iter().enumerate() {
            let ids = ids.as_ref();
            if ids.is_empty() {
                return Err(ModelError::input(format!("sample {sample} has no tokens")));
            }
            let mut parts = Vec::new();
            let mut modality = Vec::new();
            for (is_image, run) in split_at_placeholders(ids) {
                if is_image {
                    let (index, block) = blocks.next().ok_or_else(|| {
                        ModelError::input("more image placeholders than visual blocks")
                    })?;
                    let block = self.visual_block(block, hidden, index)?;
                    modality.extend(std::iter::repeat_n(VISUAL_MODALITY, block.dim(0)?));
                    parts.push(block);
                } else {
                    let text: Vec<u32> = run
                        .iter()
                        .enumerate()
                        .map(|(pos, &id)| {
                            u32::try_from(id).map_err(|_| {
                                ModelError::input(format!(
                                    "sample {sample}: invalid token id {id} at position {pos}"
                                ))
                            })
                        })
                        .collect::<Result<_>>()?;
                    modality.extend(std::iter::repeat_n(TEXT_MODALITY, text.len()));
                    parts.push(self.llm.embed(&text)?);
                }
            }
            sequences.push(Tensor::cat(&parts, 0)?);
            modalities.push(modality);
        }
        let len = modalities.iter().map(Vec::len).max().unwrap_or(0);
        let mut padded = Vec::with_capacity(sequences.len());
        let mut modality = Vec::with_capacity(sequences.len() * len);
        let mut lengths = Vec::with_capacity(sequences.len());
        for (seq, mods) in sequences.into_iter().zip(modalities) {
            let real = mods.len();
            lengths.push(real);
            modality.extend_from_slice(&mods);
            modality.extend(std::iter::repeat_n(TEXT_MODALITY, len - real));
            padded.push(if real < len {
                let zeros = Tensor::zeros((len - real, hidden), self.dtype, &self.device)?;
                Tensor::cat(&[&seq, &zeros], 0)?
            } else {
                seq
            });
        }
        Ok(MergedInputs {
            inputs_embeds: Tensor::stack(&padded, 0)?,
            lengths,
            modality,
        })
    }

    /// A visual block flattened to `[n, D]` in the compute dtype on the model's device.
    fn visual_block(&self, block: &Tensor, hidden: usize, index: usize) -> Result<Tensor> {
        let dims = block.dims();
        let ok = dims.len() >= 2 && dims[dims.len() - 1] == hidden && block.elem_count() > 0;
        if !ok {
            return Err(ModelError::input(format!(
                "visual block {index} has shape {dims:?}, expected [tokens, {hidden}] or [frames, tokens, {hidden}]"
            )));
        }
        let rows = block.elem_count() / hidden;
        Ok(block
            .reshape((rows, hidden))?
            .to_device(&self.device)?
            .to_dtype(self.dtype)?)
    }

    /// Runs the decoder over merged inputs; `keep_layer_outputs` also returns every layer's output.
    pub fn forward_decoder(
        &self,
        merged: &MergedInputs,
        keep_layer_outputs: bool,
    ) -> Result<DecoderOutput> {
        self.llm.forward(
            &merged.inputs_embeds,
            &merged.lengths,
            &merged.modality,
            keep_layer_outputs,
        )
    }

    /// `model.norm` over any `[..., D]` hidden states.
    pub fn final_norm(&self, hidden: &Tensor) -> Result<Tensor> {
        self.llm.final_norm(hidden)
    }

    /// Normed hidden state at each sample's last real token: `[B, D]`; `merged` continues `prefix`.
    fn last_token_normed(
        &self,
        prefix: Option<&PrefixKv>,
        merged: &MergedInputs,
    ) -> Result<Tensor> {
        let last = self.llm.last_rows_after(
            prefix,
            &merged.inputs_embeds,
            &merged.lengths,
            &merged.modality,
        )?;
        self.llm.final_norm(&last)
    }

    /// Logits of the given token ids (e.g. the five level words) at each sample's last real token:
    /// `[B, level_ids.len()]`, f32.
    pub fn level_logits(&self, merged: &MergedInputs, level_ids: &[u32]) -> Result<Tensor> {
        self.level_logits_after(None, merged, level_ids)
    }

    /// [`level_logits`](Self::level_logits) for inputs that all continue a shared `prefix`
    /// (`merged` holds only what follows it).
    pub fn level_logits_after(
        &self,
        prefix: Option<&PrefixKv>,
        merged: &MergedInputs,
        level_ids: &[u32],
    ) -> Result<Tensor> {
        let normed = self.last_token_normed(prefix, merged)?;
        Ok(self
            .llm
            .logits_for_ids(&normed, level_ids)?
            .to_dtype(DType::F32)?)
    }

    /// Full-vocabulary logits at each sample's last real token: `[B, vocab]`, f32.
    pub fn last_token_logits(&self, merged: &MergedInputs) -> Result<Tensor> {
        let normed = self.last_token_normed(None, merged)?;
        Ok(self.llm.logits(&normed)?.to_dtype(DType::F32)?)
    }

    /// Scores N images with one prompt (a single `-200`) in one batch: `[N, level_ids.len()]`, f32.
    pub fn image_level_logits(
        &self,
        input_ids: &[i64],
        pixels: &Tensor,
        level_ids: &[u32],
    ) -> Result<Tensor> {
        let visual = self.encode_images(pixels)?;
        let n = visual.dim(0)?;
        let blocks = (0..n)
            .map(|i| visual.get(i))
            .collect::<candle_core::Result<Vec<_>>>()?;
        self.shared_prompt_level_logits(input_ids, None, &blocks, level_ids)
    }

    /// The K/V of a prompt's text before its first `-200`, which every image scored with it
    /// shares; `None` when the prompt opens with the placeholder or has none.
    pub fn prompt_prefix(&self, input_ids: &[i64]) -> Result<Option<PrefixKv>> {
        let (text, _) = split_prompt(input_ids);
        if text.is_empty() {
            return Ok(None);
        }
        Ok(Some(self.llm.prefix_kv(&text_ids(text)?)?))
    }

    /// Level logits of N samples that all use `input_ids` (a single `-200`), the placeholder of
    /// sample i filled by `blocks[i]`: `[N, level_ids.len()]`, f32. With `prefix` (from
    /// [`prompt_prefix`](Self::prompt_prefix) of the same ids) the text before the placeholder is
    /// not run again.
    pub fn shared_prompt_level_logits(
        &self,
        input_ids: &[i64],
        prefix: Option<&PrefixKv>,
        blocks: &[Tensor],
        level_ids: &[u32],
    ) -> Result<Tensor> {
        let rest = match prefix {
            None => input_ids,
            Some(prefix) => {
                let (text, rest) = split_prompt(input_ids);
                if text_ids(text)? != prefix.ids() {
                    return Err(ModelError::input(
                        "the shared prefix K/V belong to another prompt",
                    ));
                }
                rest
            }
        };
        let prompts = vec![rest; blocks.len()];
        self.level_logits_after(prefix, &self.merge_inputs(&prompts, blocks)?, level_ids)
    }

    /// Scores clips (each `[T_i, 3, S, S]` frames) with one prompt (a single `-200`) in one padded batch,
    /// each read at its own last token: `[clips.len(), level_ids.len()]`, f32.
    pub fn video_level_logits(
        &self,
        input_ids: &[i64],
        clips: &[Tensor],
        level_ids: &[u32],
    ) -> Result<Tensor> {
        if clips.is_empty() {
            return Err(ModelError::input("no clips to score"));
        }
        let frames = Tensor::cat(clips, 0)?;
        let visual = self.encode_images(&frames)?;
        let mut start = 0;
        let mut blocks = Vec::with_capacity(clips.len());
        for clip in clips {
            let t = clip.dim(0)?;
            blocks.push(visual.narrow(0, start, t)?);
            start += t;
        }
        self.shared_prompt_level_logits(input_ids, None, &blocks, level_ids)
    }
}

/// The loss of one training batch and how many target tokens it averages over.
#[derive(Debug, Clone)]
pub struct TrainingLoss {
    /// Scalar f32: mean cross-entropy over every target token of the batch (one mean over tokens, not a
    /// mean of per-sample means, as the official trainer computes it).
    pub loss: Tensor,
    pub n_targets: usize,
}

/// One sample of a training batch: ids with one `-200`, labels of the same length (`-100` where no loss is
/// taken), and the visual input that fills the placeholder: `[T, 3, S, S]` (one image: T = 1).
#[derive(Debug, Clone)]
pub struct TrainingSample<'a> {
    pub input_ids: &'a [i64],
    pub labels: &'a [i64],
    pub pixels: &'a Tensor,
}

/// A position whose next token is a training target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainingTarget {
    /// Sample in the batch.
    pub sample: usize,
    /// Position in the merged sequence (its logits predict `id`).
    pub position: usize,
    pub id: u32,
}

/// Label of positions without loss.
pub const IGNORE_LABEL: i64 = -100;

impl OneAlignModel {
    /// Labels spread over the merged sequence (`-100` at every visual position and in the padding):
    /// `[B][L]`.
    pub fn merged_labels(
        &self,
        samples: &[TrainingSample],
        merged: &MergedInputs,
    ) -> Result<Vec<Vec<i64>>> {
        let len = merged.padded_len();
        samples
            .iter()
            .enumerate()
            .map(|(b, sample)| {
                if sample.labels.len() != sample.input_ids.len() {
                    return Err(ModelError::input(format!(
                        "sample {b}: {} labels for {} token ids",
                        sample.labels.len(),
                        sample.input_ids.len()
                    )));
                }
                let frames = sample.pixels.dim(0)?;
                let mut out = Vec::with_capacity(len);
                for (&id, &label) in sample.input_ids.iter().zip(sample.labels) {
                    if id == IMAGE_TOKEN_INDEX {
                        out.extend(std::iter::repeat_n(
                            IGNORE_LABEL,
                            frames * self.tokens_per_image(),
                        ));
                    } else {
                        out.push(label);
                    }
                }
                if out.len() != merged.lengths[b] {
                    return Err(ModelError::input(format!(
                        "sample {b}: merged labels have length {}, merged tokens {}",
                        out.len(),
                        merged.lengths[b]
                    )));
                }
                out.resize(len, IGNORE_LABEL);
                Ok(out)
            })
            .collect()
    }

    /// Next-token cross-entropy of a batch (logits at t against label t + 1), the official training
    /// objective. Differentiable: gradients reach every trainable tensor the model was loaded with.
    pub fn training_loss(&self, samples: &[TrainingSample]) -> Result<TrainingLoss> {
        let (hidden, targets) = self.training_hidden(samples)?;
        if targets.is_empty() {
            return Err(ModelError::input("the batch has no target tokens"));
        }
        let n = targets.len();
        let logits = self.llm.logits(&hidden)?.to_dtype(DType::F32)?;
        let log_probs = candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1)?;
        let ids: Vec<u32> = targets.iter().map(|t| t.id).collect();
        let ids = Tensor::from_vec(ids, (n, 1), &self.device)?;
        let picked = log_probs.gather(&ids, 1)?;
        let loss = (picked.sum_all()? * (-1.0 / n as f64))?;
        Ok(TrainingLoss { loss, n_targets: n })
    }

    /// Normed hidden states at every position whose next label is a target: `[n, D]`, with for each row
    /// its sample, its merged position and the target id.
    pub fn training_hidden(
        &self,
        samples: &[TrainingSample],
    ) -> Result<(Tensor, Vec<TrainingTarget>)> {
        if samples.is_empty() {
            return Err(ModelError::input("empty training batch"));
        }
        let frames: Vec<Tensor> = samples.iter().map(|s| s.pixels.clone()).collect();
        let visual = self.encode_images(&Tensor::cat(&frames, 0)?)?;
        let mut blocks = Vec::with_capacity(samples.len());
        let mut start = 0;
        for (b, sample) in samples.iter().enumerate() {
            let placeholders = sample
                .input_ids
                .iter()
                .filter(|&&id| id == IMAGE_TOKEN_INDEX)
                .count();
            if placeholders != 1 {
                return Err(ModelError::input(format!(
                    "sample {b} has {placeholders} image placeholders; training needs exactly one"
                )));
            }
            let t = sample.pixels.dim(0)?;
            blocks.push(visual.narrow(0, start, t)?);
            start += t;
        }
        let ids: Vec<&[i64]> = samples.iter().map(|s| s.input_ids).collect();
        let merged = self.merge_inputs(&ids, &blocks)?;
        let labels = self.merged_labels(samples, &merged)?;
        let max = self.config.llm.max_position_embeddings;
        if let Some((b, &n)) = merged.lengths.iter().enumerate().find(|&(_, &n)| n > max) {
            return Err(ModelError::input(format!(
                "sample {b} is {n} tokens long with its visual tokens, more than the model's context of {max}"
            )));
        }
        let hidden = self.forward_decoder(&merged, false)?.last_hidden_state;
        let (bsz, len, d) = hidden.dims3()?;
        let mut rows = Vec::new();
        let mut targets = Vec::new();
        for (b, labels) in labels.iter().enumerate() {
            for t in 0..len.saturating_sub(1) {
                let next = labels[t + 1];
                if next != IGNORE_LABEL {
                    let id = u32::try_from(next)
                        .ok()
                        .filter(|&id| (id as usize) < self.config.llm.vocab_size)
                        .ok_or_else(|| {
                            ModelError::input(format!("sample {b}: label {next} is not a token id"))
                        })?;
                    rows.push((b * len + t) as u32);
                    targets.push(TrainingTarget {
                        sample: b,
                        position: t,
                        id,
                    });
                }
            }
        }
        if rows.is_empty() {
            return Ok((Tensor::zeros((0, d), self.dtype, &self.device)?, targets));
        }
        let picked = hidden
            .reshape((bsz * len, d))?
            .index_select(&Tensor::new(rows.as_slice(), &self.device)?, 0)?;
        Ok((self.llm.final_norm(&picked)?, targets))
    }

    /// Full-vocabulary logits of normed hidden rows `[n, D]`: `[n, vocab]` in the compute dtype.
    pub fn lm_logits(&self, normed: &Tensor) -> Result<Tensor> {
        self.llm.logits(normed)
    }
}

/// Splits ids into runs: `(true, [-200])` for each placeholder, `(false, text)` for the text between.
/// A prompt split before its first `-200`: the text that opens it, and the rest (all of it when it
/// has no placeholder).
pub fn split_prompt(input_ids: &[i64]) -> (&[i64], &[i64]) {
    match input_ids.iter().position(|&id| id == IMAGE_TOKEN_INDEX) {
        Some(at) => input_ids.split_at(at),
        None => (&[], input_ids),
    }
}

/// Text token ids as the embedding takes them.
fn text_ids(ids: &[i64]) -> Result<Vec<u32>> {
    ids.iter()
        .enumerate()
        .map(|(pos, &id)| {
            u32::try_from(id)
                .map_err(|_| ModelError::input(format!("invalid token id {id} at position {pos}")))
        })
        .collect()
}

fn split_at_placeholders(ids: &[i64]) -> Vec<(bool, &[i64])> {
    let mut runs = Vec::new();
    let mut start = 0;
    for (i, &id) in ids.iter().enumerate() {
        if id == IMAGE_TOKEN_INDEX {
            if i > start {
                runs.push((false, &ids[start..i]));
            }
            runs.push((true, &ids[i..=i]));
            start = i + 1;
        }
    }
    if start < ids.len() {
        runs.push((false, &ids[start..]));
    }
    runs
}
