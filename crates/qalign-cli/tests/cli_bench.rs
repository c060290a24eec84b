//! `qalign bench` run as the real binary on the tiny fixture model: every stage reports positive
//! timings, the JSON holds what the docs quote, and --random-weights needs only config.json.

use std::path::PathBuf;

use assert_cmd::Command;
use predicates::prelude::*;
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures"))
}

fn qalign() -> Command {
    Command::cargo_bin("qalign").unwrap()
}

fn bench_json(extra: &[&str]) -> Value {
    bench_json_with_kernels(extra, None)
}

/// [`bench_json`] with `QALIGN_CPU_KERNELS` set to `kernels`, or unset.
fn bench_json_with_kernels(extra: &[&str], kernels: Option<&str>) -> Value {
    let mut cmd = qalign();
    cmd.env_remove("QALIGN_CPU_KERNELS");
    if let Some(kernels) = kernels {
        cmd.env("QALIGN_CPU_KERNELS", kernels);
    }
    let out = cmd
        .args([
            "bench",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--batch-sizes",
            "1,2",
        ])
        .args(["--frames", "2", "--format", "json", "--offline"])
        .args(extra)
        .env_remove("QALIGN_MODEL")
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    serde_json::from_slice(&out).unwrap()
}

fn stages(report: &Value) -> Vec<(String, Option<u64>)> {
    report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["stage"].as_str().unwrap().to_string(),
                r["batch"].as_u64(),
            )
        })
        .collect()
}

fn check_rows(report: &Value) {
    for row in report["rows"].as_array().unwrap() {
        for key in ["median_ms", "min_ms", "median_ms_per_item", "items_per_s"] {
            let v = row[key].as_f64().unwrap();
            assert!(v.is_finite() && v > 0.0, "{key} = {v} in {row}");
        }
        assert!(row["min_ms"].as_f64() <= row["median_ms"].as_f64());
        let per_item = row["median_ms"].as_f64().unwrap() / row["items"].as_f64().unwrap();
        assert!((row["median_ms_per_item"].as_f64().unwrap() - per_item).abs() < 1e-9);
    }
}

#[test]
fn bench_tiny_model_reports_every_stage() {
    let model = fixtures().join("tiny-onealign");
    let image = fixtures().join("images/singapore_flyer.jpg");
    let report = bench_json(&["--model", model.to_str().unwrap(), image.to_str().unwrap()]);
    assert_eq!(report["weights"], "checkpoint");
    assert_eq!(report["dtype"], "f32");
    assert_eq!(report["device"], "cpu");
    assert_eq!(report["iters"], 1);
    assert_eq!(report["config"]["llm"]["hidden_size"], 64);
    let kernels = &report["cpu_kernels"];
    assert_eq!(kernels["mode"], "best");
    assert!(["avx512", "avx2", "candle"].contains(&kernels["f32_matmul"].as_str().unwrap()));
    let expected: Vec<(String, Option<u64>)> = [
        ("load", None),
        ("preprocess", None),
        ("encode", Some(1)),
        ("vision", Some(1)),
        ("abstractor", Some(1)),
        ("llm", Some(1)),
        ("llm_whole_prompt", Some(1)),
        ("score_1q", Some(1)),
        ("score_2q", Some(1)),
        ("files_1q", Some(1)),
        ("encode", Some(2)),
        ("vision", Some(2)),
        ("abstractor", Some(2)),
        ("llm", Some(2)),
        ("llm_whole_prompt", Some(2)),
        ("score_1q", Some(2)),
        ("score_2q", Some(2)),
        ("files_1q", Some(2)),
        ("video_llm", None),
        ("video_clip", None),
    ]
    .into_iter()
    .map(|(s, b)| (s.to_string(), b))
    .collect();
    assert_eq!(stages(&report), expected);
    check_rows(&report);
    // The video prompt has 27 text tokens besides `<|image|>`; each frame adds 64 queries + 1.
    let video = &report["rows"][18];
    assert_eq!(video["positions"], 27 + 2 * 65);
    assert_eq!(video["items"], 2);
    let ratio_names: Vec<&str> = report["ratios"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert!(ratio_names.contains(&"encode_per_image_b1_over_b2"));
    assert!(ratio_names.contains(&"score_2q_over_1q_b2"));
    assert!(ratio_names.contains(&"llm_whole_prompt_over_llm_b1"));
    assert!(ratio_names.contains(&"files_1q_over_score_1q_per_image_b2"));
    // Four batches of files per timed run, the one image cycled.
    let files: Vec<&Value> = report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["stage"] == "files_1q")
        .collect();
    assert_eq!(files[0]["items"], 4);
    assert_eq!(files[1]["items"], 8);

    // Only the AVX2 kernels, as on an older CPU, and no files rows.
    let report = bench_json_with_kernels(
        &[
            "--model",
            model.to_str().unwrap(),
            "--file-batches",
            "0",
            image.to_str().unwrap(),
        ],
        Some("avx2"),
    );
    assert!(stages(&report).iter().all(|(stage, _)| stage != "files_1q"));
    let kernels = &report["cpu_kernels"];
    assert_eq!(kernels["mode"], "avx2");
    assert!(["avx2", "candle"].contains(&kernels["f32_matmul"].as_str().unwrap()));
    assert!(["f32-decode", "candle"].contains(&kernels["quant_matmul"].as_str().unwrap()));
}

