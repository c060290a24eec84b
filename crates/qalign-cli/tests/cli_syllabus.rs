//! `qalign syllabus` run as the real binary.

use std::path::PathBuf;

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

#[test]
fn koniq_syllabus_with_report() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sft.json");
    let report = dir.path().join("report.json");
    qalign()
        .arg("syllabus")
        .arg(labels("train_koniq.json"))
        .args(["--task", "quality", "--input", "image", "--seed", "3"])
        .arg("--out")
        .arg(&out)
        .arg("--report-json")
        .arg(&report)
        .assert()
        .success()
        .stdout(predicate::str::contains("train_koniq"))
        .stdout(predicate::str::contains("0.9520  0.9608"))
        .stderr(predicate::str::contains("wrote 7046 items from 1 file(s)"));
    let items: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let items = items.as_array().unwrap();
    assert_eq!(items.len(), 7046);
    assert_eq!(items[0]["id"], "10004473376.jpg->77.3836206897");
    assert_eq!(items[0]["image"], "koniq/10004473376.jpg");
    assert_eq!(
        items[0]["conversations"][1]["value"],
        "The quality of the image is excellent."
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let d = &r["datasets"][0];
    assert_eq!(d["name"], "train_koniq");
    assert_eq!(d["n"], 7046);
    assert_eq!(d["m"], 6.68487394958);
    assert_eq!(d["M"], 85.0608108108);
    assert_eq!(format!("{:.3}", d["srcc"].as_f64().unwrap()), "0.952");
    assert_eq!(format!("{:.3}", d["plcc"].as_f64().unwrap()), "0.961");
    assert_eq!(d["level_counts"]["excellent"], 2053);
    // Only the two outputs are in the folder: no temporary files left behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
}

#[test]
fn seeded_few_shot_mix_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, seed: &str| {
        let out = dir.path().join(name);
        qalign()
            .arg("syllabus")
            .arg(labels("csiq.json"))
            .arg(labels("live.json"))
            .args([
                "--task",
                "quality",
                "--input",
                "image",
                "--fraction",
                "0.25",
                "--seed",
                seed,
            ])
            .arg("--out")
            .arg(&out)
            .assert()
            .success()
            .stdout(predicate::str::contains("csiq").and(predicate::str::contains("live")));
        std::fs::read(out).unwrap()
    };
    let a = run("a.json", "11");
    assert_eq!(a, run("b.json", "11"));
    assert_ne!(a, run("c.json", "12"));
    let items: Vec<serde_json::Value> = serde_json::from_slice(&a).unwrap();
    assert_eq!(items.len(), 188 + 246); // round(0.25·750) + round(0.25·982)
}

#[test]
fn explicit_range() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sft.json");
    qalign()
        .arg("syllabus")
        .arg(labels("live.json"))
        .args([
            "--task", "quality", "--input", "image", "--range", "0", "100",
        ])
        .arg("--out")
        .arg(&out)
        .assert()
        .success()
        .stdout(predicate::str::contains("0.0000   100.0000"));
    // A range that excludes data is an error naming the record.
    qalign()
        .arg("syllabus")
        .arg(labels("live.json"))
        .args([
            "--task", "quality", "--input", "image", "--range", "10", "100",
        ])
        .arg("--out")
        .arg(&out)
        .assert()
        .code(1)
        .stderr(predicate::str::contains(
            "dataset live, record 0 (live/jp2k/img1.bmp): score 0 is outside the range [10, 100]",
        ));
    // Unless clamped: the 0 scores become bad.
    qalign()
        .arg("syllabus")
        .arg(labels("live.json"))
        .args([
            "--task", "quality", "--input", "image", "--range", "10", "100", "--clamp",
        ])
        .arg("--out")
        .arg(&out)
        .assert()
        .success();
    let items: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(items[0]["id"], "img1.bmp->0.0");
    assert_eq!(
        items[0]["conversations"][1]["value"],
        "The quality of the image is bad."
    );
    qalign()
        .arg("syllabus")
        .arg(labels("live.json"))
        .args([
            "--task", "quality", "--input", "image", "--range", "5", "-1",
        ])
        .arg("--out")
        .arg(&out)
        .assert()
        .code(1)
        .stderr(predicate::str::contains(
            "--range: invalid score range [5, -1]",
        ));
}

#[test]
fn usage_and_input_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sft.json");
    // Unknown task: a clap usage error.
    qalign()
        .arg("syllabus")
        .arg(labels("csiq.json"))
        .args(["--task", "sharpness", "--input", "image"])
        .arg("--out")
        .arg(&out)
        .assert()
        .code(2)
        .stderr(predicate::str::contains(
            "invalid value 'sharpness' for '--task <TASK>'",
        ));
    // --clamp only makes sense with --range.
    qalign()
        .arg("syllabus")
        .arg(labels("csiq.json"))
        .args(["--task", "quality", "--input", "image", "--clamp"])
        .arg("--out")
        .arg(&out)
        .assert()
        .code(2)
        .stderr(predicate::str::contains("--range <m> <M>"));
    // Missing labels file.
    qalign()
        .args([
            "syllabus",
            "/no/such/labels.json",
            "--task",
            "quality",
            "--input",
            "image",
        ])
        .arg("--out")
        .arg(&out)
        .assert()
        .code(1)
        .stderr(predicate::str::contains("cannot read /no/such/labels.json"));
    // Images with --input video.
    qalign()
        .arg("syllabus")
        .arg(labels("csiq.json"))
        .args(["--task", "quality", "--input", "video"])
        .arg("--out")
        .arg(&out)
        .assert()
        .code(1)
        .stderr(predicate::str::contains(
            "dataset csiq, record 0 (csiq/dst_imgs/awgn/1600.AWGN.1.png) is an image by its extension, but the input kind is video",
        ));
    // Bad fraction.
    qalign()
        .arg("syllabus")
        .arg(labels("csiq.json"))
        .args(["--task", "quality", "--input", "image", "--fraction", "1.5"])
        .arg("--out")
        .arg(&out)
        .assert()
        .code(1)
        .stderr(predicate::str::contains(
            "--fraction must lie in (0, 1], got 1.5",
        ));
    assert!(!out.exists(), "no output on failure");
}
