//! Where `merge`, `quantize`, `train` and `eval --plot` may write, through the real binary: an
//! output folder is new, empty or from an earlier run of the same command (anything else, the
//! model folder and its ancestors included, is refused before any work and left untouched);
//! written files get ordinary permissions; links and devices named as outputs survive; a failed
//! plot keeps the previous one.

mod common;

use std::path::{Path, PathBuf};

use common::{Run, copy_tiny_model, fixtures, qalign, run, run_expecting, tiny_model};

fn lora() -> PathBuf {
    fixtures().join("lora/q-align-tiny-lora")
}

fn merge(model: &Path, out: &Path) -> Run {
    run(qalign()
        .arg("merge")
        .arg("--model")
        .arg(model)
        .arg("--lora")
        .arg(lora())
        .arg("--out")
        .arg(out))
}

fn quantize(model: &Path, out: &Path) -> Run {
    run(qalign()
        .arg("quantize")
        .arg("--model")
        .arg(model)
        .args(["--quant", "q8_0", "--out"])
        .arg(out))
}

/// `qalign train` on the fixture batch (one step unless `extra` says otherwise).
fn train(model: &Path, output: &Path, extra: &[&str]) -> Run {
    let mut cmd = qalign();
    cmd.arg("train")
        .arg("--model")
        .arg(model)
        .arg("--data")
        .arg(fixtures().join("training/sft_batch.json"))
        .arg("--image-folder")
        .arg(fixtures().join("images"))
        .arg("--output")
        .arg(output)
        .args(["--batch-size", "3"])
        .args(extra);
    if !extra.contains(&"--max-steps") {
        cmd.args(["--max-steps", "1"]);
    }
    run(&mut cmd)
}

/// The sorted names in `dir`.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// Every file under `dir` with its bytes, sorted by path.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(snapshot(&path));
        } else {
            out.push((path.clone(), std::fs::read(&path).unwrap()));
        }
    }
    out.sort();
    out
}

fn assert_refused(r: &Run, needles: &[&str]) {
    assert_eq!(r.code, 1, "{}", r.stderr);
    for needle in needles {
        assert!(r.stderr.contains(needle), "no `{needle}` in:\n{}", r.stderr);
    }
}

#[test]
fn merge_refuses_a_folder_with_other_files_and_deletes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("p");
    std::fs::create_dir_all(out.join("sub")).unwrap();
    std::fs::write(out.join("thesis.txt"), "thesis\n").unwrap();
    std::fs::write(out.join("sub/notes.txt"), "notes\n").unwrap();
    let before = snapshot(&out);
    let r = merge(&tiny_model(), &out);
    assert_refused(
        &r,
        &[
            &out.display().to_string(),
            "is not empty",
            "(sub, thesis.txt)",
        ],
    );
    assert_eq!(snapshot(&out), before);
    assert_eq!(names(tmp.path()), ["p"], "no temporary folder left");

    // Many foreign entries: a few are named, the rest counted.
    let crowded = tmp.path().join("crowded");
    std::fs::create_dir(&crowded).unwrap();
    for name in ["a", "b", "c", "d", "e"] {
        std::fs::write(crowded.join(name), name).unwrap();
    }
    let r = merge(&tiny_model(), &crowded);
    assert_refused(&r, &["(a, b, c and 2 more)"]);
    assert_eq!(names(&crowded), ["a", "b", "c", "d", "e"]);

    // A file of ours under a folder's name is not ours.
    let odd = tmp.path().join("odd");
    std::fs::create_dir_all(odd.join("model.safetensors")).unwrap();
    assert_refused(&merge(&tiny_model(), &odd), &["(model.safetensors)"]);
    assert!(odd.join("model.safetensors").is_dir());
}

#[test]
fn merge_writes_a_new_or_empty_folder_and_reruns_into_its_own() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    run_expecting(
        qalign()
            .arg("merge")
            .arg("--model")
            .arg(tiny_model())
            .arg("--lora")
            .arg(lora())
            .arg("--out")
            .arg(&empty),
        0,
    );
    let written = names(&empty);
    assert!(written.contains(&"model.safetensors".to_string()));
    assert!(written.contains(&"config.json".to_string()));
    let first = std::fs::read(empty.join("model.safetensors")).unwrap();
    // The same command again replaces its own files with the same result.
    assert_eq!(merge(&tiny_model(), &empty).code, 0);
    assert_eq!(names(&empty), written);
    assert_eq!(
        std::fs::read(empty.join("model.safetensors")).unwrap(),
        first
    );
    // A path that does not exist yet, below a folder that does not either.
    let deep = tmp.path().join("new/merged");
    assert_eq!(merge(&tiny_model(), &deep).code, 0);
    assert_eq!(names(&deep), written);
    assert_eq!(
        names(tmp.path()),
        ["empty", "new"],
        "no temporary folder left"
    );
}

