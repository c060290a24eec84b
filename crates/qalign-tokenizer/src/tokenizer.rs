//! The LLaMA SentencePiece BPE tokenizer: loading `tokenizer.model`, text → ids and ids → text.
//!
//! Q-Align's prompts must be tokenised exactly as the official Python stack does (sentencepiece
//! library / Hugging Face slow `LlamaTokenizer`, `legacy` on or off), because the scores are read
//! from the logits at the last prompt position. This module reproduces SentencePiece's normaliser
//! (identity rules, dummy prefix, whitespace escaping), its BPE merge order (see `bpe.rs`), byte
//! fallback, and its decoder.

use std::path::Path;

use prost::Message;
use rustc_hash::FxHashMap;

use crate::error::{Result, TokenizerError};
use crate::proto::{self, model_type, piece_type};

/// SentencePiece's whitespace symbol "▁" (U+2581).
pub const SPACE_SYMBOL: &str = "\u{2581}";

/// What a vocabulary entry is, as recorded in the model (`ModelProto.SentencePiece.Type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PieceKind {
    /// An ordinary piece produced by BPE merges.
    Normal,
    /// The unknown piece (`<unk>`).
    Unknown,
    /// A control piece (`<s>`, `</s>`): never produced from text by SentencePiece, invisible when decoding.
    Control,
    /// A user-defined piece: matched verbatim in the text and never merged further.
    UserDefined,
    /// An unused piece: merges through it are re-split into its two halves.
    Unused,
    /// A byte-fallback piece `<0xNN>`.
    Byte,
}

#[derive(Debug, Clone)]
pub(crate) struct Piece {
    pub text: Box<str>,
    pub score: f32,
    pub kind: PieceKind,
}

/// Piece text → id. FxHash (rustc's hash, from `rustc-hash`) is several times faster than SipHash
/// on the short piece strings looked up for every candidate merge; the tables are fixed at load
/// time from the model file, so hash flooding is not a concern.
pub(crate) type PieceMap = FxHashMap<Box<str>, u32>;

/// Normaliser switches from `NormalizerSpec` (the identity rule set is the only one supported).
#[derive(Debug, Clone, Copy)]
struct NormalizerOptions {
    add_dummy_prefix: bool,
    remove_extra_whitespaces: bool,
    escape_whitespaces: bool,
}

/// A loaded SentencePiece BPE model (for Q-Align: the 32000-piece LLaMA-2 vocabulary).
#[derive(Debug, Clone)]
pub struct Tokenizer {
    pub(crate) pieces: Vec<Piece>,
    /// SentencePiece's `pieces_`: normal, user-defined and unused pieces, the merge targets.
    pub(crate) mergeable: PieceMap,
    /// SentencePiece's `reserved_id_map_`: unknown, control and byte pieces.
    reserved: PieceMap,
    /// Whether any piece is UNUSED (only then do merges need re-splitting).
    pub(crate) has_unused: bool,
    /// User-defined pieces, longest first (matched before splitting into characters).
    pub(crate) user_defined: Vec<Box<str>>,
    /// Control and unknown pieces, longest first: the "special tokens" that Hugging Face's
    /// tokenizer recognises inside text (`<s>`, `</s>`, `<unk>` for LLaMA).
    special_tokens: Vec<(Box<str>, u32)>,
    /// Byte value → id of its `<0xNN>` piece, when byte fallback is on.
    byte_ids: Option<Box<[u32; 256]>>,
    normalizer: NormalizerOptions,
    unk_surface: String,
    unk_id: u32,
    bos_id: u32,
    eos_id: u32,
    pad_id: Option<u32>,
    /// Hugging Face's `legacy` flag: text after a special token also gets the dummy prefix.
    legacy: bool,
}

