//! `qalign syllabus` run as the real binary.

use std::path::PathBuf;

#[cfg(unix)]
use std::os::unix::fs::FileTypeExt;

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
        .code(2)
        .stderr(predicate::str::contains("--range 5 -1: need m < M"));
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
    assert!(!out.exists(), "no output on failure");
}

/// Every invalid flag value is a usage error (exit 2) that says what is accepted.
#[test]
fn invalid_flag_values_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sft.json");
    let cases: [(&[&str], &str); 9] = [
        (
            &["--fraction", "1.5"],
            "invalid value '1.5' for '--fraction <F>': expected a fraction in (0, 1], got `1.5`",
        ),
        (
            &["--fraction", "0"],
            "invalid value '0' for '--fraction <F>'",
        ),
        (
            &["--fraction", "-0.5"],
            "invalid value '-0.5' for '--fraction <F>'",
        ),
        (
            &["--fraction", "nan"],
            "invalid value 'nan' for '--fraction <F>'",
        ),
        (&["--range", "5", "-1"], "--range 5 -1: need m < M"),
        (&["--range", "3", "3"], "--range 3 3: need m < M"),
        (
            &["--range", "0", "nan"],
            "invalid value 'nan' for '--range <m> <M>': expected a finite number",
        ),
        (
            &["--range", "0", "inf"],
            "invalid value 'inf' for '--range <m> <M>'",
        ),
        (
            &["--range", "0", "1e999"],
            "invalid value '1e999' for '--range <m> <M>'",
        ),
    ];
    for (flags, message) in cases {
        qalign()
            .arg("syllabus")
            .arg(labels("csiq.json"))
            .args(["--task", "quality", "--input", "image"])
            .args(flags)
            .arg("--out")
            .arg(&out)
            .assert()
            .code(2)
            .stderr(predicate::str::contains(message));
    }
    assert!(!out.exists(), "no output on a usage error");
}

/// `--out` (or `--report-json`) naming an input, under any spelling, is refused before anything
/// is written, and the labels are left as they were.
#[test]
fn out_equal_to_an_input_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("labels.json");
    std::fs::copy(labels("csiq.json"), &input).unwrap();
    let original = std::fs::read(&input).unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::os::unix::fs::symlink(&input, dir.path().join("link.json")).unwrap();
    std::fs::hard_link(&input, dir.path().join("hard.json")).unwrap();
    let spellings = [
        "labels.json",
        "./labels.json",
        "sub/../labels.json",
        ".//labels.json",
        "link.json",
        "hard.json",
    ];
    for spelling in spellings {
        for flag in ["--out", "--report-json"] {
            let mut cmd = qalign();
            cmd.current_dir(dir.path()).args([
                "syllabus",
                "labels.json",
                "--task",
                "quality",
                "--input",
                "image",
            ]);
            if flag == "--out" {
                cmd.args(["--out", spelling]);
            } else {
                cmd.args(["--out", "sft.json", "--report-json", spelling]);
            }
            cmd.assert()
                .code(2)
                .stderr(predicate::str::contains(format!(
                    "{flag} {spelling} is the label file labels.json: refusing to overwrite an input"
                )));
            assert_eq!(
                std::fs::read(&input).unwrap(),
                original,
                "{flag} {spelling}"
            );
        }
    }
    assert!(!dir.path().join("sft.json").exists());
    // The report and the syllabus cannot share a file either.
    qalign()
        .current_dir(dir.path())
        .args([
            "syllabus",
            "labels.json",
            "--task",
            "quality",
            "--input",
            "image",
        ])
        .args(["--out", "sft.json", "--report-json", "./sft.json"])
        .assert()
        .success();
    std::fs::write(dir.path().join("r.json"), "{}").unwrap();
    qalign()
        .current_dir(dir.path())
        .args([
            "syllabus",
            "labels.json",
            "--task",
            "quality",
            "--input",
            "image",
        ])
        .args(["--out", "r.json", "--report-json", "./r.json"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains(
            "--report-json ./r.json is the --out file r.json",
        ));
    // A different file with the same name elsewhere is fine.
    qalign()
        .current_dir(dir.path())
        .args([
            "syllabus",
            "labels.json",
            "--task",
            "quality",
            "--input",
            "image",
        ])
        .args(["--out", "sub/labels.json"])
        .assert()
        .success();
}

