//! `qalign train`, `qalign merge` and `score --lora` through the real binary: the official LoRA fixture's
//! two AdamW steps reproduced from `--lora-init` (losses, gradient norms, parameters after two steps),
//! scores with official and qalign adapters, merged checkpoints, the torch pickle read back the way
//! `torch.load` reads it, resuming, and a clear error for every bad input.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{
    assert_close, copy_tiny_model, fixtures, json_records, num, qalign, run_expecting, tiny_model,
};
use serde_json::Value;

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn lora_fixture() -> PathBuf {
    fixtures().join("lora/q-align-tiny-lora")
}

/// `qalign train --model <tiny> --data DATA --image-folder IMAGES --output OUT`.
fn train_cmd(data: &Path, images: &Path, out: &Path) -> assert_cmd::Command {
    let mut cmd = qalign();
    cmd.arg("train")
        .arg("--model")
        .arg(tiny_model())
        .arg("--data")
        .arg(data)
        .arg("--image-folder")
        .arg(images)
        .arg("--output")
        .arg(out);
    cmd
}

/// `qalign train` on the fixture batch with the settings of the LoRA fixture (the issue's bar).
fn train_fixture_bar(out: &Path, log: &Path, extra: &[&str]) -> common::Run {
    run_expecting(&mut fixture_bar_cmd(out, log, extra), 0)
}

fn fixture_bar_cmd(out: &Path, log: &Path, extra: &[&str]) -> assert_cmd::Command {
    fixture_bar_cmd_with_images(&fixtures().join("images"), out, log, extra)
}

fn fixture_bar_cmd_with_images(
    images: &Path,
    out: &Path,
    log: &Path,
    extra: &[&str],
) -> assert_cmd::Command {
    let mut cmd = train_cmd(&fixtures().join("training/sft_batch.json"), images, out);
    cmd.arg("--lora-init")
        .arg(lora_fixture())
        .args([
            "--lr",
            "2e-4",
            "--lr-schedule",
            "constant",
            "--warmup-ratio",
            "0",
            "--weight-decay",
            "0",
            "--max-grad-norm",
            "0",
            "--batch-size",
            "3",
        ])
        .arg("--log-json")
        .arg(log)
        .args(extra);
    if !extra.contains(&"--lora-dropout") {
        cmd.args(["--lora-dropout", "0"]);
    }
    cmd
}

