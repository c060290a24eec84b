//! `qalign eval` run as the real binary, including bad inputs.

use std::path::{Path, PathBuf};

use assert_cmd::Command;
use predicates::prelude::*;

fn labels(name: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/labels"
    ))
    .join(name)
}

fn qalign() -> Command {
    Command::cargo_bin("qalign").unwrap()
}

/// JSONL predictions for livec.json: MOS + ((i·37) mod 101)·0.5 (the scipy case of the core
/// tests), under absolute paths, minus the last 4 items, plus one stray prediction.
fn livec_predictions(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(labels("livec.json")).unwrap();
    let records: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    let mut out = String::new();
    for (i, r) in records.iter().enumerate().take(records.len() - 4) {
        let mos = r["gt_score"].as_f64().unwrap();
        let line = serde_json::json!({
            "path": format!("/data/{}", r["img_path"].as_str().unwrap()),
            "score": mos + ((i * 37) % 101) as f64 * 0.5,
        });
        out.push_str(&line.to_string());
        out.push('\n');
    }
    out.push_str("{\"path\": \"/data/elsewhere/x.bmp\", \"score\": 1}\n");
    let p = dir.join("pred.jsonl");
    std::fs::write(&p, out).unwrap();
    p
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn json_output_joins_and_reports_unmatched() {
    let dir = tempfile::tempdir().unwrap();
    let pred = livec_predictions(dir.path());
    let output = qalign()
        .arg("eval")
        .arg("--pred")
        .arg(&pred)
        .arg("--labels")
        .arg(labels("livec.json"))
        .args(["--format", "json", "--bootstrap", "40", "--seed", "9"])
        .assert()
        .success()
        .stderr(predicate::str::contains(
            "warning: 1 prediction(s) matched no label, e.g. /data/elsewhere/x.bmp",
        ))
        .stderr(predicate::str::contains(
            "warning: 4 label(s) have no prediction, e.g. ",
        ))
        .get_output()
        .stdout
        .clone();
    let v: serde_json::Value = serde_json::from_slice(&output).unwrap();
    assert_eq!(v["n"], 1165);
    for key in ["srcc", "plcc", "krcc", "rmse"] {
        let x = v[key].as_f64().unwrap();
        let ci = &v["ci"][key];
        assert!(
            ci["low"].as_f64().unwrap() <= x && x <= ci["high"].as_f64().unwrap(),
            "{key}"
        );
    }
    // The 1165 kept pairs, by scipy (spearmanr, pearsonr, kendalltau) and numpy RMSE.
    for (key, expected) in [
        ("srcc", 0.7830676762705022),
        ("plcc", 0.8145151514226114),
        ("krcc", 0.5825992180252408),
        ("rmse", 28.923396680481368),
    ] {
        let got = v[key].as_f64().unwrap();
        assert!((got - expected).abs() <= 1e-9, "{key}: {got} vs {expected}");
    }
    assert_eq!(v["ci"]["resamples"], 40);
    assert_eq!(v["join"]["unmatched_predictions"], 1);
    assert_eq!(v["join"]["unmatched_labels"], 4);
    assert!(v.get("logistic").is_none(), "raw metrics only by default");
}

#[test]
fn table_logistic_and_plot() {
    let dir = tempfile::tempdir().unwrap();
    let pred = livec_predictions(dir.path());
    let png = dir.path().join("scatter.png");
    qalign()
        .arg("eval")
        .arg("--pred")
        .arg(&pred)
        .arg("--labels")
        .arg(labels("livec.json"))
        .args(["--bootstrap", "20", "--logistic", "--plot"])
        .arg(&png)
        .assert()
        .success()
        .stdout(predicate::str::is_match(r"(?m)^n\s+1165$").unwrap())
        .stdout(predicate::str::is_match(r"(?m)^SRCC\s+0\.78\d\d  \[0\.\d+, 0\.\d+\]$").unwrap())
        .stdout(predicate::str::contains(
            "95% CI (bootstrap, 20 resamples, seed 0)",
        ))
        .stdout(predicate::str::contains("PLCC (logistic)"))
        .stderr(predicate::str::contains("bootstrap ").not());
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
}

#[test]
fn csv_predictions_and_official_results() {
    let dir = tempfile::tempdir().unwrap();
    // CSV with a quoted path; labels in the short {img_path, gt_score string} schema.
    let pred = write(
        dir.path(),
        "p.csv",
        "path,score\n\"agi-cgi/AttnGAN_normal_000.jpg\",1\nagi-cgi/AttnGAN_normal_001.jpg,3\nagi-cgi/AttnGAN_normal_002.jpg,0.5\nagi-cgi/AttnGAN_normal_003.jpg,2\n",
    );
    // MOS: 0.9656, 1.3619, 0.1953, 1.0750 → identical ranking.
    let out = qalign()
        .arg("eval")
        .arg("--pred")
        .arg(&pred)
        .arg("--labels")
        .arg(labels("agi.json"))
        .args(["--format", "json", "--bootstrap", "0"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["n"], 4);
    assert!((v["srcc"].as_f64().unwrap() - 1.0).abs() < 1e-12);
    assert!((v["krcc"].as_f64().unwrap() - 1.0).abs() < 1e-12);
    assert!(v["ci"].is_null());
    // Official eval results (objects back to back, logits only) against themselves.
    let results = write(
        dir.path(),
        "results.json",
        concat!(
            r#"{"img_path": "a.jpg", "gt_score": 1.0, "logits": {"excellent": 0, "good": 0, "fair": 0, "poor": 1, "bad": 3}}"#,
            r#"{"img_path": "b.jpg", "gt_score": 2.0, "logits": {"excellent": 0, "good": 1, "fair": 2, "poor": 1, "bad": 0}}"#,
            r#"{"img_path": "c.jpg", "gt_score": 3.0, "logits": {"excellent": 3, "good": 1, "fair": 0, "poor": 0, "bad": 0}}"#,
        ),
    );
    let out = qalign()
        .arg("eval")
        .arg("--pred")
        .arg(&results)
        .arg("--labels")
        .arg(&results)
        .args(["--format", "json", "--bootstrap", "0"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["n"], 3);
    assert!((v["srcc"].as_f64().unwrap() - 1.0).abs() < 1e-12);
}

#[test]
fn bad_inputs_exit_1_with_clear_messages() {
    let dir = tempfile::tempdir().unwrap();
    let good = livec_predictions(dir.path());
    let cases: Vec<(PathBuf, PathBuf, &str)> = vec![
        (
            dir.path().join("missing.jsonl"),
            labels("livec.json"),
            "cannot read",
        ),
        (
            write(
                dir.path(),
                "broken.json",
                "[{\"path\": \"a.jpg\", \"score\": 1},",
            ),
            labels("livec.json"),
            "broken.json: malformed JSON at line 1",
        ),
        (
            write(
                dir.path(),
                "text.jsonl",
                "{\"path\": \"livec/t1.bmp\", \"score\": 1}\n{\"path\": \"livec/t2.bmp\", \"score\": \"great\"}\n",
            ),
            labels("livec.json"),
            "text.jsonl: record 1 (line 2): \"score\" is not a number (\"great\")",
        ),
        (
            good.clone(),
            write(dir.path(), "empty.json", "[]"),
            "empty.json: no records",
        ),
        (
            write(
                dir.path(),
                "elsewhere.jsonl",
                "{\"path\": \"x/1.png\", \"score\": 1}\n",
            ),
            labels("livec.json"),
            "no prediction path matched a label path (e.g. prediction \"x/1.png\", label \"livec/t1.bmp\")",
        ),
        (
            write(
                dir.path(),
                "two.jsonl",
                "{\"path\": \"livec/t1.bmp\", \"score\": 1}\n{\"path\": \"livec/t2.bmp\", \"score\": 2}\n",
            ),
            labels("livec.json"),
            "need at least 3 pairs, got 2",
        ),
    ];
    for (pred, lab, message) in cases {
        qalign()
            .arg("eval")
            .arg("--pred")
            .arg(&pred)
            .arg("--labels")
            .arg(&lab)
            .args(["--bootstrap", "0"])
            .assert()
            .code(1)
            .stderr(predicate::str::contains(message));
    }
    // A bad plot path: the metrics are fine, the plot format is not.
    qalign()
        .arg("eval")
        .arg("--pred")
        .arg(&good)
        .arg("--labels")
        .arg(labels("livec.json"))
        .args(["--bootstrap", "0", "--plot"])
        .arg(dir.path().join("plot.bmp"))
        .assert()
        .code(1)
        .stderr(predicate::str::contains("must end in .png or .svg"));
}

#[test]
fn usage_errors_exit_2() {
    qalign()
        .args(["eval", "--pred", "p.jsonl"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("--labels <LABELS>"));
    qalign()
        .args([
            "eval", "--pred", "p.jsonl", "--labels", "l.json", "--format", "xml",
        ])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("invalid value 'xml'"));
    qalign()
        .args([
            "eval",
            "--pred",
            "p.jsonl",
            "--labels",
            "l.json",
            "--bootstrap",
            "-3",
        ])
        .assert()
        .code(2);
}
