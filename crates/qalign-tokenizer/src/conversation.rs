//! Training-time text and label masking, as the official `train_mem.py` does it (spec §8.3).
//!
//! Training uses a different template from inference (vicuna v1: system prompt, image marker
//! moved to the front of the question, `</s>` after the answer). The loss is taken only on the
//! answer and `</s>`; which tokens are masked follows the official `preprocess_v1` arithmetic
//! (`cur_len = 2`, `instruction_len = len(ids(instruction)) − 3`, `round_len − 1`), including
//! its rule that a length mismatch masks the whole sample.

use serde::Deserialize;

use crate::error::{Result, TokenizerError};
use crate::image::tokenize_with_image;
use crate::tokenizer::Tokenizer;
use qalign_core::vocab::IMAGE_MARKER;

/// The vicuna v1 system prompt (`conv_vicuna_v1.system`).
pub const VICUNA_V1_SYSTEM: &str = "A chat between a curious user and an artificial intelligence assistant. \
The assistant gives helpful, detailed, and polite answers to the user's questions.";

/// Label of positions that do not contribute to the loss.
pub const IGNORE_INDEX: i64 = -100;

/// `model_max_length` of the official tokenizer: sequences are truncated to it by the collator.
pub const MODEL_MAX_LENGTH: usize = 2048;

const USER_ROLE: &str = "USER";
const ASSISTANT_ROLE: &str = "ASSISTANT";
/// Separator after a user turn (`conv.sep`).
const SEP: &str = " ";
/// Separator after an assistant turn (`conv.sep2`).
const SEP2: &str = "</s>";

/// Who speaks a turn in the training JSON (`"from"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Speaker {
    #[serde(rename = "human")]
    Human,
    #[serde(rename = "gpt")]
    Gpt,
}

/// One turn of a training sample's `"conversations"` list.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Message {
    pub from: Speaker,
    pub value: String,
}

impl Message {
    pub fn human(value: impl Into<String>) -> Self {
        Self {
            from: Speaker::Human,
            value: value.into(),
        }
    }

    pub fn gpt(value: impl Into<String>) -> Self {
        Self {
            from: Speaker::Gpt,
            value: value.into(),
        }
    }
}

/// Token ids and loss labels of one training sample (unpadded, untruncated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainingTokens {
    /// Ids with [`crate::IMAGE_TOKEN_INDEX`] where the visual tokens go.
    pub input_ids: Vec<i64>,
    /// Same length; [`IGNORE_INDEX`] where no loss is taken, else the id itself.
    pub labels: Vec<i64>,
    /// True when the official length check failed and every label was set to [`IGNORE_INDEX`]
    /// (the official code prints "WARNING: tokenization mismatch").
    pub length_mismatch: bool,
}

