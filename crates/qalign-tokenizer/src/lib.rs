//! A pure-Rust reader and encoder for the LLaMA SentencePiece `tokenizer.model`, plus the
//! official `tokenizer_image_token` splicing and the Q-Align prompt strings.
//!
//! Q-Align reads its score from the logits after the last prompt token, so the prompt ids must
//! match the official Python stack bit for bit; this crate reproduces SentencePiece BPE (and
//! Hugging Face's slow `LlamaTokenizer`, `legacy` on or off) without Python or C++.

mod bpe;
pub mod conversation;
mod error;
mod image;
pub mod prompts;
mod proto;
mod tokenizer;

pub use conversation::{
    IGNORE_INDEX, MODEL_MAX_LENGTH, Message, Speaker, TrainingTokens, VICUNA_V1_SYSTEM,
    move_image_marker_to_front, single_turn_training_text, tokenize_for_training, vicuna_v1_prompt,
};
pub use error::{Result, TokenizerError};
pub use image::{level_token_ids, tokenize_with_image};
pub use prompts::{
    EVAL_SCRIPT_LOGGED_WORDS, aesthetics_eval_script_prompt, answer_prefix, custom_scorer_prompt,
    quality_eval_script_prompt, question, score_method_prompt_repo_variant, scorer_prompt,
};
pub use qalign_core::vocab::{IMAGE_MARKER, IMAGE_TOKEN_INDEX, LEVEL_WORDS, MediaKind, Task};
pub use tokenizer::{PieceKind, SPACE_SYMBOL, Tokenizer};
