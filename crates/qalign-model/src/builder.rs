//! The front door for library users: `Scorer::builder().model(..).device(..).dtype(..).build()`
//! takes a folder or a Hugging Face hub id and plain qalign types, resolves and loads everything,
//! and hands back a ready [`Scorer`]; no tensor-library type is needed to get there.

use std::path::PathBuf;
use std::sync::Arc;

use qalign_core::LevelSet;
use qalign_media::DecodeOptions;

use crate::adapter::Adapter;
use crate::device::{Device, Dtype, Quant};
use crate::hub::{DEFAULT_MODEL, offline_from_env, resolve_model_at};
use crate::loader::WeightFormat;
use crate::model::{LoadObserver, LoadOptions, LoadProgress};
use crate::scorer::{Result, Scorer, ScorerOptions};

/// Builds a [`Scorer`]; see [`Scorer::builder`].
#[derive(Debug, Clone)]
pub struct ScorerBuilder {
    model: String,
    revision: Option<String>,
    offline: Option<bool>,
    device: Device,
    dtype: Dtype,
    quant: Option<Quant>,
    weights: WeightFormat,
    lora: Option<PathBuf>,
    decode: DecodeOptions,
    levels: LevelSet,
    on_load_progress: Option<LoadObserver>,
}

impl Default for ScorerBuilder {
    fn default() -> Self {
        Self {
            model: DEFAULT_MODEL.to_string(),
            revision: None,
            offline: None,
            device: Device::Cpu,
            dtype: Dtype::F32,
            quant: None,
            weights: WeightFormat::Auto,
            lora: None,
            decode: DecodeOptions::default(),
            levels: LevelSet::itu(),
            on_load_progress: None,
        }
    }
}

impl Scorer {
    /// Starts a builder: `q-future/one-align` on the CPU in f32 unless told otherwise.
    ///
    /// ```no_run
    /// use qalign_model::{Device, Dtype, Scale, Scorer, Task};
    ///
    /// let scorer = Scorer::builder()
    ///     .model("q-future/one-align")
    ///     .device(Device::Cpu)
    ///     .dtype(Dtype::F32)
    ///     .build()?;
    /// for item in scorer.score_paths(&["photo.jpg"], &[Task::Quality])? {
    ///     let scored = item.result?;
    ///     println!("{}: {:.3}", item.path.display(), scored.scores()[0].score(Scale::OneToFive));
    /// }
    /// # Ok::<(), qalign_model::ScoreError>(())
    /// ```
    pub fn builder() -> ScorerBuilder {
        ScorerBuilder::default()
    }
}

impl ScorerBuilder {
    /// A checkpoint folder, or a hub id (`owner/name`) looked up in the Hugging Face cache and
    /// downloaded when online.
    pub fn model(mut self, model: impl Into<String>) -> Self {
        self.model = model.into();
        self
    }

    /// The branch, tag or commit hash of a hub id (default `main`); an error for a folder.
    pub fn revision(mut self, revision: impl Into<String>) -> Self {
        self.revision = Some(revision.into());
        self
    }

    /// Never touch the network (default: on when `HF_HUB_OFFLINE=1` or `TRANSFORMERS_OFFLINE=1`).
    pub fn offline(mut self, offline: bool) -> Self {
        self.offline = Some(offline);
        self
    }

    pub fn device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }

    pub fn dtype(mut self, dtype: Dtype) -> Self {
        self.dtype = dtype;
        self
    }

    /// Quantise the weights of the linear layers as they load (`None`: keep them in the compute
    /// dtype). Needs the f32 compute dtype; layers whose input dimension does not fit the
    /// format's block fall back to Q8_0 or f32 ([`Quant::for_in_dim`]).
    pub fn quant(mut self, quant: Option<Quant>) -> Self {
        self.quant = quant;
        self
    }

    /// Which weight files to read when a folder has several layouts.
    pub fn weights(mut self, weights: WeightFormat) -> Self {
        self.weights = weights;
        self
    }

    /// A LoRA adapter folder (official layout or from `qalign train`), merged as weights load.
    pub fn lora(mut self, adapter_dir: impl Into<PathBuf>) -> Self {
        self.lora = Some(adapter_dir.into());
        self
    }

    /// Apply the EXIF orientation tag before scoring (off, as in the official code).
    pub fn exif_orientation(mut self, apply: bool) -> Self {
        self.decode.exif_orientation = apply;
        self
    }

    /// The level words, best first (default: excellent, good, fair, poor, bad).
    pub fn levels(mut self, levels: LevelSet) -> Self {
        self.levels = levels;
        self
    }

    /// Calls `observe` when the load starts and after each transformer layer (for a progress bar:
    /// the real OneAlign takes minutes to read, convert or quantise).
    pub fn on_load_progress(
        mut self,
        observe: impl Fn(LoadProgress) + Send + Sync + 'static,
    ) -> Self {
        self.on_load_progress = Some(LoadObserver::new(observe));
        self
    }

    /// The local folder the model spec names, downloading it first when it is a hub id that is
    /// not cached and the builder is online.
    pub fn resolve(&self) -> Result<PathBuf> {
        let offline = self.offline.unwrap_or_else(offline_from_env);
        Ok(resolve_model_at(&self.model, self.revision.as_deref(), offline)?.dir)
    }

    /// The low-level load options these settings give (device, dtype, quantisation, weights,
    /// merged adapter).
    pub fn load_options(&self) -> Result<LoadOptions> {
        let adaptation = match &self.lora {
            Some(dir) => Some(Arc::new(Adapter::load(dir)?.merged_adaptation())),
            None => None,
        };
        Ok(LoadOptions {
            device: self.device.to_candle()?,
            dtype: self.dtype.to_candle(),
            format: self.weights,
            adaptation,
            quant: self.quant,
            lm_head_rows: None,
            on_progress: self.on_load_progress.clone(),
        })
    }

    /// The options [`Scorer::load`] takes for these settings.
    pub fn scorer_options(&self) -> Result<ScorerOptions> {
        Ok(ScorerOptions {
            load: self.load_options()?,
            decode: self.decode,
            levels: self.levels.clone(),
        })
    }

    /// Resolves the model and loads it.
    pub fn build(self) -> Result<Scorer> {
        let options = self.scorer_options()?;
        Scorer::load(&self.resolve()?, &options)
    }
}