/// Python's `str.strip()` with no argument: strips characters for which `str.isspace()` is true.
fn python_strip(s: &str) -> &str {
    // Python's whitespace also includes the information separators U+001C..U+001F.
    s.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

/// The official `preprocess_multimodal` on one turn: if the value contains the image marker,
/// remove every marker, strip, and put a single `"<|image|>\n"` in front; otherwise unchanged.
pub fn move_image_marker_to_front(value: &str) -> String {
    if !value.contains(IMAGE_MARKER) {
        return value.to_string();
    }
    let without = value.replace(IMAGE_MARKER, "");
    let joined = format!("{IMAGE_MARKER}\n{}", python_strip(&without));
    python_strip(&joined).to_string()
}

/// The vicuna v1 training text of a conversation, exactly as `preprocess_multimodal` +
/// `conv_vicuna_v1.get_prompt()` build it: `"{system} USER: {q} ASSISTANT: {a}</s>USER: …"`.
/// A leading assistant turn is skipped (as the official code does); the remaining turns must
/// alternate human, gpt, human, …
pub fn vicuna_v1_prompt(messages: &[Message]) -> Result<String> {
    let messages = match messages.first() {
        Some(first) if first.from != Speaker::Human => &messages[1..],
        _ => messages,
    };
    let mut prompt = format!("{VICUNA_V1_SYSTEM}{SEP}");
    for (index, message) in messages.iter().enumerate() {
        let (expected, role, sep) = if index % 2 == 0 {
            (Speaker::Human, USER_ROLE, SEP)
        } else {
            (Speaker::Gpt, ASSISTANT_ROLE, SEP2)
        };
        if message.from != expected {
            return Err(TokenizerError::Conversation {
                reason: format!(
                    "turn {index} is from {:?} but the turns must alternate human, gpt, …",
                    message.from
                ),
            });
        }
        let value = move_image_marker_to_front(&message.value);
        if value.is_empty() {
            // The template writes an empty message as "ROLE:" without separator.
            prompt.push_str(role);
            prompt.push(':');
        } else {
            prompt.push_str(role);
            prompt.push_str(": ");
            prompt.push_str(&value);
            prompt.push_str(sep);
        }
    }
    Ok(prompt)
}

/// The training text of one question/answer pair, e.g. question
/// `"How would you rate the quality of this image?\n<|image|>"` and answer
/// `"The quality of the image is good."` give
/// `"{system} USER: <|image|>\nHow would you rate the quality of this image? ASSISTANT: The quality of the image is good.</s>"`.
pub fn single_turn_training_text(question: &str, answer: &str) -> String {
    let mut prompt = format!("{VICUNA_V1_SYSTEM}{SEP}");
    for (role, value, sep) in [(USER_ROLE, question, SEP), (ASSISTANT_ROLE, answer, SEP2)] {
        let value = move_image_marker_to_front(value);
        if value.is_empty() {
            prompt.push_str(role);
            prompt.push(':');
        } else {
            prompt.push_str(&format!("{role}: {value}{sep}"));
        }
    }
    prompt
}

/// Python slice assignment `labels[start:stop] = IGNORE_INDEX` for non-negative bounds.
fn mask(labels: &mut [i64], start: i64, stop: i64) {
    let len = labels.len() as i64;
    let start = start.clamp(0, len) as usize;
    let stop = stop.clamp(0, len) as usize;
    if start < stop {
        labels[start..stop].fill(IGNORE_INDEX);
    }
}

/// Tokenises a vicuna v1 training text and masks its labels like the official `preprocess_v1`
/// (final version, 2024-01-21): ids via [`tokenize_with_image`]; labels start as a copy; the first
/// `cur_len = 2` positions are masked; for every round (text between `</s>`s, split at
/// `" ASSISTANT: "`), `instruction_len = len(ids(instruction + " ASSISTANT: ")) − 3` positions from
/// `cur_len` are masked and `cur_len` advances by `len(ids(round)) − 1`; everything from `cur_len`
/// on is masked. If `cur_len < model_max_length` and `cur_len` differs from the number of ids
/// that are not the pad id (= unk id), all labels are masked. For a single round this masks
/// everything up to and including "ASSISTANT:" and keeps the answer and `</s>`.
pub fn tokenize_for_training(
    tokenizer: &Tokenizer,
    prompt: &str,
    model_max_length: usize,
) -> TrainingTokens {
    let input_ids = tokenize_with_image(tokenizer, prompt);
    let mut labels = input_ids.clone();
    let pad = i64::from(tokenizer.unk_id());
    let total_len = input_ids.iter().filter(|&&id| id != pad).count() as i64;
    let round_sep = format!("{SEP}{ASSISTANT_ROLE}: ");

    let mut cur_len: i64 = 2;
    mask(&mut labels, 0, cur_len);
    for round in prompt.split(SEP2) {
        if round.is_empty() {
            break;
        }
        let parts: Vec<&str> = round.split(&round_sep).collect();
        if parts.len() != 2 {
            break;
        }
        let instruction = format!("{}{round_sep}", parts[0]);
        let round_len = tokenize_with_image(tokenizer, round).len() as i64 - 1;
        let instruction_len = tokenize_with_image(tokenizer, &instruction).len() as i64 - 3;
        mask(&mut labels, cur_len, cur_len + instruction_len);
        cur_len += round_len;
    }
    mask(&mut labels, cur_len, i64::MAX);

    let length_mismatch = cur_len < model_max_length as i64 && cur_len != total_len;
    if length_mismatch {
        labels.fill(IGNORE_INDEX);
    }
    TrainingTokens {
        input_ids,
        labels,
        length_mismatch,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_marker_moves_to_the_front_and_is_deduplicated() {
        assert_eq!(
            move_image_marker_to_front("Rate it.\n<|image|>"),
            "<|image|>\nRate it."
        );
        assert_eq!(
            move_image_marker_to_front("A?\n<|image|>B?\n<|image|>"),
            "<|image|>\nA?\nB?"
        );
        assert_eq!(move_image_marker_to_front("  no image "), "  no image ");
        assert_eq!(move_image_marker_to_front("<|image|>"), "<|image|>");
        // Python's isspace() includes U+001C..U+001F; Rust's trim alone would keep them.
        assert_eq!(
            move_image_marker_to_front("\u{1f}x<|image|>"),
            "<|image|>\nx"
        );
    }

    #[test]
    fn messages_must_alternate() {
        let ok = vicuna_v1_prompt(&[
            Message::gpt("skipped"),
            Message::human("Q"),
            Message::gpt("A"),
        ]);
        assert_eq!(
            ok.unwrap(),
            format!("{VICUNA_V1_SYSTEM} USER: Q ASSISTANT: A</s>")
        );
        let err = vicuna_v1_prompt(&[Message::human("Q"), Message::human("Q2")]).unwrap_err();
        assert!(err.to_string().contains("turn 1"), "{err}");
    }

    #[test]
    fn empty_message_renders_role_colon_without_separator() {
        assert_eq!(
            single_turn_training_text("Q", ""),
            format!("{VICUNA_V1_SYSTEM} USER: Q ASSISTANT:")
        );
    }
}
