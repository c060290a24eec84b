//! mPLUG-Owl2 / OneAlign in candle: loads the official checkpoints unchanged (safetensors or PyTorch
//! pickles, single or sharded) and runs the network that Q-Align scores with: ViT → visual abstractor →
//! LLaMA-2 with modality-adaptive (multiway) layers, reading the logits at each sample's last token.
//!
//! # The front door
//!
//! [`Scorer::builder`] takes a checkpoint folder or a Hugging Face hub id, and
//! [`Scorer::score_paths`] scores image and video files, one outcome per input:
//!
//! ```no_run
//! use qalign_model::{Device, Scale, Scorer, Task};
//!
//! let scorer = Scorer::builder().model("q-future/one-align").device(Device::Cpu).build()?;
//! for item in scorer.score_paths(&["a.jpg", "clip.mp4"], &[Task::Quality, Task::Aesthetics])? {
//!     match item.result {
//!         Ok(scored) => {
//!             let [quality, aesthetics] = scored.scores() else { unreachable!() };
//!             println!("{}: quality {:.2}, aesthetics {:.2}", item.path.display(),
//!                      quality.score(Scale::OneToFive), aesthetics.score(Scale::OneToFive));
//!         }
//!         Err(err) => eprintln!("{}: {err}", item.path.display()),
//!     }
//! }
//! # Ok::<(), qalign_model::ScoreError>(())
//! ```
//!
//! [`Scorer::score_paths_with`] adds custom questions ([`Query::custom`]), batch size, video
//! sampling, strict mode, a progress callback and streaming of outcomes. Below it, [`Scorer`]
//! scores preprocessed images and encoded frames, and [`OneAlignModel`] is the network itself
//! (tensors in, tensors out, through the re-exported [`candle`]).

pub mod abstractor;
pub mod adapt;
pub mod adapter;
mod batch;
mod builder;
pub mod config;
mod cpu_attention;
mod cpu_kernels;
mod cpu_matmul;
mod cpu_quant;
#[cfg(target_arch = "x86_64")]
mod cpu_quant_vnni;
mod cpu_simd;
mod cuda_fused;
mod device;
pub mod error;
pub mod gguf;
pub mod hub;
pub mod llm;
pub mod loader;
pub mod model;
pub mod nn;
pub mod quant;
pub mod report;
pub mod scorer;
pub mod summary;
pub mod video_score;
pub mod vision;

pub use adapt::{Adaptation, LoraPair, Param, Trainable};
pub use adapter::{Adapter, AdapterConfig};
pub use config::{ModelConfig, MplugOwl2Config};
pub use error::{ModelError, Result};
pub use gguf::{GGUF_FILE, GgufStore, GgufSummary};
pub use llm::{DecoderOutput, PrefixKv, TEXT_MODALITY, VISUAL_MODALITY};
pub use loader::{CheckpointFiles, WeightFormat, WeightStore, Weights};
pub use model::{
    IGNORE_LABEL, IMAGE_TOKEN_INDEX, LoadObserver, LoadOptions, LoadProgress, MergedInputs,
    OneAlignModel, TrainingLoss, TrainingSample, TrainingTarget, split_prompt,
};

pub use batch::{ItemOutcome, Progress, ProgressCallback, ScoreOptions, Scored};
pub use builder::ScorerBuilder;
pub use cpu_kernels::{CpuKernels, cpu_kernels};
pub use device::{Device, Dtype, Quant, parse_device};
pub use quant::{KindCount, QuantLayer, QuantReport};
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