fn log_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The trained tensors of an adapter folder, by the PEFT in-memory names the fixture uses.
fn adapter_tensors(dir: &Path) -> HashMap<String, Tensor> {
    let mut out = HashMap::new();
    let lora = candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu)
        .unwrap();
    for (k, v) in lora {
        // base_model.model.X.lora_A.weight → base_model.model.X.lora_A.default.weight
        let k = k
            .replace(".lora_A.weight", ".lora_A.default.weight")
            .replace(".lora_B.weight", ".lora_B.default.weight");
        out.insert(k, v);
    }
    for (k, v) in candle_core::pickle::read_all(dir.join("non_lora_trainables.bin")).unwrap() {
        out.insert(k, v);
    }
    out
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn two_adamw_steps_from_the_official_adapter_match_the_official_trainer() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, log) = (tmp.path().join("out"), tmp.path().join("log.jsonl"));
    train_fixture_bar(&out, &log, &["--max-steps", "2"]);
    let expected = read_json(&fixtures().join("lora/expected.json"));
    let steps = expected["training"]["steps"].as_array().unwrap();
    let logged = log_lines(&log);
    assert_eq!(logged.len(), 2);
    for (got, want) in logged.iter().zip(steps) {
        let (l, w) = (num(&got["loss"]), num(&want["loss"]));
        assert!((l - w).abs() <= 1e-5 * w.abs(), "loss {l} vs {w}");
        let (g, w) = (
            num(&got["grad_norm"]),
            num(&want["total_trainable_grad_norm_l2"]),
        );
        assert!((g - w).abs() <= 1e-4 * w, "grad norm {g} vs {w}");
        assert_eq!(num(&got["lr"]), 2e-4);
        for key in ["step", "samples_per_s", "epoch", "elapsed_s"] {
            assert!(got[key].is_number(), "{key} missing in {got}");
        }
    }
    // The adapter's own log is the same.
    assert_eq!(log_lines(&out.join("training_log.jsonl")), logged);

    // Parameters after two steps: 1e-6 where the first gradient is clearly non-zero, else 2·lr.
    let fixture = candle_core::safetensors::load(
        fixtures().join("lora/lora_train.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let saved = adapter_tensors(&out);
    for name in expected["training"]["watched"].as_array().unwrap() {
        let name = name.as_str().unwrap();
        let want = &fixture[&format!("after_step2/{name}")];
        let grad0 = fixture[&format!("grad_step0/{name}")]
            .flatten_all()
            .unwrap();
        let got = saved[name].reshape(want.shape()).unwrap();
        let diff: Vec<f32> = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let grad0: Vec<f32> = grad0.to_vec1().unwrap();
        for (i, (d, g)) in diff.iter().zip(&grad0).enumerate() {
            let tol = if g.abs() > 1e-4 { 1e-6 } else { 4e-4 };
            assert!(*d <= tol, "{name}[{i}]: |Δ| {d} > {tol} (grad {g})");
        }
    }

    // The official layout: PEFT config, keys without `.default`, the abstractor in the pickle.
    let cfg = read_json(&out.join("adapter_config.json"));
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 8);
    assert_eq!(cfg["lora_alpha"].as_f64(), Some(16.0));
    assert_eq!(
        cfg["target_modules"], expected["recipe"]["target_modules"],
        "targets carried over from --lora-init"
    );
    assert!(cfg["base_model_name_or_path"].is_string());
    let lora = candle_core::safetensors::load(out.join("adapter_model.safetensors"), &Device::Cpu)
        .unwrap();
    let mut keys: Vec<&String> = lora.keys().collect();
    keys.sort();
    let mut want_keys: Vec<String> = expected["adapter_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().replace(".default.", "."))
        .collect();
    want_keys.sort();
    assert_eq!(keys, want_keys.iter().collect::<Vec<_>>());
    let pickled: Vec<String> = candle_core::pickle::read_all(out.join("non_lora_trainables.bin"))
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    let mut pickled_sorted = pickled.clone();
    pickled_sorted.sort();
    let mut want_nl: Vec<String> = expected["non_lora_trainables_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().to_owned())
        .collect();
    want_nl.sort();
    assert_eq!(pickled_sorted, want_nl);
    for f in ["config.json", "preprocessor_config.json"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }

    // Scoring with the trained adapter works and differs from the starting adapter.
    let trained = score_json(&["--lora", out.to_str().unwrap()]);
    let start = score_json(&["--lora", lora_fixture().to_str().unwrap()]);
    assert!((num(&trained[0]["score"]) - num(&start[0]["score"])).abs() > 1e-6);
}

/// `qalign score boy_colorful.jpg --model tiny` + `extra`, as JSON records.
fn score_json(extra: &[&str]) -> Vec<Value> {
    let mut cmd = common::score();
    cmd.arg(fixtures().join("images/boy_colorful.jpg"))
        .args(["--format", "json", "--task", "all"])
        .args(extra);
    json_records(&run_expecting(&mut cmd, 0).stdout)
}

fn expected_adapter_scores() -> Value {
    read_json(&fixtures().join("lora/expected.json"))["scores_with_adapter"]["boy_colorful.jpg"]
        .clone()
}

fn assert_official_adapter_scores(records: &[Value]) {
    let want = expected_adapter_scores();
    assert_eq!(records.len(), 2);
    for r in records {
        let task = r["task"].as_str().unwrap();
        let w = &want[task];
        for (l, wl) in common::f64s(&r["logits"])
            .iter()
            .zip(common::f64s(&w["level_logits"]))
        {
            assert_close(*l, wl, common::TOL_LOGITS, &format!("{task} logit"));
        }
        assert_close(
            num(&r["score"]),
            num(&w["score15"]),
            common::TOL_SCORE15,
            task,
        );
    }
}

#[test]
fn score_with_the_official_adapter_gives_the_official_scores() {
    assert_official_adapter_scores(&score_json(&["--lora", lora_fixture().to_str().unwrap()]));
}

#[test]
fn merged_checkpoint_scores_like_the_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let merged = tmp.path().join("merged");
    let mut cmd = qalign();
    cmd.arg("merge")
        .arg("--model")
        .arg(tiny_model())
        .arg("--lora")
        .arg(lora_fixture())
        .arg("--out")
        .arg(&merged)
        .args(["--dtype", "f32"]);
    run_expecting(&mut cmd, 0);
    for f in ["model.safetensors", "config.json", "tokenizer.model"] {
        assert!(merged.join(f).is_file(), "{f} missing");
    }
    let mut cmd = qalign();
    cmd.arg("score")
        .arg("--model")
        .arg(&merged)
        .arg(fixtures().join("images/boy_colorful.jpg"))
        .args(["--format", "json", "--task", "all"]);
    assert_official_adapter_scores(&json_records(&run_expecting(&mut cmd, 0).stdout));
}

#[test]
fn merge_never_writes_over_its_base() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    copy_tiny_model(&base);
    let before = std::fs::read(base.join("model.safetensors")).unwrap();
    let mut cmd = qalign();
    cmd.arg("merge")
        .arg("--model")
        .arg(&base)
        .arg("--lora")
        .arg(lora_fixture())
        .arg("--out")
        .arg(base.join("."));
    let r = run_expecting(&mut cmd, 1);
    assert!(r.stderr.contains("is the model folder"), "{}", r.stderr);
    assert_eq!(
        std::fs::read(base.join("model.safetensors")).unwrap(),
        before
    );
}

