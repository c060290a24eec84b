//! Readers for human-score label files and prediction files.
//!
//! Q-Align's label files come in several shapes (training schema with the MOS in `id`,
//! `gt_score` as a float or a padded string, `image` or `img_path`, concatenated eval results),
//! and users bring plain CSV/JSONL. Everything is normalised here into a list of
//! `(path, score)` items so the syllabus and the evaluation never see the differences.
//!
//! Accepted containers (chosen by extension, `.csv`/`.tsv` vs. everything else):
//! * JSON: one array of objects, or objects back to back (JSONL, or the official eval results
//!   with no separator at all);
//! * CSV/TSV with a header row; quoted fields are handled.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{Map, Value};

use crate::levels::{LevelDistribution, Scale};
use crate::vocab::MediaKind;

/// Errors while reading a label or prediction file. Each names the file and, where it applies,
/// the record (0-based index in the file) and its line.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("cannot read {}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{}: malformed JSON at line {line}, column {column}: {message}", path.display())]
    Json {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{}: record {index}{}: {message}", path.display(), fmt_line(*line))]
    Record {
        path: PathBuf,
        index: usize,
        line: Option<usize>,
        message: String,
    },
    #[error("{}: CSV error{}: {message}", path.display(), fmt_line(*line))]
    Csv {
        path: PathBuf,
        line: Option<usize>,
        message: String,
    },
    #[error("{}: the CSV header has no {what} column (looked for {candidates}; header is {header})", path.display())]
    MissingColumn {
        path: PathBuf,
        what: &'static str,
        candidates: String,
        header: String,
    },
    #[error("{}: no records", path.display())]
    Empty { path: PathBuf },
}

fn fmt_line(line: Option<usize>) -> String {
    line.map(|l| format!(" (line {l})")).unwrap_or_default()
}

/// One labelled item.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LabelItem {
    /// The media path as written in the file (relative to the dataset's media folder).
    pub path: String,
    /// The human opinion score (MOS).
    pub score: f64,
    pub kind: MediaKind,
    /// The record's `id`, when it has one.
    pub id: Option<String>,
    /// The `gpt` answer of a training-schema record, e.g. "The quality of the image is good."
    pub answer: Option<String>,
}

impl LabelItem {
    /// The level word of the official answer: the text after the last " is ", without the
    /// final period ("good", "below average").
    pub fn answer_level_word(&self) -> Option<&str> {
        let answer = self.answer.as_deref()?.trim();
        let answer = answer.strip_suffix('.').unwrap_or(answer);
        answer.rsplit_once(" is ").map(|(_, word)| word.trim())
    }
}

/// A labelled dataset read from one file.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// The file stem, e.g. `train_koniq`.
    pub name: String,
    pub source: PathBuf,
    pub items: Vec<LabelItem>,
}

impl Dataset {
    pub fn scores(&self) -> Vec<f64> {
        self.items.iter().map(|i| i.score).collect()
    }
}

/// A predicted score for one media path.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    pub path: String,
    pub score: f64,
    /// The record's `task` (`quality`, `aesthetics`, `custom` in `qalign score` output), when
    /// the file has that key or column: one file may hold several tasks per path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
}

/// Which keys / columns hold the path and the score. `None` means: try the defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Columns {
    pub path: Option<String>,
    pub score: Option<String>,
}

/// Default path keys for label files, in order of preference.
pub const LABEL_PATH_KEYS: [&str; 3] = ["image", "img_path", "path"];
/// Default score keys for label files; when none is present the MOS after `->` in `id` is used.
pub const LABEL_SCORE_KEYS: [&str; 3] = ["gt_score", "mos", "score"];
/// Default path keys for prediction files.
pub const PREDICTION_PATH_KEYS: [&str; 3] = ["path", "image", "img_path"];
/// Default score keys for prediction files; when none is present, a `logits` object with the
/// five ITU words is turned into a 1–5 score (the official `wa5`).
pub const PREDICTION_SCORE_KEYS: [&str; 3] = ["score", "pred", "prediction"];

#[derive(Clone, Copy)]
enum Role {
    Label,
    Prediction,
}

