//! The training syllabus: human scores turned into the official SFT conversations.
//!
//! Q-Align is trained to *say* a rating word. Each labelled item becomes a two-turn
//! conversation — a question drawn from a paraphrase pool, answered "The quality of the image is
//! good." — with the word chosen by Eq. 1 over the dataset's own score range. The conversion
//! precision (SRCC/PLCC between the MOS and the level number, the paper's Table 2) tells how much
//! the discretisation costs.

use std::io::Write;
use std::path::{Path, PathBuf};

use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};

use crate::dataset::Dataset;
use crate::levels::{Level, LevelError, LevelSet, ScoreRange};
use crate::metrics::{self, MetricError};
use crate::vocab::{IMAGE_MARKER, MediaKind, Task};

const QUALITY_IMAGE: [&str; 9] = [
    "What is your quality rating for this image?",
    "What's your opinion on the quality of this picture?",
    "How do you assess the quality of this image?",
    "Could you evaluate the quality of this image?",
    "How would you judge the quality of this image?",
    "Rate the quality of this image.",
    "Can you rate the quality of this picture?",
    "How would you rate the quality of this image?",
    "What do you think about the quality of this image?",
];

const QUALITY_VIDEO: [&str; 9] = [
    "What is your quality rating for this video?",
    "What's your opinion on the quality of this video?",
    "How do you assess the quality of this video?",
    "Could you evaluate the quality of this video?",
    "How would you judge the quality of this video?",
    "Rate the quality of this video.",
    "Can you rate the quality of this video?",
    "How would you rate the quality of this video?",
    "What do you think about the quality of this video?",
];

const AESTHETICS_IMAGE: [&str; 9] = [
    "What is your aesthetics rating for this image?",
    "What's your opinion on the aesthetics of this picture?",
    "How do you assess the aesthetics of this image?",
    "Could you evaluate the aesthetics of this image?",
    "How would you judge the aesthetics of this image?",
    "Rate the aesthetics of this image.",
    "Can you rate the aesthetics of this picture?",
    "How would you rate the aesthetics of this image?",
    "What do you think about the aesthetics of this image?",
];

const AESTHETICS_VIDEO: [&str; 9] = [
    "What is your aesthetics rating for this video?",
    "What's your opinion on the aesthetics of this video?",
    "How do you assess the aesthetics of this video?",
    "Could you evaluate the aesthetics of this video?",
    "How would you judge the aesthetics of this video?",
    "Rate the aesthetics of this video.",
    "Can you rate the aesthetics of this video?",
    "How would you rate the aesthetics of this video?",
    "What do you think about the aesthetics of this video?",
];

/// The paraphrased questions for a task and input (quality/image is the official KonIQ pool).
pub fn question_pool(task: Task, input: MediaKind) -> &'static [&'static str] {
    match (task, input) {
        (Task::Quality, MediaKind::Image) => &QUALITY_IMAGE,
        (Task::Quality, MediaKind::Video) => &QUALITY_VIDEO,
        (Task::Aesthetics, MediaKind::Image) => &AESTHETICS_IMAGE,
        (Task::Aesthetics, MediaKind::Video) => &AESTHETICS_VIDEO,
    }
}

/// The answer sentence: "The quality of the image is good."
pub fn answer_sentence(task: Task, input: MediaKind, word: &str) -> String {
    format!("The {task} of the {input} is {word}.")
}

/// Errors while building a syllabus.
#[derive(Debug, thiserror::Error)]
pub enum SyllabusError {
    #[error("the fraction of items to keep must lie in (0, 1], got {0}")]
    BadFraction(f64),
    #[error("no label files given")]
    NoDatasets,
    #[error("dataset {dataset}: {error}")]
    Range { dataset: String, error: LevelError },
    #[error("dataset {dataset}, record {index} ({path}): {error}")]
    Item {
        dataset: String,
        index: usize,
        path: String,
        error: LevelError,
    },
    #[error("dataset {dataset}, record {index} ({path}) is {} by its extension, but the input kind is {expected}", with_article(*found))]
    WrongInput {
        dataset: String,
        index: usize,
        path: String,
        found: MediaKind,
        expected: MediaKind,
    },
    #[error("cannot write {}: {error}", path.display())]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
}

fn with_article(kind: MediaKind) -> &'static str {
    match kind {
        MediaKind::Image => "an image",
        MediaKind::Video => "a video",
    }
}

/// How to build the syllabus.
#[derive(Debug, Clone, PartialEq)]
pub struct SyllabusOptions {
    pub task: Task,
    pub input: MediaKind,
    /// Bin over this range instead of each dataset's own min and max.
    pub range: Option<ScoreRange>,
    /// Keep a seeded random subset of this fraction of each dataset (few-shot).
    pub fraction: Option<f64>,
    /// Seeds both the subset and the question draws.
    pub seed: u64,
    pub levels: LevelSet,
    /// Put scores outside `range` in the end levels instead of failing.
    pub clamp: bool,
}

