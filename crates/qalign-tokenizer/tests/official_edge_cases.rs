//! Edge cases pinned to the official tokenizer's own output: whitespace runs, CR/LF, tabs,
//! special-token strings, NFC vs NFD, ZWJ emoji, RTL, byte fallback and custom-question prompts.
//!
//! A custom `--question` is tokenised with the same code as the official prompts, so these
//! catch a drift that the fixed official prompts (plain ASCII) would not. Every id list was
//! pasted from `AutoTokenizer.from_pretrained(tiny-onealign, use_fast=False)` (transformers
//! 4.36.1, sentencepiece 0.2.2, `legacy=false`) with the official `tokenizer_image_token`, and
//! every decoded string from `sentencepiece.SentencePieceProcessor.decode` (0.1.99 and 0.2.2 agree).

use std::sync::OnceLock;

use qalign_tokenizer::conversation::IGNORE_INDEX;
use qalign_tokenizer::{
    MODEL_MAX_LENGTH, Message, Tokenizer, custom_scorer_prompt, tokenize_for_training,
    tokenize_with_image, vicuna_v1_prompt,
};

fn tokenizer() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(Tokenizer::llama2_builtin)
}

/// `tokenizer(text).input_ids` of the official slow tokenizer (BOS added).
#[test]
fn text_encodes_like_the_official_slow_tokenizer() {
    let cases: &[(&str, &[u32])] = &[
        (
            "  two leading, two trailing  ",
            &[1, 259, 1023, 8236, 29892, 1023, 25053, 259],
        ),
        (
            "tab\there\r\nCRLF",
            &[1, 4434, 12, 4150, 30004, 13, 29907, 2241, 29943],
        ),
        ("\n\nUSER", &[1, 29871, 13, 13, 11889]),
        // Special-token strings become their ids; the fast tokenizer gives other ids for these
        // (it adds a "▁" after a special token), but the official scorers load the slow one.
        ("a </s> b", &[1, 263, 29871, 2, 289]),
        ("<s> ", &[1, 1, 29871]),
        ("<<s>>", &[1, 529, 1, 29958]),
        ("x<unk> y", &[1, 921, 0, 343]),
        ("</s>there", &[1, 2, 12711]),
        // A literal "▁" in the text is a space.
        ("\u{2581}good", &[1, 29871, 1781]),
        ("a\u{2581}\u{2581}b", &[1, 263, 29871, 289]),
        // No Unicode normalisation: NFC and NFD give different ids.
        (
            "\u{c5}ngstr\u{f6}m caf\u{e9}",
            &[1, 11260, 865, 25961, 274, 28059],
        ),
        (
            "A\u{30a}ngstro\u{308}m cafe\u{301}",
            &[
                1, 319, 207, 141, 865, 303, 307, 31719, 29885, 5777, 1725, 30103,
            ],
        ),
        (
            "\u{1f468}\u{200d}\u{1f469}\u{200d}\u{1f467} \u{1f3f3}\u{fe0f}\u{200d}\u{1f308}",
            &[
                1, 29871, 243, 162, 148, 171, 30722, 243, 162, 148, 172, 30722, 243, 162, 148, 170,
                29871, 243, 162, 146, 182, 30598, 30722, 243, 162, 143, 139,
            ],
        ),
        ("\u{200b}\u{200d}\u{feff}", &[1, 29871, 30166, 30722, 30143]),
        (
            "\u{5e9}\u{5dc}\u{5d5}\u{5dd} \u{645}\u{631}\u{62d}\u{628}\u{627} \u{202e}",
            &[
                1, 29871, 30294, 30249, 30205, 30404, 29871, 30159, 30156, 30240, 30177, 30112,
                29871, 229, 131, 177,
            ],
        ),
        (
            "\u{4e2d}\u{6587} \u{65e5}\u{672c}\u{8a9e} \u{d55c}\u{ad6d}\u{c5b4}",
            &[
                1, 29871, 30275, 30333, 29871, 30325, 30346, 30968, 29871, 30877, 31293, 31129,
            ],
        ),
        // Byte fallback, including NUL and DEL.
        (
            "\u{10ffff}\u{e000}\u{0}\u{7f}",
            &[1, 29871, 247, 146, 194, 194, 241, 131, 131, 3, 130],
        ),
        (
            "\u{fb01}\u{2460}\u{ff21}",
            &[1, 29871, 31017, 229, 148, 163, 242, 191, 164],
        ),
        // Byte-piece names and a broken marker are plain text.
        ("<0x0A>", &[1, 529, 29900, 29916, 29900, 29909, 29958]),
        ("<|image| >", &[1, 529, 29989, 3027, 29989, 1405]),
    ];
    let tok = tokenizer();
    for (text, want) in cases {
        assert_eq!(
            tok.encode_with_special_tokens(text, true),
            *want,
            "{text:?}"
        );
        assert_eq!(
            tokenize_with_image(tok, text),
            want.iter().map(|&id| i64::from(id)).collect::<Vec<_>>(),
            "{text:?}"
        );
    }
}

