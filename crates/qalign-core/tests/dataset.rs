//! Every label schema in the fixtures, plus CSV/JSONL/concatenated predictions and bad input.

mod common;

use std::path::Path;

use common::labels;
use qalign_core::MediaKind;
use qalign_core::dataset::{Columns, DatasetError, read_labels, read_predictions};
use qalign_core::levels::ScoreRange;

struct Expect {
    file: &'static str,
    n: usize,
    min: f64,
    max: f64,
    first_path: &'static str,
    first_score: f64,
    kind: MediaKind,
}

#[test]
fn every_label_schema_reads() {
    let cases = [
        // Training schema, MOS only in `id`.
        Expect {
            file: "train_koniq.json",
            n: 7046,
            min: 6.68487394958,
            max: 85.0608108108,
            first_path: "koniq/10004473376.jpg",
            first_score: 77.3836206897,
            kind: MediaKind::Image,
        },
        Expect {
            file: "train_spaq.json",
            n: 8897,
            min: 2.0,
            max: 93.67,
            first_path: "spaq/07565.jpg",
            first_score: 63.6,
            kind: MediaKind::Image,
        },
        Expect {
            file: "test_kadid.json",
            n: 2000,
            min: 1.03,
            max: 4.83,
            first_path: "kadid10k/I66_01_01.png",
            first_score: 4.63,
            kind: MediaKind::Image,
        },
        // {img_path, gt_score float}.
        Expect {
            file: "livec.json",
            n: 1169,
            min: 3.42,
            max: 92.4319526627219,
            first_path: "livec/t1.bmp",
            first_score: 63.963406174124174,
            kind: MediaKind::Image,
        },
        // {img_path, gt_score string}.
        Expect {
            file: "agi.json",
            n: 2982,
            min: 0.0,
            max: 4.488740784,
            first_path: "agi-cgi/AttnGAN_normal_000.jpg",
            first_score: 0.965602553,
            kind: MediaKind::Image,
        },
        // {image, gt_score float}.
        Expect {
            file: "csiq.json",
            n: 750,
            min: 0.0,
            max: 1.0,
            first_path: "csiq/dst_imgs/awgn/1600.AWGN.1.png",
            first_score: 0.062,
            kind: MediaKind::Image,
        },
        Expect {
            file: "live.json",
            n: 982,
            min: 0.0,
            max: 84.48897154,
            first_path: "live/jp2k/img1.bmp",
            first_score: 0.0,
            kind: MediaKind::Image,
        },
        // Video, {img_path "<id>.mp4", gt_score}.
        Expect {
            file: "konvid.json",
            n: 1200,
            min: 1.22,
            max: 4.64,
            first_path: "3339962845.mp4",
            first_score: 4.64,
            kind: MediaKind::Video,
        },
        // Training schema + gt_score strings with trailing spaces.
        Expect {
            file: "ft/cgi_test_split_1.json",
            n: 1197,
            min: 0.6,
            max: 4.39,
            first_path: "agi-cgi/movie_0138.jpg",
            first_score: 2.65,
            kind: MediaKind::Image,
        },
        // Video training schema, MOS in `id`, 8 image markers.
        Expect {
            file: "ft/maxwell_train_split_1.json",
            n: 3634,
            min: 1.057142857,
            max: 4.742857143,
            first_path: "maxwell/0001.mp4",
            first_score: 1.057142857,
            kind: MediaKind::Video,
        },
    ];
    for e in cases {
        let ds = read_labels(&labels(e.file), &Columns::default())
            .unwrap_or_else(|err| panic!("{}: {err}", e.file));
        assert_eq!(ds.items.len(), e.n, "{}", e.file);
        let r = ScoreRange::of(&ds.scores()).unwrap();
        assert_eq!((r.min(), r.max()), (e.min, e.max), "{}", e.file);
        assert_eq!(ds.items[0].path, e.first_path, "{}", e.file);
        assert_eq!(ds.items[0].score, e.first_score, "{}", e.file);
        assert!(ds.items.iter().all(|i| i.kind == e.kind), "{}", e.file);
    }
}

#[test]
fn training_schema_keeps_id_and_answer() {
    let ds = read_labels(&labels("train_koniq.json"), &Columns::default()).unwrap();
    assert_eq!(ds.name, "train_koniq");
    let first = &ds.items[0];
    assert_eq!(first.id.as_deref(), Some("10004473376.jpg->77.3836206897"));
    assert_eq!(
        first.answer.as_deref(),
        Some("The quality of the image is excellent.")
    );
    assert_eq!(first.answer_level_word(), Some("excellent"));
    let maxwell = read_labels(
        &labels("ft/maxwell_train_split_1.json"),
        &Columns::default(),
    )
    .unwrap();
    assert_eq!(maxwell.items[0].answer_level_word(), Some("bad"));
}

