//! The official SFT JSON as training samples: each conversation becomes the vicuna v1 text with the
//! image marker moved to the front, token ids and loss labels (only the answer and `</s>` are targets),
//! and its visual input (an image, a list of frame files, or a video sampled at 1 fps as in scoring).
//! Every sample is checked when the file is read, so a bad one stops the run before training starts with
//! an error that names it; the official loader instead swaps a failing sample for a random one.

use std::path::{Path, PathBuf};

use qalign_media::{MediaKind, PreprocessConfig, SamplingOptions, sniff_kind};
use qalign_tokenizer::{
    IMAGE_TOKEN_INDEX, MODEL_MAX_LENGTH, Message, Speaker, Tokenizer, tokenize_for_training,
    vicuna_v1_prompt,
};
use serde::Deserialize;

use crate::error::{Result, TrainError};

/// `"image"` in the SFT JSON: one path, or a list of frame paths.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum ImageField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct RawSample {
    #[serde(default)]
    id: Option<serde_json::Value>,
    #[serde(default)]
    image: Option<ImageField>,
    #[serde(default)]
    conversations: Vec<Message>,
}

/// What fills a sample's `<|image|>` slot.
#[derive(Debug, Clone, PartialEq)]
pub enum Visual {
    Image(PathBuf),
    /// Frame files, in order (all frames' tokens go in the one slot).
    Frames(Vec<PathBuf>),
    /// A video file and the number of frames its 1-fps plan takes.
    Video {
        path: PathBuf,
        frames: usize,
    },
}

impl Visual {
    /// Frames (images) this input contributes.
    pub fn n_frames(&self) -> usize {
        match self {
            Self::Image(_) => 1,
            Self::Frames(f) => f.len(),
            Self::Video { frames, .. } => *frames,
        }
    }

    /// The media files, in order.
    pub fn paths(&self) -> Vec<&Path> {
        match self {
            Self::Image(path) | Self::Video { path, .. } => vec![path.as_path()],
            Self::Frames(frames) => frames.iter().map(PathBuf::as_path).collect(),
        }
    }
}

/// One checked training sample.
#[derive(Debug, Clone)]
pub struct Sample {
    /// The sample's `id`, or `#<index>` when it has none.
    pub id: String,
    /// Position in the JSON file.
    pub index: usize,
    pub visual: Visual,
    pub input_ids: Vec<i64>,
    pub labels: Vec<i64>,
    /// The human score after `->` in an official id (`"img.jpg->62.5"`), used by the soft loss.
    pub mos: Option<f64>,
    /// The level word of the answer (`good`, …), when the answer ends with one.
    pub level_word: Option<String>,
}

impl Sample {
    /// Tokens after the visual tokens are spliced in.
    pub fn merged_len(&self, tokens_per_image: usize) -> usize {
        self.input_ids.len() - 1 + self.visual.n_frames() * tokens_per_image
    }
}

/// How to read a dataset.
#[derive(Debug, Clone)]
pub struct DataOptions {
    /// Image paths in the JSON are relative to this folder (the official `--image_folder`).
    pub image_folder: PathBuf,
    /// Context of the model, in merged tokens.
    pub max_positions: usize,
    /// Visual tokens per image or frame.
    pub tokens_per_image: usize,
    /// Frame sampling for video inputs (1 fps by default, as in scoring).
    pub sampling: SamplingOptions,
    /// The level words, for finding the answer's level (soft loss).
    pub level_words: Vec<String>,
}

/// A checked SFT dataset.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub path: PathBuf,
    pub samples: Vec<Sample>,
}

fn sample_error(path: &Path, index: usize, id: &str, message: impl Into<String>) -> TrainError {
    TrainError::Sample {
        file: path.to_owned(),
        index,
        id: id.to_owned(),
        message: message.into(),
    }
}

impl Dataset {
    /// Reads and checks every sample of an SFT JSON file (a JSON array).
    pub fn load(path: &Path, tokenizer: &Tokenizer, opts: &DataOptions) -> Result<Self> {
        Self::load_with_progress(path, tokenizer, opts, &mut |_, _| {})
    }

