//! The official `tokenizer_image_token` (q_align/mm_utils.py): how a prompt containing the image
//! marker becomes ids with a −200 placeholder where the visual tokens are spliced in, and how
//! the five level-word token ids are obtained.

use crate::error::{Result, TokenizerError};
use crate::tokenizer::Tokenizer;

use qalign_core::vocab::{IMAGE_MARKER, IMAGE_TOKEN_INDEX};

/// Tokenises a prompt exactly as the official `tokenizer_image_token` does with the slow LLaMA
/// tokenizer: split the text on [`IMAGE_MARKER`]; tokenise every non-empty chunk on its own with
/// BOS (so each chunk gets the dummy prefix "▁"), an empty chunk giving no ids; if the first
/// chunk starts with BOS keep that BOS once and drop the first id of every later chunk; join
/// the chunks with one [`IMAGE_TOKEN_INDEX`].
///
/// Quirk kept from the original: when the prompt starts with the marker, the first chunk is
/// empty, no id is dropped, and the later chunks keep their BOS (`"<|image|>Hi"` → `[-200, 1, …]`).
pub fn tokenize_with_image(tokenizer: &Tokenizer, prompt: &str) -> Vec<i64> {
    let chunks: Vec<Vec<u32>> = prompt
        .split(IMAGE_MARKER)
        .map(|chunk| {
            if chunk.is_empty() {
                Vec::new()
            } else {
                tokenizer.encode_with_special_tokens(chunk, true)
            }
        })
        .collect();
    let mut ids = Vec::with_capacity(chunks.iter().map(Vec::len).sum::<usize>() + chunks.len());
    let bos = tokenizer.bos_id();
    let offset = match chunks.first().and_then(|c| c.first()) {
        Some(&first) if first == bos => {
            ids.push(i64::from(bos));
            1
        }
        _ => 0,
    };
    for (index, chunk) in chunks.iter().enumerate() {
        if index > 0 {
            ids.push(IMAGE_TOKEN_INDEX);
        }
        ids.extend(chunk.iter().skip(offset).map(|&id| i64::from(id)));
    }
    ids
}

/// Token id of each word as the official code picks it: `tokenizer(words).input_ids[i][1]`, the
/// first piece after BOS (so "moderate" gives "▁moder"). For `["excellent", "good", "fair",
/// "poor", "bad"]` this is `[15129, 1781, 6534, 6460, 4319]`.
pub fn level_token_ids(tokenizer: &Tokenizer, words: &[&str]) -> Result<Vec<u32>> {
    words
        .iter()
        .map(|word| {
            tokenizer
                .encode_with_special_tokens(word, true)
                .get(1)
                .copied()
                .ok_or_else(|| TokenizerError::EmptyWord {
                    word: (*word).to_string(),
                })
        })
        .collect()
}