#[test]
fn python_reads_our_pickle_as_torch_load_does() {
    let Ok(status) = std::process::Command::new("python3")
        .arg("--version")
        .status()
    else {
        eprintln!("python3 not found: skipping the torch.load-style read");
        return;
    };
    assert!(status.success());
    let tmp = tempfile::tempdir().unwrap();
    let (out, log) = (tmp.path().join("out"), tmp.path().join("log.jsonl"));
    train_fixture_bar(&out, &log, &["--max-steps", "1"]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/check_torch_pickle.py");
    let run = std::process::Command::new("python3")
        .arg(&script)
        .arg(out.join("non_lora_trainables.bin"))
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let read: Value = serde_json::from_slice(&run.stdout).unwrap();
    let ours = candle_core::pickle::read_all(out.join("non_lora_trainables.bin")).unwrap();
    assert_eq!(read.as_object().unwrap().len(), ours.len());
    for (name, t) in ours {
        let entry = &read[&name];
        assert_eq!(entry["dtype"], "float32", "{name}");
        let shape: Vec<usize> = entry["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(shape, t.dims(), "{name}");
        let sum = t
            .to_dtype(DType::F64)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(
            (num(&entry["sum"]) - sum).abs() <= 1e-6 * sum.abs().max(1.0),
            "{name}"
        );
    }
}

#[test]
fn resuming_from_a_checkpoint_continues_the_same_run() {
    resume_continues_the_run("0");
}

/// LoRA dropout draws random masks: a resumed run draws the ones the uninterrupted run drew.
#[test]
fn resuming_with_dropout_draws_the_same_masks() {
    resume_continues_the_run("0.3");
}

fn resume_continues_the_run(dropout: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let straight = tmp.path().join("straight");
    train_fixture_bar(
        &straight,
        &tmp.path().join("a.jsonl"),
        &["--max-steps", "3", "--lora-dropout", dropout],
    );
    let split = tmp.path().join("split");
    let log = tmp.path().join("b.jsonl");
    train_fixture_bar(
        &split,
        &log,
        &[
            "--max-steps",
            "3",
            "--save-steps",
            "2",
            "--lora-dropout",
            dropout,
        ],
    );
    let checkpoint = split.join("checkpoint-2");
    for f in [
        "adapter_config.json",
        "optimizer.safetensors",
        "trainer_state.json",
    ] {
        assert!(checkpoint.join(f).is_file(), "{f} missing in checkpoint");
    }
    // The image folder spelled another way is the same data.
    let resumed = tmp.path().join("resumed");
    let log_c = tmp.path().join("c.jsonl");
    let r = run_expecting(
        &mut fixture_bar_cmd_with_images(
            &fixtures().join("./images/"),
            &resumed,
            &log_c,
            &[
                "--max-steps",
                "3",
                "--resume",
                checkpoint.to_str().unwrap(),
                "--lora-dropout",
                dropout,
            ],
        ),
        0,
    );
    assert!(r.stderr.contains("step 3/3"), "{}", r.stderr);
    let a = adapter_tensors(&straight);
    let c = adapter_tensors(&resumed);
    for (name, t) in &a {
        let d = max_abs(&(t - &c[name]).unwrap());
        assert!(d <= 1e-7, "{name}: resumed run differs by {d}");
    }
    let logged = log_lines(&log_c);
    assert_eq!(logged.len(), 3, "the resumed log holds all steps");
    // The checkpoint's steps come back as they were written, and the clock goes on from them.
    let before = std::fs::read_to_string(&log).unwrap();
    let after = std::fs::read_to_string(&log_c).unwrap();
    let restored: Vec<&str> = after.lines().take(2).collect();
    assert_eq!(restored, before.lines().take(2).collect::<Vec<_>>());
    let elapsed = |v: &Value| v["elapsed_s"].as_f64().unwrap();
    assert!(elapsed(&logged[2]) >= elapsed(&logged[1]), "{after}");

    // Other settings would make another run than the one resumed: refused, naming what changed.
    let changed = tmp.path().join("changed");
    let r = run_expecting(
        &mut fixture_bar_cmd(
            &changed,
            &tmp.path().join("d.jsonl"),
            &[
                "--max-steps",
                "4",
                "--resume",
                checkpoint.to_str().unwrap(),
                "--lora-dropout",
                if dropout == "0" { "0.1" } else { "0" },
            ],
        ),
        1,
    );
    for field in ["total_steps: 3 → 4", "adaptation: "] {
        assert!(r.stderr.contains(field), "{}", r.stderr);
    }
    assert!(!changed.join("adapter_config.json").exists());
}

/// A dataset folder with the fixture images and an SFT JSON made of `items`.
fn dataset(items: &Value) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("sft.json");
    std::fs::write(&data, serde_json::to_string(items).unwrap()).unwrap();
    (tmp, data)
}

fn item(image: Value, question: &str, answer: Option<&str>) -> Value {
    let mut conv = vec![serde_json::json!({"from": "human", "value": question})];
    if let Some(a) = answer {
        conv.push(serde_json::json!({"from": "gpt", "value": a}));
    }
    serde_json::json!({"id": "x->1.0", "image": image, "conversations": conv})
}

fn train_bad(data: &Path, extra: &[&str]) -> common::Run {
    let out = data.parent().unwrap().join("out");
    let mut cmd = train_cmd(data, &fixtures().join("images"), &out);
    cmd.args(["--lora-r", "4", "--max-steps", "1"]).args(extra);
    let r = run_expecting(&mut cmd, 1);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    assert!(!out.join("adapter_config.json").exists(), "nothing written");
    r
}

#[test]
fn bad_training_input_is_named_and_nothing_is_written() {
    let q = "How would you rate the quality of this image?\n<|image|>";
    let a = Some("The quality of the image is good.");
    let cases: Vec<(Value, &str)> = vec![
        (
            serde_json::json!([item("missing.jpg".into(), q, a)]),
            "missing.jpg does not exist",
        ),
        (
            serde_json::json!([item("boy_colorful.jpg".into(), q, None)]),
            "has no answer",
        ),
        (
            serde_json::json!([item("boy_colorful.jpg".into(), q, Some("  "))]),
            "has no answer",
        ),
        (serde_json::json!([]), "has no samples"),
        (
            serde_json::json!([item("boy_colorful.jpg".into(), "no marker", a)]),
            "markers",
        ),
        (
            serde_json::json!([item(
                Value::Array(vec!["boy_colorful.jpg".into(); 70]),
                q,
                a
            )]),
            "more than the model's context",
        ),
    ];
    for (items, message) in cases {
        let (_tmp, data) = dataset(&items);
        let r = train_bad(&data, &[]);
        assert!(
            r.stderr.contains(message),
            "expected `{message}` in:\n{}",
            r.stderr
        );
        if message != "has no samples" {
            assert!(r.stderr.contains("sample 0 (x->1.0)"), "{}", r.stderr);
        }
    }
    // An undecodable image (a text file named .jpg) is caught before training; so is an image too
    // large to decode (its header says 16384x16384), one whose padded square is 3 pixels
    // wide, which the official preprocessing misreads, and a TIFF whose FillOrder (3) scoring
    // refuses (with scoring's words), though the `image` crate reads its header.
    let mut tiny = Vec::new();
    image::RgbImage::new(3, 2)
        .write_to(
            &mut std::io::Cursor::new(&mut tiny),
            image::ImageFormat::Png,
        )
        .unwrap();
    for (name, bytes, reason) in [
        ("broken.jpg", b"not an image".to_vec(), "broken.jpg"),
        (
            "huge.png",
            common::png_bomb(),
            "16384x16384 exceeds the limit",
        ),
        ("tiny.png", tiny, "3x3 square"),
        (
            "fill3.tif",
            tiff_fill_order_3(),
            "fill3.tif: TIFF FillOrder 3 is not a valid value (1 or 2); Pillow refuses it too",
        ),
    ] {
        let (tmp, data) = dataset(&serde_json::json!([item(name.into(), q, a)]));
        std::fs::write(tmp.path().join(name), bytes).unwrap();
        let mut cmd = train_cmd(&data, tmp.path(), &tmp.path().join("out"));
        cmd.args(["--max-steps", "1"]);
        let r = run_expecting(&mut cmd, 1);
        assert!(
            r.stderr.contains(name) && r.stderr.contains(reason) && r.stderr.contains("sample 0"),
            "{}",
            r.stderr
        );
        assert!(!r.stderr.contains("step 1/"), "{}", r.stderr);
    }

    // Unknown LoRA targets and bad settings.
    let (_tmp, data) = dataset(&serde_json::json!([item("boy_colorful.jpg".into(), q, a)]));
    let r = train_bad(&data, &["--lora-targets", "q_proj,no_such_proj"]);
    assert!(
        r.stderr.contains("`no_such_proj` matches no linear layer"),
        "{}",
        r.stderr
    );
    // A bad flag value is a usage error (exit 2), refused before anything is read.
    let out = data.parent().unwrap().join("out");
    let mut cmd = train_cmd(&data, &fixtures().join("images"), &out);
    cmd.args(["--warmup-ratio", "2"]);
    let r = run_expecting(&mut cmd, 2);
    assert!(r.stderr.contains("--warmup-ratio"), "{}", r.stderr);
    assert!(!out.exists(), "nothing written");
    let mut cmd = train_cmd(&data, &fixtures().join("images"), &out);
    cmd.args(["--lora-targets", "q_proj,,v_proj.multiway.1"]);
    let r = run_expecting(&mut cmd, 2);
    assert!(r.stderr.contains("an empty LoRA target"), "{}", r.stderr);
    // The default the help shows is one value --lora-targets takes back.
    let help = run_expecting(qalign().args(["train", "--help"]), 0).stdout;
    assert!(
        help.contains("[default: self_attn.q_proj,self_attn.v_proj.multiway.1]"),
        "{help}"
    );
}

/// A little-endian 8x8 8-bit gray TIFF, one uncompressed strip, with FillOrder = 3.
fn tiff_fill_order_3() -> Vec<u8> {
    // (tag, SHORT or LONG, value), in tag order; the pixels follow the IFD at 8 + 2 + 8·12 + 4.
    let entries: [(u16, u16, u32); 8] = [
        (256, 3, 8),
        (257, 3, 8),
        (258, 3, 8),
        (259, 3, 1),
        (262, 3, 1),
        (266, 3, 3),
        (273, 4, 110),
        (279, 4, 64),
    ];
    let mut out = b"II*\0\x08\0\0\0".to_vec();
    out.extend((entries.len() as u16).to_le_bytes());
    for (tag, kind, value) in entries {
        out.extend(tag.to_le_bytes());
        out.extend(kind.to_le_bytes());
        out.extend(1u32.to_le_bytes());
        out.extend(value.to_le_bytes());
    }
    out.extend(0u32.to_le_bytes());
    assert_eq!(out.len(), 110);
    out.extend((0..64).map(|i| i * 4));
    // The `image` crate reads its header (it ignores FillOrder), so only the tag check refuses it.
    let header = image::ImageReader::new(std::io::Cursor::new(&out))
        .with_guessed_format()
        .unwrap()
        .into_dimensions();
    assert_eq!(header.unwrap(), (8, 8));
    out
}

#[test]
fn adapter_whose_targets_are_not_in_the_base_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = tmp.path().join("adapter");
    std::fs::create_dir(&adapter).unwrap();
    std::fs::copy(
        lora_fixture().join("adapter_config.json"),
        adapter.join("adapter_config.json"),
    )
    .unwrap();
    // A LoRA pair for layer 7 of a two-layer model.
    let a = Tensor::zeros((8, 64), DType::F32, &Device::Cpu).unwrap();
    let b = Tensor::zeros((64, 8), DType::F32, &Device::Cpu).unwrap();
    let tensors = HashMap::from([
        (
            "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight".to_owned(),
            a,
        ),
        (
            "base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight".to_owned(),
            b,
        ),
    ]);
    candle_core::safetensors::save(&tensors, adapter.join("adapter_model.safetensors")).unwrap();
    let mut cmd = common::score();
    cmd.arg(fixtures().join("images/boy_colorful.jpg"))
        .arg("--lora")
        .arg(&adapter);
    let r = run_expecting(&mut cmd, 1);
    assert!(
        r.stderr.contains("model.layers.7.self_attn.q_proj") && r.stderr.contains("not found"),
        "{}",
        r.stderr
    );
    // A folder that is not an adapter.
    let mut cmd = common::score();
    cmd.arg(fixtures().join("images/boy_colorful.jpg"))
        .arg("--lora")
        .arg(tmp.path());
    let r = run_expecting(&mut cmd, 1);
    assert!(r.stderr.contains("adapter_config.json"), "{}", r.stderr);
}