    /// [`Dataset::load`], calling `checked(done, total)` as the samples are checked (a large
    /// dataset takes a while: every media file's header is read).
    pub fn load_with_progress(
        path: &Path,
        tokenizer: &Tokenizer,
        opts: &DataOptions,
        checked: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| TrainError::Io {
            path: path.to_owned(),
            source,
        })?;
        let raw: Vec<RawSample> =
            serde_json::from_str(&text).map_err(|source| TrainError::Json {
                path: path.to_owned(),
                source,
            })?;
        if raw.is_empty() {
            return Err(TrainError::EmptyDataset(path.to_owned()));
        }
        let total = raw.len();
        let samples = raw
            .into_iter()
            .enumerate()
            .map(|(index, raw)| {
                let sample = Self::check(path, index, raw, tokenizer, opts);
                checked(index + 1, total);
                sample
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            path: path.to_owned(),
            samples,
        })
    }

    fn check(
        path: &Path,
        index: usize,
        raw: RawSample,
        tokenizer: &Tokenizer,
        opts: &DataOptions,
    ) -> Result<Sample> {
        let id = match &raw.id {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => format!("#{index}"),
        };
        let err = |message: String| sample_error(path, index, &id, message);
        let image = raw
            .image
            .ok_or_else(|| err("has no \"image\" (text-only samples are not supported)".into()))?;
        let resolve = |p: &str| -> Result<PathBuf> {
            let full = opts.image_folder.join(p);
            if full.is_file() {
                Ok(full)
            } else {
                Err(err(format!("image file {} does not exist", full.display())))
            }
        };
        let visual = match image {
            ImageField::Many(list) if list.is_empty() => {
                return Err(err("\"image\" is an empty list".into()));
            }
            ImageField::Many(list) => {
                let frames = list
                    .iter()
                    .map(|p| resolve(p))
                    .collect::<Result<Vec<_>>>()?;
                for frame in &frames {
                    check_image_header(frame).map_err(&err)?;
                }
                Visual::Frames(frames)
            }
            ImageField::One(p) => {
                let full = resolve(&p)?;
                match sniff_kind(&full).map_err(|e| err(e.to_string()))? {
                    Some(MediaKind::Video) => {
                        let info =
                            qalign_media::video::probe(&full).map_err(|e| err(e.to_string()))?;
                        let plan = qalign_media::video::plan_for(&info, &opts.sampling)
                            .map_err(|e| err(e.to_string()))?;
                        if plan.indices().is_empty() {
                            return Err(err(format!("{} has no frames to sample", full.display())));
                        }
                        Visual::Video {
                            path: full,
                            frames: plan.indices().len(),
                        }
                    }
                    _ => {
                        check_image_header(&full).map_err(&err)?;
                        Visual::Image(full)
                    }
                }
            }
        };
        let answers: Vec<&Message> = raw
            .conversations
            .iter()
            .filter(|m| m.from == Speaker::Gpt)
            .collect();
        if answers.is_empty() || answers.iter().all(|m| m.value.trim().is_empty()) {
            return Err(err(
                "the conversation has no answer (no non-empty \"gpt\" turn)".into(),
            ));
        }
        let markers: usize = raw
            .conversations
            .iter()
            .map(|m| m.value.matches(qalign_tokenizer::IMAGE_MARKER).count())
            .sum();
        if markers != 1 {
            return Err(err(format!(
                "the conversation has {markers} {} markers; exactly one is needed",
                qalign_tokenizer::IMAGE_MARKER
            )));
        }
        let prompt = vicuna_v1_prompt(&raw.conversations).map_err(|e| err(e.to_string()))?;
        let tokens = tokenize_for_training(tokenizer, &prompt, MODEL_MAX_LENGTH);
        if tokens.length_mismatch {
            let hint = if tokenizer.legacy() && raw.conversations.len() > 2 {
                " (the model's tokenizer_config.json sets `legacy` or leaves it unset, which makes \
                 the official masking ignore every multi-turn sample; single-turn samples train)"
            } else {
                ""
            };
            return Err(err(format!(
                "tokenization mismatch: the official label masking would ignore the whole sample{hint}"
            )));
        }
        if tokens.input_ids.len() > MODEL_MAX_LENGTH {
            return Err(err(format!(
                "{} text tokens, more than the tokenizer's model_max_length {MODEL_MAX_LENGTH}",
                tokens.input_ids.len()
            )));
        }
        if !tokens
            .labels
            .iter()
            .any(|&l| l != qalign_tokenizer::IGNORE_INDEX)
        {
            return Err(err("no answer token is a training target".into()));
        }
        if !tokens.input_ids.contains(&IMAGE_TOKEN_INDEX) {
            return Err(err("the image marker did not survive tokenization".into()));
        }
        let last_answer = answers.last().map(|m| m.value.as_str()).unwrap_or_default();
        let sample = Sample {
            mos: id
                .rsplit_once("->")
                .and_then(|(_, s)| s.trim().parse::<f64>().ok())
                .filter(|v| v.is_finite()),
            level_word: answer_level(last_answer, &opts.level_words),
            id: id.clone(),
            index,
            visual,
            input_ids: tokens.input_ids,
            labels: tokens.labels,
        };
        let merged = sample.merged_len(opts.tokens_per_image);
        if merged > opts.max_positions {
            return Err(err(format!(
                "{merged} tokens with its {} frame(s) of visual tokens, more than the model's context of {}",
                sample.visual.n_frames(),
                opts.max_positions
            )));
        }
        Ok(sample)
    }

    /// The MOS range of the samples that carry one (for mapping scores onto the levels).
    pub fn mos_range(&self) -> Option<(f64, f64)> {
        let mut it = self.samples.iter().filter_map(|s| s.mos);
        let first = it.next()?;
        let (lo, hi) = it.fold((first, first), |(lo, hi), v| (lo.min(v), hi.max(v)));
        (hi > lo).then_some((lo, hi))
    }
}