#[test]
fn media_kind_of_items_not_on_this_machine_goes_by_name() {
    let kind = |p: &str| MediaKind::of_file(Path::new(p));
    assert_eq!(kind("a/b.MP4"), Some(MediaKind::Video));
    assert_eq!(kind("x.mkv"), Some(MediaKind::Video));
    assert_eq!(kind("x.y4m"), Some(MediaKind::Video));
    assert_eq!(kind("x.ogv"), Some(MediaKind::Video));
    assert_eq!(kind("x.jpg"), Some(MediaKind::Image));
    assert_eq!(kind("noext"), None);
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn csv_with_quotes_and_custom_columns() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "labels.csv",
        "Image,MOS,comment\n\"a, b.jpg\",3.5,\"said \"\"hi\"\"\"\nc.mp4, 4 ,x\n",
    );
    let ds = read_labels(&p, &Columns::default()).unwrap();
    assert_eq!(ds.items.len(), 2);
    assert_eq!(ds.items[0].path, "a, b.jpg");
    assert_eq!(ds.items[0].score, 3.5);
    assert_eq!(ds.items[1].kind, MediaKind::Video);
    assert_eq!(ds.items[1].score, 4.0);

    let p = write(dir.path(), "named.csv", "file_id,quality\nx.png,1.25\n");
    let cols = Columns {
        path: Some("file_id".into()),
        score: Some("quality".into()),
    };
    let preds = read_predictions(&p, &cols).unwrap();
    assert_eq!(preds[0].path, "x.png");
    assert_eq!(preds[0].score, 1.25);

    let p = write(dir.path(), "tabs.tsv", "path\tscore\nx.png\t2\n");
    assert_eq!(
        read_predictions(&p, &Columns::default()).unwrap()[0].score,
        2.0
    );
}

/// A CSV's score column is found among the role's own names: a prediction CSV that also
/// carries the ground truth used to be read as MOS against MOS (SRCC 1.0 for any model).
#[test]
fn csv_score_columns_follow_the_role() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "both.csv",
        "image,gt_score,mos,pred\na.jpg,1,2,4.5\nb.jpg,3,4,0.5\n",
    );
    let preds = read_predictions(&p, &Columns::default()).unwrap();
    let scores: Vec<f64> = preds.iter().map(|p| p.score).collect();
    assert_eq!(scores, [4.5, 0.5]);
    // As labels the same file gives gt_score, the first label key (as in JSON).
    assert_eq!(
        read_labels(&p, &Columns::default()).unwrap().scores(),
        [1.0, 3.0]
    );
    // Labels prefer mos over score, as the JSON keys do; predictions the reverse.
    let p = write(dir.path(), "two.csv", "path,score,mos\na.jpg,7,8\n");
    assert_eq!(
        read_labels(&p, &Columns::default()).unwrap().scores(),
        [8.0]
    );
    assert_eq!(
        read_predictions(&p, &Columns::default()).unwrap()[0].score,
        7.0
    );
    // A prediction CSV with only a MOS column has no prediction in it.
    let p = write(dir.path(), "mos_only.csv", "path,mos\na.jpg,3\n");
    let msg = read_predictions(&p, &Columns::default())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("no score column") && msg.contains("\"pred\""),
        "{msg}"
    );
}

#[test]
fn jsonl_concatenated_and_qalign_outputs() {
    let dir = tempfile::tempdir().unwrap();
    // JSONL, qalign's own score output (a plain score and a {value, scale} score).
    let p = write(
        dir.path(),
        "pred.jsonl",
        "{\"path\": \"a.jpg\", \"score\": 3.25}\n{\"path\": \"b.jpg\", \"score\": {\"value\": 0.5, \"scale\": \"0-1\"}}\n",
    );
    let preds = read_predictions(&p, &Columns::default()).unwrap();
    assert_eq!(
        preds
            .iter()
            .map(|p| (p.path.as_str(), p.score))
            .collect::<Vec<_>>(),
        vec![("a.jpg", 3.25), ("b.jpg", 0.5)]
    );
    // The official eval results: objects back to back, no separator; the iqa script logs only
    // logits (→ wa5 on 1-5), the iaa/vqa scripts add "score".
    let p = write(
        dir.path(),
        "results.json",
        concat!(
            r#"{"img_path": "x.jpg", "gt_score": 2.0, "logits": {"good": 1.0, "poor": 0.0, "high": 9, "fair": 0.0, "excellent": 0.0, "bad": 0.0}}"#,
            r#"{"image": "y.mp4", "gt_score": "4.1 ", "score": 0.75, "logits": {}}"#
        ),
    );
    let preds = read_predictions(&p, &Columns::default()).unwrap();
    assert_eq!(preds[0].path, "x.jpg");
    let e = 1f64.exp();
    let wa5 = (5.0 + 4.0 * e + 3.0 + 2.0 + 1.0) / (4.0 + e);
    assert!(
        (preds[0].score - wa5).abs() < 1e-6,
        "{} vs {wa5}",
        preds[0].score
    );
    assert_eq!((preds[1].path.as_str(), preds[1].score), ("y.mp4", 0.75));
    // The same file read as labels takes gt_score.
    let ds = read_labels(&p, &Columns::default()).unwrap();
    assert_eq!(ds.scores(), vec![2.0, 4.1]);
}