impl SyllabusOptions {
    pub fn new(task: Task, input: MediaKind) -> Self {
        Self {
            task,
            input,
            range: None,
            fraction: None,
            seed: 0,
            levels: LevelSet::itu(),
            clamp: false,
        }
    }
}

/// One conversation turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Turn {
    pub from: String,
    pub value: String,
}

/// One item of the official SFT JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SftItem {
    pub id: String,
    pub image: String,
    pub conversations: Vec<Turn>,
}

/// Level word → count, serialised as a JSON object in level order (best → worst).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LevelCounts(pub Vec<(String, usize)>);

impl Serialize for LevelCounts {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (word, count) in &self.0 {
            map.serialize_entry(word, count)?;
        }
        map.end()
    }
}

/// The conversion precision of one dataset (paper Table 2).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConversionReport {
    pub name: String,
    /// Items written (the subset when a fraction was asked for).
    pub n: usize,
    /// The binned range.
    pub m: f64,
    #[serde(rename = "M")]
    pub max: f64,
    /// SRCC / PLCC between each written item's MOS and its level number; NaN (JSON null) when
    /// undefined, with the reason in `undefined`.
    pub srcc: f64,
    pub plcc: f64,
    pub level_counts: LevelCounts,
    /// Why the conversion precision is undefined (too few items, all MOS equal, or all items
    /// in one level); absent when it is defined.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub undefined: Option<String>,
}

/// A built syllabus: the SFT items of all datasets, in input order, and one report each.
#[derive(Debug, Clone, PartialEq)]
pub struct Syllabus {
    pub items: Vec<SftItem>,
    pub reports: Vec<ConversionReport>,
}