impl Tokenizer {
    /// Loads a SentencePiece `tokenizer.model` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| TokenizerError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&bytes, &path.display().to_string())
    }

    /// The LLaMA-2 vocabulary built into this crate (pieces, scores and types as in the released
    /// `tokenizer.model`; from llama.cpp's `ggml-vocab-llama-spm.gguf`, MIT, see
    /// `assets/LICENSE-llama.cpp.txt`). Used when a checkpoint folder ships no `tokenizer.model`.
    pub fn llama2_builtin() -> Self {
        static BYTES: &[u8] = include_bytes!("../assets/llama2-tokenizer.model");
        Self::parse(BYTES, "built-in LLaMA-2 tokenizer")
            .expect("the built-in tokenizer model parses")
    }

    /// Parses the bytes of a SentencePiece `tokenizer.model`.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        Self::parse(bytes, "tokenizer model bytes")
    }

    fn parse(bytes: &[u8], origin: &str) -> Result<Self> {
        let not_sp = |reason: String| TokenizerError::NotSentencePiece {
            origin: origin.to_string(),
            reason,
        };
        let unsupported = |reason: String| TokenizerError::Unsupported {
            origin: origin.to_string(),
            reason,
        };
        if bytes.is_empty() {
            return Err(not_sp("the file is empty".into()));
        }
        let model = proto::ModelProto::decode(bytes)
            .map_err(|e| not_sp(format!("protobuf decoding failed: {e}")))?;
        if model.pieces.is_empty() {
            return Err(not_sp("it has no vocabulary pieces".into()));
        }
        let trainer = model
            .trainer_spec
            .ok_or_else(|| not_sp("it has no trainer_spec".into()))?;
        match trainer.model_type.unwrap_or(model_type::UNIGRAM) {
            model_type::BPE => {}
            other => {
                let name = match other {
                    model_type::UNIGRAM => "unigram".to_string(),
                    model_type::WORD => "word".to_string(),
                    model_type::CHAR => "char".to_string(),
                    n => format!("unknown-type ({n})"),
                };
                return Err(TokenizerError::NotBpe {
                    origin: origin.to_string(),
                    model_type: name,
                });
            }
        }
        if trainer.treat_whitespace_as_suffix.unwrap_or(false) {
            return Err(unsupported("treat_whitespace_as_suffix".into()));
        }
        let normalizer_spec = model.normalizer_spec.unwrap_or_default();
        if normalizer_spec
            .precompiled_charsmap
            .as_ref()
            .is_some_and(|m| !m.is_empty())
        {
            let name = normalizer_spec.name.as_deref().unwrap_or("?");
            return Err(unsupported(format!(
                "normalisation rules ({name}); only the identity normaliser is implemented"
            )));
        }
        let normalizer = NormalizerOptions {
            add_dummy_prefix: normalizer_spec.add_dummy_prefix.unwrap_or(true),
            remove_extra_whitespaces: normalizer_spec.remove_extra_whitespaces.unwrap_or(true),
            escape_whitespaces: normalizer_spec.escape_whitespaces.unwrap_or(true),
        };
        let byte_fallback = trainer.byte_fallback.unwrap_or(false);

        let mut pieces = Vec::with_capacity(model.pieces.len());
        let mut mergeable =
            PieceMap::with_capacity_and_hasher(model.pieces.len(), Default::default());
        let mut reserved = PieceMap::default();
        let mut user_defined = Vec::new();
        let mut special_tokens = Vec::new();
        let mut byte_ids: Box<[Option<u32>; 256]> = Box::new([None; 256]);
        let mut unk_id = None;
        for (index, sp) in model.pieces.into_iter().enumerate() {
            let id =
                u32::try_from(index).map_err(|_| not_sp("more than 2^32 pieces".to_string()))?;
            let text: Box<str> = sp.piece.unwrap_or_default().into_boxed_str();
            if text.is_empty() {
                return Err(not_sp(format!("piece {id} is empty")));
            }
            let score = sp.score.unwrap_or(0.0);
            if score.is_nan() {
                return Err(not_sp(format!("piece {id} ({text:?}) has a NaN score")));
            }
            // -0.0 + 0.0 == +0.0: scores then compare by total order exactly as C++ `<` does.
            let score = score + 0.0;
            let kind = match sp.r#type.unwrap_or(piece_type::NORMAL) {
                piece_type::NORMAL => PieceKind::Normal,
                piece_type::UNKNOWN => PieceKind::Unknown,
                piece_type::CONTROL => PieceKind::Control,
                piece_type::USER_DEFINED => PieceKind::UserDefined,
                piece_type::UNUSED => PieceKind::Unused,
                piece_type::BYTE => PieceKind::Byte,
                n => {
                    return Err(not_sp(format!(
                        "piece {id} ({text:?}) has unknown type {n}"
                    )));
                }
            };
            let table = match kind {
                PieceKind::Normal | PieceKind::UserDefined | PieceKind::Unused => &mut mergeable,
                PieceKind::Unknown | PieceKind::Control | PieceKind::Byte => &mut reserved,
            };
            if table.insert(text.clone(), id).is_some() {
                return Err(not_sp(format!("piece {text:?} is defined twice")));
            }
            match kind {
                PieceKind::UserDefined => user_defined.push(text.clone()),
                PieceKind::Unknown => {
                    if unk_id.replace(id).is_some() {
                        return Err(not_sp("it has more than one unknown piece".into()));
                    }
                    special_tokens.push((text.clone(), id));
                }
                PieceKind::Control => special_tokens.push((text.clone(), id)),
                PieceKind::Byte => {
                    if !byte_fallback {
                        return Err(not_sp(format!(
                            "byte piece {text:?} found although byte_fallback is off"
                        )));
                    }
                    let byte = parse_byte_piece(&text)
                        .ok_or_else(|| not_sp(format!("invalid byte piece {text:?}")))?;
                    byte_ids[usize::from(byte)] = Some(id);
                }
                PieceKind::Normal | PieceKind::Unused => {}
            }
            pieces.push(Piece { text, score, kind });
        }
        let unk_id = unk_id.ok_or_else(|| not_sp("it has no unknown (<unk>) piece".into()))?;
        let byte_ids = if byte_fallback {
            let mut ids = Box::new([0u32; 256]);
            for (byte, id) in byte_ids.iter().enumerate() {
                ids[byte] = id.ok_or_else(|| {
                    not_sp(format!(
                        "byte_fallback is on but piece <0x{byte:02X}> is missing"
                    ))
                })?;
            }
            Some(ids)
        } else {
            None
        };
        let vocab_size = pieces.len();
        let special_id = |value: Option<i32>, default: i32, name: &str| -> Result<Option<u32>> {
            let value = value.unwrap_or(default);
            if value < 0 {
                return Ok(None);
            }
            match u32::try_from(value) {
                Ok(id) if (id as usize) < vocab_size => Ok(Some(id)),
                _ => Err(not_sp(format!(
                    "{name} {value} is outside the vocabulary of {vocab_size} pieces"
                ))),
            }
        };
        let require = |id: Option<u32>, name: &str| {
            id.ok_or_else(|| unsupported(format!("the model has no {name} piece")))
        };
        let bos_id = require(special_id(trainer.bos_id, 1, "bos_id")?, "BOS")?;
        let eos_id = require(special_id(trainer.eos_id, 2, "eos_id")?, "EOS")?;
        let pad_id = special_id(trainer.pad_id, -1, "pad_id")?;
        // The trainer_spec id must agree with the piece typed UNKNOWN.
        if let Some(spec_unk) = special_id(trainer.unk_id, 0, "unk_id")?
            && spec_unk != unk_id
        {
            return Err(not_sp(format!(
                "trainer_spec.unk_id is {spec_unk} but the unknown piece is {unk_id}"
            )));
        }

        let has_unused = pieces.iter().any(|p| p.kind == PieceKind::Unused);
        user_defined.sort_by_key(|s| std::cmp::Reverse(s.len()));
        special_tokens.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        Ok(Self {
            pieces,
            mergeable,
            reserved,
            has_unused,
            user_defined,
            special_tokens,
            byte_ids,
            normalizer,
            unk_surface: trainer
                .unk_surface
                .unwrap_or_else(|| " \u{2047} ".to_string()),
            unk_id,
            bos_id,
            eos_id,
            pad_id,
            legacy: false,
        })
    }

    /// Sets Hugging Face's `legacy` flag (`tokenizer_config.json`), which
    /// [`Tokenizer::encode_with_special_tokens`] follows. Off by default.
    pub fn with_legacy(mut self, legacy: bool) -> Self {
        self.legacy = legacy;
        self
    }

    /// Whether text after a special token gets the dummy prefix (Hugging Face's `legacy`).
    pub fn legacy(&self) -> bool {
        self.legacy
    }

    /// Number of pieces (32000 for LLaMA-2); every id produced is below it.
    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    /// Id of the begin-of-sequence control piece `<s>` (1 for LLaMA).
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// Id of the end-of-sequence control piece `</s>` (2 for LLaMA).
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Id of the unknown piece `<unk>` (0 for LLaMA; Q-Align training also pads with it).
    pub fn unk_id(&self) -> u32 {
        self.unk_id
    }

    /// Id of the padding piece, if the model defines one (LLaMA does not).
    pub fn pad_id(&self) -> Option<u32> {
        self.pad_id
    }

    /// Id of a piece given its exact text (for example `"▁good"` or `"<0x0A>"`).
    pub fn token_to_id(&self, piece: &str) -> Option<u32> {
        self.reserved
            .get(piece)
            .or_else(|| self.mergeable.get(piece))
            .copied()
    }

    /// Text of the piece with this id, as stored in the model (with "▁" for spaces).
    pub fn id_to_piece(&self, id: u32) -> Option<&str> {
        self.pieces.get(id as usize).map(|p| &*p.text)
    }

    /// Kind of the piece with this id.
    pub fn piece_kind(&self, id: u32) -> Option<PieceKind> {
        self.pieces.get(id as usize).map(|p| p.kind)
    }

    /// BPE score of the piece with this id (higher merges first).
    pub fn piece_score(&self, id: u32) -> Option<f32> {
        self.pieces.get(id as usize).map(|p| p.score)
    }

    /// Encodes text exactly like the sentencepiece library (`sp.encode(text)`), optionally with
    /// BOS in front: the dummy prefix "▁" is added to non-empty text, spaces become "▁", pieces
    /// are merged by score, and characters outside the vocabulary fall back to `<0xNN>` bytes.
    /// Strings such as `"</s>"` in the text are ordinary characters here; see
    /// [`Tokenizer::encode_with_special_tokens`] for the Hugging Face behaviour.
    pub fn encode(&self, text: &str, add_bos: bool) -> Vec<u32> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 2);
        if add_bos {
            ids.push(self.bos_id);
        }
        self.encode_piece_run(text, self.normalizer.add_dummy_prefix, &mut ids);
        ids
    }

    /// Encodes text like Hugging Face's slow `LlamaTokenizer` does for `tokenizer(text).input_ids`
    /// (what the official Q-Align code calls): the strings of the control and unknown pieces
    /// (`<s>`, `</s>`, `<unk>`) inside the text become those ids, and the text before the first
    /// of them gets the dummy prefix. Text after one gets it too only with
    /// [`Tokenizer::with_legacy`] (`"a</s>b"` ends in `▁b` with `legacy=true`, in `b` without).
    /// For text without such strings this equals [`Tokenizer::encode`].
    pub fn encode_with_special_tokens(&self, text: &str, add_bos: bool) -> Vec<u32> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 2);
        if add_bos {
            ids.push(self.bos_id);
        }
        let mut rest = text;
        let mut at_start = true;
        while !rest.is_empty() {
            let (before, special) = self.split_at_special_token(rest);
            let prefix = (at_start || self.legacy) && self.normalizer.add_dummy_prefix;
            self.encode_piece_run(before, prefix, &mut ids);
            at_start = false;
            match special {
                Some((id, len)) => {
                    ids.push(id);
                    rest = &rest[before.len() + len..];
                }
                None => break,
            }
        }
        ids
    }

    /// Finds the leftmost (then longest) special-token string; returns the text before it and
    /// the token's (id, byte length).
    fn split_at_special_token<'t>(&self, text: &'t str) -> (&'t str, Option<(u32, usize)>) {
        if self.special_tokens.is_empty() {
            return (text, None);
        }
        for (pos, _) in text.char_indices() {
            let tail = &text[pos..];
            if let Some((piece, id)) = self
                .special_tokens
                .iter()
                .find(|(piece, _)| tail.starts_with(&**piece))
            {
                return (&text[..pos], Some((*id, piece.len())));
            }
        }
        (text, None)
    }

    /// Normalises and BPE-encodes one run of plain text, appending ids.
    fn encode_piece_run(&self, text: &str, add_dummy_prefix: bool, ids: &mut Vec<u32>) {
        let normalized = self.normalize(text, add_dummy_prefix);
        if normalized.is_empty() {
            return;
        }
        for range in self.bpe_segments(&normalized) {
            let piece = &normalized[range];
            match self.token_to_id(piece) {
                Some(id) => ids.push(id),
                None => match &self.byte_ids {
                    Some(byte_ids) => {
                        ids.extend(piece.bytes().map(|b| byte_ids[usize::from(b)]));
                    }
                    None => ids.push(self.unk_id),
                },
            }
        }
    }

    /// SentencePiece's normaliser with an empty rule set: optional dummy prefix, optional
    /// whitespace collapsing, ' ' → "▁". Empty input (or all-space input when collapsing) stays empty.
    fn normalize(&self, text: &str, add_dummy_prefix: bool) -> String {
        let opts = self.normalizer;
        let text = if opts.remove_extra_whitespaces {
            text.trim_start_matches(' ')
        } else {
            text
        };
        if text.is_empty() {
            return String::new();
        }
        let space = if opts.escape_whitespaces {
            SPACE_SYMBOL
        } else {
            " "
        };
        let mut out = String::with_capacity(text.len() + 3 * (text.len() / 4 + 1));
        if add_dummy_prefix {
            out.push_str(space);
        }
        let mut prev_space = opts.remove_extra_whitespaces;
        for c in text.chars() {
            if c == ' ' {
                if !prev_space {
                    out.push_str(space);
                }
                prev_space = opts.remove_extra_whitespaces;
            } else {
                out.push(c);
                prev_space = false;
            }
        }
        if opts.remove_extra_whitespaces {
            while out.ends_with(space) {
                out.truncate(out.len() - space.len());
            }
        }
        out
    }

    /// Decodes ids like the sentencepiece library: byte pieces are reassembled into UTF-8 (each
    /// invalid byte becomes U+FFFD), "▁" becomes a space, the first piece's leading "▁" (the
    /// dummy prefix) is dropped, control pieces are invisible, `<unk>` is shown as " ⁇ ".
    /// Ids outside the vocabulary are shown like `<unk>`; use [`Tokenizer::try_decode`] to reject them.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut text = String::new();
        let mut pending_bytes = Vec::new();
        let mut expect_bos_space = true;
        let mut bos_space_seen = false;
        for &id in ids {
            let Some(piece) = self.pieces.get(id as usize) else {
                flush_bytes(&mut pending_bytes, &mut text);
                expect_bos_space = false;
                text.push_str(&self.unk_surface);
                continue;
            };
            if piece.kind == PieceKind::Byte {
                // `parse_byte_piece` succeeded at load time for every byte piece.
                if let Some(byte) = parse_byte_piece(&piece.text) {
                    pending_bytes.push(byte);
                }
                continue;
            }
            flush_bytes(&mut pending_bytes, &mut text);
            if bos_space_seen || !text.is_empty() {
                expect_bos_space = false;
            }
            bos_space_seen = false;
            match piece.kind {
                PieceKind::Control => {}
                PieceKind::Unknown => text.push_str(&self.unk_surface),
                _ => {
                    let mut surface: &str = &piece.text;
                    let strips_bos_space = self.normalizer.add_dummy_prefix
                        || self.normalizer.remove_extra_whitespaces;
                    if expect_bos_space
                        && strips_bos_space
                        && let Some(stripped) = surface.strip_prefix(SPACE_SYMBOL)
                    {
                        surface = stripped;
                        // With whitespace collapsing sentencepiece keeps stripping later pieces.
                        bos_space_seen = !self.normalizer.remove_extra_whitespaces;
                    }
                    push_unescaped(&mut text, surface);
                }
            }
        }
        flush_bytes(&mut pending_bytes, &mut text);
        text
    }

    /// Like [`Tokenizer::decode`], but an id outside the vocabulary is an error.
    pub fn try_decode(&self, ids: &[u32]) -> Result<String> {
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.pieces.len()) {
            return Err(TokenizerError::IdOutOfRange {
                id,
                vocab_size: self.pieces.len(),
            });
        }
        Ok(self.decode(ids))
    }
}