#[test]
fn full_fine_tuning_writes_a_checkpoint_that_scores() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("full");
    let mut cmd = train_cmd(
        &fixtures().join("training/sft_batch.json"),
        &fixtures().join("images"),
        &out,
    );
    cmd.args(["--full", "--max-steps", "1", "--batch-size", "3"]);
    let r = run_expecting(&mut cmd, 0);
    assert!(r.stderr.contains("step 1/1"), "{}", r.stderr);
    let loss = training_loss_of_first_step(&out);
    let want = num(&read_json(&fixtures().join("training/expected.json"))["loss"]);
    assert!(
        (loss - want).abs() <= 1e-5,
        "full-model loss {loss} vs {want}"
    );
    let mut cmd = qalign();
    cmd.arg("score")
        .arg("--model")
        .arg(&out)
        .arg(fixtures().join("images/boy_colorful.jpg"))
        .args(["--format", "json"]);
    let records = json_records(&run_expecting(&mut cmd, 0).stdout);
    let s = num(&records[0]["score"]);
    assert!((1.0..=5.0).contains(&s));
}

fn training_loss_of_first_step(out: &Path) -> f64 {
    num(&log_lines(&out.join("training_log.jsonl"))[0]["loss"])
}

#[test]
fn bench_train_times_lora_steps() {
    let mut cmd = qalign();
    cmd.arg("bench")
        .arg("--train")
        .arg("--model")
        .arg(tiny_model())
        .args([
            "--batch-sizes",
            "2",
            "--iters",
            "2",
            "--warmup",
            "1",
            "--format",
            "json",
        ]);
    let r = run_expecting(&mut cmd, 0);
    let report: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(report["mode"], "lora");
    // r 128 on 2 × (q_proj + v_proj.multiway.1) of a 64-wide model, plus the abstractor.
    let lora = 4 * (128 * 64 + 64 * 128);
    assert!(num(&report["trainable_params"]) as usize > lora);
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["batch"], 2);
    assert_eq!(rows[0]["steps"], 2, "warm-up steps are not timed");
    assert!(num(&rows[0]["samples_per_s"]) > 0.0);
    assert!(num(&report["peak_rss_mib"]) > 0.0);
}

