//! Shared helpers of the `score` / `info` / video CLI tests: where the fixtures are, how to run
//! the real `qalign` binary with a clean environment, and how to check one JSON score record
//! against the fixture values and against itself (score, std, entropy recomputed from probs).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use assert_cmd::Command;
use serde_json::Value;

/// The five level words, best first.
pub const LEVELS: [&str; 5] = ["excellent", "good", "fair", "poor", "bad"];

/// Tolerances of tests/fixtures/README.md ("Suggested tolerances").
pub const TOL_LOGITS: f64 = 1e-5;
pub const TOL_PROBS: f64 = 2e-6;
pub const TOL_SCORE01: f64 = 2e-6;
pub const TOL_SCORE15: f64 = 8e-6;

/// The keys every score record has (video records add frames, fps, sampled_indices, ...).
pub const RECORD_KEYS: [&str; 10] = [
    "path", "task", "input", "score", "scale", "levels", "probs", "logits", "std", "entropy",
];

pub fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures"))
}

pub fn tiny_model() -> PathBuf {
    fixtures().join("tiny-onealign")
}

/// The commit of the tiny model's snapshot in [`hub_cache_with_tiny_model`].
pub const TINY_COMMIT: &str = "fedcba9876543210fedcba9876543210fedcba98";

/// A Hugging Face cache under `hf_home` (as `HF_HOME`) holding the tiny model as the hub id
/// `org/tiny` at [`TINY_COMMIT`], which the ref `tag` names (`main` is not cached).
pub fn hub_cache_with_tiny_model(hf_home: &std::path::Path, tag: &str) {
    let repo = hf_home.join("hub/models--org--tiny");
    let snapshot = repo.join("snapshots").join(TINY_COMMIT);
    std::fs::create_dir_all(&snapshot).unwrap();
    for entry in std::fs::read_dir(tiny_model()).unwrap() {
        let path = entry.unwrap().path();
        std::os::unix::fs::symlink(&path, snapshot.join(path.file_name().unwrap())).unwrap();
    }
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join(tag), TINY_COMMIT).unwrap();
}

pub fn images_dir() -> PathBuf {
    fixtures().join("images")
}

/// The five fixture image file names, sorted.
pub fn image_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(images_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names.len(), 5, "{names:?}");
    names
}

