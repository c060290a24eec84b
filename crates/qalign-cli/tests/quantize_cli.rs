//! `qalign quantize` through the real binary: the folder it writes scores exactly as quantising at
//! load does (same blocks, same kernels), with an adapter merged first too; bad GGUF files, a
//! config that does not match the file, and contradicting flags fail with clear errors; a failed
//! or refused run leaves no folder behind and never touches the model folder.

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn quantize(out: &Path, quant: &str, extra: &[&str]) -> Run {
    run(qalign()
        .arg("quantize")
        .arg("--model")
        .arg(tiny_model())
        .args(["--quant", quant])
        .arg("--out")
        .arg(out)
        .args(extra))
}

fn adapter() -> PathBuf {
    fixtures().join("lora/q-align-tiny-lora")
}

/// `(file, task) → score` of a `--format json` run, in output order.
fn scores(r: &Run) -> Vec<(String, String, f64)> {
    json_records(&r.stdout)
        .iter()
        .map(|rec| {
            (
                file_name(rec),
                rec["task"].as_str().unwrap().to_owned(),
                num(&rec["score"]),
            )
        })
        .collect()
}

fn score_all(model: &Path, extra: &[&str]) -> Run {
    run_expecting(
        qalign()
            .arg("score")
            .arg("--model")
            .arg(model)
            .arg(images_dir())
            .args(["--task", "all", "--format", "json"])
            .args(extra),
        0,
    )
}

