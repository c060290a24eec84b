//! Property tests over hostile `tokenizer.model` bytes: arbitrary bytes, and structured mutations
//! (a byte flipped, the file cut short, bytes overwritten, a field appended) of a small valid BPE
//! model. Loading returns a typed error or a tokenizer, never panics; a tokenizer loaded from
//! mutated bytes then encodes arbitrary text and decodes arbitrary ids without panicking, and its
//! ids stay inside its vocabulary.

use std::path::PathBuf;
use std::sync::OnceLock;

use proptest::prelude::*;
use qalign_tokenizer::{Tokenizer, TokenizerError};

/// Protobuf wire encoding, just enough for `sentencepiece_model.proto`.
fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn key(field: u64, wire: u64, out: &mut Vec<u8>) {
    varint((field << 3) | wire, out);
}

fn int_field(field: u64, v: u64, out: &mut Vec<u8>) {
    key(field, 0, out);
    varint(v, out);
}

fn bytes_field(field: u64, bytes: &[u8], out: &mut Vec<u8>) {
    key(field, 2, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

fn piece(text: &str, score: f32, kind: u64) -> Vec<u8> {
    let mut p = Vec::new();
    bytes_field(1, text.as_bytes(), &mut p);
    key(2, 5, &mut p);
    p.extend_from_slice(&score.to_le_bytes());
    int_field(3, kind, &mut p);
    p
}

/// A small BPE model with byte fallback: `<unk>` `<s>` `</s>`, the 256 byte pieces, a
/// user-defined piece, an unused piece, and merges for a few words.
fn small_model() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| {
        let mut out = Vec::new();
        let mut pieces = vec![
            piece("<unk>", 0.0, 2),
            piece("<s>", 0.0, 3),
            piece("</s>", 0.0, 3),
        ];
        pieces.extend((0..=255u8).map(|b| piece(&format!("<0x{b:02X}>"), 0.0, 6)));
        pieces.push(piece("<|image|>", 0.0, 4));
        pieces.push(piece("▁g", -1.0, 5));
        let words = [
            "▁", "g", "o", "d", "a", "i", "r", "▁go", "▁goo", "▁good", "fa", "fai", "▁fair", "▁fa",
        ];
        for (i, w) in words.iter().enumerate() {
            pieces.push(piece(w, -(i as f32) - 2.0, 1));
        }
        for p in &pieces {
            bytes_field(1, p, &mut out);
        }
        let mut trainer = Vec::new();
        int_field(3, 2, &mut trainer); // model_type BPE
        int_field(35, 1, &mut trainer); // byte_fallback
        bytes_field(2, &trainer, &mut out);
        let mut normalizer = Vec::new();
        bytes_field(1, b"identity", &mut normalizer);
        int_field(3, 1, &mut normalizer);
        int_field(4, 0, &mut normalizer);
        bytes_field(3, &normalizer, &mut out);
        out
    })
}

fn llama() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let path = PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/assets/llama2-tokenizer.model"
        ));
        Tokenizer::from_file(&path).unwrap()
    })
}

fn typed(err: &TokenizerError) -> bool {
    matches!(
        err,
        TokenizerError::NotSentencePiece { .. }
            | TokenizerError::NotBpe { .. }
            | TokenizerError::Unsupported { .. }
    )
}

/// Uses a tokenizer as hostile callers would: arbitrary text, arbitrary ids.
fn exercise(tok: &Tokenizer, text: &str, ids: &[u32]) -> Result<(), TestCaseError> {
    let n = tok.vocab_size();
    for encoded in [
        tok.encode(text, true),
        tok.encode(text, false),
        tok.encode_with_special_tokens(text, true),
    ] {
        prop_assert!(encoded.iter().all(|&id| (id as usize) < n));
        let _ = tok.decode(&encoded);
    }
    let _ = tok.decode(ids);
    match tok.try_decode(ids) {
        Ok(_) => prop_assert!(ids.iter().all(|&id| (id as usize) < n)),
        Err(TokenizerError::IdOutOfRange { id, vocab_size }) => {
            prop_assert!(id as usize >= n && vocab_size == n)
        }
        Err(other) => return Err(TestCaseError::fail(format!("{other:?}"))),
    }
    for id in ids {
        let _ = (
            tok.id_to_piece(*id),
            tok.piece_kind(*id),
            tok.piece_score(*id),
        );
    }
    let _ = tok.token_to_id(text);
    Ok(())
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip {
        at: usize,
        mask: u8,
    },
    Truncate {
        to: usize,
    },
    Overwrite {
        at: usize,
        bytes: Vec<u8>,
    },
    /// Appends a field: protobuf merges it into the message (a last scalar wins, a repeated
    /// field grows), so this reaches the semantic checks rather than the decoder.
    Append {
        bytes: Vec<u8>,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(at, mask)| Mutation::Flip { at, mask }),
        any::<usize>().prop_map(|to| Mutation::Truncate { to }),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..6))
            .prop_map(|(at, bytes)| Mutation::Overwrite { at, bytes }),
        appended_field().prop_map(|bytes| Mutation::Append { bytes }),
    ]
}

