//! The scoring API users call: load a checkpoint folder once, then score images and videos for
//! quality, aesthetics or a custom question with the official prompts, level words and
//! weighting. It owns the glue between the tokenizer, the preprocessing and the network, so that
//! the CLI and a server share one path that matches the official scorers.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Tensor};
use qalign_core::{LevelDistribution, LevelError, LevelSet};
use qalign_media::{DecodeOptions, MediaError, Pixels, PreprocessConfig, RgbImage};
use qalign_tokenizer::{
    LEVEL_WORDS, MediaKind, Task, Tokenizer, TokenizerError, custom_scorer_prompt, level_token_ids,
    scorer_prompt, tokenize_with_image,
};

use crate::error::ModelError;
use crate::model::{LoadOptions, OneAlignModel};

/// Everything that can stop a scoring call.
#[derive(Debug, thiserror::Error)]
pub enum ScoreError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Media(#[from] MediaError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Level(#[from] LevelError),
    #[error("{0}")]
    Input(String),
}

impl From<candle_core::Error> for ScoreError {
    fn from(e: candle_core::Error) -> Self {
        Self::Model(ModelError::Candle(e))
    }
}

pub type Result<T> = std::result::Result<T, ScoreError>;

/// What to ask the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Query {
    /// One of the official scorer prompts.
    Task(Task),
    /// A custom question (`USER: <question>\n<|image|>\nASSISTANT: <answer_prefix>`); the level
    /// words are read right after the answer prefix.
    Custom {
        question: String,
        answer_prefix: String,
    },
}

impl Query {
    /// The name used in reports: `quality`, `aesthetics` or `custom`.
    pub fn name(&self) -> &'static str {
        match self {
            Query::Task(Task::Quality) => "quality",
            Query::Task(Task::Aesthetics) => "aesthetics",
            Query::Custom { .. } => "custom",
        }
    }

    /// The prompt text, with one `<|image|>` marker.
    pub fn prompt(&self, input: MediaKind) -> String {
        match self {
            Query::Task(task) => scorer_prompt(*task, input),
            Query::Custom {
                question,
                answer_prefix,
            } => custom_scorer_prompt(question, answer_prefix),
        }
    }
}

/// The level logits of one scored item and the distribution they give.
#[derive(Debug, Clone)]
pub struct LevelScores {
    /// Logits of the level words (best → worst), as the model output them. For a windowed video
    /// these are `ln` of the combined probabilities (a softmax of them gives the probabilities back).
    pub logits: Vec<f32>,
    pub distribution: LevelDistribution,
}

impl LevelScores {
    fn from_logits(logits: Vec<f32>) -> Result<Self> {
        let distribution = LevelDistribution::from_logits(&logits)?;
        Ok(Self {
            logits,
            distribution,
        })
    }

    /// Combines several results by averaging their probabilities with the given weights
    /// (e.g. frame counts of video windows).
    pub fn weighted_mean(parts: &[(&LevelScores, f64)]) -> Result<Self> {
        let total: f64 = parts.iter().map(|(_, w)| w).sum();
        let n = parts.first().map_or(0, |(s, _)| s.logits.len());
        if parts.is_empty() || total <= 0.0 || n == 0 {
            return Err(ScoreError::Input("nothing to combine".into()));
        }
        let mut probs = vec![0.0f64; n];
        for (scores, weight) in parts {
            for (acc, p) in probs.iter_mut().zip(scores.distribution.probs()) {
                *acc += p * weight / total;
            }
        }
        let logits = probs.iter().map(|p| p.ln() as f32).collect();
        Ok(Self {
            logits,
            distribution: LevelDistribution::from_probs(probs)?,
        })
    }
}

/// Where the scorer's tokenizer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenizerSource {
    /// `tokenizer.model` of the checkpoint folder.
    Checkpoint,
    /// The folder has none: the built-in LLaMA-2 vocabulary (the same pieces as the release's).
    BuiltIn,
}

/// A model folder's `preprocessor_config.json`, or the CLIP settings at `image_size` without one.
pub fn folder_preprocess(dir: &Path, image_size: usize) -> Result<PreprocessConfig> {
    let path = dir.join("preprocessor_config.json");
    Ok(if path.exists() {
        PreprocessConfig::from_file(&path)?
    } else {
        PreprocessConfig::clip(image_size as u32)
    })
}

/// A model folder's `tokenizer.model`, or the built-in LLaMA-2 vocabulary without one.
pub fn folder_tokenizer(dir: &Path) -> Result<(Tokenizer, TokenizerSource)> {
    let path = dir.join("tokenizer.model");
    Ok(if path.exists() {
        (Tokenizer::from_file(&path)?, TokenizerSource::Checkpoint)
    } else {
        (Tokenizer::llama2_builtin(), TokenizerSource::BuiltIn)
    })
}