#[cfg(unix)]
#[test]
fn an_output_folder_given_as_a_link_stays_a_link() {
    let tmp = tempfile::tempdir().unwrap();
    let real = tmp.path().join("real");
    std::fs::create_dir(&real).unwrap();
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink("real", &link).unwrap();
    assert_eq!(merge(&tiny_model(), &link).code, 0);
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert!(real.join("model.safetensors").is_file());
    assert_eq!(names(tmp.path()), ["link", "real"]);
}

#[test]
fn a_file_is_never_replaced_by_an_output_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("report.txt");
    std::fs::write(&file, "keep me").unwrap();
    let shown = file.display().to_string();
    assert_refused(
        &merge(&tiny_model(), &file),
        &[&shown, "exists and is not a folder"],
    );
    assert_refused(
        &quantize(&tiny_model(), &file),
        &[&shown, "exists and is not a folder"],
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
    assert_eq!(names(tmp.path()), ["report.txt"]);
}

#[test]
fn quantize_refuses_the_folder_holding_the_model_and_foreign_files() {
    let tmp = tempfile::tempdir().unwrap();
    let parent = tmp.path().join("pm");
    std::fs::create_dir(&parent).unwrap();
    let base = parent.join("base");
    copy_tiny_model(&base);
    let before = snapshot(&parent);
    // The folder that contains the model, named directly or through the model's path.
    for out in [parent.clone(), base.join("..")] {
        let r = quantize(&base, &out);
        assert_refused(
            &r,
            &[
                "contains the model folder",
                "write the quantised model elsewhere",
            ],
        );
        assert_eq!(snapshot(&parent), before);
    }
    // The same for merge, and for a grandparent.
    assert_refused(&merge(&base, &parent), &["contains the model folder"]);
    assert_refused(&merge(&base, tmp.path()), &["contains the model folder"]);
    assert_eq!(snapshot(&parent), before);
    // A folder with other files (but not the model) is refused as for merge.
    let other = tmp.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("model.safetensors.bak"), "backup").unwrap();
    assert_refused(&quantize(&base, &other), &["(model.safetensors.bak)"]);
    assert_eq!(names(&other), ["model.safetensors.bak"]);
    // Its own folder is replaced on a rerun.
    let q = tmp.path().join("q");
    assert_eq!(quantize(&base, &q).code, 0);
    let written = names(&q);
    assert!(written.contains(&"model.gguf".to_string()), "{written:?}");
    assert_eq!(quantize(&base, &q).code, 0);
    assert_eq!(names(&q), written);
    assert_eq!(names(tmp.path()), ["other", "pm", "q"]);
}

#[test]
fn train_never_writes_into_the_model_folder_or_its_ancestors() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    copy_tiny_model(&base);
    let before = snapshot(tmp.path());
    let r = train(&base, &base, &["--full"]);
    assert_refused(
        &r,
        &["is the model folder", "write the training output elsewhere"],
    );
    let r = train(&base, &base.join("."), &[]);
    assert_refused(&r, &["is the model folder"]);
    let r = train(&base, tmp.path(), &["--full"]);
    assert_refused(&r, &["contains the model folder"]);
    assert_eq!(
        snapshot(tmp.path()),
        before,
        "nothing written, nothing changed"
    );
}

/// The mode `File::create` gives a new file here (0666 less this process's umask, which the
/// binary inherits).
#[cfg(unix)]
fn ordinary_mode(dir: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    let probe = dir.join("probe");
    std::fs::File::create(&probe).unwrap();
    let mode = std::fs::metadata(&probe).unwrap().permissions().mode() & 0o777;
    std::fs::remove_file(probe).unwrap();
    mode
}

#[cfg(unix)]
fn assert_modes(dir: &Path, want: u32) {
    use std::os::unix::fs::PermissionsExt;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let meta = std::fs::metadata(&path).unwrap();
        if meta.is_dir() {
            assert_modes(&path, want);
        } else {
            let mode = meta.permissions().mode() & 0o777;
            assert_eq!(mode, want, "{}: {mode:o} vs {want:o}", path.display());
        }
    }
}

