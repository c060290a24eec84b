//! The exact inference prompt strings of Q-Align / OneAlign (spec §5.3).
//!
//! Whitespace and word order matter: the score is read from the logits after the last prompt
//! token, so a prompt that differs by one space gives a different score. Every string here is
//! checked against the official token ids in the tests.

use std::fmt;
use std::str::FromStr;

use crate::error::TokenizerError;
use crate::image::IMAGE_MARKER;

/// The five rating words, in the order of the probability vector (best first).
pub const LEVEL_WORDS: [&str; 5] = ["excellent", "good", "fair", "poor", "bad"];

/// The 13 words whose logits the official eval scripts log, in their order.
pub const EVAL_SCRIPT_LOGGED_WORDS: [&str; 13] = [
    "good",
    "poor",
    "high",
    "fair",
    "low",
    "excellent",
    "bad",
    "fine",
    "moderate",
    "decent",
    "average",
    "medium",
    "acceptable",
];

/// What is being rated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Task {
    Quality,
    Aesthetics,
}

impl Task {
    /// The word used in the prompts ("quality", "aesthetics").
    pub fn word(self) -> &'static str {
        match self {
            Task::Quality => "quality",
            Task::Aesthetics => "aesthetics",
        }
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.word())
    }
}

impl FromStr for Task {
    type Err = TokenizerError;

    /// Accepts "quality" and "aesthetics" (also "aesthetic", as pyiqa spells it), any case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "quality" => Ok(Task::Quality),
            "aesthetics" | "aesthetic" => Ok(Task::Aesthetics),
            _ => Err(TokenizerError::UnknownName {
                kind: "task",
                name: s.to_string(),
                expected: "quality, aesthetics",
            }),
        }
    }
}

/// What kind of input is rated; a video is still one image slot in the prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InputKind {
    Image,
    Video,
}

impl InputKind {
    /// The word used in the prompts ("image", "video").
    pub fn word(self) -> &'static str {
        match self {
            InputKind::Image => "image",
            InputKind::Video => "video",
        }
    }
}

impl fmt::Display for InputKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.word())
    }
}

impl FromStr for InputKind {
    type Err = TokenizerError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "image" => Ok(InputKind::Image),
            "video" => Ok(InputKind::Video),
            _ => Err(TokenizerError::UnknownName {
                kind: "input kind",
                name: s.to_string(),
                expected: "image, video",
            }),
        }
    }
}

/// The user question of the official prompts: "How would you rate the {task} of this {input}?".
pub fn question(task: Task, input: InputKind) -> String {
    format!("How would you rate the {task} of this {input}?")
}

/// The answer prefix the model completes with a level word: "The {task} of the {input} is".
pub fn answer_prefix(task: Task, input: InputKind) -> String {
    format!("The {task} of the {input} is")
}

/// A scorer prompt with any question and answer prefix, in the official scorer layout:
/// `"USER: {question}\n<|image|>\nASSISTANT: {answer_prefix}"` (no system prompt).
/// The answer prefix should end right before where a level word would follow (no trailing space).
pub fn custom_scorer_prompt(question: &str, answer_prefix: &str) -> String {
    format!("USER: {question}\n{IMAGE_MARKER}\nASSISTANT: {answer_prefix}")
}

/// The prompt of the official scorer classes and of the Hub copy of the model's `.score()`:
/// `QAlignScorer` (quality, image), `QAlignAestheticScorer` (aesthetics, image),
/// `QAlignVideoScorer` (quality, video). (Aesthetics/video follows the same template; no official
/// class uses it.) For example
/// `"USER: How would you rate the quality of this image?\n<|image|>\nASSISTANT: The quality of the image is"`.
pub fn scorer_prompt(task: Task, input: InputKind) -> String {
    custom_scorer_prompt(&question(task, input), &answer_prefix(task, input))
}

/// The prompt built by the `score()` method in the Q-Align **repository's** copy of
/// `modeling_mplug_owl2.py`, which fills its template as (task, input, input, task), so the
/// answer reads "The image of the quality is". This is what the official repo code (and the
/// fixtures' `score_method_*` entries) use; the Hub copy fixed the order, giving
/// [`scorer_prompt`]. Use this only to reproduce the repo's `score()` numbers.
pub fn score_method_prompt_repo_variant(task: Task, input: InputKind) -> String {
    custom_scorer_prompt(
        &question(task, input),
        &format!("The {input} of the {task} is"),
    )
}

/// Prompt of the official `iqa_eval.py` (image) and `vqa_eval.py` (video): the `mplug_owl2`
/// conversation template, image marker after the question, then `" ASSISTANT:"` on the same
/// line: `"USER: How would you rate the quality of this image?\n<|image|> ASSISTANT: The quality of the image is"`.
pub fn quality_eval_script_prompt(input: InputKind) -> String {
    let task = Task::Quality;
    format!(
        "USER: {}\n{IMAGE_MARKER} ASSISTANT: {}",
        question(task, input),
        answer_prefix(task, input)
    )
}

/// Prompt of the official `iaa_eval.py`: image marker *before* the question, no newline:
/// `"USER: <|image|>How would you rate the aesthetics of this image? ASSISTANT: The aesthetics of the image is"`.
pub fn aesthetics_eval_script_prompt() -> String {
    let (task, input) = (Task::Aesthetics, InputKind::Image);
    format!(
        "USER: {IMAGE_MARKER}{} ASSISTANT: {}",
        question(task, input),
        answer_prefix(task, input)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_print() {
        assert_eq!("Quality".parse::<Task>().unwrap(), Task::Quality);
        assert_eq!("aesthetic".parse::<Task>().unwrap(), Task::Aesthetics);
        assert_eq!("video".parse::<InputKind>().unwrap(), InputKind::Video);
        let err = "sharpness".parse::<Task>().unwrap_err().to_string();
        assert!(
            err.contains("sharpness") && err.contains("quality"),
            "{err}"
        );
        assert_eq!(Task::Aesthetics.to_string(), "aesthetics");
    }

    #[test]
    fn scorer_prompts_are_the_official_strings() {
        assert_eq!(
            scorer_prompt(Task::Quality, InputKind::Image),
            "USER: How would you rate the quality of this image?\n<|image|>\nASSISTANT: The quality of the image is"
        );
        assert_eq!(
            score_method_prompt_repo_variant(Task::Quality, InputKind::Video),
            "USER: How would you rate the quality of this video?\n<|image|>\nASSISTANT: The video of the quality is"
        );
    }
}