#[test]
fn video_samples_train_on_their_sampled_frames() {
    if std::process::Command::new("ffprobe")
        .arg("-version")
        .output()
        .is_err()
    {
        eprintln!("ffprobe not found: skipping");
        return;
    }
    let q = "How would you rate the quality of this video?\n<|image|>";
    let items = serde_json::json!([item(
        "baby.mp4".into(),
        q,
        Some("The quality of the video is good.")
    )]);
    let (tmp, data) = dataset(&items);
    let out = tmp.path().join("out");
    let log = tmp.path().join("log.jsonl");
    let mut cmd = train_cmd(&data, &fixtures().join("video"), &out);
    cmd.arg("--log-json").arg(&log).args([
        "--lora-r",
        "4",
        "--max-steps",
        "1",
        "--max-frames",
        "3",
    ]);
    run_expecting(&mut cmd, 0);
    let logged = log_lines(&log);
    assert_eq!(logged.len(), 1);
    assert!(num(&logged[0]["loss"]).is_finite());
    assert!(out.join("adapter_config.json").is_file());
}

#[test]
fn bf16_training_keeps_f32_master_weights_and_tracks_the_f32_run() {
    // The mixed-precision path (bf16 frozen weights and activations, f32 master copies and moments), on
    // the CPU: the losses follow the f32 reference within bf16 accuracy, and the adapter is saved in f32.
    let tmp = tempfile::tempdir().unwrap();
    let (out, log) = (tmp.path().join("out"), tmp.path().join("log.jsonl"));
    train_fixture_bar(&out, &log, &["--max-steps", "2", "--dtype", "bf16"]);
    let expected = read_json(&fixtures().join("lora/expected.json"));
    for (got, want) in log_lines(&log)
        .iter()
        .zip(expected["training"]["steps"].as_array().unwrap())
    {
        let (l, w) = (num(&got["loss"]), num(&want["loss"]));
        assert!((l - w).abs() <= 0.02 * w, "bf16 loss {l} vs f32 {w}");
    }
    let lora = candle_core::safetensors::load(out.join("adapter_model.safetensors"), &Device::Cpu)
        .unwrap();
    assert!(lora.values().all(|t| t.dtype() == DType::F32));
}