/// How to load a [`Scorer`].
#[derive(Debug, Clone, Default)]
pub struct ScorerOptions {
    pub load: LoadOptions,
    pub decode: DecodeOptions,
}

/// A loaded model with its tokenizer, preprocessing and level words.
pub struct Scorer {
    model: OneAlignModel,
    tokenizer: Tokenizer,
    tokenizer_source: TokenizerSource,
    preprocess: PreprocessConfig,
    decode: DecodeOptions,
    levels: LevelSet,
    level_ids: Vec<u32>,
    /// Images and frames encoded so far (ViT + abstractor passes), for statistics and tests.
    images_encoded: AtomicUsize,
}

impl Scorer {
    /// Loads `config.json`, `preprocessor_config.json`, `tokenizer.model` and the weights of a
    /// model folder. A folder without `preprocessor_config.json` uses the CLIP settings at the
    /// config's image size; one without `tokenizer.model` uses the built-in LLaMA-2 vocabulary.
    pub fn load(dir: &Path, opts: &ScorerOptions) -> Result<Self> {
        Self::with_model(OneAlignModel::load(dir, &opts.load)?, dir, opts)
    }

    /// Wraps an already built model (e.g. [`OneAlignModel::random_init`]) with the
    /// preprocessing and tokenizer of its folder, with the same fallbacks as [`Scorer::load`].
    pub fn with_model(model: OneAlignModel, dir: &Path, opts: &ScorerOptions) -> Result<Self> {
        let preprocess = folder_preprocess(dir, model.config().vision.image_size)?;
        let (tokenizer, tokenizer_source) = folder_tokenizer(dir)?;
        Self::from_parts(model, tokenizer, tokenizer_source, preprocess, opts.decode)
    }

    /// Assembles a scorer from loaded parts.
    pub fn from_parts(
        model: OneAlignModel,
        tokenizer: Tokenizer,
        tokenizer_source: TokenizerSource,
        preprocess: PreprocessConfig,
        decode: DecodeOptions,
    ) -> Result<Self> {
        let levels = LevelSet::itu();
        let level_ids = level_token_ids(&tokenizer, &LEVEL_WORDS)?;
        let vocab = model.config().llm.vocab_size;
        if let Some(bad) = level_ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(ScoreError::Input(format!(
                "level token id {bad} is outside the model's vocabulary of {vocab}: tokenizer and checkpoint do not match"
            )));
        }
        Ok(Self {
            model,
            tokenizer,
            tokenizer_source,
            preprocess,
            decode,
            levels,
            level_ids,
            images_encoded: AtomicUsize::new(0),
        })
    }

    pub fn model(&self) -> &OneAlignModel {
        &self.model
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn tokenizer_source(&self) -> TokenizerSource {
        self.tokenizer_source
    }

    pub fn preprocess_config(&self) -> &PreprocessConfig {
        &self.preprocess
    }

    /// The level words, best first, in the order of every probability vector.
    pub fn levels(&self) -> &LevelSet {
        &self.levels
    }

    /// How many images and frames went through the ViT and abstractor so far.
    pub fn images_encoded(&self) -> usize {
        self.images_encoded.load(Ordering::Relaxed)
    }

    /// Token ids of the level words.
    pub fn level_ids(&self) -> &[u32] {
        &self.level_ids
    }

    /// The prompt ids (with the `-200` placeholder) for a query.
    pub fn prompt_ids(&self, query: &Query, input: MediaKind) -> Vec<i64> {
        tokenize_with_image(&self.tokenizer, &query.prompt(input))
    }

    /// Decodes and preprocesses an image file.
    pub fn load_image(&self, path: &Path) -> Result<Pixels> {
        Ok(qalign_media::preprocess_path(
            path,
            &self.preprocess,
            &self.decode,
        )?)
    }

    /// Preprocesses a decoded RGB image (e.g. a video frame).
    pub fn preprocess_rgb(&self, image: &RgbImage) -> Pixels {
        self.preprocess.preprocess(image)
    }

    /// Stacks preprocessed images into a `[N, 3, H, W]` f32 tensor on the model's device.
    pub fn pixels_tensor(&self, images: &[&Pixels]) -> Result<Tensor> {
        let first = images
            .first()
            .ok_or_else(|| ScoreError::Input("no images".into()))?;
        let shape = first.shape();
        let mut data = Vec::with_capacity(images.len() * first.data.len());
        for image in images {
            if image.shape() != shape {
                return Err(ScoreError::Input(format!(
                    "images of different sizes in one batch: {:?} and {:?}",
                    shape,
                    image.shape()
                )));
            }
            data.extend_from_slice(&image.data);
        }
        Ok(Tensor::from_vec(
            data,
            (images.len(), shape[0], shape[1], shape[2]),
            self.model.device(),
        )?)
    }

    /// ViT + abstractor: the visual tokens `[N, Q + 1, D]` of preprocessed images or frames.
    pub fn encode(&self, images: &[&Pixels]) -> Result<Tensor> {
        let pixels = self.pixels_tensor(images)?;
        let visual = self.model.encode_images(&pixels)?;
        self.images_encoded
            .fetch_add(images.len(), Ordering::Relaxed);
        Ok(visual)
    }

    /// Scores N encoded images (`visual`: `[N, Q + 1, D]`) for one query, in one batch.
    pub fn score_encoded_images(&self, visual: &Tensor, query: &Query) -> Result<Vec<LevelScores>> {
        let ids = self.prompt_ids(query, MediaKind::Image);
        let n = visual.dim(0)?;
        let blocks = (0..n)
            .map(|i| visual.get(i))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let prompts = vec![ids.as_slice(); n];
        let merged = self.model.merge_inputs(&prompts, &blocks)?;
        self.rows(&self.model.level_logits(&merged, &self.level_ids)?)
    }

    /// Scores images for several queries; each image goes through the ViT and abstractor once.
    /// Returns `[image][query]`.
    pub fn score_images(
        &self,
        images: &[&Pixels],
        queries: &[Query],
    ) -> Result<Vec<Vec<LevelScores>>> {
        let visual = self.encode(images)?;
        let per_query = queries
            .iter()
            .map(|q| self.score_encoded_images(&visual, q))
            .collect::<Result<Vec<_>>>()?;
        Ok(transpose(per_query, images.len()))
    }

    /// Scores clips given their encoded frames (each `[T_i, Q + 1, D]`), all spliced at the
    /// single `<|image|>` of the video prompt, in one padded batch. Every clip is read at its own
    /// last real token, so a clip scores the same in a batch as alone.
    pub fn score_encoded_clips(&self, clips: &[Tensor], query: &Query) -> Result<Vec<LevelScores>> {
        if clips.is_empty() {
            return Err(ScoreError::Input("no clips to score".into()));
        }
        let ids = self.prompt_ids(query, MediaKind::Video);
        let prompts = vec![ids.as_slice(); clips.len()];
        let merged = self.model.merge_inputs(&prompts, clips)?;
        self.rows(&self.model.level_logits(&merged, &self.level_ids)?)
    }

    /// The most frames one forward pass may hold for a query's video prompt within the model's
    /// position limit (`max_position_embeddings`).
    pub fn max_frames_per_pass(&self, query: &Query) -> usize {
        let text = self.prompt_ids(query, MediaKind::Video).len() - 1;
        let context = self.model.config().llm.max_position_embeddings;
        let per_frame = self.model.tokens_per_image();
        (context.saturating_sub(text) / per_frame).max(1)
    }

    fn rows(&self, logits: &Tensor) -> Result<Vec<LevelScores>> {
        logits
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?
            .into_iter()
            .map(LevelScores::from_logits)
            .collect()
    }
}

