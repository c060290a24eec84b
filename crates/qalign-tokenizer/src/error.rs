//! One error type for the whole crate, so callers can name the file, piece or word that was wrong.

use std::path::PathBuf;

/// Everything that can go wrong while loading a `tokenizer.model` or using it.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The model file could not be read (missing, unreadable, ...).
    #[error("cannot read tokenizer model {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The bytes are not a SentencePiece `ModelProto` (bad protobuf, no pieces, broken piece table).
    #[error("{origin} is not a SentencePiece model: {reason}")]
    NotSentencePiece { origin: String, reason: String },

    /// A valid SentencePiece model, but not a BPE one (unigram, word, char).
    #[error(
        "{origin} is a SentencePiece {model_type} model; only BPE models (LLaMA) are supported"
    )]
    NotBpe { origin: String, model_type: String },

    /// A BPE model using a feature this reader does not implement.
    #[error("{origin}: unsupported SentencePiece feature: {reason}")]
    Unsupported { origin: String, reason: String },

    /// A token id that is not in the vocabulary.
    #[error("token id {id} is out of range (vocabulary size {vocab_size})")]
    IdOutOfRange { id: u32, vocab_size: usize },

    /// A rating word that yields no token after BOS (for example the empty string).
    #[error("word {word:?} produces no token after BOS, so it has no level token id")]
    EmptyWord { word: String },

    /// A training conversation that the official template code would reject.
    #[error("invalid training conversation: {reason}")]
    Conversation { reason: String },
}

pub type Result<T, E = TokenizerError> = std::result::Result<T, E>;