#[test]
fn soft_loss_with_a_narrow_gaussian_is_the_official_loss() {
    // The fixture ids carry MOS 62.5, 81.0 and 12.0 with answers good, excellent, bad: over that range
    // they map to levels 3.93, 5 and 1, so a narrow Gaussian is one-hot on the answer's level.
    let want = num(&read_json(&fixtures().join("training/expected.json"))["loss"]);
    let first_loss = |sigma: &str| {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let mut cmd = train_cmd(
            &fixtures().join("training/sft_batch.json"),
            &fixtures().join("images"),
            &out,
        );
        cmd.args([
            "--full",
            "--max-steps",
            "1",
            "--batch-size",
            "3",
            "--loss",
            "soft",
        ])
        .args(["--soft-sigma", sigma]);
        run_expecting(&mut cmd, 0);
        training_loss_of_first_step(&out)
    };
    let narrow = first_loss("1e-4");
    assert!(
        (narrow - want).abs() <= 1e-5,
        "soft σ→0 {narrow} vs hard {want}"
    );
    let wide = first_loss("0.8");
    assert!(
        (wide - want).abs() > 1e-3,
        "a wide target changes the loss: {wide}"
    );
}

#[test]
fn an_explicit_zero_learning_rate_is_warned_about_and_trains_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let log = tmp.path().join("log.jsonl");
    let mut cmd = train_cmd(
        &fixtures().join("training/sft_batch.json"),
        &fixtures().join("images"),
        &out,
    );
    // No warm-up, so only `--lr 0` makes the rate 0.
    cmd.args(["--lr", "0", "--warmup-ratio", "0", "--lora-r", "4"])
        .args(["--max-steps", "2", "--batch-size", "3"])
        .arg("--log-json")
        .arg(&log);
    let r = run_expecting(&mut cmd, 0);
    assert!(
        r.stderr.contains(
            "warning: the learning rate is 0 at every one of the 2 step(s) (--lr 0), so nothing \
             is trained"
        ),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("warm-up starts"), "{}", r.stderr);
    let lines = log_lines(&log);
    assert_eq!(lines.len(), 2);
    for line in &lines {
        assert_eq!(num(&line["lr"]), 0.0);
    }
    // The adapter equals its start: every B is 0 and the abstractor is the base's, bit for bit.
    let base = candle_core::safetensors::load(tiny_model().join("model.safetensors"), &Device::Cpu)
        .unwrap();
    let (mut lora_b, mut abstractor) = (0, 0);
    for (key, tensor) in adapter_tensors(&out) {
        if key.contains(".lora_B.") {
            assert_eq!(max_abs(&tensor), 0.0, "{key}");
            lora_b += 1;
        } else if let Some(name) = key.strip_prefix("base_model.model.")
            && name.starts_with("model.visual_abstractor.")
        {
            let start = base[name].to_dtype(DType::F32).unwrap();
            let diff = (tensor.to_dtype(DType::F32).unwrap() - start).unwrap();
            assert_eq!(max_abs(&diff), 0.0, "{key}");
            abstractor += 1;
        }
    }
    // Two layers × (q_proj + v_proj.multiway.1), and the abstractor.
    assert_eq!(lora_b, 4);
    assert!(abstractor > 0, "the abstractor was saved");

    // A rate that is 0 only through the warm-up keeps its own warning.
    let mut cmd = train_cmd(
        &fixtures().join("training/sft_batch.json"),
        &fixtures().join("images"),
        &tmp.path().join("warm"),
    );
    cmd.args(["--lora-r", "4", "--max-steps", "1", "--batch-size", "3"]);
    let r = run_expecting(&mut cmd, 0);
    assert!(
        r.stderr.contains(
            "warning: the learning rate is 0 at every one of the 1 step(s) (warm-up starts at 0"
        ),
        "{}",
        r.stderr
    );
}

