//! Golden tests: every id list in tests/fixtures/tokenizer/ and the training tokenisation in
//! tests/fixtures/training/expected.json, produced by the official Python stack.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use qalign_tokenizer::prompts::{
    self, EVAL_SCRIPT_LOGGED_WORDS, aesthetics_eval_script_prompt, quality_eval_script_prompt,
    score_method_prompt_repo_variant,
};
use qalign_tokenizer::{
    IGNORE_INDEX, IMAGE_TOKEN_INDEX, LEVEL_WORDS, MODEL_MAX_LENGTH, MediaKind, Message, PieceKind,
    Task, Tokenizer, TokenizerError, level_token_ids, scorer_prompt, single_turn_training_text,
    tokenize_for_training, tokenize_with_image, vicuna_v1_prompt,
};
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures"))
}

/// The one committed copy of the LLaMA-2 `tokenizer.model`: the crate's bundled asset
/// (`tests/fixtures/tiny-onealign/tokenizer.model` is a symbolic link to it).
fn model_file() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/assets/llama2-tokenizer.model"
    ))
}

fn tokenizer() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| Tokenizer::from_file(&model_file()).unwrap())
}

fn read_json(relative: &str) -> Value {
    let text = std::fs::read_to_string(fixtures().join(relative)).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids_u32(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| u32::try_from(v.as_u64().unwrap()).unwrap())
        .collect()
}

fn ids_i64(value: &Value) -> Vec<i64> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect()
}

#[test]
fn model_metadata() {
    fn shareable<T: Send + Sync>() {}
    shareable::<Tokenizer>();
    let tok = tokenizer();
    assert_eq!(tok.vocab_size(), 32000);
    assert_eq!((tok.unk_id(), tok.bos_id(), tok.eos_id()), (0, 1, 2));
    assert_eq!(tok.pad_id(), None);
    assert_eq!(tok.id_to_piece(29871), Some("▁"));
    assert_eq!(tok.id_to_piece(13), Some("<0x0A>"));
    assert_eq!(tok.token_to_id("▁good"), Some(1781));
    assert_eq!(tok.token_to_id("</s>"), Some(2));
    assert_eq!(tok.token_to_id("not a piece"), None);
    assert_eq!(tok.piece_kind(1), Some(PieceKind::Control));
    assert_eq!(tok.piece_kind(0), Some(PieceKind::Unknown));
    assert_eq!(tok.piece_kind(3), Some(PieceKind::Byte));
    assert_eq!(tok.piece_kind(258), Some(PieceKind::Byte));
    assert_eq!(tok.piece_kind(259), Some(PieceKind::Normal));
    assert_eq!(tok.id_to_piece(32000), None);
}

