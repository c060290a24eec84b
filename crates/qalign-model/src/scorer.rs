//! The scoring API users call: load a checkpoint folder once, then score images and videos for
//! quality, aesthetics or a custom question with the official prompts, level words and
//! weighting. It owns the glue between the tokenizer, the preprocessing and the network, so that
//! the CLI and a server share one path that matches the official scorers.

use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Tensor};
use qalign_core::{IMAGE_MARKER, LevelDistribution, LevelError, LevelSet, MediaKind, Scale, Task};
use qalign_media::{DecodeOptions, MediaError, Pixels, PreprocessConfig, RgbImage};
use qalign_tokenizer::{
    Tokenizer, TokenizerError, custom_scorer_prompt, level_token_ids, scorer_prompt,
    tokenize_with_image,
};

use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::hub::HubError;
use crate::llm::PrefixKv;
use crate::model::{LoadOptions, OneAlignModel, split_prompt};

/// Everything that can stop a scoring call. Variants name what went wrong and carry the
/// numbers; none holds front-end wording (flags, commands).
#[derive(Debug, thiserror::Error)]
pub enum ScoreError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Media(#[from] MediaError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Level(LevelError),
    #[error(transparent)]
    Hub(#[from] HubError),
    /// A call got an empty list where it needs at least one item.
    #[error("nothing to score: no {what} given")]
    Empty { what: &'static str },
    /// Preprocessed images of different shapes cannot share a batch.
    #[error("images of different sizes in one batch: {first:?} and {other:?}")]
    MixedSizes {
        first: [usize; 3],
        other: [usize; 3],
    },
    /// A level word's token id is not in the checkpoint's vocabulary.
    #[error(
        "the level word {word:?} has token id {id}, outside the model's vocabulary of {vocab}: \
         the tokenizer and the checkpoint do not match"
    )]
    TokenizerMismatch { word: String, id: u32, vocab: usize },
    /// A custom question or answer prefix is empty.
    #[error("the custom {which} is empty")]
    EmptyText { which: &'static str },
    /// A custom question or answer prefix holds the image marker, which the prompt places itself.
    #[error(
        "the custom {which} contains the image marker {IMAGE_MARKER}; the prompt places the image itself"
    )]
    MarkerInText { which: &'static str },
    /// The prompt and at least one image do not fit the model's context.
    #[error(
        "the prompt is too long: {text_tokens} text tokens + {visual_tokens} visual tokens \
         exceed the model's context of {limit} positions"
    )]
    PromptTooLong {
        text_tokens: usize,
        visual_tokens: usize,
        limit: usize,
    },
    /// The network produced NaN or infinite level logits: a fault of the weights (corrupt, or
    /// overflowing in a half dtype), not of the input.
    #[error(
        "the model produced a non-finite logit ({value}) for a level word: its weights hold \
         NaN/Inf values or overflow in this dtype (f32 avoids overflow)"
    )]
    NonFiniteOutput { value: f32 },
    /// A clip yielded no frame to score.
    #[error("the clip has no frames to score")]
    NoFrames,
    /// The frame stream ended before the planned frames were read.
    #[error("the clip ended after {decoded} of {expected} frames")]
    ClipEnded { decoded: usize, expected: usize },
    /// A warning that strict mode turns into an error.
    #[error("{0} (an error in strict mode)")]
    Strict(ScoreWarning),
    /// The caller's progress callback asked to stop (Ctrl-C, a client that left).
    #[error("scoring was stopped before the input was finished")]
    Cancelled,
}

impl From<LevelError> for ScoreError {
    fn from(e: LevelError) -> Self {
        match e {
            LevelError::NonFiniteLogit { value, .. } => Self::NonFiniteOutput { value },
            other => Self::Level(other),
        }
    }
}

impl From<candle_core::Error> for ScoreError {
    fn from(e: candle_core::Error) -> Self {
        Self::Model(ModelError::Candle(e))
    }
}

impl ScoreError {
    /// Whether the message already names `path` (media errors do), so that a front end names
    /// each file once.
    pub fn names_path(&self, path: &Path) -> bool {
        let shown = path.display().to_string();
        !shown.is_empty() && self.to_string().contains(&shown)
    }
}

