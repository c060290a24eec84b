//! mPLUG-Owl2 / OneAlign in candle: loads the official checkpoints unchanged (safetensors or PyTorch
//! pickles, single or sharded) and runs the network that Q-Align scores with: ViT → visual abstractor →
//! LLaMA-2 with modality-adaptive (multiway) layers, reading the logits at each sample's last token.

pub mod abstractor;
pub mod adapt;
pub mod adapter;
mod batch;
mod builder;
pub mod config;
mod device;
pub mod error;
pub mod hub;
pub mod llm;
pub mod loader;
pub mod model;
pub mod nn;
pub mod report;
pub mod scorer;
pub mod summary;
pub mod video_score;
pub mod vision;

pub use adapt::{Adaptation, LoraPair, Param, Trainable};
pub use adapter::{Adapter, AdapterConfig};
pub use config::{ModelConfig, MplugOwl2Config};
pub use error::{ModelError, Result};
pub use llm::{DecoderOutput, TEXT_MODALITY, VISUAL_MODALITY};
pub use loader::{CheckpointFiles, WeightFormat, WeightStore, Weights};
pub use model::{
    IGNORE_LABEL, IMAGE_TOKEN_INDEX, LoadOptions, MergedInputs, OneAlignModel, TrainingLoss,
    TrainingSample, TrainingTarget,
};

pub use batch::{ItemOutcome, Progress, ScoreOptions, Scored};
pub use builder::ScorerBuilder;
pub use device::{Device, Dtype, parse_device};
pub use report::{FrameRecord, ScoreRecord, WarningRecord, WindowRecord};
pub use scorer::{
    LevelScores, Query, ScoreError, ScoreWarning, Scorer, ScorerOptions, TokenizerSource, Visual,
    balanced_windows,
};
pub use video_score::{ClipResult, FrameResult, VideoOptions, VideoResult, WindowResult};

/// The tensor library underneath, for callers of the low-level [`OneAlignModel`] API.
pub use candle_core as candle;
pub use qalign_core::{LevelSet, MediaKind, Scale, Task};
pub use qalign_media::{DecodeOptions, SamplingOptions};
pub use qalign_tokenizer::Tokenizer;