/// A top-level field: a piece with an arbitrary text, score and type, or a trainer / normalizer
/// spec with one arbitrary varint field among those the loader reads.
fn appended_field() -> impl Strategy<Value = Vec<u8>> {
    let piece_field = ("\\PC{0,6}", any::<f32>(), 0u64..9).prop_map(|(text, score, kind)| {
        let mut out = Vec::new();
        bytes_field(1, &piece(&text, score, kind), &mut out);
        out
    });
    let spec_field = (
        prop::sample::select(vec![2u64, 3]),
        prop::sample::select(vec![1u64, 3, 4, 5, 24, 35, 40, 41, 42, 43]),
        prop_oneof![0u64..5, any::<u64>()],
    )
        .prop_map(|(message, field, value)| {
            let mut inner = Vec::new();
            int_field(field, value, &mut inner);
            let mut out = Vec::new();
            bytes_field(message, &inner, &mut out);
            out
        });
    prop_oneof![piece_field, spec_field]
}

fn apply(valid: &[u8], m: &Mutation) -> Vec<u8> {
    let mut bytes = valid.to_vec();
    match m {
        Mutation::Flip { at, mask } => {
            let i = at % bytes.len();
            bytes[i] ^= mask;
        }
        Mutation::Truncate { to } => bytes.truncate(to % valid.len()),
        Mutation::Overwrite { at, bytes: new } => {
            let i = at % bytes.len();
            for (k, b) in new.iter().enumerate() {
                if let Some(slot) = bytes.get_mut(i + k) {
                    *slot = *b;
                }
            }
        }
        Mutation::Append { bytes: extra } => bytes.extend_from_slice(extra),
    }
    bytes
}

fn hostile_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "\\PC{0,40}",
        "[ ▁<>|/sgodfair\\n\\t]{0,40}",
        prop::collection::vec(any::<char>(), 0..40).prop_map(String::from_iter),
    ]
}

fn hostile_ids() -> impl Strategy<Value = Vec<u32>> {
    prop::collection::vec(
        prop_oneof![0u32..300, 31990u32..32010, any::<u32>(), Just(u32::MAX)],
        0..24,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn arbitrary_bytes_load_or_fail_typed(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        match Tokenizer::from_bytes(&bytes) {
            Ok(tok) => prop_assert!(tok.vocab_size() > 0),
            Err(err) => prop_assert!(typed(&err), "{err:?}"),
        }
    }

    #[test]
    fn mutated_model_loads_or_fails_typed_and_then_never_panics(
        m in mutation(),
        text in hostile_text(),
        ids in hostile_ids(),
    ) {
        match Tokenizer::from_bytes(&apply(small_model(), &m)) {
            Ok(tok) => exercise(&tok, &text, &ids)?,
            Err(err) => prop_assert!(typed(&err), "{err:?}"),
        }
    }

    #[test]
    fn the_real_vocabulary_takes_hostile_text_and_ids(text in hostile_text(), ids in hostile_ids()) {
        exercise(llama(), &text, &ids)?;
    }
}

#[test]
fn the_small_model_is_valid_and_merges() {
    let tok = Tokenizer::from_bytes(small_model()).unwrap();
    assert_eq!(tok.vocab_size(), 3 + 256 + 2 + 14);
    let good = tok.token_to_id("▁good").unwrap();
    assert_eq!(tok.encode("good", false), vec![good]);
    assert_eq!(tok.decode(&tok.encode("good fair", true)), "good fair");
    // A character outside the vocabulary falls back to its UTF-8 bytes.
    let ids = tok.encode("é", false);
    assert_eq!(ids.len(), 3, "{ids:?}"); // "▁" then the two bytes of "é"
    assert_eq!(tok.decode(&ids), "é");
}

#[test]
fn every_truncation_of_the_small_model_fails_typed_or_loads() {
    let valid = small_model();
    for len in 0..valid.len() {
        if let Err(err) = Tokenizer::from_bytes(&valid[..len]) {
            assert!(typed(&err), "cut at {len}: {err:?}");
        }
    }
}

#[test]
fn deeply_nested_unused_merges_are_split_back_without_recursion() {
    // "a" plus UNUSED pieces "aa", "aaa", ... with rising scores: "a"×N merges from the left
    // into one UNUSED piece nested N deep, which must be split back into N × "a".
    const N: usize = 3000;
    let mut out = Vec::new();
    for p in [
        piece("<unk>", 0.0, 2),
        piece("<s>", 0.0, 3),
        piece("</s>", 0.0, 3),
        piece("a", 0.0, 1),
    ] {
        bytes_field(1, &p, &mut out);
    }
    for k in 2..=N {
        bytes_field(1, &piece(&"a".repeat(k), k as f32, 5), &mut out);
    }
    let mut trainer = Vec::new();
    int_field(3, 2, &mut trainer);
    bytes_field(2, &trainer, &mut out);
    let mut normalizer = Vec::new();
    int_field(3, 0, &mut normalizer); // no dummy prefix
    bytes_field(3, &normalizer, &mut out);
    let tok = Tokenizer::from_bytes(&out).unwrap();
    let a = tok.token_to_id("a").unwrap();
    // A small stack: a recursive re-split of N nested merges would overflow it.
    let ids = std::thread::Builder::new()
        .stack_size(128 * 1024)
        .spawn(move || tok.encode(&"a".repeat(N), false))
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(ids, vec![a; N]);
}
