//! The exact inference prompt strings of Q-Align / OneAlign (spec §5.3).
//!
//! Whitespace and word order matter: the score is read from the logits after the last prompt
//! token, so a prompt that differs by one space gives a different score. Every string here is
//! checked against the official token ids in the tests.

use qalign_core::vocab::{IMAGE_MARKER, MediaKind, Task};

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

/// The user question of the official prompts: "How would you rate the {task} of this {input}?".
pub fn question(task: Task, input: MediaKind) -> String {
    format!("How would you rate the {task} of this {input}?")
}

/// The answer prefix the model completes with a level word: "The {task} of the {input} is".
pub fn answer_prefix(task: Task, input: MediaKind) -> String {
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
pub fn scorer_prompt(task: Task, input: MediaKind) -> String {
    custom_scorer_prompt(&question(task, input), &answer_prefix(task, input))
}

/// The prompt built by the `score()` method in the Q-Align **repository's** copy of
/// `modeling_mplug_owl2.py`, which fills its template as (task, input, input, task), so the
/// answer reads "The image of the quality is". This is what the official repo code (and the
/// fixtures' `score_method_*` entries) use; the Hub copy fixed the order, giving
/// [`scorer_prompt`]. Use this only to reproduce the repo's `score()` numbers.
pub fn score_method_prompt_repo_variant(task: Task, input: MediaKind) -> String {
    custom_scorer_prompt(
        &question(task, input),
        &format!("The {input} of the {task} is"),
    )
}

/// Prompt of the official `iqa_eval.py` (image) and `vqa_eval.py` (video): the `mplug_owl2`
/// conversation template, image marker after the question, then `" ASSISTANT:"` on the same
/// line: `"USER: How would you rate the quality of this image?\n<|image|> ASSISTANT: The quality of the image is"`.
pub fn quality_eval_script_prompt(input: MediaKind) -> String {
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
    let (task, input) = (Task::Aesthetics, MediaKind::Image);
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
    fn scorer_prompts_are_the_official_strings() {
        assert_eq!(
            scorer_prompt(Task::Quality, MediaKind::Image),
            "USER: How would you rate the quality of this image?\n<|image|>\nASSISTANT: The quality of the image is"
        );
        assert_eq!(
            score_method_prompt_repo_variant(Task::Quality, MediaKind::Video),
            "USER: How would you rate the quality of this video?\n<|image|>\nASSISTANT: The video of the quality is"
        );
    }
}