/// A base named by hub id and `--revision` is written into the adapter's config as PEFT does
/// (`base_model_name_or_path` and `revision`).
#[test]
fn the_base_revision_is_written_into_the_adapter_config() {
    let tmp = tempfile::tempdir().unwrap();
    common::hub_cache_with_tiny_model(tmp.path(), "v1");
    let out = tmp.path().join("out");
    let mut cmd = qalign();
    cmd.env("HF_HOME", tmp.path())
        .args([
            "train",
            "--model",
            "org/tiny",
            "--revision",
            "v1",
            "--offline",
        ])
        .arg("--data")
        .arg(fixtures().join("training/sft_batch.json"))
        .arg("--image-folder")
        .arg(fixtures().join("images"))
        .arg("--output")
        .arg(&out)
        .args(["--lora-r", "4", "--max-steps", "1"]);
    run_expecting(&mut cmd, 0);
    let config = read_json(&out.join("adapter_config.json"));
    assert_eq!(config["base_model_name_or_path"], "org/tiny");
    assert_eq!(config["revision"], "v1");
}

/// A checkpoint that cannot be written stops the run with an error naming it, is not tried
/// again, and the message says which checkpoint the run goes on from.
#[test]
fn a_checkpoint_that_cannot_be_written_names_it_and_the_one_to_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    // checkpoint-2 holds a file of the user's: replacing the folder would delete it.
    std::fs::create_dir_all(out.join("checkpoint-2")).unwrap();
    std::fs::write(out.join("checkpoint-2/mine.txt"), b"keep").unwrap();
    let mut cmd = train_cmd(
        &fixtures().join("training/sft_batch.json"),
        &fixtures().join("images"),
        &out,
    );
    cmd.args([
        "--lora-r",
        "4",
        "--batch-size",
        "1",
        "--max-steps",
        "3",
        "--save-steps",
        "1",
    ]);
    let r = run_expecting(&mut cmd, 1);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    let named = format!("cannot write {}", out.join("checkpoint-2").display());
    assert!(r.stderr.contains(&named), "{}", r.stderr);
    let hint = format!("--resume {}", out.join("checkpoint-1").display());
    assert!(r.stderr.contains(&hint), "{}", r.stderr);
    assert_eq!(
        std::fs::read(out.join("checkpoint-2/mine.txt")).unwrap(),
        b"keep"
    );
    assert!(!out.join("adapter_config.json").exists());
    // The checkpoint it names resumes the run to its end.
    let mut cmd = train_cmd(
        &fixtures().join("training/sft_batch.json"),
        &fixtures().join("images"),
        &tmp.path().join("resumed"),
    );
    cmd.args([
        "--lora-r",
        "4",
        "--batch-size",
        "1",
        "--max-steps",
        "3",
        "--resume",
    ])
    .arg(out.join("checkpoint-1"));
    run_expecting(&mut cmd, 0);
    assert!(tmp.path().join("resumed/adapter_config.json").is_file());
}