#[test]
fn a_quantised_folder_scores_exactly_as_quantising_at_load() {
    let dir = tempfile::tempdir().unwrap();
    for quant in ["q8_0", "q4k"] {
        let out = dir.path().join(quant);
        let r = quantize(&out, quant, &[]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert!(r.stderr.contains("37 linear layers"), "{}", r.stderr);
        for name in [
            "model.gguf",
            "config.json",
            "tokenizer.model",
            "preprocessor_config.json",
        ] {
            assert!(out.join(name).is_file(), "{name} missing");
        }
        let stored = score_all(&out, &[]);
        let at_load = score_all(&tiny_model(), &["--quant", quant]);
        assert_eq!(scores(&stored), scores(&at_load), "{quant}");
        assert_eq!(scores(&stored).len(), 10);
        // The same layer report: the stored formats are the ones quantising at load picks.
        let report = |r: &Run| {
            r.stderr
                .lines()
                .find(|l| l.contains("linear layers as"))
                .map(str::to_owned)
        };
        assert_eq!(report(&stored), report(&at_load), "{}", stored.stderr);
        assert!(report(&stored).is_some(), "{}", stored.stderr);
        // Asking for the format the folder holds is fine; another is refused.
        score_all(&out, &["--quant", quant]);
        let other = if quant == "q4k" { "q8_0" } else { "q4k" };
        let r = run(qalign()
            .arg("score")
            .arg("--model")
            .arg(&out)
            .arg(images_dir())
            .args(["--quant", other]));
        assert_eq!(r.code, 1, "{}", r.stderr);
        assert!(
            r.stderr
                .contains(&format!("holds {quant} weights, not {other}")),
            "{}",
            r.stderr
        );
        // Half-precision activations are a usage error, found before the folder is read.
        let r = run_expecting(
            qalign()
                .arg("score")
                .arg("--model")
                .arg(&out)
                .arg(images_dir())
                .args(["--dtype", "f16"]),
            2,
        );
        assert!(
            r.stderr.contains(
                "holds quantised weights (`model.gguf`), which run with f32 activations: leave out --dtype f16"
            ),
            "{}",
            r.stderr
        );
    }
}

#[test]
fn an_adapter_is_merged_before_quantising() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged-q8");
    let lora = adapter();
    let r = quantize(&out, "q8_0", &["--lora", lora.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let stored = score_all(&out, &[]);
    let at_load = score_all(
        &tiny_model(),
        &["--quant", "q8_0", "--lora", lora.to_str().unwrap()],
    );
    assert_eq!(scores(&stored), scores(&at_load));
    let base = score_all(&tiny_model(), &["--quant", "q8_0"]);
    assert_ne!(
        scores(&stored),
        scores(&base),
        "the adapter changes the scores"
    );
    // A quantised folder takes no adapter: it would have to be merged into blocks.
    let r = run(qalign()
        .arg("score")
        .arg("--model")
        .arg(&out)
        .arg(images_dir())
        .args(["--lora", lora.to_str().unwrap()]));
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("qalign quantize --lora"), "{}", r.stderr);
}

#[test]
fn broken_or_mismatched_gguf_files_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good");
    assert_eq!(quantize(&good, "q4k", &[]).code, 0);
    let bytes = std::fs::read(good.join("model.gguf")).unwrap();
    let variant = |name: &str, gguf: &[u8]| {
        let d = dir.path().join(name);
        std::fs::create_dir(&d).unwrap();
        for entry in std::fs::read_dir(&good).unwrap() {
            let p = entry.unwrap().path();
            std::fs::copy(&p, d.join(p.file_name().unwrap())).unwrap();
        }
        std::fs::write(d.join("model.gguf"), gguf).unwrap();
        d
    };
    let fails_with = |model: &Path, wants: &[&str]| {
        let r = run(qalign()
            .arg("score")
            .arg("--model")
            .arg(model)
            .arg(images_dir()));
        assert_eq!(r.code, 1, "{}", r.stderr);
        for want in wants {
            assert!(r.stderr.contains(want), "wanted `{want}` in: {}", r.stderr);
        }
        assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
        assert!(r.stdout.is_empty());
    };
    fails_with(
        &variant("truncated", &bytes[..bytes.len() / 2]),
        &["model.gguf", "truncated or corrupt"],
    );
    fails_with(
        &variant("garbage", b"GGUF but not really"),
        &["model.gguf", "GGUF"],
    );
    fails_with(&variant("empty", b""), &["model.gguf"]);
    // A header declaring `general.alignment` 0 (candle's reader divided by it and panicked), and
    // one whose dimensions multiply past 2^64.
    let mut zero_align = bytes[..24].to_vec();
    let kvs = u64::from_le_bytes(bytes[16..24].try_into().unwrap());
    zero_align[16..24].copy_from_slice(&(kvs + 1).to_le_bytes());
    zero_align.extend(17u64.to_le_bytes());
    zero_align.extend(b"general.alignment");
    zero_align.extend(4u32.to_le_bytes());
    zero_align.extend(0u32.to_le_bytes());
    zero_align.extend(&bytes[24..]);
    fails_with(
        &variant("zero-alignment", &zero_align),
        &["model.gguf", "`general.alignment` is 0"],
    );
    let mut huge = bytes.clone();
    let name = b"model.vision_model.encoder.layers.0.mlp.fc2.weight";
    let at = huge.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    assert_eq!(u32::from_le_bytes(huge[at..at + 4].try_into().unwrap()), 2);
    for d in 0..2 {
        huge[at + 4 + 8 * d..at + 12 + 8 * d].copy_from_slice(&(1u64 << 40).to_le_bytes());
    }
    fails_with(
        &variant("huge-dims", &huge),
        &[
            "model.gguf",
            "model.vision_model.encoder.layers.0.mlp.fc2.weight",
            "truncated or corrupt",
        ],
    );
    // A GGUF from elsewhere: valid header, no qalign layout.
    let mut foreign = bytes.clone();
    let at = foreign
        .windows(b"qalign.layout".len())
        .position(|w| w == b"qalign.layout")
        .unwrap();
    foreign[at..at + 6].copy_from_slice(b"xxxxxx");
    fails_with(
        &variant("foreign", &foreign),
        &["not written by `qalign quantize`"],
    );
    // A config that does not describe the file: a wider ViT MLP.
    let wider = variant("mismatch", &bytes);
    let config = std::fs::read_to_string(wider.join("config.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&config).unwrap();
    let vision = &mut json["visual_config"]["visual_model"]["intermediate_size"];
    let old = vision
        .as_u64()
        .expect("the tiny config names the ViT MLP size");
    *vision = (old + 32).into();
    std::fs::write(wider.join("config.json"), json.to_string()).unwrap();
    fails_with(
        &wider,
        &["model.gguf", "has shape", &format!("{}", old + 32)],
    );
}

#[test]
fn refused_runs_write_nothing_and_leave_the_model_alone() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    // An unknown format is a usage error.
    let r = quantize(&out, "q3", &[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("expected q8_0 or q4k"), "{}", r.stderr);
    // A missing adapter fails before anything is written.
    let r = quantize(&out, "q8_0", &["--lora", "/nonexistent/adapter"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(!out.exists());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // The model folder itself is never the output.
    let copy = dir.path().join("model");
    copy_tiny_model(&copy);
    let before: Vec<_> = std::fs::read_dir(&copy)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let r = run(qalign()
        .arg("quantize")
        .arg("--model")
        .arg(&copy)
        .args(["--quant", "q8_0", "--out"])
        .arg(copy.join("../model")));
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("is the model folder"), "{}", r.stderr);
    let after: Vec<_> = std::fs::read_dir(&copy)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(before, after);
    // A quantised folder is not quantised again.
    let q = dir.path().join("q");
    assert_eq!(quantize(&q, "q8_0", &[]).code, 0);
    let r = run(qalign()
        .arg("quantize")
        .arg("--model")
        .arg(&q)
        .args(["--quant", "q4k", "--out"])
        .arg(dir.path().join("qq")));
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("quantised already"), "{}", r.stderr);
    assert!(!dir.path().join("qq").exists());
}

#[test]
fn info_reads_a_quantised_folder() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q4k");
    assert_eq!(quantize(&out, "q4k", &[]).code, 0);
    let info = |model: &Path| -> serde_json::Value {
        let r = run_expecting(
            qalign().arg("info").arg(model).args(["--format", "json"]),
            0,
        );
        serde_json::from_str(&r.stdout).unwrap()
    };
    let (stored, original) = (info(&out), info(&tiny_model()));
    assert_eq!(stored["format"], "gguf");
    // Fused and regrouped layers hold the same parameters as the checkpoint's tensors.
    for part in 0..3 {
        assert_eq!(
            stored["parts"][part]["parameters"], original["parts"][part]["parameters"],
            "{}",
            stored["parts"][part]
        );
    }
    let dtypes = stored["dtypes"].as_object().unwrap();
    assert!(
        dtypes.contains_key("q4k") && dtypes.contains_key("q8_0") && dtypes.contains_key("f32"),
        "{dtypes:?}"
    );
}