pub type Result<T> = std::result::Result<T, ScoreError>;

/// Something a result should be read with: the item was scored, but not quite as asked.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScoreWarning {
    /// The clip is shorter than one sampling period: scored on its first frame.
    #[error(
        "shorter than one sampling period ({frames} frames at {fps:.3} fps): scored on its first frame"
    )]
    ShortClip { frames: usize, fps: f64 },
    /// More frames were sampled than the frame cap allows: spread uniformly instead.
    #[error("{sampled} sampled frames capped to {kept} (uniformly spread)")]
    FramesCapped { sampled: usize, kept: usize },
    /// The container promised more frames than could be decoded (a cut or damaged file).
    #[error(
        "truncated video: the header promises {expected_frames} frames but only {decoded_frames} \
         could be decoded; scored on {scored_frames} sampled frame(s) of the decodable part"
    )]
    Truncated {
        expected_frames: usize,
        decoded_frames: usize,
        scored_frames: usize,
    },
    /// The stream ended early and some sampled frames repeat the last decoded one.
    #[error("the stream ended early; {count} sampled frame(s) repeat the last decoded frame")]
    RepeatedFrames { count: usize },
}

impl ScoreWarning {
    /// A stable machine-readable name (the `code` of a report's warning).
    pub fn code(&self) -> &'static str {
        match self {
            ScoreWarning::ShortClip { .. } => "short_clip",
            ScoreWarning::FramesCapped { .. } => "frames_capped",
            ScoreWarning::Truncated { .. } => "truncated",
            ScoreWarning::RepeatedFrames { .. } => "repeated_frames",
        }
    }
}

/// What to ask the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Query {
    /// One of the official scorer prompts.
    Task(Task),
    /// A custom question (`USER: <question>\n<|image|>\nASSISTANT: <answer_prefix>`); the level
    /// words are read right after the answer prefix. Build it with [`Query::custom`].
    Custom {
        question: String,
        answer_prefix: String,
    },
}

impl Query {
    /// A custom question, checked: neither part may be blank or hold the image marker.
    pub fn custom(question: impl Into<String>, answer_prefix: impl Into<String>) -> Result<Self> {
        let query = Query::Custom {
            question: question.into(),
            answer_prefix: answer_prefix.into(),
        };
        query.check_text()?;
        Ok(query)
    }