impl Role {
    fn path_keys(self) -> &'static [&'static str] {
        match self {
            Role::Label => &LABEL_PATH_KEYS,
            Role::Prediction => &PREDICTION_PATH_KEYS,
        }
    }
    fn score_keys(self) -> &'static [&'static str] {
        match self {
            Role::Label => &LABEL_SCORE_KEYS,
            Role::Prediction => &PREDICTION_SCORE_KEYS,
        }
    }
}

/// Read a label file (any supported schema).
pub fn read_labels(path: &Path, columns: &Columns) -> Result<Dataset, DatasetError> {
    parse_labels(path, &read_file(path)?, columns)
}

/// Parse the contents of a label file; `path` picks the format by its extension (`.csv`,
/// `.tsv`, else JSON/JSONL) and names the file in errors. Any bytes give a dataset or a
/// [`DatasetError`], never a panic.
pub fn parse_labels(path: &Path, bytes: &[u8], columns: &Columns) -> Result<Dataset, DatasetError> {
    let records = parse_records(path, bytes, columns, Role::Label)?;
    let items = records
        .into_iter()
        .map(|r| LabelItem {
            // Content when the file is reachable from here, else the name; an unknown name is an image.
            kind: MediaKind::of_file(Path::new(&r.path)).unwrap_or(MediaKind::Image),
            path: r.path,
            score: r.score,
            id: r.id,
            answer: r.answer,
        })
        .collect();
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    Ok(Dataset {
        name,
        source: path.to_path_buf(),
        items,
    })
}

/// Read a prediction file: JSONL/JSON/concatenated objects with a path and a score (qalign's
/// own output, the official eval results) or a CSV.
pub fn read_predictions(path: &Path, columns: &Columns) -> Result<Vec<Prediction>, DatasetError> {
    parse_predictions(path, &read_file(path)?, columns)
}

/// Parse the contents of a prediction file, as [`parse_labels`] does a label file.
pub fn parse_predictions(
    path: &Path,
    bytes: &[u8],
    columns: &Columns,
) -> Result<Vec<Prediction>, DatasetError> {
    Ok(parse_records(path, bytes, columns, Role::Prediction)?
        .into_iter()
        .map(|r| Prediction {
            path: r.path,
            score: r.score,
            task: r.task,
        })
        .collect())
}

struct RawRecord {
    path: String,
    score: f64,
    id: Option<String>,
    answer: Option<String>,
    task: Option<String>,
}

fn read_file(path: &Path) -> Result<Vec<u8>, DatasetError> {
    std::fs::read(path).map_err(|error| DatasetError::Io {
        path: path.to_path_buf(),
        error,
    })
}