#[test]
fn llama_spm_test_vectors_encode_exactly() {
    let tok = tokenizer();
    let cases = read_json("tokenizer/llama_spm_tests.json");
    let cases = cases.as_array().unwrap();
    assert_eq!(cases.len(), 46);
    let mut failures = Vec::new();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let expected = ids_u32(&case["ids"]);
        let pieces: Vec<&str> = case["pieces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap())
            .collect();
        // The vectors were made without BOS, with the dummy prefix applied.
        let got = tok.encode(text, false);
        if got != expected {
            failures.push(format!("{text:?}: got {got:?}, expected {expected:?}"));
        }
        // The Hugging Face path agrees (no special-token strings in these texts).
        assert_eq!(tok.encode_with_special_tokens(text, false), got, "{text:?}");
        // With BOS: the same ids after a 1.
        let with_bos = tok.encode(text, true);
        assert_eq!(with_bos[0], 1);
        assert_eq!(&with_bos[1..], &got[..]);
        // The recorded pieces are the vocabulary strings of the ids.
        let got_pieces: Vec<&str> = expected
            .iter()
            .map(|&id| tok.id_to_piece(id).unwrap())
            .collect();
        assert_eq!(got_pieces, pieces, "{text:?}");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn llama_spm_inp_out_files_agree_with_json() {
    // The .inp/.out pair is the same data in llama.cpp's format: check we read the same cases.
    let inp = std::fs::read_to_string(fixtures().join("tokenizer/llama_spm_tests.inp")).unwrap();
    let out = std::fs::read_to_string(fixtures().join("tokenizer/llama_spm_tests.out")).unwrap();
    // Each text is followed by "\n__ggml_vocab_test__\n" (so an empty text is just that line).
    let texts: Vec<&str> = inp.split_terminator("\n__ggml_vocab_test__\n").collect();
    assert_eq!(texts.len(), 46);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 46);
    let tok = tokenizer();
    for (text, line) in texts.iter().zip(&lines) {
        let expected: Vec<u32> = line
            .split_whitespace()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(tok.encode(text, false), expected, "{text:?}");
    }
}

#[test]
fn empty_and_whitespace_only_texts() {
    let tok = tokenizer();
    // Empty text gets no dummy prefix; whitespace-only text does.
    assert_eq!(tok.encode("", false), Vec::<u32>::new());
    assert_eq!(tok.encode("", true), vec![1]);
    assert_eq!(tok.encode(" ", false), vec![259]); // "▁▁"
    assert_eq!(tok.encode("\n", false), vec![29871, 13]);
    assert_eq!(tok.decode(&[259]), " ");
    assert_eq!(tok.decode(&[29871, 13]), "\n");
}

#[test]
fn qalign_prompts_by_name_and_by_text() {
    let tok = tokenizer();
    let fixture = read_json("tokenizer/qalign_prompts.json");
    assert_eq!(fixture["image_token_id"].as_i64(), Some(IMAGE_TOKEN_INDEX));
    assert_eq!(fixture["bos_id"].as_u64(), Some(u64::from(tok.bos_id())));
    assert_eq!(fixture["eos_id"].as_u64(), Some(u64::from(tok.eos_id())));
    assert_eq!(fixture["unk_id"].as_u64(), Some(u64::from(tok.unk_id())));

    let prompts = fixture["prompts"].as_object().unwrap();
    assert_eq!(prompts.len(), 7);
    for (name, entry) in prompts {
        let text = entry["text"].as_str().unwrap();
        assert_eq!(
            tokenize_with_image(tok, text),
            ids_i64(&entry["input_ids"]),
            "prompt {name}"
        );
    }
    let by_text = fixture["by_text"].as_object().unwrap();
    assert_eq!(by_text.len(), 7);
    for (text, ids) in by_text {
        assert_eq!(tokenize_with_image(tok, text), ids_i64(ids), "{text:?}");
    }

    // The prompt builders give exactly the fixture strings.
    let text_of = |name: &str| prompts[name]["text"].as_str().unwrap().to_string();
    assert_eq!(
        scorer_prompt(Task::Quality, MediaKind::Image),
        text_of("quality")
    );
    assert_eq!(
        scorer_prompt(Task::Aesthetics, MediaKind::Image),
        text_of("aesthetics")
    );
    assert_eq!(
        scorer_prompt(Task::Quality, MediaKind::Video),
        text_of("video_quality")
    );
    assert_eq!(
        score_method_prompt_repo_variant(Task::Quality, MediaKind::Image),
        text_of("score_method_quality_image")
    );
    assert_eq!(
        score_method_prompt_repo_variant(Task::Aesthetics, MediaKind::Image),
        text_of("score_method_aesthetics_image")
    );
    assert_eq!(
        score_method_prompt_repo_variant(Task::Quality, MediaKind::Video),
        text_of("score_method_quality_video")
    );
    assert_eq!(
        single_turn_training_text(
            "How would you rate the quality of this image?\n<|image|>",
            "The quality of the image is good."
        ),
        text_of("train_example_vicuna_v1")
    );
}

#[test]
fn level_token_ids_match_fixture() {
    let tok = tokenizer();
    let fixture = read_json("tokenizer/qalign_prompts.json");
    let words: Vec<&str> = fixture["level_words"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap())
        .collect();
    assert_eq!(words, LEVEL_WORDS);
    let ids = level_token_ids(tok, &LEVEL_WORDS).unwrap();
    assert_eq!(ids, ids_u32(&fixture["level_token_ids"]));
    assert_eq!(ids, [15129, 1781, 6534, 6460, 4319]);
    let pieces: Vec<&str> = ids.iter().map(|&id| tok.id_to_piece(id).unwrap()).collect();
    let expected_pieces: Vec<&str> = fixture["level_token_pieces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(pieces, expected_pieces);

    // The 13 words logged by the eval scripts (spec §5.2); "moderate" is "▁moder" + "ate".
    assert_eq!(
        level_token_ids(tok, &EVAL_SCRIPT_LOGGED_WORDS).unwrap(),
        [
            1781, 6460, 1880, 6534, 4482, 15129, 4319, 2691, 17768, 27189, 6588, 18350, 22691
        ]
    );
    assert!(matches!(
        level_token_ids(tok, &["good", ""]),
        Err(TokenizerError::EmptyWord { word }) if word.is_empty()
    ));
}

#[test]
fn eval_script_prompts_match_spec_ids() {
    let tok = tokenizer();
    // Spec §5.3, iqa_eval.py.
    let iqa = quality_eval_script_prompt(MediaKind::Image);
    assert_eq!(
        iqa,
        "USER: How would you rate the quality of this image?\n<|image|> ASSISTANT: The quality of the image is"
    );
    assert_eq!(
        tokenize_with_image(tok, &iqa),
        [
            1, 3148, 1001, 29901, 1128, 723, 366, 6554, 278, 11029, 310, 445, 1967, 29973, 13,
            -200, 29871, 319, 1799, 9047, 13566, 29901, 450, 11029, 310, 278, 1967, 338
        ]
    );
    // vqa_eval.py: the same with "video" (4863) in both places.
    let vqa_ids = tokenize_with_image(tok, &quality_eval_script_prompt(MediaKind::Video));
    let mut expected_vqa = tokenize_with_image(tok, &iqa);
    for id in &mut expected_vqa {
        if *id == 1967 {
            *id = 4863;
        }
    }
    assert_eq!(vqa_ids, expected_vqa);
    // iaa_eval.py.
    let iaa = aesthetics_eval_script_prompt();
    assert_eq!(
        iaa,
        "USER: <|image|>How would you rate the aesthetics of this image? ASSISTANT: The aesthetics of the image is"
    );
    assert_eq!(
        tokenize_with_image(tok, &iaa),
        [
            1, 3148, 1001, 29901, 29871, -200, 1128, 723, 366, 6554, 278, 263, 342, 9188, 1199,
            310, 445, 1967, 29973, 319, 1799, 9047, 13566, 29901, 450, 263, 342, 9188, 1199, 310,
            278, 1967, 338
        ]
    );
    // A custom question in the scorer layout tokenises like the built-in one.
    assert_eq!(
        prompts::custom_scorer_prompt(
            &prompts::question(Task::Quality, MediaKind::Image),
            &prompts::answer_prefix(Task::Quality, MediaKind::Image)
        ),
        scorer_prompt(Task::Quality, MediaKind::Image)
    );
}

#[test]
fn image_marker_edge_cases_follow_the_official_code() {
    let tok = tokenizer();
    assert_eq!(tokenize_with_image(tok, ""), Vec::<i64>::new());
    assert_eq!(tokenize_with_image(tok, "<|image|>"), vec![-200]);
    // Leading marker: the first chunk is empty, so later chunks keep their BOS.
    assert_eq!(
        tokenize_with_image(tok, "<|image|>Hello"),
        vec![-200, 1, 15043]
    );
    assert_eq!(
        tokenize_with_image(tok, "Hello<|image|>"),
        vec![1, 15043, -200]
    );
    // A chunk starting with a space or newline yields a lone "▁" (29871) first.
    assert_eq!(
        tokenize_with_image(tok, "Hello<|image|> Hello"),
        vec![1, 15043, -200, 29871, 15043]
    );
    assert_eq!(
        tokenize_with_image(tok, "Hello<|image|><|image|>Hello"),
        vec![1, 15043, -200, -200, 15043]
    );
}

#[test]
fn special_token_strings_follow_hugging_face() {
    let tok = tokenizer();
    // sentencepiece treats "</s>" as characters; HF (what the official code calls) as EOS.
    assert_ne!(tok.encode("good.</s>", false), vec![1781, 29889, 2]);
    assert_eq!(
        tok.encode_with_special_tokens("good.</s>", false),
        vec![1781, 29889, 2]
    );
    // legacy=false: no dummy prefix after a special token; a leading special token has none.
    assert_eq!(
        tok.encode_with_special_tokens("</s>Hello", false),
        vec![2, tok.token_to_id("Hello").unwrap()]
    );
    assert_eq!(
        tok.encode_with_special_tokens("</s> Hello", false),
        vec![2, 15043]
    );
    assert_eq!(tok.encode_with_special_tokens("<s>", true), vec![1, 1]);
    assert_eq!(tok.decode(&[1, 15043, 2]), "Hello");
}

fn unpadded_rows(expected: &Value, key: &str) -> Vec<Vec<i64>> {
    let masks = expected["attention_mask"].as_array().unwrap();
    expected[key]
        .as_array()
        .unwrap()
        .iter()
        .zip(masks)
        .map(|(row, mask)| {
            let n = mask
                .as_array()
                .unwrap()
                .iter()
                .filter(|m| m.as_i64() == Some(1))
                .count();
            ids_i64(row)[..n].to_vec()
        })
        .collect()
}

#[test]
fn training_batch_tokenisation_and_labels() {
    let tok = tokenizer();
    let expected = read_json("training/expected.json");
    let batch = read_json("training/sft_batch.json");
    let conversations: Vec<&str> = expected["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    let input_rows = unpadded_rows(&expected, "input_ids");
    let label_rows = unpadded_rows(&expected, "labels");
    let samples = batch.as_array().unwrap();
    assert_eq!(samples.len(), 3);
    let mut n_targets = 0;
    for (i, sample) in samples.iter().enumerate() {
        let messages: Vec<Message> =
            serde_json::from_value(sample["conversations"].clone()).unwrap();
        let text = vicuna_v1_prompt(&messages).unwrap();
        assert_eq!(text, conversations[i], "sample {i}");
        let tokens = tokenize_for_training(tok, &text, MODEL_MAX_LENGTH);
        assert!(!tokens.length_mismatch, "sample {i}");
        assert_eq!(tokens.input_ids, input_rows[i], "sample {i} input_ids");
        assert_eq!(tokens.labels, label_rows[i], "sample {i} labels");
        n_targets += tokens.labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
    }
    // Targets are predicted from the previous position, so the first label is never a target.
    assert_eq!(
        n_targets as u64,
        expected["n_target_tokens"].as_u64().unwrap()
    );
}

#[test]
fn training_mask_mismatch_masks_everything() {
    let tok = tokenizer();
    // A "<unk>" in the text is id 0 = pad id, so the official length check fails.
    let text = single_turn_training_text(
        "<unk> Rate it.\n<|image|>",
        "The quality of the image is good.",
    );
    let tokens = tokenize_for_training(tok, &text, MODEL_MAX_LENGTH);
    assert!(tokens.length_mismatch);
    assert!(tokens.labels.iter().all(|&l| l == IGNORE_INDEX));
    assert_eq!(tokens.labels.len(), tokens.input_ids.len());
}

#[test]
fn load_errors_are_clear() {
    let missing = Path::new("/nonexistent/tokenizer.model");
    let err = Tokenizer::from_file(missing).unwrap_err();
    assert!(matches!(err, TokenizerError::Io { .. }));
    assert!(
        err.to_string().contains("/nonexistent/tokenizer.model"),
        "{err}"
    );

    let json = fixtures().join("tiny-onealign/config.json");
    let err = Tokenizer::from_file(&json).unwrap_err();
    assert!(
        matches!(err, TokenizerError::NotSentencePiece { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("config.json"), "{err}");

    let err = Tokenizer::from_bytes(&[]).unwrap_err();
    assert!(
        matches!(err, TokenizerError::NotSentencePiece { .. }),
        "{err}"
    );

    // The real model with trainer_spec.model_type rewritten to UNIGRAM (1).
    let bytes = std::fs::read(model_file()).unwrap();
    let unigram = with_model_type(&bytes, 1);
    let err = Tokenizer::from_bytes(&unigram).unwrap_err();
    assert!(
        matches!(&err, TokenizerError::NotBpe { model_type, .. } if model_type == "unigram"),
        "{err}"
    );
    // Sanity: rewriting to BPE (2) gives a working tokenizer again.
    let bpe = Tokenizer::from_bytes(&with_model_type(&bytes, 2)).unwrap();
    assert_eq!(bpe.encode("Hello world", false), vec![15043, 3186]);
}

/// Re-serialises the model with a `trainer_spec.model_type` field appended (protobuf: the last
/// occurrence of a scalar field wins, and a repeated message field merges).
fn with_model_type(model: &[u8], model_type: u8) -> Vec<u8> {
    let mut out = model.to_vec();
    // Field 2 (trainer_spec), wire type 2, length 2: field 3 varint = model_type.
    out.extend_from_slice(&[0x12, 0x02, 0x18, model_type]);
    out
}

#[test]
fn tiny_onealign_ships_the_same_tokenizer() {
    // The tiny model folder keeps the release layout through a link to the bundled asset, so the
    // 500 KB file is committed once.
    let linked = fixtures().join("tiny-onealign/tokenizer.model");
    assert!(
        std::fs::symlink_metadata(&linked)
            .unwrap()
            .file_type()
            .is_symlink(),
        "{} should link to the bundled asset, not be a copy",
        linked.display()
    );
    let a = std::fs::read(model_file()).unwrap();
    let b = std::fs::read(&linked).unwrap();
    assert_eq!(a, b);
}

#[test]
fn no_piece_has_a_space_symbol_after_other_text() {
    // Hugging Face (legacy=false) encodes "<unk>" + text and drops the "<unk>" pieces; that equals
    // plain sentencepiece encoding only if no merge can span the ">" / "▁" boundary, i.e. no
    // piece has "▁" after a non-"▁" character. `encode_with_special_tokens` relies on this.
    let tok = tokenizer();
    for id in 0..tok.vocab_size() as u32 {
        let piece = tok.id_to_piece(id).unwrap();
        let trimmed = piece.trim_start_matches('▁');
        assert!(!trimmed.contains('▁'), "piece {id} {piece:?}");
    }
}

#[test]
fn multi_round_conversations_mask_every_instruction() {
    // The final official rule (cur_len = 2, round_len − 1 per round) balances for later rounds
    // because "USER" right after "</s>" has no dummy prefix and is one piece (11889) instead of
    // "▁US" "ER" when the round is tokenised alone.
    let tok = tokenizer();
    let messages = [
        Message::human("How would you rate the quality of this image?\n<|image|>"),
        Message::gpt("The quality of the image is good."),
        Message::human("And its aesthetics?"),
        Message::gpt("The aesthetics of the image is fair."),
    ];
    let text = vicuna_v1_prompt(&messages).unwrap();
    assert!(text.ends_with(
        "good.</s>USER: And its aesthetics? ASSISTANT: The aesthetics of the image is fair.</s>"
    ));
    let tokens = tokenize_for_training(tok, &text, MODEL_MAX_LENGTH);
    assert!(!tokens.length_mismatch);
    let targets: Vec<i64> = tokens
        .labels
        .iter()
        .copied()
        .filter(|&l| l != IGNORE_INDEX)
        .collect();
    let answer =
        |s: &str| -> Vec<i64> { tok.encode(s, false).into_iter().map(i64::from).collect() };
    let mut expected = answer("The quality of the image is good.");
    expected.push(2);
    expected.extend(answer("The aesthetics of the image is fair."));
    expected.push(2);
    assert_eq!(targets, expected);
    // Every target sits at its own id's position.
    for (id, label) in tokens.input_ids.iter().zip(&tokens.labels) {
        assert!(*label == IGNORE_INDEX || label == id);
    }
}

#[test]
fn builtin_llama2_vocabulary_equals_the_fixture_model() {
    let builtin = qalign_tokenizer::Tokenizer::llama2_builtin();
    let file =
        qalign_tokenizer::Tokenizer::from_file(&fixtures().join("tiny-onealign/tokenizer.model"))
            .unwrap();
    assert_eq!(builtin.vocab_size(), 32000);
    let text = "USER: How would you rate the quality of this image?\nASSISTANT: The quality is";
    assert_eq!(builtin.encode(text, true), file.encode(text, true));
    assert_eq!(
        qalign_tokenizer::level_token_ids(&builtin, &qalign_tokenizer::LEVEL_WORDS).unwrap(),
        vec![15129, 1781, 6534, 6460, 4319]
    );
}

#[test]
fn every_piece_text_maps_back_to_its_id() {
    // The piece tables (rustc-hash FxHashMap) hold all 32000 pieces, each under its own text.
    let tok = tokenizer();
    for id in 0..tok.vocab_size() as u32 {
        let piece = tok.id_to_piece(id).unwrap();
        assert_eq!(tok.token_to_id(piece), Some(id), "{piece:?}");
    }
}