    /// The name used in reports: `quality`, `aesthetics` or `custom`.
    pub fn name(&self) -> &'static str {
        match self {
            Query::Task(task) => task.as_str(),
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

    fn check_text(&self) -> Result<()> {
        if let Query::Custom {
            question,
            answer_prefix,
        } = self
        {
            for (which, text) in [("question", question), ("answer prefix", answer_prefix)] {
                if text.trim().is_empty() {
                    return Err(ScoreError::EmptyText { which });
                }
                if text.contains(IMAGE_MARKER) {
                    return Err(ScoreError::MarkerInText { which });
                }
            }
        }
        Ok(())
    }
}

impl From<Task> for Query {
    fn from(task: Task) -> Self {
        Query::Task(task)
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
    /// The score on `scale`: the level-weighted mean of the probabilities (paper Eq. 4).
    pub fn score(&self, scale: Scale) -> f64 {
        self.distribution.score(scale).value
    }

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
            return Err(ScoreError::Empty {
                what: "weighted results",
            });
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

/// A model folder's `tokenizer.model`, or the built-in LLaMA-2 vocabulary without one, with the
/// `legacy` flag of its `tokenizer_config.json` (see [`folder_tokenizer_legacy`]).
pub fn folder_tokenizer(dir: &Path) -> Result<(Tokenizer, TokenizerSource)> {
    let path = dir.join("tokenizer.model");
    let (tokenizer, source) = if path.exists() {
        (Tokenizer::from_file(&path)?, TokenizerSource::Checkpoint)
    } else {
        (Tokenizer::llama2_builtin(), TokenizerSource::BuiltIn)
    };
    Ok((tokenizer.with_legacy(folder_tokenizer_legacy(dir)?), source))
}

/// Hugging Face's `legacy` flag as transformers 4.36 reads it from a folder's
/// `tokenizer_config.json`: the value when it is a boolean, on when the key is missing or null
/// (`LlamaTokenizer`'s default), off when there is no such file. It decides only how text after
/// `</s>`, `<s>` or `<unk>` inside a prompt or a training conversation is tokenised (for
/// multi-turn training data, whether the official label masking keeps the sample).
pub fn folder_tokenizer_legacy(dir: &Path) -> Result<bool> {
    let path = dir.join("tokenizer_config.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(source) => return Err(ModelError::Io { path, source }.into()),
    };
    let config: serde_json::Value =
        serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: path.clone(),
            source,
        })?;
    if !config.is_object() {
        return Err(ModelError::Config {
            path: Some(path),
            message: "expected a JSON object".into(),
        }
        .into());
    }
    match config.get("legacy") {
        None | Some(serde_json::Value::Null) => Ok(true),
        Some(serde_json::Value::Bool(legacy)) => Ok(*legacy),
        Some(other) => Err(ModelError::Config {
            path: Some(path),
            message: format!("`legacy` must be true, false or null, not {other}"),
        }
        .into()),
    }
}

/// How to load a [`Scorer`] from a folder (the low-level path; [`Scorer::builder`] is the
/// front door).
#[derive(Debug, Clone, Default)]
pub struct ScorerOptions {
    pub load: LoadOptions,
    pub decode: DecodeOptions,
    /// The level words read from the logits, best first (default: the five ITU words).
    pub levels: LevelSet,
}

impl ScorerOptions {
    /// The model load options of a scorer of the folder `dir`: [`ScorerOptions::load`] keeping only
    /// the `lm_head` rows of the level words, all that scoring reads ([`LoadOptions::lm_head_rows`]).
    /// Level words the folder's tokenizer or vocabulary cannot give leave the head whole, so the
    /// scorer reports them once the model is built.
    pub fn model_load_options(&self, dir: &Path) -> Result<LoadOptions> {
        let (tokenizer, _) = folder_tokenizer(dir)?;
        let words: Vec<&str> = self.levels.words().iter().map(String::as_str).collect();
        let vocab = ModelConfig::from_file(&dir.join("config.json"))?
            .llm
            .vocab_size;
        let lm_head_rows = level_token_ids(&tokenizer, &words)
            .ok()
            .filter(|ids| ids.iter().all(|&id| (id as usize) < vocab));
        Ok(LoadOptions {
            lm_head_rows: lm_head_rows.or_else(|| self.load.lm_head_rows.clone()),
            ..self.load.clone()
        })
    }
}

/// The visual tokens of encoded images or frames (`[N, Q + 1, D]` on the model's device),
/// ready to be scored for any number of queries.
#[derive(Debug, Clone)]
pub struct Visual {
    tokens: Tensor,
}

impl Visual {
    /// How many images or frames it holds.
    pub fn len(&self) -> usize {
        self.tokens.dims().first().copied().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Wraps visual tokens `[N, Q + 1, D]` made another way (low level: benchmarks use random ones).
    pub fn from_tensor(tokens: Tensor) -> Self {
        Self { tokens }
    }

    /// The underlying tensor (low level).
    pub fn tensor(&self) -> &Tensor {
        &self.tokens
    }
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
    prefixes: PrefixCache,
    /// Images and frames through the ViT and abstractor, for the crate's own tests.
    #[cfg(test)]
    images_encoded: std::sync::atomic::AtomicUsize,
}

impl Scorer {
    /// Loads `config.json`, `preprocessor_config.json`, `tokenizer.model` and the weights of a
    /// model folder. A folder without `preprocessor_config.json` uses the CLIP settings at the
    /// config's image size; one without `tokenizer.model` uses the built-in LLaMA-2 vocabulary.
    pub fn load(dir: &Path, opts: &ScorerOptions) -> Result<Self> {
        let load = opts.model_load_options(dir)?;
        Self::with_model(OneAlignModel::load(dir, &load)?, dir, opts)
    }

