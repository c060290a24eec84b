//! One error type for training, so the CLI can tell a bad dataset sample (named by file, index and id)
//! from a bad model folder, a bad adapter, an unusable checkpoint to resume from, and a numeric failure.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot parse {}: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A sample of the dataset cannot be trained on.
    #[error("{}: sample {index} ({id}): {message}", file.display())]
    Sample {
        file: PathBuf,
        index: usize,
        id: String,
        message: String,
    },
    #[error("{}: the dataset has no samples", .0.display())]
    EmptyDataset(PathBuf),
    /// A setting is out of range or settings contradict each other.
    #[error("invalid training setting: {0}")]
    Config(String),
    /// A LoRA target names no module of the base model.
    #[error("LoRA target `{target}` matches no linear layer of the base model (known: {known})")]
    Target { target: String, known: String },
    #[error("cannot resume: {0}")]
    Resume(String),
    /// An output would replace an input.
    #[error("{0}")]
    Overwrite(String),
    #[error(transparent)]
    Model(#[from] qalign_model::ModelError),
    #[error(transparent)]
    Score(#[from] qalign_model::ScoreError),
    #[error(transparent)]
    Media(#[from] qalign_media::MediaError),
    #[error(transparent)]
    Tokenizer(#[from] qalign_tokenizer::TokenizerError),
    #[error(transparent)]
    Pickle(#[from] crate::torch_pickle::PickleWriteError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("internal error: {0}")]
    Internal(String),
    /// The stop flag ([`crate::Trainer::set_stop`]) was raised: Ctrl-C or SIGTERM.
    #[error("interrupted before step {0} was complete")]
    Interrupted(usize),
    /// Training stopped on `source` after some steps; `kept` says what was saved to resume from.
    #[error("{source}\n{kept}")]
    Stopped {
        source: Box<TrainError>,
        kept: String,
    },
}

pub type Result<T> = std::result::Result<T, TrainError>;
