//! The subset of SentencePiece's `sentencepiece_model.proto` (proto2) needed to encode and decode.
//! Hand-written prost messages instead of a build script: unknown fields (training metadata,
//! self-test data, denormalizer) are skipped by prost, and proto2 defaults are applied by the
//! loader, not here, so every field stays `Option`.

/// `sentencepiece.ModelProto` (fields 1..3; 4 and 5 are ignored).
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct ModelProto {
    #[prost(message, repeated, tag = "1")]
    pub pieces: Vec<SentencePiece>,
    #[prost(message, optional, tag = "2")]
    pub trainer_spec: Option<TrainerSpec>,
    #[prost(message, optional, tag = "3")]
    pub normalizer_spec: Option<NormalizerSpec>,
}

/// `ModelProto.SentencePiece`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct SentencePiece {
    #[prost(string, optional, tag = "1")]
    pub piece: Option<String>,
    #[prost(float, optional, tag = "2")]
    pub score: Option<f32>,
    /// `Type` enum (NORMAL = 1 by default); enums are varints on the wire, read as i32.
    #[prost(int32, optional, tag = "3")]
    pub r#type: Option<i32>,
}

/// `sentencepiece.TrainerSpec`: only the fields that change encoding or name special pieces.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct TrainerSpec {
    /// UNIGRAM = 1 (default), BPE = 2, WORD = 3, CHAR = 4.
    #[prost(int32, optional, tag = "3")]
    pub model_type: Option<i32>,
    #[prost(bool, optional, tag = "24")]
    pub treat_whitespace_as_suffix: Option<bool>,
    #[prost(bool, optional, tag = "35")]
    pub byte_fallback: Option<bool>,
    #[prost(int32, optional, tag = "40")]
    pub unk_id: Option<i32>,
    #[prost(int32, optional, tag = "41")]
    pub bos_id: Option<i32>,
    #[prost(int32, optional, tag = "42")]
    pub eos_id: Option<i32>,
    #[prost(int32, optional, tag = "43")]
    pub pad_id: Option<i32>,
    #[prost(string, optional, tag = "44")]
    pub unk_surface: Option<String>,
}

/// `sentencepiece.NormalizerSpec`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct NormalizerSpec {
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    #[prost(bytes = "vec", optional, tag = "2")]
    pub precompiled_charsmap: Option<Vec<u8>>,
    #[prost(bool, optional, tag = "3")]
    pub add_dummy_prefix: Option<bool>,
    #[prost(bool, optional, tag = "4")]
    pub remove_extra_whitespaces: Option<bool>,
    #[prost(bool, optional, tag = "5")]
    pub escape_whitespaces: Option<bool>,
}

/// `ModelProto.SentencePiece.Type` values.
pub(crate) mod piece_type {
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const UNUSED: i32 = 5;
    pub const BYTE: i32 = 6;
}

/// `TrainerSpec.ModelType` values.
pub(crate) mod model_type {
    pub const UNIGRAM: i32 = 1;
    pub const BPE: i32 = 2;
    pub const WORD: i32 = 3;
    pub const CHAR: i32 = 4;
}