#[cfg(unix)]
#[test]
fn safetensors_outputs_get_ordinary_permissions() {
    let tmp = tempfile::tempdir().unwrap();
    let want = ordinary_mode(tmp.path());
    let merged = tmp.path().join("merged");
    assert_eq!(merge(&tiny_model(), &merged).code, 0);
    assert!(merged.join("model.safetensors").is_file());
    assert_modes(&merged, want);
    // LoRA: adapter_model.safetensors; a checkpoint: optimizer.safetensors too.
    let lora_out = tmp.path().join("lora");
    let r = train(
        &tiny_model(),
        &lora_out,
        &["--max-steps", "2", "--save-steps", "1"],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(lora_out.join("adapter_model.safetensors").is_file());
    assert!(
        lora_out
            .join("checkpoint-1/optimizer.safetensors")
            .is_file()
    );
    assert_modes(&lora_out, want);
    let full = tmp.path().join("full");
    let r = train(&tiny_model(), &full, &["--full"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(full.join("model.safetensors").is_file());
    assert_modes(&full, want);
}

#[test]
fn merge_refuses_a_base_whose_config_cannot_be_loaded() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    copy_tiny_model(&base);
    let path = base.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(config["hidden_size"], 64);
    config["num_attention_heads"] = 5.into();
    std::fs::write(&path, config.to_string()).unwrap();
    let out = tmp.path().join("merged");
    let r = merge(&base, &out);
    assert_refused(
        &r,
        &["hidden size 64 is not a positive multiple of 5 attention heads"],
    );
    assert!(!out.exists());
    assert_eq!(names(tmp.path()), ["base"]);
}

#[cfg(unix)]
#[test]
fn train_log_json_through_a_link_or_to_a_device() {
    use std::os::unix::fs::FileTypeExt;
    let tmp = tempfile::tempdir().unwrap();
    // The link stays a link; the run's steps land in its target, replacing what was there.
    let target = tmp.path().join("t.jsonl");
    std::fs::write(&target, "{\"old\": true}\n").unwrap();
    let link = tmp.path().join("link.jsonl");
    std::os::unix::fs::symlink("t.jsonl", &link).unwrap();
    let out = tmp.path().join("out");
    let r = train(
        &tiny_model(),
        &out,
        &["--max-steps", "2", "--log-json", link.to_str().unwrap()],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&target)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["step"], 1);
    assert_eq!(lines[1]["step"], 2);
    // The same log as the output folder's.
    assert_eq!(
        std::fs::read_to_string(&target).unwrap(),
        std::fs::read_to_string(out.join("training_log.jsonl")).unwrap()
    );
    // /dev/null takes the lines; it stays a device.
    let r = train(
        &tiny_model(),
        &tmp.path().join("out2"),
        &["--log-json", "/dev/null"],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        std::fs::metadata("/dev/null")
            .unwrap()
            .file_type()
            .is_char_device()
    );
    // /dev/full cannot take them: an error naming it, and the device is still a device.
    if Path::new("/dev/full").exists() {
        let r = train(
            &tiny_model(),
            &tmp.path().join("out3"),
            &["--log-json", "/dev/full"],
        );
        assert_refused(&r, &["/dev/full", "No space left on device"]);
        assert!(
            std::fs::metadata("/dev/full")
                .unwrap()
                .file_type()
                .is_char_device()
        );
    }
}

#[test]
fn train_help_says_the_log_is_replaced() {
    let r = run_expecting(qalign().args(["train", "--help"]), 0);
    assert!(
        r.stdout
            .contains("An existing file is replaced when the run starts"),
        "{}",
        r.stdout
    );
    assert!(!r.stdout.contains("append one JSON object"), "{}", r.stdout);
}

/// A plot write that fails half-way (the file size limit makes it fail with EFBIG) keeps the
/// previous plot and leaves no debris.
#[cfg(unix)]
#[test]
fn a_failed_plot_keeps_the_previous_one() {
    let tmp = tempfile::tempdir().unwrap();
    let labels = fixtures().join("labels/livec.json");
    let records: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&labels).unwrap()).unwrap();
    let mut pred = String::new();
    for (i, r) in records.iter().enumerate() {
        let mos = r["gt_score"].as_f64().unwrap();
        let line = serde_json::json!({
            "path": r["img_path"],
            "score": mos + ((i * 37) % 101) as f64 * 0.5,
        });
        pred.push_str(&format!("{line}\n"));
    }
    let pred_path = tmp.path().join("pred.jsonl");
    std::fs::write(&pred_path, pred).unwrap();
    let png = tmp.path().join("scatter.png");
    std::fs::write(&png, b"the previous plot").unwrap();
    let bin = env!("CARGO_BIN_EXE_qalign");
    let eval: Vec<&std::ffi::OsStr> = vec![
        "eval".as_ref(),
        "--pred".as_ref(),
        pred_path.as_os_str(),
        "--labels".as_ref(),
        labels.as_os_str(),
        "--bootstrap".as_ref(),
        "0".as_ref(),
        "--plot".as_ref(),
        png.as_os_str(),
    ];
    // 8 blocks (4 or 8 KiB, by shell) is less than the plot; SIGXFSZ is ignored so the write
    // fails with EFBIG instead of killing the process.
    let r = run(assert_cmd::Command::new("sh")
        .arg("-c")
        .arg("ulimit -f 8 && trap '' XFSZ && exec \"$0\" \"$@\"")
        .arg(bin)
        .args(&eval));
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("cannot write"), "{}", r.stderr);
    assert_eq!(std::fs::read(&png).unwrap(), b"the previous plot");
    assert_eq!(names(tmp.path()), ["pred.jsonl", "scatter.png"]);
    // Without the limit the plot is replaced by a real PNG.
    let r = run(qalign().args(&eval));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let bytes = std::fs::read(&png).unwrap();
    assert!(bytes.len() > 8 * 1024, "{} bytes", bytes.len());
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
}
