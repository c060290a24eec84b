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

/// Every invalid flag value is a usage error (exit 2) naming the flag and what it accepts, and
/// is caught before any file is read.
#[test]
fn invalid_flag_values_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let pred = livec_predictions(dir.path());
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--confidence".into(), "1.5".into()],
            "invalid value '1.5' for '--confidence <C>': expected a confidence level strictly between 0 and 1",
        ),
        (
            vec!["--confidence".into(), "-1".into()],
            "invalid value '-1' for '--confidence <C>'",
        ),
        (
            vec!["--confidence".into(), "nan".into()],
            "invalid value 'nan' for '--confidence <C>'",
        ),
        (
            vec!["--confidence".into(), "0".into()],
            "invalid value '0' for '--confidence <C>'",
        ),
        (
            vec!["--confidence".into(), "1".into()],
            "invalid value '1' for '--confidence <C>'",
        ),
        (
            vec![
                "--plot".into(),
                dir.path().join("x.gif").display().to_string(),
            ],
            "the plot file must end in .png or .svg",
        ),
        (
            vec![
                "--plot".into(),
                dir.path().join("noext").display().to_string(),
            ],
            "the plot file must end in .png or .svg",
        ),
        // 10^8 resamples would hold 3.2 GB of results: the limit is in the message.
        (
            vec!["--bootstrap".into(), "100000000".into()],
            "invalid value '100000000' for '--bootstrap <N>': 100000000 is not in 0..=100000",
        ),
        (
            vec!["--bootstrap".into(), "100001".into()],
            "is not in 0..=100000",
        ),
    ];
    for (flags, message) in cases {
        qalign()
            .arg("eval")
            .arg("--pred")
            .arg(&pred)
            .arg("--labels")
            .arg(labels("livec.json"))
            .args(&flags)
            .assert()
            .code(2)
            .stderr(predicate::str::contains(message));
    }
    assert!(!dir.path().join("x.gif").exists());
    // Upper-case extensions are fine, and the written PNG is a real PNG.
    let png = dir.path().join("plot.PNG");
    qalign()
        .arg("eval")
        .arg("--pred")
        .arg(&pred)
        .arg("--labels")
        .arg(labels("livec.json"))
        .args(["--bootstrap", "0", "--confidence", "0.999", "--plot"])
        .arg(&png)
        .assert()
        .success();
    assert_eq!(&std::fs::read(&png).unwrap()[..8], b"\x89PNG\r\n\x1a\n");
}

/// MOS and predictions × 1e155 give the same correlations as the plain values (they overflowed
/// to PLCC 0 or 1 before), and RMSE scaled by the same factor.
#[test]
fn extreme_magnitudes_give_the_plain_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let pred = livec_predictions(dir.path());
    let run = |pred: &Path, labels_file: &Path| -> serde_json::Value {
        let out = qalign()
            .arg("eval")
            .arg("--pred")
            .arg(pred)
            .arg("--labels")
            .arg(labels_file)
            .args(["--format", "json", "--bootstrap", "30", "--logistic"])
            .assert()
            .success()
            .get_output()
            .stdout
            .clone();
        serde_json::from_slice(&out).unwrap()
    };
    let scale = |from: &Path, to: &str, key: &str, k: f64| -> PathBuf {
        let text = std::fs::read_to_string(from).unwrap();
        let mut out = String::new();
        let values: Vec<serde_json::Value> = if text.trim_start().starts_with('[') {
            serde_json::from_str(&text).unwrap()
        } else {
            text.lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect()
        };
        for mut v in values {
            let x = v[key].as_f64().unwrap();
            v[key] = serde_json::json!(x * k);
            out.push_str(&v.to_string());
            out.push('\n');
        }
        write(dir.path(), to, &out)
    };
    let plain = run(&pred, &labels("livec.json"));
    // The table stays readable: scientific notation instead of 157 digits.
    qalign()
        .arg("eval")
        .arg("--pred")
        .arg(scale(&pred, "big_pred.jsonl", "score", 1e155))
        .arg("--labels")
        .arg(scale(
            &labels("livec.json"),
            "big_labels.jsonl",
            "gt_score",
            1e155,
        ))
        .args(["--bootstrap", "0"])
        .assert()
        .success()
        .stdout(predicate::str::is_match(r"(?m)^PLCC\s+0\.8145 ").unwrap())
        .stdout(predicate::str::is_match(r"(?m)^RMSE \(raw\)\s+2\.8923e156 ").unwrap());
    for k in [1e155, 1e-155] {
        let big = run(
            &scale(&pred, "big_pred.jsonl", "score", k),
            &scale(&labels("livec.json"), "big_labels.jsonl", "gt_score", k),
        );
        for key in ["srcc", "plcc", "krcc"] {
            let (a, b) = (plain[key].as_f64().unwrap(), big[key].as_f64().unwrap());
            assert!((a - b).abs() < 1e-9, "{key} at ×{k}: {b} vs {a}");
            for end in ["low", "high"] {
                let (a, b) = (
                    plain["ci"][key][end].as_f64().unwrap(),
                    big["ci"][key][end].as_f64().unwrap(),
                );
                assert!((a - b).abs() < 1e-9, "{key} CI {end} at ×{k}: {b} vs {a}");
            }
        }
        let (a, b) = (
            plain["rmse"].as_f64().unwrap(),
            big["rmse"].as_f64().unwrap(),
        );
        assert!((b / k - a).abs() < 1e-9 * a, "RMSE at ×{k}: {b} vs {a}");
        let (a, b) = (
            plain["logistic"]["plcc"].as_f64().unwrap(),
            big["logistic"]["plcc"].as_f64().unwrap(),
        );
        assert!((a - b).abs() < 1e-9, "logistic PLCC at ×{k}: {b} vs {a}");
    }
}

