//! The label and prediction parsers on hostile bytes: arbitrary bytes, token soup that looks
//! like JSON or CSV, and byte-level mutations of a real label file. Whatever comes in, the
//! answer is records with non-empty paths and finite scores or a typed error naming the file,
//! never a panic.

mod common;

use std::path::Path;

use proptest::prelude::*;
use qalign_core::dataset::{Columns, DatasetError, parse_labels, parse_predictions};

const EXTENSIONS: [&str; 5] = ["json", "jsonl", "csv", "tsv", "txt"];

/// Parse `bytes` as labels and as predictions under `name`, and check what comes back.
fn check(name: &str, bytes: &[u8], columns: &Columns) -> Result<(), TestCaseError> {
    let path = Path::new(name);
    match parse_labels(path, bytes, columns) {
        Ok(ds) => {
            prop_assert!(!ds.items.is_empty());
            for item in &ds.items {
                prop_assert!(item.score.is_finite(), "{}", item.score);
                prop_assert!(!item.path.is_empty());
            }
        }
        Err(e) => check_error(name, &e)?,
    }
    match parse_predictions(path, bytes, columns) {
        Ok(preds) => {
            prop_assert!(!preds.is_empty());
            for p in &preds {
                prop_assert!(p.score.is_finite(), "{}", p.score);
                prop_assert!(!p.path.is_empty());
            }
        }
        Err(e) => check_error(name, &e)?,
    }
    Ok(())
}

fn check_error(name: &str, e: &DatasetError) -> Result<(), TestCaseError> {
    let text = e.to_string();
    prop_assert!(text.contains(name), "{text}");
    let typed = matches!(
        e,
        DatasetError::Io { .. }
            | DatasetError::Json { .. }
            | DatasetError::Record { .. }
            | DatasetError::Csv { .. }
            | DatasetError::MissingColumn { .. }
            | DatasetError::Empty { .. }
    );
    prop_assert!(typed, "{text}");
    Ok(())
}

/// Pieces that JSON label files are made of, glued together at random.
fn json_soup() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        Just("[".to_string()),
        Just("]".to_string()),
        Just("{".to_string()),
        Just("}".to_string()),
        Just(",".to_string()),
        Just(":".to_string()),
        Just("\n".to_string()),
        Just("\"image\"".to_string()),
        Just("\"img_path\"".to_string()),
        Just("\"path\"".to_string()),
        Just("\"gt_score\"".to_string()),
        Just("\"score\"".to_string()),
        Just("\"id\"".to_string()),
        Just("\"logits\"".to_string()),
        Just("\"value\"".to_string()),
        Just("\"conversations\"".to_string()),
        Just("\"from\"".to_string()),
        Just("\"gpt\"".to_string()),
        Just("\"excellent\"".to_string()),
        Just("\"a.jpg->1e308\"".to_string()),
        Just("\"x->\"".to_string()),
        Just("\"  \"".to_string()),
        Just("\"1e999\"".to_string()),
        Just("\"NaN\"".to_string()),
        Just("null".to_string()),
        Just("true".to_string()),
        Just("1e308".to_string()),
        Just("-1e400".to_string()),
        Just("\u{feff}".to_string()),
        "-?[0-9]{1,4}(\\.[0-9]{1,3})?".prop_map(|s| s),
        "\"[a-z/\\\\.]{0,8}\"".prop_map(|s| s),
    ];
    proptest::collection::vec(token, 0..60).prop_map(|t| t.concat())
}

/// CSV-like text: a header of known and unknown column names, then rows of random cells.
fn csv_soup() -> impl Strategy<Value = String> {
    let cell = prop_oneof![
        Just(String::new()),
        Just("\"".to_string()),
        Just("\"a,b\"".to_string()),
        Just("nan".to_string()),
        Just("inf".to_string()),
        Just("1e999".to_string()),
        Just("  3.5  ".to_string()),
        "-?[0-9]{1,3}(\\.[0-9]{1,2})?".prop_map(|s| s),
        "[a-z/.]{1,6}".prop_map(|s| s),
    ];
    let name = prop_oneof![
        Just("path".to_string()),
        Just("IMAGE".to_string()),
        Just("score".to_string()),
        Just("Mos".to_string()),
        Just("other".to_string()),
        Just(String::new()),
    ];
    let sep = prop_oneof![Just(","), Just("\t"), Just(";")];
    (
        sep,
        proptest::collection::vec(name, 0..4),
        proptest::collection::vec(proptest::collection::vec(cell, 0..5), 0..8),
    )
        .prop_map(|(sep, header, rows)| {
            let mut out = header.join(sep);
            for row in rows {
                out.push('\n');
                out.push_str(&row.join(sep));
            }
            out
        })
}

fn fixture_head() -> Vec<u8> {
    let bytes = std::fs::read(common::labels("train_koniq.json")).unwrap();
    bytes[..2048].to_vec()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..400), ext in 0..EXTENSIONS.len()) {
        check(&format!("labels.{}", EXTENSIONS[ext]), &bytes, &Columns::default())?;
    }

    #[test]
    fn json_like_text(text in json_soup(), custom in any::<bool>()) {
        let columns = if custom {
            Columns { path: Some("path".into()), score: Some("value".into()) }
        } else {
            Columns::default()
        };
        check("soup.json", text.as_bytes(), &columns)?;
    }

    #[test]
    fn csv_like_text(text in csv_soup(), tsv in any::<bool>()) {
        check(if tsv { "soup.tsv" } else { "soup.csv" }, text.as_bytes(), &Columns::default())?;
    }

    #[test]
    fn mutated_label_file(
        edits in proptest::collection::vec((0usize..2048, any::<u8>(), 0u8..3), 1..8),
        cut in 1usize..2048,
    ) {
        let mut bytes = fixture_head();
        bytes.truncate(cut);
        for (at, byte, op) in edits {
            let at = at % (bytes.len() + 1);
            match op {
                0 if at < bytes.len() => bytes[at] = byte,
                1 => bytes.insert(at, byte),
                _ if at < bytes.len() => { bytes.remove(at); }
                _ => {}
            }
        }
        check("train_koniq.json", &bytes, &Columns::default())?;
    }
}

#[test]
fn typed_errors_for_typical_breakage() {
    let cols = Columns::default();
    let err = |name: &str, text: &[u8]| parse_labels(Path::new(name), text, &cols).unwrap_err();
    assert!(
        matches!(err("a.json", b"\xff\xfe{}"), DatasetError::Io { error, .. }
        if error.kind() == std::io::ErrorKind::InvalidData && error.to_string().contains("offset 0"))
    );
    assert!(matches!(
        err("a.json", b"[{\"image\": \"x.jpg\""),
        DatasetError::Json { line: 1, .. }
    ));
    assert!(matches!(err("a.json", b"[]"), DatasetError::Empty { .. }));
    assert!(matches!(
        err(
            "a.json",
            b"[{\"image\": \"x.jpg\", \"gt_score\": \"1e999\"}]"
        ),
        DatasetError::Record { index: 0, .. }
    ));
    assert!(matches!(
        err("a.csv", b"name,other\nx,1\n"),
        DatasetError::MissingColumn { .. }
    ));
    assert!(matches!(
        err("a.csv", b"path,score\nx,1\ny\n"),
        DatasetError::Csv { .. }
    ));
    // And a good file parses.
    let ds = parse_labels(
        Path::new("a.csv"),
        b"path,score\nx.jpg,1\ny.jpg,2.5\n",
        &cols,
    )
    .unwrap();
    assert_eq!(ds.name, "a");
    assert_eq!(ds.scores(), vec![1.0, 2.5]);
}