/// `tokenizer_image_token("USER: {q}\n<|image|>\nASSISTANT: {a}")`, the layout `qalign score
/// --question Q --answer-prefix A` uses.
#[test]
fn custom_question_prompts_match_the_official_ids() {
    let cases: &[(&str, &str, &[i64])] = &[
        // The README's example.
        (
            "How clear is this image?",
            "The clarity of the image is",
            &[
                1, 3148, 1001, 29901, 1128, 2821, 338, 445, 1967, 29973, 13, -200, 29871, 13,
                22933, 9047, 13566, 29901, 450, 7542, 537, 310, 278, 1967, 338,
            ],
        ),
        // Spaces and newlines are kept verbatim; a trailing space ends the prompt with "▁".
        (
            "  Is it sharp?\n",
            "It is ",
            &[
                1, 3148, 1001, 29901, 259, 1317, 372, 15301, 29973, 13, 13, -200, 29871, 13, 22933,
                9047, 13566, 29901, 739, 338, 29871,
            ],
        ),
        (
            "Rate </s> this",
            "<s>It is",
            &[
                1, 3148, 1001, 29901, 390, 403, 29871, 2, 445, 13, -200, 29871, 13, 22933, 9047,
                13566, 29901, 29871, 1, 3112, 338,
            ],
        ),
        (
            "\u{8fd9}\u{5f20}\u{56fe}\u{7247}\u{6e05}\u{6670}\u{5417}\u{ff1f}",
            "\u{7b54}\u{6848}\u{662f}",
            &[
                1, 3148, 1001, 29901, 29871, 30810, 31328, 30861, 31122, 30989, 233, 156, 179, 232,
                147, 154, 30882, 13, -200, 29871, 13, 22933, 9047, 13566, 29901, 29871, 234, 176,
                151, 233, 164, 139, 30392,
            ],
        ),
        (
            "Emoji \u{1f600}?\r\n",
            "\tThe rating is",
            &[
                1, 3148, 1001, 29901, 2812, 29877, 2397, 29871, 243, 162, 155, 131, 29973, 30004,
                13, 13, -200, 29871, 13, 22933, 9047, 13566, 29901, 29871, 12, 1576, 21700, 338,
            ],
        ),
    ];
    let tok = tokenizer();
    for (question, answer_prefix, want) in cases {
        let prompt = custom_scorer_prompt(question, answer_prefix);
        assert_eq!(tokenize_with_image(tok, &prompt), *want, "{prompt:?}");
    }
}

/// `sentencepiece` decoding: control pieces vanish, `<unk>` is " ⁇ ", the dummy-prefix space
/// of the first piece is dropped, invalid UTF-8 from byte pieces becomes U+FFFD.
#[test]
fn decode_matches_sentencepiece() {
    let cases: &[(&[u32], &str)] = &[
        (&[1, 29871, 13, 22933, 2, 29871, 15043], "\nASS  Hello"),
        (&[0, 3148, 1, 2, 259, 29871], " \u{2047}  US   "),
        (&[228, 191, 163, 29871, 228], "\u{1f20} \u{fffd}"),
        (&[29871, 29871, 1781], "  good"),
        (&[13, 29871, 4319, 2, 15129], "\n  bad excellent"),
        (&[243, 162, 155, 131, 1781], "\u{1f600} good"),
    ];
    let tok = tokenizer();
    for (ids, want) in cases {
        assert_eq!(tok.decode(ids), *want, "{ids:?}");
    }
}