fn err_text(r: Result<impl std::fmt::Debug, DatasetError>) -> String {
    r.expect_err("expected an error").to_string()
}

#[test]
fn bad_input_names_file_and_record() {
    let dir = tempfile::tempdir().unwrap();
    let c = Columns::default();

    let missing = dir.path().join("nope.json");
    let msg = err_text(read_labels(&missing, &c));
    assert!(
        msg.contains("nope.json") && msg.contains("cannot read"),
        "{msg}"
    );

    let p = write(
        dir.path(),
        "broken.json",
        "[{\"image\": \"a.jpg\", \"gt_score\": 1},\n {\"image\": ",
    );
    let msg = err_text(read_labels(&p, &c));
    assert!(
        msg.contains("broken.json") && msg.contains("malformed JSON at line 2"),
        "{msg}"
    );

    let p = write(
        dir.path(),
        "text.json",
        "[{\"image\": \"a.jpg\", \"gt_score\": 1}, {\"image\": \"b.jpg\", \"gt_score\": \"high\"}]",
    );
    let msg = err_text(read_labels(&p, &c));
    assert!(
        msg.contains("text.json: record 1")
            && msg.contains("\"gt_score\" is not a number (\"high\")"),
        "{msg}"
    );

    let p = write(
        dir.path(),
        "lines.jsonl",
        "{\"path\": \"a.jpg\", \"score\": 1}\n\n{\"path\": \"b.jpg\"}\n",
    );
    let msg = err_text(read_predictions(&p, &c));
    assert!(
        msg.contains("lines.jsonl: record 1 (line 3): no score"),
        "{msg}"
    );

    let p = write(
        dir.path(),
        "id.json",
        "[{\"image\": \"a.jpg\", \"id\": \"a.jpg->abc\"}]",
    );
    let msg = err_text(read_labels(&p, &c));
    assert!(
        msg.contains("record 0") && msg.contains("the MOS in \"id\" is not a number"),
        "{msg}"
    );

    let p = write(dir.path(), "nopath.json", "[{\"gt_score\": 1}]");
    let msg = err_text(read_labels(&p, &c));
    assert!(msg.contains("no path"), "{msg}");

    let p = write(
        dir.path(),
        "multi.json",
        "[{\"image\": [\"a.jpg\", \"b.jpg\"], \"gt_score\": 1}]",
    );
    let msg = err_text(read_labels(&p, &c));
    assert!(msg.contains("multi-image"), "{msg}");

    let p = write(
        dir.path(),
        "scalar.json",
        "[{\"image\": \"a.jpg\", \"gt_score\": 1}, 5]",
    );
    let msg = err_text(read_labels(&p, &c));
    assert!(
        msg.contains("record 1: expected a JSON object, found a number"),
        "{msg}"
    );

    let p = write(dir.path(), "nan.csv", "path,score\na.jpg,1\nb.jpg,NaN\n");
    let msg = err_text(read_labels(&p, &c));
    assert!(
        msg.contains("nan.csv: record 1 (line 3)") && msg.contains("not a finite number"),
        "{msg}"
    );

    let p = write(dir.path(), "cols.csv", "file,rating\na.jpg,1\n");
    let msg = err_text(read_labels(&p, &c));
    assert!(
        msg.contains("no score column") && msg.contains("file,rating"),
        "{msg}"
    );

    let p = write(dir.path(), "ragged.csv", "path,score\na.jpg,1\nb.jpg\n");
    let msg = err_text(read_labels(&p, &c));
    assert!(msg.contains("ragged.csv: CSV error (line 3)"), "{msg}");

    for (name, text) in [
        ("empty.json", "[]"),
        ("blank.jsonl", "\n \n"),
        ("header.csv", "path,score\n"),
    ] {
        let p = write(dir.path(), name, text);
        let msg = err_text(read_labels(&p, &c));
        assert!(msg.ends_with(&format!("{name}: no records")), "{msg}");
    }
}
