//! One error type for the whole crate, so a caller can tell a bad model folder (config, missing or misshapen
//! weight) from a bad input (ids, pixels) and from a numeric-backend failure.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running the model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A JSON file (config, shard index) is not valid JSON or has a field of the wrong type.
    #[error("cannot parse {path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// The configuration parses but describes something this implementation cannot build.
    #[error("invalid model config{}: {message}", path.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default())]
    Config {
        path: Option<PathBuf>,
        message: String,
    },
    /// No checkpoint in a supported layout was found in the model folder.
    #[error("no weights in {dir}: looked for {looked_for}")]
    NoWeights { dir: PathBuf, looked_for: String },
    /// A weight file exists but cannot be decoded (bad safetensors header, bad pickle, ...).
    #[error("cannot read weights from {path}: {message}")]
    WeightFile { path: PathBuf, message: String },
    /// A tensor the network needs is not in the checkpoint.
    #[error("missing weight `{key}` (looked in {file})")]
    MissingKey { key: String, file: PathBuf },
    /// A tensor is present but its shape does not match the configuration.
    #[error("weight `{key}` in {file} has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        key: String,
        expected: Vec<usize>,
        found: Vec<usize>,
        file: PathBuf,
    },
    /// A LoRA adapter folder is incomplete or does not fit the base model.
    #[error("adapter {dir}: {message}")]
    Adapter { dir: PathBuf, message: String },
    /// The caller passed inputs the model cannot take (wrong pixel shape, image count, ...).
    #[error("invalid input: {0}")]
    Input(String),
    /// A device name that is not `cpu`, `cuda` or `cuda:N`.
    #[error("unknown device `{name}`: expected cpu, cuda or cuda:N")]
    UnknownDevice { name: String },
    /// A dtype name that is not `f32`, `f16` or `bf16`.
    #[error("unknown dtype `{name}`: expected f32, f16 or bf16")]
    UnknownDtype { name: String },
    /// A weight quantisation name that is not `q8_0` or `q4k`.
    #[error("unknown quantisation `{name}`: expected q8_0 or q4k")]
    UnknownQuant { name: String },
    /// Quantised weights were asked for where they cannot be used (training, 16-bit activations).
    #[error("cannot quantise the weights: {0}")]
    Quant(String),
    /// A CUDA device was asked for, but this build has no CUDA support (the `cuda` feature).
    #[error(
        "device `{device}` needs CUDA, but this build of qalign has no CUDA support (it was built without the `cuda` feature)"
    )]
    NoCuda { device: crate::device::Device },
    /// A failure inside candle (device, dtype or kernel error).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Shorthand used throughout the crate.
pub type Result<T> = std::result::Result<T, ModelError>;

impl ModelError {
    pub(crate) fn config(message: impl Into<String>) -> Self {
        Self::Config {
            path: None,
            message: message.into(),
        }
    }

    pub(crate) fn input(message: impl Into<String>) -> Self {
        Self::Input(message.into())
    }
}