    /// Wraps an already built model (e.g. [`OneAlignModel::random_init`]) with the
    /// preprocessing and tokenizer of its folder, with the same fallbacks as [`Scorer::load`].
    pub fn with_model(model: OneAlignModel, dir: &Path, opts: &ScorerOptions) -> Result<Self> {
        let preprocess = folder_preprocess(dir, model.config().vision.image_size)?;
        let (tokenizer, tokenizer_source) = folder_tokenizer(dir)?;
        Self::from_parts(
            model,
            tokenizer,
            tokenizer_source,
            preprocess,
            opts.decode,
            opts.levels.clone(),
        )
    }

    /// Assembles a scorer from loaded parts.
    pub fn from_parts(
        model: OneAlignModel,
        tokenizer: Tokenizer,
        tokenizer_source: TokenizerSource,
        preprocess: PreprocessConfig,
        decode: DecodeOptions,
        levels: LevelSet,
    ) -> Result<Self> {
        let words: Vec<&str> = levels.words().iter().map(String::as_str).collect();
        let level_ids = level_token_ids(&tokenizer, &words)?;
        let vocab = model.config().llm.vocab_size;
        if let Some((word, &id)) = words
            .iter()
            .zip(&level_ids)
            .find(|&(_, &id)| id as usize >= vocab)
        {
            return Err(ScoreError::TokenizerMismatch {
                word: (*word).to_string(),
                id,
                vocab,
            });
        }
        Ok(Self {
            model,
            tokenizer,
            tokenizer_source,
            preprocess,
            decode,
            levels,
            level_ids,
            prefixes: PrefixCache::default(),
            #[cfg(test)]
            images_encoded: Default::default(),
        })
    }

    /// The network itself (low level: tensors in, tensors out).
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

    /// Token ids of the level words.
    pub fn level_ids(&self) -> &[u32] {
        &self.level_ids
    }

