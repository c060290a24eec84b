//! What a checkpoint folder holds, without loading a single tensor: the resolved config, the
//! weight files, parameter counts per part and the dtypes on disk (`qalign info`). Lets a user
//! check a download before spending minutes and gigabytes on loading it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::ModelConfig;
use crate::error::Result;
use crate::gguf::{GGUF_FILE, GgufStore};
use crate::loader::{CheckpointFiles, WeightFormat, WeightStore};

/// Parameter count of one part of the network.
#[derive(Debug, Clone, Serialize)]
pub struct PartCount {
    pub part: &'static str,
    pub tensors: usize,
    pub parameters: u64,
}

/// A summary of a checkpoint folder.
#[derive(Debug, Clone, Serialize)]
pub struct CheckpointSummary {
    pub dir: PathBuf,
    pub config: ModelConfig,
    /// `safetensors`, `pytorch-bin` or `gguf` (written by `qalign quantize`).
    pub format: &'static str,
    pub index: Option<PathBuf>,
    pub weight_files: Vec<PathBuf>,
    /// The other files of the folder (tokenizer, preprocessor config, ...).
    pub other_files: Vec<String>,
    /// Trainable parameters per part (vision, abstractor, llm), excluding fixed buffers.
    pub parts: Vec<PartCount>,
    /// Fixed tables stored with the weights (abstractor sin-cos position tables).
    pub buffers: PartCount,
    /// Stored tensors the model ignores (`rotary_emb.inv_freq`, recomputed in f32).
    pub ignored: usize,
    /// Stored element count per dtype.
    pub dtypes: BTreeMap<String, u64>,
}

fn part_of(key: &str) -> &'static str {
    if key.starts_with("model.vision_model.") {
        "vision"
    } else if key.starts_with("model.visual_abstractor.") {
        "abstractor"
    } else {
        "llm"
    }
}

fn is_buffer(key: &str) -> bool {
    key.ends_with(".q_pos_embed") || key.ends_with(".k_pos_embed")
}

/// Reads the config and the weight headers of `dir` (a checkpoint, or a `model.gguf` written by
/// `qalign quantize`, whose entries count the same parameters).
pub fn summarize(dir: &Path, format: WeightFormat) -> Result<CheckpointSummary> {
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    let gguf = dir.join(GGUF_FILE);
    if format == WeightFormat::Auto && gguf.is_file() {
        let store = GgufStore::open(&gguf)?;
        let files = CheckpointFiles {
            format: WeightFormat::Auto,
            index: None,
            shards: vec![gguf],
        };
        let entries = store.keys().into_iter().filter_map(|k| {
            let (shape, dtype) = store.entry(k)?;
            Some((k, shape.to_vec(), format!("{dtype:?}").to_lowercase()))
        });
        return Ok(tally(dir, config, "gguf", &files, entries));
    }
    let store = WeightStore::open_dir(dir, format)?;
    let files = store.files().clone();
    let name = match files.format {
        WeightFormat::PytorchBin => "pytorch-bin",
        _ => "safetensors",
    };
    let entries = store.keys().into_iter().filter_map(|k| {
        let (shape, dtype) = store.entry(k)?;
        Some((k, shape.to_vec(), format!("{dtype:?}").to_lowercase()))
    });
    Ok(tally(dir, config, name, &files, entries))
}

/// Counts stored tensors `(key, shape, dtype name)` per part and dtype.
fn tally<'a>(
    dir: &Path,
    config: ModelConfig,
    format: &'static str,
    files: &CheckpointFiles,
    entries: impl Iterator<Item = (&'a str, Vec<usize>, String)>,
) -> CheckpointSummary {
    let mut parts: BTreeMap<&'static str, (usize, u64)> = ["vision", "abstractor", "llm"]
        .iter()
        .map(|p| (*p, (0, 0)))
        .collect();
    let mut buffers = (0usize, 0u64);
    let mut ignored = 0;
    let mut dtypes = BTreeMap::new();
    for (key, shape, dtype) in entries {
        let count: u64 = shape.iter().map(|&d| d as u64).product();
        *dtypes.entry(dtype).or_insert(0) += count;
        if key.ends_with(".rotary_emb.inv_freq") {
            ignored += 1;
        } else if is_buffer(key) {
            buffers.0 += 1;
            buffers.1 += count;
        } else {
            let entry = parts.entry(part_of(key)).or_insert((0, 0));
            entry.0 += 1;
            entry.1 += count;
        }
    }
    let weight_names: Vec<_> = files
        .shards
        .iter()
        .chain(files.index.iter())
        .filter_map(|p| p.file_name().map(|n| n.to_os_string()))
        .collect();
    let mut other_files: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.path().is_file())
                .map(|e| e.file_name())
                .filter(|n| !weight_names.contains(n))
                .map(|n| n.to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    other_files.sort();
    CheckpointSummary {
        dir: dir.to_path_buf(),
        config,
        format,
        index: files.index.clone(),
        weight_files: files.shards.clone(),
        other_files,
        parts: ["vision", "abstractor", "llm"]
            .iter()
            .map(|p| PartCount {
                part: p,
                tensors: parts[p].0,
                parameters: parts[p].1,
            })
            .collect(),
        buffers: PartCount {
            part: "buffers",
            tensors: buffers.0,
            parameters: buffers.1,
        },
        ignored,
        dtypes,
    }
}

impl CheckpointSummary {
    /// All trainable parameters.
    pub fn total_parameters(&self) -> u64 {
        self.parts.iter().map(|p| p.parameters).sum()
    }
}