pub fn expected() -> &'static Value {
    static EXPECTED: OnceLock<Value> = OnceLock::new();
    EXPECTED.get_or_init(|| {
        let text = std::fs::read_to_string(fixtures().join("expected/expected.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    })
}

/// `expected.images.<name>.tasks.<task>`.
pub fn expected_task(image: &str, task: &str) -> &'static Value {
    let v = &expected()["images"][image]["tasks"][task];
    assert!(v.is_object(), "no expected values for {image} / {task}");
    v
}

/// The `qalign` binary with no model or offline setting inherited from the environment.
pub fn qalign() -> Command {
    let mut cmd = Command::cargo_bin("qalign").unwrap();
    cmd.env_remove("QALIGN_MODEL")
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("TRANSFORMERS_OFFLINE")
        .env_remove("HF_HUB_CACHE")
        .env_remove("HUGGINGFACE_HUB_CACHE");
    cmd
}

/// `qalign score --model <tiny model>`.
pub fn score() -> Command {
    let mut cmd = qalign();
    cmd.arg("score").arg("--model").arg(tiny_model());
    cmd
}

/// Exit code and captured output of a finished run.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

pub fn run(cmd: &mut Command) -> Run {
    let out = cmd.output().unwrap();
    Run {
        code: out.status.code().expect("killed by a signal"),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

/// Runs and asserts the exit code, printing both streams when it differs.
pub fn run_expecting(cmd: &mut Command, code: i32) -> Run {
    let r = run(cmd);
    assert_eq!(
        r.code, code,
        "exit code {} (expected {code})\n--- stdout\n{}\n--- stderr\n{}",
        r.code, r.stdout, r.stderr
    );
    r
}

/// The records of a `--format json` run (one JSON array).
pub fn json_records(stdout: &str) -> Vec<Value> {
    let v: Value = serde_json::from_str(stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{stdout}"));
    v.as_array().expect("a JSON array").clone()
}

pub fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

pub fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

pub fn assert_close(actual: f64, expected: f64, tol: f64, what: &str) {
    assert!(
        (actual - expected).abs() <= tol,
        "{what}: {actual} vs expected {expected} (|diff| {:e} > {tol:e})",
        (actual - expected).abs()
    );
}

pub fn assert_all_close(actual: &[f64], expected: &[f64], tol: f64, what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: lengths differ");
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert_close(*a, *e, tol, &format!("{what}[{i}]"));
    }
}

/// Level weights, best level first: 5..1 on the 1-5 scale, 1..0 on the 0-1 scale.
pub fn level_weights(scale: &str) -> [f64; 5] {
    match scale {
        "1-5" => [5.0, 4.0, 3.0, 2.0, 1.0],
        "0-1" => [1.0, 0.75, 0.5, 0.25, 0.0],
        other => panic!("unknown scale {other}"),
    }
}

/// The file name of a record's path.
pub fn file_name(record: &Value) -> String {
    Path::new(record["path"].as_str().unwrap())
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// Checks the keys and the internal consistency of one record: input kind, scale, level words,
/// probabilities summing to 1 and equal to softmax(logits), score = Σ p·w, std and entropy
/// recomputed from the probabilities.
pub fn check_record_shape(r: &Value, input: &str, scale: &str) {
    for key in RECORD_KEYS {
        assert!(r.get(key).is_some(), "record has no `{key}`: {r}");
    }
    assert_eq!(r["input"], input, "{r}");
    assert_eq!(r["scale"], scale, "{r}");
    assert_eq!(r["levels"], serde_json::json!(LEVELS), "{r}");
    let probs = f64s(&r["probs"]);
    let logits = f64s(&r["logits"]);
    assert_eq!(probs.len(), 5);
    assert_eq!(logits.len(), 5);
    assert_close(probs.iter().sum(), 1.0, 1e-9, "sum of probs");
    let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = logits.iter().map(|l| (l - max).exp()).sum();
    for (i, (p, l)) in probs.iter().zip(&logits).enumerate() {
        assert_close(
            *p,
            (l - max).exp() / z,
            1e-6,
            &format!("softmax(logits)[{i}]"),
        );
    }
    let w = level_weights(scale);
    let mean: f64 = probs.iter().zip(w).map(|(p, w)| p * w).sum();
    assert_close(num(&r["score"]), mean, 1e-12, "score = Σ p·w");
    let var: f64 = probs
        .iter()
        .zip(w)
        .map(|(p, w)| p * (w - mean).powi(2))
        .sum();
    assert_close(num(&r["std"]), var.sqrt(), 1e-12, "std");
    let entropy: f64 = -probs
        .iter()
        .filter(|&&p| p > 0.0)
        .map(|p| p * p.ln())
        .sum::<f64>();
    assert_close(num(&r["entropy"]), entropy, 1e-12, "entropy");
}

/// Checks an image record against `expected.images.<file>.tasks.<task>`.
pub fn check_against_fixture(r: &Value, scale: &str) {
    let name = file_name(r);
    let task = r["task"].as_str().unwrap();
    let e = expected_task(&name, task);
    let what = format!("{name} {task}");
    check_record_shape(r, "image", scale);
    assert_all_close(
        &f64s(&r["logits"]),
        &f64s(&e["level_logits"]),
        TOL_LOGITS,
        &format!("{what} logits"),
    );
    assert_all_close(
        &f64s(&r["probs"]),
        &f64s(&e["level_probs"]),
        TOL_PROBS,
        &format!("{what} probs"),
    );
    let (key, tol) = match scale {
        "1-5" => ("score15", TOL_SCORE15),
        _ => ("score01", TOL_SCORE01),
    };
    assert_close(
        num(&r["score"]),
        num(&e[key]),
        tol,
        &format!("{what} {key}"),
    );
}

/// A copy of the tiny model's files (not its subfolders) in a new folder `dest`.
pub fn copy_tiny_model(dest: &Path) {
    std::fs::create_dir(dest).unwrap();
    for entry in std::fs::read_dir(tiny_model()).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, dest.join(p.file_name().unwrap())).unwrap();
        }
    }
}

/// Copies a file into `dir` under `name`.
pub fn copy_to(src: &Path, dir: &Path, name: &str) -> PathBuf {
    let dst = dir.join(name);
    std::fs::copy(src, &dst).unwrap();
    dst
}

/// A valid PNG of 16384x16384 (above the pixel cap) in ~40 KB: 1-bit black rows.
pub fn png_bomb() -> Vec<u8> {
    use std::io::Write;
    const SIDE: u32 = 16384;
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, SIDE, SIDE);
    encoder.set_color(png::ColorType::Grayscale);
    encoder.set_depth(png::BitDepth::One);
    encoder.set_compression(png::Compression::High);
    let mut writer = encoder.write_header().unwrap();
    let mut stream = writer.stream_writer().unwrap();
    let row = vec![0u8; SIDE as usize / 8];
    for _ in 0..SIDE {
        stream.write_all(&row).unwrap();
    }
    stream.finish().unwrap();
    writer.finish().unwrap();
    out
}