/// `qalign score --task all` writes a quality and an aesthetics record per path: `--task` picks
/// one, and without it the mixed file is refused rather than half of it silently dropped.
#[test]
fn task_picks_one_of_several_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let single = std::fs::read_to_string(livec_predictions(dir.path())).unwrap();
    let mut both = String::new();
    for line in single.lines() {
        let mut record: serde_json::Value = serde_json::from_str(line).unwrap();
        record["task"] = "quality".into();
        both += &format!("{record}\n");
        record["task"] = "aesthetics".into();
        record["score"] = (-record["score"].as_f64().unwrap()).into();
        both += &format!("{record}\n");
    }
    let pred = write(dir.path(), "both.jsonl", &both);
    let eval = |extra: &[&str]| {
        let mut cmd = qalign();
        cmd.arg("eval")
            .arg("--pred")
            .arg(&pred)
            .arg("--labels")
            .arg(labels("livec.json"))
            .args(extra);
        cmd.assert()
    };
    let srcc = |task: &str| {
        let run = eval(&["--format", "json", "--bootstrap", "0", "--task", task]).success();
        let v: serde_json::Value = serde_json::from_slice(&run.get_output().stdout).unwrap();
        assert_eq!(v["n"], 1165, "{task}");
        v["srcc"].as_f64().unwrap()
    };
    // The same pairs as json_output_joins_and_reports_unmatched, and their mirror image.
    assert!((srcc("quality") - 0.7830676762705022).abs() <= 1e-9);
    assert!((srcc("aesthetics") + 0.7830676762705022).abs() <= 1e-9);
    eval(&[]).code(1).stderr(predicate::str::contains(
        "holds predictions of several tasks (aesthetics: 1166, quality: 1166); choose one with --task",
    ));
    eval(&["--task", "custom"])
        .code(1)
        .stderr(predicate::str::contains(
            "holds no prediction of task `custom`",
        ));
}

/// A whole LIVE folder scored (CSV, which also carries each image's MOS, as an exported table
/// would), evaluated against a split of it. Two defects met here: the CSV's `mos` column was
/// taken as the prediction (SRCC 1 for any model), and LIVE's repeated file names paired the
/// split with other folders' images. Expected: scipy on the correct pairs.
#[test]
fn split_of_a_scored_folder_with_a_mos_column() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(labels("live.json")).unwrap();
    let records: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    let mut all: Vec<(String, f64)> = records
        .iter()
        .map(|r| {
            let path = r["image"].as_str().unwrap().to_string();
            (path, r["gt_score"].as_f64().unwrap())
        })
        .collect();
    // The split: every 5th record (197 images, 196 of them with a name used in other folders).
    let split: Vec<&serde_json::Value> = records.iter().step_by(5).collect();
    write(
        dir.path(),
        "split.json",
        &serde_json::to_string(&split).unwrap(),
    );
    all.sort_by(|a, b| a.0.cmp(&b.0));
    let mut csv = String::from("path,mos,pred\n");
    for (i, (path, mos)) in all.iter().enumerate() {
        let pred = mos + ((i * 37) % 101) as f64 * 0.1;
        csv.push_str(&format!("/data/{path},{mos},{pred}\n"));
    }
    let pred = write(dir.path(), "pred.csv", &csv);
    let out = qalign()
        .arg("eval")
        .arg("--pred")
        .arg(&pred)
        .arg("--labels")
        .arg(dir.path().join("split.json"))
        .args(["--format", "json", "--bootstrap", "0"])
        .assert()
        .success()
        .stderr(predicate::str::contains(
            "785 prediction(s) matched no label",
        ))
        .get_output()
        .stdout
        .clone();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["n"], 197);
    assert_eq!(v["join"]["duplicate_predictions"], 0);
    assert_eq!(v["join"]["ambiguous_predictions"], 0);
    assert_eq!(v["join"]["unmatched_labels"], 0);
    for (key, expected) in [("srcc", 0.985556655130807), ("plcc", 0.9917106164383834)] {
        let got = v[key].as_f64().unwrap();
        assert!((got - expected).abs() < 1e-12, "{key}: {got} vs {expected}");
    }
}

/// A label file that lists a path twice is named as the reason its predictions are skipped.
#[test]
fn repeated_label_paths_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let labels = write(
        dir.path(),
        "l.csv",
        "path,mos\na.jpg,1\n./a.jpg,2\nb.jpg,3\nc.jpg,4\nd.jpg,5\n",
    );
    let pred = write(
        dir.path(),
        "p.csv",
        "path,score\na.jpg,9\nb.jpg,1\nc.jpg,3\nd.jpg,2\n",
    );
    let out = qalign()
        .arg("eval")
        .arg("--pred")
        .arg(&pred)
        .arg("--labels")
        .arg(&labels)
        .args(["--format", "json", "--bootstrap", "0"])
        .assert()
        .success()
        .stderr(predicate::str::contains(
            "warning: 1 path(s) occur more than once in",
        ))
        .stderr(predicate::str::contains(
            "so their predictions are ambiguous, e.g. a.jpg",
        ))
        .get_output()
        .stdout
        .clone();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["n"], 3);
    assert_eq!(v["join"]["ambiguous_predictions"], 1);
    // b, c, d: scores 1, 3, 2 against MOS 3, 4, 5.
    assert!((v["srcc"].as_f64().unwrap() - 0.5).abs() < 1e-12, "{v}");
}