/// Parses `<0xNN>` (two upper- or lower-case hex digits) into the byte value.
fn parse_byte_piece(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// Appends a piece's surface with every "▁" turned back into a space.
fn push_unescaped(text: &mut String, surface: &str) {
    let mut parts = surface.split(SPACE_SYMBOL);
    if let Some(first) = parts.next() {
        text.push_str(first);
    }
    for part in parts {
        text.push(' ');
        text.push_str(part);
    }
}

/// Appends accumulated byte-fallback bytes as UTF-8, replacing each byte of an invalid sequence
/// with U+FFFD (one replacement per byte, as sentencepiece does).
fn flush_bytes(bytes: &mut Vec<u8>, text: &mut String) {
    let mut rest: &[u8] = bytes;
    while !rest.is_empty() {
        match std::str::from_utf8(rest) {
            Ok(valid) => {
                text.push_str(valid);
                break;
            }
            Err(err) => {
                let (valid, after) = rest.split_at(err.valid_up_to());
                // `valid` is valid UTF-8 by construction of `valid_up_to`.
                text.push_str(std::str::from_utf8(valid).unwrap_or_default());
                text.push(char::REPLACEMENT_CHARACTER);
                rest = &after[1..];
            }
        }
    }
    bytes.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_piece_names_parse() {
        assert_eq!(parse_byte_piece("<0x0A>"), Some(10));
        assert_eq!(parse_byte_piece("<0xff>"), Some(255));
        assert_eq!(parse_byte_piece("<0x100>"), None);
        assert_eq!(parse_byte_piece("0x0A"), None);
    }

    #[test]
    fn invalid_utf8_bytes_become_one_replacement_each() {
        let mut text = String::new();
        // A truncated 3-byte sequence (E2 82) then 'A', then a lone continuation byte.
        let mut bytes = vec![0xE2, 0x82, b'A', 0x80, 0xF0, 0x9F, 0x98, 0x80];
        flush_bytes(&mut bytes, &mut text);
        assert_eq!(text, "\u{FFFD}\u{FFFD}A\u{FFFD}\u{1F600}");
        assert!(bytes.is_empty());
    }
}
