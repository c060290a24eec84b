//! Fine-tuning OneAlign / Q-Align as the official `train_mem.py` does (LoRA or full SFT), on a CPU or a
//! GPU: the SFT data pipeline, the training loop with the HF Trainer's optimisation, checkpoints, and
//! adapters in the official PEFT layout that the official Python code loads unchanged.

pub mod data;
pub mod error;
pub mod merge;
pub mod optim;
pub mod quantize;
pub mod save;
pub mod soft;
pub mod torch_pickle;
pub mod trainer;

pub use error::{Result, TrainError};
pub use trainer::{
    DEFAULT_LORA_TARGETS, LossKind, Mode, StepLog, TrainConfig, TrainSummary, Trainer,
};