fn parse_records(
    path: &Path,
    bytes: &[u8],
    columns: &Columns,
    role: Role,
) -> Result<Vec<RawRecord>, DatasetError> {
    let text = std::str::from_utf8(bytes).map_err(|e| DatasetError::Io {
        path: path.to_path_buf(),
        error: std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "not UTF-8 text (invalid byte at offset {})",
                e.valid_up_to()
            ),
        ),
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let records = match ext.as_deref() {
        Some("csv") => read_csv(path, text, b',', columns, role)?,
        Some("tsv") => read_csv(path, text, b'\t', columns, role)?,
        _ => read_json(path, text, columns, role)?,
    };
    if records.is_empty() {
        return Err(DatasetError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(records)
}

fn line_of_offset(text: &str, offset: usize) -> usize {
    // The first non-space byte at or after `offset` is where the record starts.
    let start = text[offset..]
        .find(|c: char| !c.is_whitespace())
        .map_or(offset, |d| offset + d);
    text[..start].bytes().filter(|&b| b == b'\n').count() + 1
}

fn read_json(
    path: &Path,
    text: &str,
    columns: &Columns,
    role: Role,
) -> Result<Vec<RawRecord>, DatasetError> {
    let json_error = |e: serde_json::Error| DatasetError::Json {
        path: path.to_path_buf(),
        line: e.line(),
        column: e.column(),
        message: e.to_string(),
    };
    let mut stream = serde_json::Deserializer::from_str(text).into_iter::<Value>();
    let mut values: Vec<(Value, Option<usize>)> = Vec::new();
    loop {
        let offset = stream.byte_offset();
        match stream.next() {
            None => break,
            Some(Ok(v)) => values.push((v, Some(line_of_offset(text, offset)))),
            Some(Err(e)) => return Err(json_error(e)),
        }
    }
    // A single top-level array holds the records; otherwise every value is one record.
    let records: Vec<(Value, Option<usize>)> = match values.as_slice() {
        [(Value::Array(_), _)] => match values.pop() {
            Some((Value::Array(items), _)) => items.into_iter().map(|v| (v, None)).collect(),
            _ => Vec::new(),
        },
        _ => values,
    };
    records
        .into_iter()
        .enumerate()
        .map(|(index, (value, line))| {
            let record_error = |message: String| DatasetError::Record {
                path: path.to_path_buf(),
                index,
                line,
                message,
            };
            match value {
                Value::Object(map) => parse_json_record(&map, columns, role).map_err(record_error),
                other => Err(record_error(format!(
                    "expected a JSON object, found {}",
                    json_kind(&other)
                ))),
            }
        })
        .collect()
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn keys_text(keys: &[&str]) -> String {
    keys.iter()
        .map(|k| format!("\"{k}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

fn parse_json_record(
    map: &Map<String, Value>,
    columns: &Columns,
    role: Role,
) -> Result<RawRecord, String> {
    let path_keys: Vec<&str> = match &columns.path {
        Some(k) => vec![k.as_str()],
        None => role.path_keys().to_vec(),
    };
    let (path_key, path_value) = path_keys
        .iter()
        .find_map(|k| map.get(*k).map(|v| (*k, v)))
        .ok_or_else(|| {
            format!(
                "no path: none of the keys {} is present",
                keys_text(&path_keys)
            )
        })?;
    let path = json_path(path_value).map_err(|m| format!("\"{path_key}\" {m}"))?;

    let id = map.get("id").and_then(Value::as_str).map(str::to_string);
    let score_keys: Vec<&str> = match &columns.score {
        Some(k) => vec![k.as_str()],
        None => role.score_keys().to_vec(),
    };
    let score = match score_keys.iter().find_map(|k| map.get(*k).map(|v| (*k, v))) {
        Some((key, value)) => json_score(value).map_err(|m| format!("\"{key}\" {m}"))?,
        None => fallback_score(map, id.as_deref(), role, columns).ok_or_else(|| {
            let extra = match role {
                Role::Label => "nor an \"id\" of the form \"name->MOS\"",
                Role::Prediction => "nor \"logits\" for the five ITU words",
            };
            format!(
                "no score: none of the keys {} {extra}",
                keys_text(&score_keys)
            )
        })??,
    };
    let answer = map
        .get("conversations")
        .and_then(Value::as_array)
        .and_then(|turns| {
            turns
                .iter()
                .find(|t| t.get("from").and_then(Value::as_str) == Some("gpt"))
        })
        .and_then(|t| t.get("value"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let task = map.get("task").and_then(Value::as_str).map(str::to_string);
    Ok(RawRecord {
        path,
        score,
        id,
        answer,
        task,
    })
}

/// The score when no score key is present: the MOS in `id` (labels) or the `wa5` of `logits`
/// (predictions). `None` when that source is absent too (an explicit score key disables it).
fn fallback_score(
    map: &Map<String, Value>,
    id: Option<&str>,
    role: Role,
    columns: &Columns,
) -> Option<Result<f64, String>> {
    if columns.score.is_some() {
        return None;
    }
    match role {
        Role::Label => {
            let (_, mos) = id?.rsplit_once("->")?;
            Some(parse_score_text(mos).map_err(|m| format!("the MOS in \"id\" {m}")))
        }
        Role::Prediction => {
            let logits = map.get("logits")?.as_object()?;
            Some(wa5_from_logits(logits))
        }
    }
}

/// README `wa5`: softmax over the logged logits of the five ITU words · [5, 4, 3, 2, 1].
fn wa5_from_logits(logits: &Map<String, Value>) -> Result<f64, String> {
    let mut values = Vec::with_capacity(5);
    for word in crate::vocab::LEVEL_WORDS {
        let v = logits
            .get(word)
            .ok_or_else(|| format!("\"logits\" lacks the word \"{word}\""))?;
        values.push(json_score(v).map_err(|m| format!("\"logits\".\"{word}\" {m}"))? as f32);
    }
    let dist = LevelDistribution::from_logits(&values).map_err(|e| e.to_string())?;
    Ok(dist.score(Scale::OneToFive).value)
}

fn json_path(v: &Value) -> Result<String, String> {
    let s = match v {
        Value::String(s) => s.as_str(),
        Value::Array(items) if items.len() == 1 => items[0]
            .as_str()
            .ok_or_else(|| "must be a string".to_string())?,
        Value::Array(items) => {
            return Err(format!(
                "holds {} paths; multi-image records are not supported",
                items.len()
            ));
        }
        other => return Err(format!("must be a string, found {}", json_kind(other))),
    };
    let s = s.trim();
    if s.is_empty() {
        return Err("is empty".to_string());
    }
    Ok(s.to_string())
}

fn json_score(v: &Value) -> Result<f64, String> {
    match v {
        Value::Number(n) => n
            .as_f64()
            .filter(|f| f.is_finite())
            .ok_or_else(|| format!("is not a finite number ({n})")),
        Value::String(s) => parse_score_text(s),
        // qalign's own output may carry {"value": x, "scale": "1-5"}.
        Value::Object(o) if o.contains_key("value") => json_score(&o["value"]),
        other => Err(format!("is not a number, found {}", json_kind(other))),
    }
}

fn parse_score_text(s: &str) -> Result<f64, String> {
    let t = s.trim();
    match t.parse::<f64>() {
        Ok(f) if f.is_finite() => Ok(f),
        Ok(_) => Err(format!("is not a finite number ({s:?})")),
        Err(_) => Err(format!("is not a number ({s:?})")),
    }
}

/// Default CSV path column names (matched case-insensitively) when none is given. The score
/// columns are the role's JSON keys: a prediction CSV that also carries the ground truth
/// (`path,mos,pred`) must not be read as MOS against MOS.
const CSV_PATH_COLUMNS: [&str; 6] = ["path", "image", "img_path", "file", "filename", "name"];

fn read_csv(
    path: &Path,
    text: &str,
    delimiter: u8,
    columns: &Columns,
    role: Role,
) -> Result<Vec<RawRecord>, DatasetError> {
    let csv_error = |e: csv::Error| DatasetError::Csv {
        path: path.to_path_buf(),
        line: e.position().map(|p| p.line() as usize),
        message: e.to_string(),
    };
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let header = reader.headers().map_err(csv_error)?.clone();
    let find = |wanted: &Option<String>, defaults: &[&str], what: &'static str| {
        let candidates: Vec<&str> = match wanted {
            Some(w) => vec![w.as_str()],
            None => defaults.to_vec(),
        };
        candidates
            .iter()
            .find_map(|c| header.iter().position(|h| h.eq_ignore_ascii_case(c)))
            .ok_or_else(|| DatasetError::MissingColumn {
                path: path.to_path_buf(),
                what,
                candidates: keys_text(&candidates),
                header: header.iter().collect::<Vec<_>>().join(","),
            })
    };
    let path_col = find(&columns.path, &CSV_PATH_COLUMNS, "path")?;
    let score_col = find(&columns.score, role.score_keys(), "score")?;
    let task_col = header.iter().position(|h| h.eq_ignore_ascii_case("task"));
    let mut out = Vec::new();
    for (index, row) in reader.records().enumerate() {
        let row = row.map_err(csv_error)?;
        let line = row.position().map(|p| p.line() as usize);
        let record_error = |message: String| DatasetError::Record {
            path: path.to_path_buf(),
            index,
            line,
            message,
        };
        let media = row.get(path_col).unwrap_or("").to_string();
        if media.is_empty() {
            return Err(record_error(format!(
                "column \"{}\" is empty",
                &header[path_col]
            )));
        }
        let score = parse_score_text(row.get(score_col).unwrap_or(""))
            .map_err(|m| record_error(format!("column \"{}\" {m}", &header[score_col])))?;
        out.push(RawRecord {
            path: media,
            score,
            id: None,
            answer: None,
            task: task_col
                .and_then(|c| row.get(c))
                .filter(|t| !t.is_empty())
                .map(str::to_string),
        });
    }
    Ok(out)
}

/// Distinct paths that occur more than once.
pub fn duplicate_paths<'a, I: IntoIterator<Item = &'a str>>(paths: I) -> Vec<String> {
    let mut seen = BTreeSet::new();
    let mut dups = BTreeSet::new();
    for p in paths {
        if !seen.insert(p) {
            dups.insert(p.to_string());
        }
    }
    dups.into_iter().collect()
}