/// A damaged checkpoint (truncated optimizer state, truncated log, an impossible step) or a
/// folder that is no checkpoint is refused with the file named, and nothing is written.
#[test]
fn a_damaged_checkpoint_is_refused_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let mut cmd = train_cmd(
        &fixtures().join("training/sft_batch.json"),
        &fixtures().join("images"),
        &out,
    );
    cmd.args([
        "--lora-r",
        "4",
        "--batch-size",
        "1",
        "--max-steps",
        "2",
        "--save-steps",
        "1",
    ]);
    run_expecting(&mut cmd, 0);
    let good = out.join("checkpoint-1");
    let damage = |name: &str, f: &dyn Fn(&Path)| -> PathBuf {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for e in std::fs::read_dir(&good).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
        f(&dir);
        dir
    };
    let truncate = |file: &'static str, len: u64| {
        move |dir: &Path| {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join(file))
                .unwrap();
            f.set_len(len).unwrap();
        }
    };
    let cases: Vec<(PathBuf, String)> = vec![
        (
            damage("opt", &truncate("optimizer.safetensors", 100)),
            "optimizer.safetensors is damaged".into(),
        ),
        (
            damage("log", &truncate("training_log.jsonl", 0)),
            "training_log.jsonl is damaged: 0 steps logged, 1 done".into(),
        ),
        (
            damage("step", &|dir: &Path| {
                let path = dir.join("trainer_state.json");
                let mut state = read_json(&path);
                state["global_step"] = 99.into();
                std::fs::write(&path, state.to_string()).unwrap();
            }),
            "trainer_state.json is damaged: step 99 of a 2-step run".into(),
        ),
        (out.clone(), "has no trainer_state.json".into()),
    ];
    for (dir, message) in cases {
        let dest = tmp.path().join("resumed");
        let mut cmd = train_cmd(
            &fixtures().join("training/sft_batch.json"),
            &fixtures().join("images"),
            &dest,
        );
        cmd.args([
            "--lora-r",
            "4",
            "--batch-size",
            "1",
            "--max-steps",
            "2",
            "--resume",
        ])
        .arg(&dir);
        let r = run_expecting(&mut cmd, 1);
        assert!(r.stderr.contains(&message), "{message}: {}", r.stderr);
        assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
        assert!(!dest.exists(), "{message}: nothing written");
    }
}

/// Ctrl-C (SIGINT) or SIGTERM during training: the run stops before its next micro-batch, keeps a
/// checkpoint of the last completed step (resumable, named in the message), writes no adapter, and
/// exits as a shell reports the signal (130, 143).
#[cfg(unix)]
#[test]
fn a_signal_stops_the_run_keeping_a_checkpoint_of_the_last_step() {
    use std::io::BufRead;
    for (signal, code) in [("-INT", 130), ("-TERM", 143)] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("qalign"))
            .arg("train")
            .arg("--model")
            .arg(tiny_model())
            .arg("--data")
            .arg(fixtures().join("training/sft_batch.json"))
            .arg("--image-folder")
            .arg(fixtures().join("images"))
            .arg("--output")
            .arg(&out)
            .args(["--lora-r", "4", "--batch-size", "1", "--max-steps", "1000"])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
        let mut text = String::new();
        while !text.contains("step 1/1000") {
            let mut line = String::new();
            assert!(stderr.read_line(&mut line).unwrap() > 0, "{text}");
            text.push_str(&line);
        }
        let killed = std::process::Command::new("kill")
            .arg(signal)
            .arg(child.id().to_string())
            .status()
            .unwrap();
        assert!(killed.success());
        std::io::Read::read_to_string(&mut stderr, &mut text).unwrap();
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(code), "{text}");
        let step = read_json(
            &std::fs::read_dir(&out)
                .unwrap()
                .map(|e| e.unwrap().path())
                .find(|p| {
                    p.file_name()
                        .unwrap()
                        .to_string_lossy()
                        .starts_with("checkpoint-")
                })
                .unwrap_or_else(|| panic!("no checkpoint: {text}"))
                .join("trainer_state.json"),
        )["global_step"]
            .as_u64()
            .unwrap();
        assert!(step >= 1, "{text}");
        let hint = format!(
            "--resume {}",
            out.join(format!("checkpoint-{step}")).display()
        );
        assert!(text.contains(&hint), "{text}");
        assert!(!out.join("adapter_config.json").exists(), "{text}");
    }
}