/// MOS × 1e155 gives the plain conversion precision and no warning; an undefined precision
/// is blamed on its real cause.
#[test]
fn extreme_magnitudes_and_the_undefined_reason() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(labels("live.json")).unwrap();
    let mut records: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    let report = |file: &std::path::Path, extra: &[&str]| -> (serde_json::Value, String) {
        let report = dir.path().join("report.json");
        let out = qalign()
            .arg("syllabus")
            .arg(file)
            .args(["--task", "quality", "--input", "image"])
            .args(extra)
            .arg("--out")
            .arg(dir.path().join("sft.json"))
            .arg("--report-json")
            .arg(&report)
            .assert()
            .success()
            .get_output()
            .stderr
            .clone();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        (v["datasets"][0].clone(), String::from_utf8(out).unwrap())
    };
    let (plain, _) = report(&labels("live.json"), &[]);
    for r in &mut records {
        let key = if r.get("gt_score").is_some() {
            "gt_score"
        } else {
            "score"
        };
        let x = r[key].as_f64().unwrap();
        r[key] = serde_json::json!(x * 1e155);
    }
    let big_file = dir.path().join("live.json");
    std::fs::write(&big_file, serde_json::to_string(&records).unwrap()).unwrap();
    let (big, stderr) = report(&big_file, &[]);
    assert!(!stderr.contains("undefined"), "{stderr}");
    for key in ["srcc", "plcc"] {
        let (a, b) = (plain[key].as_f64().unwrap(), big[key].as_f64().unwrap());
        assert!((a - b).abs() < 1e-4, "{key}: {b} vs {a}");
    }
    // Every item in one level: said as such.
    let (one, stderr) = report(&labels("live.json"), &["--range", "-1000", "1000"]);
    assert!(one["srcc"].is_null());
    let n = one["n"].as_u64().unwrap();
    assert!(
        stderr.contains(&format!(
            "warning: live: the conversion precision is undefined (all {n} items got the same level)"
        )),
        "{stderr}"
    );
    assert_eq!(
        one["undefined"],
        format!("all {n} items got the same level").as_str()
    );
}

/// A `--report-json` that cannot be written fails the run before the SFT JSON is written, so no
/// finished-looking output is left behind.
#[test]
fn an_unwritable_report_leaves_no_sft_json() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sft.json");
    qalign()
        .arg("syllabus")
        .arg(labels("train_koniq.json"))
        .args(["--task", "quality", "--input", "image"])
        .arg("--out")
        .arg(&out)
        .arg("--report-json")
        .arg(dir.path().join("missing-folder/report.json"))
        .assert()
        .code(1)
        .stderr(predicate::str::contains("missing-folder"));
    assert!(!out.exists());
}

/// A FIFO as the output is written into, not opened for reading first (which would wait for a
/// writer forever).
#[cfg(unix)]
#[test]
fn a_fifo_output_is_written_into() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("sft.fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read_to_string(fifo).unwrap())
    };
    qalign()
        .arg("syllabus")
        .arg(labels("livec.json"))
        .args(["--task", "quality", "--input", "image"])
        .arg("--out")
        .arg(&fifo)
        .timeout(std::time::Duration::from_secs(60))
        .assert()
        .success();
    let items: serde_json::Value = serde_json::from_str(&reader.join().unwrap()).unwrap();
    assert_eq!(items.as_array().unwrap().len(), 1169);
    assert!(
        std::fs::symlink_metadata(&fifo)
            .unwrap()
            .file_type()
            .is_fifo()
    );
}

/// The same label file twice, or an image rated twice with different scores, is written as
/// asked, with a warning naming the repeats.
#[test]
fn repeated_images_are_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let labels_file = dir.path().join("labels.csv");
    std::fs::write(
        &labels_file,
        "image,mos\na.jpg,1\nb.jpg,3\na.jpg,5\nc.jpg,2\n",
    )
    .unwrap();
    let out = dir.path().join("sft.json");
    let syllabus = |files: &[PathBuf]| {
        let mut cmd = qalign();
        cmd.arg("syllabus")
            .args(files)
            .args(["--task", "quality", "--input", "image"])
            .arg("--out")
            .arg(&out);
        cmd.assert().success()
    };
    syllabus(&[labels_file]).stderr(predicate::str::contains(
        "warning: 1 image(s) are items more than once (a.jpg ×2), 1 of them with different levels",
    ));
    syllabus(&[labels("livec.json"), labels("livec.json")])
        .stderr(predicate::str::contains(
            "warning: 1169 image(s) are items more than once",
        ))
        .stderr(predicate::str::contains("0 of them with different levels"));
    syllabus(&[labels("livec.json")]).stderr(predicate::str::contains("more than once").not());
}