/// Hugging Face's `legacy` flag: `tokenizer(text).input_ids` of the official slow tokenizer with
/// `legacy` false and true (transformers 4.36.1), for text with special-token strings, the only
/// text where the flag matters (the official prompts are the same either way).
#[test]
fn legacy_flag_changes_text_after_special_tokens_as_the_official_tokenizer_does() {
    let modern = tokenizer();
    let legacy = Tokenizer::llama2_builtin().with_legacy(true);
    assert!(!modern.legacy() && legacy.legacy());
    let cases: &[(&str, &[u32], &[u32])] = &[
        ("a</s>b", &[1, 263, 2, 29890], &[1, 263, 2, 289]),
        ("a</s> b", &[1, 263, 2, 289], &[1, 263, 2, 29871, 289]),
        (
            "good.</s>USER: hi",
            &[1, 1781, 29889, 2, 11889, 29901, 7251],
            &[1, 1781, 29889, 2, 3148, 1001, 29901, 7251],
        ),
        ("x<s>y", &[1, 921, 1, 29891], &[1, 921, 1, 343]),
        ("<unk>z", &[1, 0, 29920], &[1, 0, 503]),
        (
            "a </s> b",
            &[1, 263, 29871, 2, 289],
            &[1, 263, 29871, 2, 29871, 289],
        ),
        ("<s> ", &[1, 1, 29871], &[1, 1, 259]),
        ("<<s>>", &[1, 529, 1, 29958], &[1, 529, 1, 1405]),
        ("x<unk> y", &[1, 921, 0, 343], &[1, 921, 0, 29871, 343]),
        ("</s>there", &[1, 2, 12711], &[1, 2, 727]),
        ("</s>  two", &[1, 2, 29871, 1023], &[1, 2, 259, 1023]),
    ];
    for &(text, want_modern, want_legacy) in cases {
        assert_eq!(
            modern.encode_with_special_tokens(text, true),
            want_modern,
            "{text:?}"
        );
        assert_eq!(
            legacy.encode_with_special_tokens(text, true),
            want_legacy,
            "{text:?} legacy"
        );
    }
}

/// The official `preprocess_v1` (vicuna v1 template, image) on a two-turn conversation, run with
/// transformers 4.36.1: with `legacy=false` both answers are targets; with `legacy=true` the text
/// after the first `</s>` tokenises one id longer than the round alone, the length check fails and
/// every label is masked ("WARNING: tokenization mismatch: 88 vs. 89").
#[test]
fn two_turn_training_labels_follow_the_legacy_flag_like_the_official_preprocess() {
    let messages = [
        Message::human("<|image|>How would you rate the quality of this image?"),
        Message::gpt("The quality of the image is good."),
        Message::human("And its aesthetics?"),
        Message::gpt("The aesthetics of the image is fair."),
    ];
    let text = vicuna_v1_prompt(&messages).unwrap();

    let modern = tokenize_for_training(tokenizer(), &text, MODEL_MAX_LENGTH);
    let want_ids: &[i64] = &[
        1, 319, 13563, 1546, 263, 12758, 1404, 322, 385, 23116, 21082, 20255, 29889, 450, 20255,
        4076, 8444, 29892, 13173, 29892, 322, 1248, 568, 6089, 304, 278, 1404, 29915, 29879, 5155,
        29889, 3148, 1001, 29901, 29871, -200, 29871, 13, 5328, 723, 366, 6554, 278, 11029, 310,
        445, 1967, 29973, 319, 1799, 9047, 13566, 29901, 450, 11029, 310, 278, 1967, 338, 1781,
        29889, 2, 11889, 29901, 1126, 967, 263, 342, 9188, 1199, 29973, 319, 1799, 9047, 13566,
        29901, 450, 263, 342, 9188, 1199, 310, 278, 1967, 338, 6534, 29889, 2,
    ];
    assert_eq!(modern.input_ids, want_ids);
    assert!(!modern.length_mismatch);
    let targets: Vec<i64> = modern
        .labels
        .iter()
        .copied()
        .filter(|&l| l != IGNORE_INDEX)
        .collect();
    assert_eq!(
        targets,
        &[
            450, 11029, 310, 278, 1967, 338, 1781, 29889, 2, 450, 263, 342, 9188, 1199, 310, 278,
            1967, 338, 6534, 29889, 2
        ]
    );
    assert_eq!(modern.labels.len(), want_ids.len());

    let legacy_tok = Tokenizer::llama2_builtin().with_legacy(true);
    let legacy = tokenize_for_training(&legacy_tok, &text, MODEL_MAX_LENGTH);
    let want_ids: &[i64] = &[
        1, 319, 13563, 1546, 263, 12758, 1404, 322, 385, 23116, 21082, 20255, 29889, 450, 20255,
        4076, 8444, 29892, 13173, 29892, 322, 1248, 568, 6089, 304, 278, 1404, 29915, 29879, 5155,
        29889, 3148, 1001, 29901, 29871, -200, 29871, 13, 5328, 723, 366, 6554, 278, 11029, 310,
        445, 1967, 29973, 319, 1799, 9047, 13566, 29901, 450, 11029, 310, 278, 1967, 338, 1781,
        29889, 2, 3148, 1001, 29901, 1126, 967, 263, 342, 9188, 1199, 29973, 319, 1799, 9047,
        13566, 29901, 450, 263, 342, 9188, 1199, 310, 278, 1967, 338, 6534, 29889, 2,
    ];
    assert_eq!(legacy.input_ids, want_ids);
    assert!(legacy.length_mismatch);
    assert!(legacy.labels.iter().all(|&l| l == IGNORE_INDEX));
}