/// `[query][item]` → `[item][query]`.
fn transpose<T>(per_query: Vec<Vec<T>>, items: usize) -> Vec<Vec<T>> {
    let mut out: Vec<Vec<T>> = (0..items)
        .map(|_| Vec::with_capacity(per_query.len()))
        .collect();
    for row in per_query {
        for (item, value) in out.iter_mut().zip(row) {
            item.push(value);
        }
    }
    out
}

/// Splits `total` frames into the fewest windows of at most `max` frames, sizes differing by at
/// most one (earlier windows take the extra frame). Returns `(start, len)` pairs.
pub fn balanced_windows(total: usize, max: usize) -> Vec<(usize, usize)> {
    if total == 0 {
        return Vec::new();
    }
    let max = max.max(1);
    let count = total.div_ceil(max);
    let base = total / count;
    let extra = total % count;
    let mut start = 0;
    (0..count)
        .map(|i| {
            let len = base + usize::from(i < extra);
            let window = (start, len);
            start += len;
            window
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_all_frames_in_order() {
        assert_eq!(balanced_windows(0, 31), vec![]);
        assert_eq!(balanced_windows(8, 31), vec![(0, 8)]);
        assert_eq!(balanced_windows(31, 31), vec![(0, 31)]);
        assert_eq!(balanced_windows(32, 31), vec![(0, 16), (16, 16)]);
        assert_eq!(
            balanced_windows(10, 3),
            vec![(0, 3), (3, 3), (6, 2), (8, 2)]
        );
        for total in 1..200 {
            for max in 1..40 {
                let w = balanced_windows(total, max);
                assert_eq!(w.len(), total.div_ceil(max));
                assert_eq!(w.iter().map(|x| x.1).sum::<usize>(), total);
                assert!(w.iter().all(|&(_, len)| len >= 1 && len <= max));
                assert!(w.windows(2).all(|p| p[0].0 + p[0].1 == p[1].0));
            }
        }
    }
}