/// Build the SFT items of several datasets (mixing), each binned over its own range (or
/// `options.range`). Deterministic for a given seed.
pub fn build_syllabus(
    datasets: &[Dataset],
    options: &SyllabusOptions,
) -> Result<Syllabus, SyllabusError> {
    if datasets.is_empty() {
        return Err(SyllabusError::NoDatasets);
    }
    if let Some(f) = options.fraction
        && !(f > 0.0 && f <= 1.0)
    {
        return Err(SyllabusError::BadFraction(f));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(options.seed);
    let pool = question_pool(options.task, options.input);
    let levels = &options.levels;
    let mut items = Vec::new();
    let mut reports = Vec::new();
    for dataset in datasets {
        let range = match options.range {
            Some(r) => r,
            None => ScoreRange::of(&dataset.scores()).map_err(|error| SyllabusError::Range {
                dataset: dataset.name.clone(),
                error,
            })?,
        };
        let selected = select(dataset.items.len(), options.fraction, &mut rng);
        let mut mos = Vec::with_capacity(selected.len());
        let mut level_numbers = Vec::with_capacity(selected.len());
        let mut counts = vec![0usize; levels.n_levels()];
        for index in selected {
            let item = &dataset.items[index];
            if item.kind != options.input {
                return Err(SyllabusError::WrongInput {
                    dataset: dataset.name.clone(),
                    index,
                    path: item.path.clone(),
                    found: item.kind,
                    expected: options.input,
                });
            }
            let level = bin(levels, item.score, range, options.clamp);
            let level = level.map_err(|error| SyllabusError::Item {
                dataset: dataset.name.clone(),
                index,
                path: item.path.clone(),
                error,
            })?;
            let question = pool[rng.random_range(0..pool.len() as u64) as usize];
            let word = levels.word(level);
            counts[levels.n_levels() - level.number()] += 1;
            mos.push(item.score);
            level_numbers.push(level.number() as f64);
            items.push(SftItem {
                id: format!(
                    "{}->{}",
                    file_name(&item.path),
                    python_float_repr(item.score)
                ),
                image: item.path.clone(),
                conversations: vec![
                    Turn {
                        from: "human".to_string(),
                        value: format!("{question}\n{IMAGE_MARKER}"),
                    },
                    Turn {
                        from: "gpt".to_string(),
                        value: answer_sentence(options.task, options.input, word),
                    },
                ],
            });
        }
        let (srcc, plcc, undefined) = match conversion_precision(&mos, &level_numbers) {
            Ok((srcc, plcc)) => (srcc, plcc, None),
            Err(why) => (f64::NAN, f64::NAN, Some(why)),
        };
        reports.push(ConversionReport {
            name: dataset.name.clone(),
            n: mos.len(),
            m: range.min(),
            max: range.max(),
            srcc,
            plcc,
            level_counts: LevelCounts(levels.words().iter().cloned().zip(counts).collect()),
            undefined,
        });
    }
    Ok(Syllabus { items, reports })
}

/// Eq. 1 for one score. The edges are `m + i·(M − m)/N`; when `N·(M − m)` would overflow
/// (|m|, |M| near f64::MAX), score and range are halved until it does not: halving is exact, so
/// the level is the one the edges would give with unlimited exponent range.
fn bin(levels: &LevelSet, score: f64, range: ScoreRange, clamp: bool) -> Result<Level, LevelError> {
    let level = |score: f64, range: ScoreRange| {
        if clamp {
            levels.level_of_clamped(score, range)
        } else {
            levels.level_of(score, range)
        }
    };
    let fits = |r: ScoreRange| ((r.max() - r.min()) * levels.n_levels() as f64).is_finite();
    if fits(range) {
        return level(score, range);
    }
    let (mut s, mut r) = (score, range);
    while !fits(r) {
        s /= 2.0;
        r = ScoreRange::new(r.min() / 2.0, r.max() / 2.0)?;
    }
    level(s, r).map_err(|e| match e {
        // Name the caller's numbers, not the halved ones.
        LevelError::OutOfRange { .. } => LevelError::OutOfRange {
            score,
            min: range.min(),
            max: range.max(),
        },
        other => other,
    })
}

/// SRCC and PLCC between MOS and level numbers, or why they are undefined.
pub fn conversion_precision(mos: &[f64], level_numbers: &[f64]) -> Result<(f64, f64), String> {
    let why = |e: MetricError| match e {
        MetricError::TooFewPairs(n) => format!(
            "only {n} item(s), and a correlation needs at least {}",
            metrics::MIN_PAIRS
        ),
        MetricError::Constant(metrics::Side::First) => {
            format!("all {} items have the same MOS", mos.len())
        }
        MetricError::Constant(metrics::Side::Second) => {
            format!("all {} items got the same level", mos.len())
        }
        other => other.to_string(),
    };
    Ok((
        metrics::srcc(mos, level_numbers).map_err(why)?,
        metrics::plcc(mos, level_numbers).map_err(why)?,
    ))
}

/// Indices of the items to keep, in file order: all of them, or round(F·n) (at least 1)
/// drawn without replacement.
fn select(n: usize, fraction: Option<f64>, rng: &mut ChaCha8Rng) -> Vec<usize> {
    match fraction {
        None => (0..n).collect(),
        Some(f) => {
            let k = ((f * n as f64).round() as usize).clamp(1.min(n), n);
            let mut picked = sample(rng, n, k).into_vec();
            picked.sort_unstable();
            picked
        }
    }
}

/// The MOS as Python's `repr(float)` writes it (the official ids were made with Python):
/// the shortest text that reads back to the same value, "67.0" for integers, and exponent
/// form ("1e-05", "1e+16") below 1e-4 or from 1e16 on.
pub fn python_float_repr(v: f64) -> String {
    let magnitude = v.abs();
    if !v.is_finite() || (magnitude != 0.0 && !(1e-4..1e16).contains(&magnitude)) {
        let text = format!("{v:e}");
        return match text.split_once('e') {
            Some((mantissa, exp)) => {
                let (sign, digits) = exp.strip_prefix('-').map_or(("+", exp), |d| ("-", d));
                format!("{mantissa}e{sign}{digits:0>2}")
            }
            None => text,
        };
    }
    let text = format!("{v}");
    if text.contains('.') {
        text
    } else {
        format!("{text}.0")
    }
}

fn file_name(path: &str) -> &str {
    path.rsplit(['/', '\\']).next().unwrap_or(path)
}

/// The first of `inputs` that `output` would overwrite: the same file however spelled
/// (`./a.json`, `dir/../a.json`, a symlink or a hard link). A missing output overwrites nothing.
pub fn overwritten_input<'a, P: AsRef<Path>>(output: &Path, inputs: &'a [P]) -> Option<&'a Path> {
    // Only an existing regular file can be a label file; checking first also keeps
    // `is_same_file` from opening a FIFO, which would wait for a writer.
    if !std::fs::metadata(output).is_ok_and(|m| m.is_file()) {
        return None;
    }
    inputs
        .iter()
        .map(AsRef::as_ref)
        .find(|input| same_file::is_same_file(output, input).unwrap_or(false))
}

/// Write `value` as pretty JSON to `path` atomically: into a temporary file in the same folder,
/// flushed, then renamed over `path`, so readers never see a half-written file.
pub fn write_json_atomic<T: Serialize + ?Sized>(
    path: &Path,
    value: &T,
) -> Result<(), SyllabusError> {
    let write_error = |error: std::io::Error| SyllabusError::Write {
        path: path.to_path_buf(),
        error,
    };
    crate::atomic::write_atomic(path, |file, _| {
        let mut writer = std::io::BufWriter::new(file);
        serde_json::to_writer_pretty(&mut writer, value).map_err(std::io::Error::other)?;
        writer.write_all(b"\n")?;
        writer.flush()
    })
    .map_err(write_error)
}