/// The level word an answer ends with (`"The quality of the image is good."` → `good`).
fn answer_level(answer: &str, words: &[String]) -> Option<String> {
    let last = answer
        .trim()
        .trim_end_matches(['.', '!'])
        .rsplit(' ')
        .next()?;
    words.iter().find(|w| w.as_str() == last).cloned()
}

/// Reads only the image header: a file that is not an image at all, or one too large to decode,
/// is caught before training rather than at the step that reaches it. A header the `image` crate
/// cannot read (formats qalign-media decodes itself, such as arithmetic-coded JPEG) is settled by
/// decoding the file as training will. A TIFF's tags that decoding honours beyond the `image`
/// crate (FillOrder) are checked too, from the tags alone.
fn check_image_header(path: &Path) -> std::result::Result<(), String> {
    let reader = image::ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if reader.format() == Some(image::ImageFormat::Tiff) {
        qalign_media::image::check_tiff_tags(path).map_err(|e| e.to_string())?;
    }
    let header = reader.into_dimensions();
    let (width, height) = match header {
        Ok(size) => size,
        Err(_) => qalign_media::load_rgb(path, &qalign_media::DecodeOptions::default())
            .map_err(|e| e.to_string())?
            .dimensions(),
    };
    if u64::from(width) * u64::from(height) > qalign_media::image::MAX_PIXELS {
        return Err(format!(
            "{}: {}",
            path.display(),
            qalign_media::image::too_many_pixels("image", width.into(), height.into())
        ));
    }
    qalign_media::preprocess::check_square_side(path, width, height).map_err(|e| e.to_string())
}

/// Decodes and preprocesses the visual input of a sample: `[T, 3, S, S]` f32 values, row-major.
pub fn load_pixels(
    sample: &Sample,
    preprocess: &PreprocessConfig,
    sampling: &SamplingOptions,
    file: &Path,
) -> Result<(Vec<f32>, usize, [usize; 3])> {
    let err = |message: String| sample_error(file, sample.index, &sample.id, message);
    let decode = qalign_media::DecodeOptions::default();
    let mut frames = Vec::new();
    match &sample.visual {
        Visual::Image(path) => frames.push(
            qalign_media::preprocess_path(path, preprocess, &decode)
                .map_err(|e| err(e.to_string()))?,
        ),
        Visual::Frames(paths) => {
            for path in paths {
                frames.push(
                    qalign_media::preprocess_path(path, preprocess, &decode)
                        .map_err(|e| err(e.to_string()))?,
                );
            }
        }
        Visual::Video { path, .. } => {
            let video = qalign_media::video::sample_frames(path, sampling)
                .map_err(|e| err(e.to_string()))?;
            frames.extend(video.images().map(|img| preprocess.preprocess(img)));
        }
    }
    let Some(first) = frames.first() else {
        return Err(err("the video gave no frames".into()));
    };
    let shape = first.shape();
    let n = frames.len();
    let mut data = Vec::with_capacity(n * first.data.len());
    for f in &frames {
        data.extend_from_slice(&f.data);
    }
    Ok((data, n, shape))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Under `legacy` the official masking ignores every multi-turn sample; the error says why.
    #[test]
    fn a_multi_turn_sample_under_a_legacy_tokenizer_is_refused_with_the_reason() {
        let images = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/images"
        ));
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("sft.json");
        let turn = |from: &str, value: &str| serde_json::json!({"from": from, "value": value});
        let sample = |conversations: Vec<serde_json::Value>| serde_json::json!({"id": "s", "image": "boy_colorful.jpg", "conversations": conversations});
        let one_turn = vec![
            turn(
                "human",
                "How would you rate the quality of this image?\n<|image|>",
            ),
            turn("gpt", "The quality of the image is good."),
        ];
        let mut two_turns = one_turn.clone();
        two_turns.push(turn("human", "And its aesthetics?"));
        two_turns.push(turn("gpt", "The aesthetics of the image is fair."));
        let opts = DataOptions {
            image_folder: images.to_path_buf(),
            max_positions: 2048,
            tokens_per_image: 65,
            sampling: SamplingOptions::default(),
            level_words: qalign_tokenizer::LEVEL_WORDS
                .iter()
                .map(|w| w.to_string())
                .collect(),
        };
        let load = |conversations: &[serde_json::Value], legacy: bool| {
            let items = serde_json::json!([sample(conversations.to_vec())]);
            std::fs::write(&data, items.to_string()).unwrap();
            Dataset::load(
                &data,
                &Tokenizer::llama2_builtin().with_legacy(legacy),
                &opts,
            )
        };
        assert_eq!(load(&one_turn, true).unwrap().samples.len(), 1);
        assert_eq!(load(&two_turns, false).unwrap().samples.len(), 1);
        let err = load(&two_turns, true).unwrap_err().to_string();
        assert!(
            err.contains("tokenization mismatch") && err.contains("`legacy`"),
            "{err}"
        );
    }
}
