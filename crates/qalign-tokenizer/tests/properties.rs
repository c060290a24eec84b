//! Property tests over arbitrary text with the real LLaMA vocabulary.
//!
//! Round-trip property (exact): for every string `s`, `decode(encode(s, bos)) == s.replace('▁', " ")`.
//! Reason: the normaliser only maps ' ' to "▁" (identity rules, no whitespace collapsing) and
//! adds one dummy "▁" in front of non-empty text; decoding maps every "▁" back to ' ' and drops
//! exactly that first one; byte fallback covers every character missing from the vocabulary, so
//! nothing becomes `<unk>`. A literal "▁" in the input is therefore indistinguishable from a
//! space, and that is the only loss.

use std::path::PathBuf;
use std::sync::OnceLock;

use proptest::prelude::*;
use qalign_tokenizer::{
    IMAGE_MARKER, IMAGE_TOKEN_INDEX, PieceKind, Tokenizer, tokenize_with_image,
};

fn tokenizer() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let path = PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/assets/llama2-tokenizer.model"
        ));
        Tokenizer::from_file(&path).unwrap()
    })
}

/// Reference BPE written the slow, obvious way: rescan all adjacent pairs, merge the one with the
/// highest score (leftmost on ties), repeat. O(n²), used only to check the heap implementation.
fn reference_encode(tok: &Tokenizer, text: &str) -> Vec<u32> {
    if text.is_empty() {
        return Vec::new();
    }
    let normalized = format!("▁{}", text.replace(' ', "▁"));
    let mut symbols: Vec<String> = normalized.chars().map(String::from).collect();
    loop {
        let mut best: Option<(f32, usize)> = None;
        for i in 0..symbols.len().saturating_sub(1) {
            let merged = format!("{}{}", symbols[i], symbols[i + 1]);
            let Some(id) = tok.token_to_id(&merged) else {
                continue;
            };
            if !matches!(
                tok.piece_kind(id),
                Some(PieceKind::Normal | PieceKind::UserDefined | PieceKind::Unused)
            ) {
                continue;
            }
            let score = tok.piece_score(id).unwrap();
            if best.is_none_or(|(best_score, _)| score > best_score) {
                best = Some((score, i));
            }
        }
        let Some((_, i)) = best else { break };
        let right = symbols.remove(i + 1);
        symbols[i].push_str(&right);
    }
    let mut ids = Vec::new();
    for symbol in &symbols {
        match tok.token_to_id(symbol) {
            Some(id) => ids.push(id),
            None => ids.extend(
                symbol
                    .bytes()
                    .map(|b| tok.token_to_id(&format!("<0x{b:02X}>")).unwrap()),
            ),
        }
    }
    ids
}

/// Arbitrary Unicode scalar values (proptest biases towards edge cases of the char space).
fn any_text() -> impl Strategy<Value = String> {
    prop::collection::vec(any::<char>(), 0..80).prop_map(String::from_iter)
}

/// Text that looks like prompts, so that many merges happen (letters, spaces, punctuation,
/// newlines, digits, a few multi-byte characters, "▁" itself).
fn prompt_like_text() -> impl Strategy<Value = String> {
    "[a-zA-Z ,.!?'\\n\\t0-9éüß語ñ🦙▁<>/|]{0,120}"
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn decode_inverts_encode_up_to_the_space_symbol(s in any_text(), add_bos in any::<bool>()) {
        let tok = tokenizer();
        let ids = tok.encode(&s, add_bos);
        prop_assert_eq!(tok.decode(&ids), s.replace('▁', " "));
    }

    #[test]
    fn decode_inverts_encode_on_prompt_like_text(s in prompt_like_text()) {
        let tok = tokenizer();
        prop_assert_eq!(tok.decode(&tok.encode(&s, true)), s.replace('▁', " "));
    }

    #[test]
    fn ids_are_in_the_vocabulary(s in any_text()) {
        let tok = tokenizer();
        for ids in [tok.encode(&s, true), tok.encode_with_special_tokens(&s, true)] {
            prop_assert!(ids.iter().all(|&id| (id as usize) < tok.vocab_size()));
        }
    }

    #[test]
    fn heap_bpe_equals_reference_bpe(s in prompt_like_text()) {
        let tok = tokenizer();
        prop_assert_eq!(tok.encode(&s, false), reference_encode(tok, &s));
    }

    #[test]
    fn heap_bpe_equals_reference_bpe_on_any_text(s in any_text()) {
        let tok = tokenizer();
        prop_assert_eq!(tok.encode(&s, false), reference_encode(tok, &s));
    }

    #[test]
    fn special_token_path_equals_plain_path_without_angle_brackets(s in any_text()) {
        prop_assume!(!s.contains('<'));
        let tok = tokenizer();
        prop_assert_eq!(tok.encode_with_special_tokens(&s, true), tok.encode(&s, true));
    }

    #[test]
    fn one_placeholder_per_image_marker(parts in prop::collection::vec(prompt_like_text(), 1..4)) {
        let tok = tokenizer();
        let prompt = parts.join(IMAGE_MARKER);
        let ids = tokenize_with_image(tok, &prompt);
        let markers = prompt.matches(IMAGE_MARKER).count();
        prop_assert_eq!(ids.iter().filter(|&&id| id == IMAGE_TOKEN_INDEX).count(), markers);
        prop_assert!(ids
            .iter()
            .all(|&id| id == IMAGE_TOKEN_INDEX || (0..tok.vocab_size() as i64).contains(&id)));
    }
}

#[test]
fn long_text_encodes_and_round_trips() {
    // 200k characters: a quadratic merge loop would take minutes here.
    let tok = tokenizer();
    let unit = "The quality of the image is good, \u{1F999} 語 naïve\n";
    let text = unit.repeat(200_000 / unit.chars().count());
    let ids = tok.encode(&text, true);
    assert!(ids.len() > 40_000);
    assert_eq!(tok.decode(&ids), text);
}