    /// The prompt ids (with the `-200` placeholder) for a query. A custom query must be valid
    /// and its prompt must leave room in the model's context for at least one image.
    pub fn prompt_ids(&self, query: &Query, input: MediaKind) -> Result<Vec<i64>> {
        query.check_text()?;
        let limit = self.model.config().llm.max_position_embeddings;
        let visual_tokens = self.model.tokens_per_image();
        let too_long = |text_tokens| ScoreError::PromptTooLong {
            text_tokens,
            visual_tokens,
            limit,
        };
        let prompt = query.prompt(input);
        // No LLaMA piece is longer than 64 bytes (the longest is 27): a prompt of more than 64
        // bytes per position has more tokens than the context holds, and is refused before it is
        // tokenised, with that lower bound as its count.
        if prompt.len() > limit * 64 {
            return Err(too_long(prompt.len() / 64));
        }
        let ids = tokenize_with_image(&self.tokenizer, &prompt);
        let text_tokens = ids.len().saturating_sub(1);
        if text_tokens + visual_tokens > limit {
            return Err(too_long(text_tokens));
        }
        Ok(ids)
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

    /// Stacks preprocessed images into a `[N, 3, H, W]` f32 tensor on the model's device (low
    /// level: the model's input).
    pub fn pixels_tensor(&self, images: &[&Pixels]) -> Result<Tensor> {
        let first = images.first().ok_or(ScoreError::Empty { what: "images" })?;
        let shape = first.shape();
        let mut data = Vec::with_capacity(images.len() * first.data.len());
        for image in images {
            if image.shape() != shape {
                return Err(ScoreError::MixedSizes {
                    first: shape,
                    other: image.shape(),
                });
            }
            data.extend_from_slice(&image.data);
        }
        Ok(Tensor::from_vec(
            data,
            (images.len(), shape[0], shape[1], shape[2]),
            self.model.device(),
        )?)
    }

    /// ViT + abstractor: the visual tokens of preprocessed images or frames.
    pub fn encode(&self, images: &[&Pixels]) -> Result<Visual> {
        let pixels = self.pixels_tensor(images)?;
        let tokens = self.model.encode_images(&pixels)?;
        #[cfg(test)]
        self.images_encoded
            .fetch_add(images.len(), std::sync::atomic::Ordering::Relaxed);
        Ok(Visual { tokens })
    }

    /// Scores N encoded images for one query, in one batch.
    pub fn score_encoded_images(&self, visual: &Visual, query: &Query) -> Result<Vec<LevelScores>> {
        let ids = self.prompt_ids(query, MediaKind::Image)?;
        let n = visual.len();
        let blocks = (0..n)
            .map(|i| visual.tokens.get(i))
            .collect::<candle_core::Result<Vec<_>>>()?;
        self.shared_prompt_rows(&ids, &blocks)
    }

    /// Scores images for several queries; each image goes through the ViT and abstractor once.
    /// Returns `[image][query]`.
    pub fn score_images(
        &self,
        images: &[&Pixels],
        queries: &[Query],
    ) -> Result<Vec<Vec<LevelScores>>> {
        if queries.is_empty() {
            return Err(ScoreError::Empty { what: "queries" });
        }
        for query in queries {
            self.prompt_ids(query, MediaKind::Image)?;
        }
        let visual = self.encode(images)?;
        let per_query = queries
            .iter()
            .map(|q| self.score_encoded_images(&visual, q))
            .collect::<Result<Vec<_>>>()?;
        Ok(transpose(per_query, images.len()))
    }

    /// Scores clips given their encoded frames, all spliced at the single `<|image|>` of the
    /// video prompt, in one padded batch. Every clip is read at its own last real token, so a
    /// clip scores the same in a batch as alone.
    pub fn score_encoded_clips(&self, clips: &[Visual], query: &Query) -> Result<Vec<LevelScores>> {
        if clips.is_empty() {
            return Err(ScoreError::Empty { what: "clips" });
        }
        let ids = self.prompt_ids(query, MediaKind::Video)?;
        let tokens: Vec<Tensor> = clips.iter().map(|c| c.tokens.clone()).collect();
        self.shared_prompt_rows(&ids, &tokens)
    }

    /// Scores visual blocks, one per sample, all with prompt `ids`; the text before the
    /// placeholder runs once per prompt for the scorer's lifetime, not once per batch.
    fn shared_prompt_rows(&self, ids: &[i64], blocks: &[Tensor]) -> Result<Vec<LevelScores>> {
        let (text, _) = split_prompt(ids);
        let prefix = match self.prefixes.get(text) {
            Some(prefix) => Some(prefix),
            None => self
                .model
                .prompt_prefix(ids)?
                .map(|prefix| self.prefixes.insert(text, prefix)),
        };
        let logits = self.model.shared_prompt_level_logits(
            ids,
            prefix.as_deref(),
            blocks,
            &self.level_ids,
        )?;
        self.rows(&logits)
    }

    /// The most frames one forward pass may hold for a query's video prompt within the model's
    /// position limit (`max_position_embeddings`).
    pub fn max_frames_per_pass(&self, query: &Query) -> Result<usize> {
        let text = self.prompt_ids(query, MediaKind::Video)?.len() - 1;
        let context = self.model.config().llm.max_position_embeddings;
        let per_frame = self.model.tokens_per_image();
        Ok((context.saturating_sub(text) / per_frame).max(1))
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

/// The prompt prefixes' K/V a scorer has computed, newest last. Bounded: a prefix costs
/// about 1 MiB per token at OneAlign's size in f32, and custom queries are unbounded.
#[derive(Debug, Default)]
struct PrefixCache {
    entries: Mutex<Vec<(Vec<i64>, Arc<PrefixKv>)>>,
}

impl PrefixCache {
    /// Prompts whose prefixes are kept: the three tasks for images and for videos, plus two.
    const CAPACITY: usize = 8;

    fn get(&self, text: &[i64]) -> Option<Arc<PrefixKv>> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .iter()
            .find(|(ids, _)| ids.as_slice() == text)
            .map(|(_, kv)| Arc::clone(kv))
    }

    fn insert(&self, text: &[i64], prefix: PrefixKv) -> Arc<PrefixKv> {
        let prefix = Arc::new(prefix);
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.retain(|(ids, _)| ids.as_slice() != text);
        if entries.len() >= Self::CAPACITY {
            entries.remove(0);
        }
        entries.push((text.to_vec(), Arc::clone(&prefix)));
        prefix
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
    fn the_legacy_flag_is_read_as_transformers_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("tokenizer_config.json");
        let legacy = |text: Option<&str>| {
            match text {
                Some(text) => std::fs::write(&config, text).unwrap(),
                None => drop(std::fs::remove_file(&config)),
            }
            folder_tokenizer_legacy(dir.path())
        };
        assert!(!legacy(None).unwrap(), "no tokenizer_config.json");
        assert!(legacy(Some("{}")).unwrap(), "LlamaTokenizer's default");
        assert!(legacy(Some(r#"{"legacy": null}"#)).unwrap());
        assert!(legacy(Some(r#"{"legacy": true}"#)).unwrap());
        assert!(!legacy(Some(r#"{"legacy": false, "model_max_length": 2048}"#)).unwrap());
        for bad in [r#"{"legacy": "no"}"#, "[]", "{", ""] {
            let err = legacy(Some(bad)).unwrap_err().to_string();
            assert!(err.contains("tokenizer_config.json"), "{bad}: {err}");
        }
        // The folder's flag reaches the tokenizer: text after `</s>` gets the dummy prefix.
        std::fs::write(&config, r#"{"legacy": true}"#).unwrap();
        let (tokenizer, source) = folder_tokenizer(dir.path()).unwrap();
        assert_eq!(source, TokenizerSource::BuiltIn);
        assert_eq!(
            tokenizer.encode_with_special_tokens("a</s>b", true),
            [1, 263, 2, 289]
        );
        let fixture = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures"));
        let (tokenizer, _) = folder_tokenizer(&fixture.join("tiny-onealign")).unwrap();
        assert!(!tokenizer.legacy());
    }

    #[test]
    fn each_image_is_encoded_once_whatever_the_number_of_queries() {
        let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures"));
        let scorer = Scorer::load(&dir.join("tiny-onealign"), &ScorerOptions::default()).unwrap();
        let pixels: Vec<Pixels> = ["boy_colorful.jpg", "synth_rgba_255x180.png"]
            .iter()
            .map(|n| scorer.load_image(&dir.join("images").join(n)).unwrap())
            .collect();
        let refs: Vec<&Pixels> = pixels.iter().collect();
        let queries = [Query::Task(Task::Quality), Query::Task(Task::Aesthetics)];
        let results = scorer.score_images(&refs, &queries).unwrap();
        assert_eq!(results.len(), 2);
        assert!(results.iter().all(|r| r.len() == 2));
        let encoded = scorer
            .images_encoded
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(encoded, 2);
    }

    #[test]
    fn prompt_prefixes_are_computed_once_and_the_cache_stays_bounded() {
        let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures"));
        let scorer = Scorer::load(&dir.join("tiny-onealign"), &ScorerOptions::default()).unwrap();
        let pixels = scorer
            .load_image(&dir.join("images").join("boy_colorful.jpg"))
            .unwrap();
        let quality = Query::Task(Task::Quality);
        let first = scorer
            .score_images(&[&pixels], std::slice::from_ref(&quality))
            .unwrap();
        let cached = scorer.prefixes.entries.lock().unwrap()[0].1.clone();
        let again = scorer.score_images(&[&pixels], &[quality]).unwrap();
        assert_eq!(first[0][0].logits, again[0][0].logits);
        assert!(Arc::ptr_eq(
            &cached,
            &scorer.prefixes.entries.lock().unwrap()[0].1
        ));
        for i in 0..PrefixCache::CAPACITY + 3 {
            let query = Query::custom(format!("Is picture {i} sharp?"), "It is").unwrap();
            scorer.score_images(&[&pixels], &[query]).unwrap();
        }
        let entries = scorer.prefixes.entries.lock().unwrap();
        assert_eq!(entries.len(), PrefixCache::CAPACITY);
        assert!(!entries.iter().any(|(_, kv)| Arc::ptr_eq(kv, &cached)));
    }

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