#[test]
fn bench_random_weights_needs_only_the_config() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["config.json", "preprocessor_config.json"] {
        std::fs::copy(
            fixtures().join("tiny-onealign").join(name),
            dir.path().join(name),
        )
        .unwrap();
    }
    let report = bench_json(&[
        "--model",
        dir.path().to_str().unwrap(),
        "--random-weights",
        "--dtype",
        "bf16",
    ]);
    assert_eq!(report["weights"], "random");
    assert_eq!(report["dtype"], "bf16");
    assert_eq!(report["images"][0], "synthetic 640x480");
    check_rows(&report);

    // Without the flag the same folder has no weights to read.
    qalign()
        .args(["bench", "--iters", "1", "--offline", "--model"])
        .arg(dir.path())
        .assert()
        .failure()
        .stderr(predicate::str::contains("model.safetensors"));
}

#[test]
fn bench_rejects_random_weights_for_a_hub_id() {
    qalign()
        .args([
            "bench",
            "--random-weights",
            "--offline",
            "--model",
            "q-future/one-align",
        ])
        .assert()
        .code(2)
        .stderr(predicate::str::contains(
            "--random-weights needs --model to be a folder",
        ));
}

/// Flags `--train` would ignore, or values out of range: usage errors (exit 2) before any work.
#[test]
fn bench_bad_flags_are_usage_errors() {
    let model = fixtures().join("tiny-onealign");
    let image = fixtures().join("images/singapore_flyer.jpg");
    let image = image.to_str().unwrap();
    for extra in [
        &["--train", image][..],
        &["--train", "--frames", "2"],
        &["--train", "--file-batches", "1"],
        &["--train", "--quant", "q4k"],
        &["--train-mode", "full"],
        &["--iters", "0"],
        &["--iters", "10001"],
        &["--batch-sizes", "0"],
        &["--batch-sizes", "1,,2"],
        &["--batch-sizes", "1025"],
        &["--warmup", "1001"],
        &["--frames", "1025"],
        &["--dtype", "f8"],
        &["--device", "tpu"],
        &["--format", "xml"],
    ] {
        let out = qalign()
            .args(["bench", "--offline", "--model"])
            .arg(&model)
            .args(extra)
            .env_remove("QALIGN_MODEL")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {stderr}");
        assert!(stderr.starts_with("error: "), "{extra:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{extra:?}");
    }
}
