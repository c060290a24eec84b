//! The real `qalign` binary where output and inputs could go wrong without a word: a closed,
//! full or abandoned stdout, CSV quoting, unreadable and repeated inputs, an `info` whose
//! config.json does not match the weights, NaN weights, and exit code 2 for every bad flag value.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;

use common::*;
use serde_json::Value;

/// The binary under test (`CARGO_BIN_EXE_qalign`, read when the test runs, as `common::qalign`).
fn qalign_bin() -> PathBuf {
    assert_cmd::cargo::cargo_bin("qalign")
}

/// Runs `script` with bash; `$Q` is the qalign binary, `$M` the tiny model, `$I` the images.
fn bash(script: &str) -> Run {
    let mut cmd = assert_cmd::Command::new("bash");
    cmd.arg("-c")
        .arg(script)
        .env("Q", qalign_bin())
        .env("M", tiny_model())
        .env("I", images_dir())
        .env_remove("QALIGN_MODEL")
        .env_remove("HF_HUB_OFFLINE");
    run(&mut cmd)
}

fn no_panic(r: &Run) {
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
}

#[test]
fn closed_stdout_is_an_error_that_says_so_before_any_work() {
    for script in [
        r#""$Q" score --model "$M" "$I" --format jsonl >&-"#,
        r#""$Q" info "$M" >&-"#,
    ] {
        let r = bash(script);
        no_panic(&r);
        assert_eq!(r.code, 1, "{script}: {}", r.stderr);
        assert!(
            r.stderr.contains("cannot write to stdout: it is closed"),
            "{script}: {}",
            r.stderr
        );
        assert!(!r.stderr.contains("loading model"), "{}", r.stderr);
    }
    // Training writes nothing to stdout, so a closed stdout does not stop it (it fails later, on
    // its missing data file, for its own reason).
    let r = bash(r#""$Q" train --model "$M" --data /nonexistent.json --output /tmp/x >&-"#);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("/nonexistent.json"), "{}", r.stderr);
}

#[test]
fn a_full_stdout_is_an_error_naming_stdout() {
    let full = || Stdio::from(std::fs::File::create("/dev/full").unwrap());
    for args in [
        &["--format", "jsonl"][..],
        &["--format", "csv"][..],
        &["--format", "json"][..],
        &["--format", "table"][..],
    ] {
        let mut cmd = std::process::Command::new(qalign_bin());
        cmd.arg("score")
            .arg("--model")
            .arg(tiny_model())
            .arg(images_dir())
            .args(args)
            .stdout(full());
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains("error: cannot write to stdout: No space left on device"),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let out = std::process::Command::new(qalign_bin())
        .arg("info")
        .arg(tiny_model())
        .stdout(full())
        .output()
        .unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot write to stdout"), "{stderr}");
}

#[test]
fn a_reader_that_stops_early_ends_the_run_quietly() {
    for format in ["jsonl", "csv"] {
        // `head -n1` reads one line and leaves.
        let r = bash(&format!(
            r#""$Q" score --model "$M" "$I" --task all --format {format} | head -n1; exit ${{PIPESTATUS[0]}}"#
        ));
        no_panic(&r);
        assert_eq!(r.code, 0, "{format}: {}", r.stderr);
        assert_eq!(r.stdout.lines().count(), 1, "{}", r.stdout);
        assert!(!r.stderr.contains("error"), "{format}: {}", r.stderr);
        // `head -c0` leaves before the first record is written: the write fails with EPIPE.
        let r = bash(&format!(
            r#""$Q" score --model "$M" "$I" --task all --format {format} | head -c0; exit ${{PIPESTATUS[0]}}"#
        ));
        no_panic(&r);
        assert_eq!(r.code, 0, "{format}: {}", r.stderr);
        assert!(!r.stderr.contains("error"), "{format}: {}", r.stderr);
        assert!(!r.stderr.contains("Broken pipe"), "{format}: {}", r.stderr);
    }
    let r = bash(r#""$Q" info "$M" | head -c0; exit ${PIPESTATUS[0]}"#);
    no_panic(&r);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.is_empty(), "{}", r.stderr);
}

#[test]
fn csv_output_parses_back_with_odd_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let src = images_dir().join("synth_portrait_120x333_gray.png");
    let names = [
        "comma, \"quote\".png",
        "new\nline.png",
        " leading space.png",
        "semi;colon.png",
    ];
    let paths: Vec<PathBuf> = names.iter().map(|n| copy_to(&src, tmp.path(), n)).collect();
    let r = run_expecting(
        score()
            .args(&paths)
            .args(["--format", "csv", "--scale", "0-1"]),
        0,
    );
    let mut reader = csv::Reader::from_reader(r.stdout.as_bytes());
    let header: Vec<String> = reader.headers().unwrap().iter().map(String::from).collect();
    assert_eq!(header.len(), 19, "{header:?}");
    assert_eq!(&header[..5], ["path", "task", "input", "score", "scale"]);
    let e = expected_task("synth_portrait_120x333_gray.png", "quality");
    let rows: Vec<csv::StringRecord> = reader.records().map(|r| r.unwrap()).collect();
    assert_eq!(rows.len(), names.len());
    for (row, path) in rows.iter().zip(&paths) {
        assert_eq!(row.len(), header.len());
        assert_eq!(&row[0], path.to_str().unwrap());
        assert_eq!(&row[1], "quality");
        assert_close(
            row[3].parse().unwrap(),
            num(&e["score01"]),
            TOL_SCORE01,
            "score",
        );
        let probs: Vec<f64> = (5..10).map(|i| row[i].parse().unwrap()).collect();
        assert_all_close(&probs, &f64s(&e["level_probs"]), TOL_PROBS, "probs");
        assert_eq!(&row[17], "", "no frames for an image");
    }
}

/// A file name that is not UTF-8 (Latin-1 `café.png`) is scored when named on the command line,
/// as it is when its folder is; the record shows the name with U+FFFD for the odd byte.
#[cfg(unix)]
#[test]
fn a_name_that_is_not_utf8_is_scored() {
    use std::os::unix::ffi::OsStrExt;
    let tmp = tempfile::tempdir().unwrap();
    let name = std::ffi::OsStr::from_bytes(b"caf\xe9.png");
    let path = tmp.path().join(name);
    std::fs::copy(images_dir().join("synth_portrait_120x333_gray.png"), &path).unwrap();
    let r = run_expecting(score().arg(&path).args(["--format", "jsonl"]), 0);
    let record: Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(
        record["path"].as_str().unwrap(),
        format!("{}/caf\u{fffd}.png", tmp.path().display())
    );
    let e = expected_task("synth_portrait_120x333_gray.png", "quality");
    assert_close(
        num(&record["score"]),
        num(&e["score15"]),
        TOL_SCORE15,
        "score",
    );
}

/// `score --format jsonl` run in `cwd`: (exit code, scored paths, stderr).
fn score_in(cwd: &Path, args: &[&str]) -> (i32, Vec<String>, String) {
    let r = run(score()
        .current_dir(cwd)
        .args(args)
        .args(["--format", "jsonl"]));
    let paths = r
        .stdout
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            v["path"].as_str().unwrap().to_string()
        })
        .collect();
    (r.code, paths, r.stderr)
}

fn is_root() -> bool {
    let out = std::process::Command::new("id").arg("-u").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

#[test]
fn unreadable_paths_found_while_searching_are_reported_and_end_with_exit_code_3() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    std::fs::create_dir(root.join("photos")).unwrap();
    copy_to(
        &images_dir().join("boy_colorful.jpg"),
        &root.join("photos"),
        "a.jpg",
    );
    let link = |target: &str, name: &str| {
        std::os::unix::fs::symlink(target, root.join("photos").join(name)).unwrap()
    };
    link("gone.jpg", "dangling.jpg");
    link("gone.txt", "dangling.txt");
    link("..", "loop");

    // Directory walk: the broken media link is an error naming it, the rest is scored, exit 3.
    let (code, paths, stderr) = score_in(root, &["photos"]);
    assert_eq!(code, 3, "{stderr}");
    assert_eq!(paths, ["photos/a.jpg"]);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(
        errors,
        ["error: photos/dangling.jpg: broken symbolic link"],
        "{stderr}"
    );
    assert!(
        stderr.contains("1 path(s) could not be read while searching the inputs"),
        "{stderr}"
    );
    // The loop loses nothing: a warning only. A broken link with a non-media name is not an input.
    assert!(
        stderr.contains("warning: photos/loop links back to"),
        "{stderr}"
    );
    assert!(!stderr.contains("dangling.txt"), "{stderr}");

    // Glob: the same broken link matched by a pattern.
    let (code, paths, stderr) = score_in(root, &["photos/*.jpg"]);
    assert_eq!(code, 3, "{stderr}");
    assert_eq!(paths, ["photos/a.jpg"]);
    assert!(
        stderr.contains("error: photos/dangling.jpg: broken symbolic link"),
        "{stderr}"
    );

    // Named directly, it is an error like a missing file.
    let (code, _, stderr) = score_in(root, &["photos/dangling.jpg"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("photos/dangling.jpg: broken symbolic link"),
        "{stderr}"
    );

    // An unreadable folder (permissions mean nothing to root).
    if !is_root() {
        use std::os::unix::fs::PermissionsExt;
        std::fs::remove_file(root.join("photos/dangling.jpg")).unwrap();
        let locked = root.join("photos/locked");
        std::fs::create_dir(&locked).unwrap();
        copy_to(&images_dir().join("boy_colorful.jpg"), &locked, "b.jpg");
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o000)).unwrap();
        let (code, paths, stderr) = score_in(root, &["photos"]);
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(code, 3, "{stderr}");
        assert_eq!(paths, ["photos/a.jpg"]);
        assert!(
            stderr.contains("error: photos/locked: cannot read:"),
            "{stderr}"
        );
        let (code, _, stderr) = score_in(root, &["photos/**/*.jpg"]);
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(code, 3, "{stderr}");
    }
}

#[test]
fn repeated_inputs_are_scored_once_with_a_warning_naming_them() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    copy_to(&images_dir().join("boy_colorful.jpg"), root, "a.jpg");
    let (code, paths, stderr) = score_in(root, &["a.jpg", "./a.jpg"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(paths, ["a.jpg"]);
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("warning:"))
        .collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(warnings[0].contains("1 input repeats"), "{}", warnings[0]);
    assert!(warnings[0].ends_with(": ./a.jpg"), "{}", warnings[0]);

    // Many repeats: one line, a count, the first few named.
    let absolute = root.join("a.jpg");
    let args = [
        "a.jpg",
        "./a.jpg",
        ".",
        "*.jpg",
        absolute.to_str().unwrap(),
        "././a.jpg",
    ];
    let (code, paths, stderr) = score_in(root, &args);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(paths, ["a.jpg"]);
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("warning:"))
        .collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(warnings[0].contains("5 inputs repeat"), "{}", warnings[0]);
    assert!(
        warnings[0].contains("./a.jpg, ./a.jpg, a.jpg and 2 more"),
        "{}",
        warnings[0]
    );

    // No repeat, no warning.
    let (_, _, stderr) = score_in(root, &["a.jpg"]);
    assert!(!stderr.contains("warning"), "{stderr}");

    // A `**` glob that goes round a folder link loop reaches the file again and again: once.
    std::os::unix::fs::symlink(".", root.join("loop")).unwrap();
    let (code, paths, stderr) = score_in(root, &["**/*.jpg"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(paths, ["a.jpg"]);
    assert!(
        stderr.contains("warning:") && stderr.contains("loop/a.jpg"),
        "{stderr}"
    );
    // A symlink to a file is an input of its own.
    std::os::unix::fs::symlink("a.jpg", root.join("b.jpg")).unwrap();
    let (code, paths, stderr) = score_in(root, &["a.jpg", "b.jpg"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(paths, ["a.jpg", "b.jpg"]);
}

/// A copy of the tiny model with the safetensors weights only, and `config` as config.json.
fn model_with_config(config: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for name in [
        "generation_config.json",
        "preprocessor_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
        "tokenizer_config.json",
        "model.safetensors",
    ] {
        copy_to(&tiny_model().join(name), tmp.path(), name);
    }
    std::fs::write(tmp.path().join("config.json"), config).unwrap();
    tmp
}

fn tiny_config() -> serde_json::Map<String, Value> {
    let text = std::fs::read_to_string(tiny_model().join("config.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn info_reports_a_config_json_that_does_not_match_the_weights() {
    // Another architecture.
    let dir = model_with_config(r#"{"model_type": "bert", "hidden_size": 768}"#);
    let r = run_expecting(qalign().arg("info").arg(dir.path()), 1);
    assert!(r.stdout.is_empty(), "{}", r.stdout);
    assert!(
        r.stderr
            .contains("is for model_type `bert`, not `mplug_owl2`"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("config.json"), "{}", r.stderr);

    // An empty config: every size would be OneAlign's default, which the tensors contradict.
    let dir = model_with_config("{}");
    let r = run_expecting(qalign().arg("info").arg(dir.path()), 1);
    assert!(r.stdout.is_empty(), "{}", r.stdout);
    assert!(r.stderr.contains("warning:"), "{}", r.stderr);
    assert!(
        r.stderr.contains("lacks model_type, vocab_size"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("does not describe the weights beside it"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains(
            "`model.embed_tokens.weight` is [32000, 64] in the weights, [32000, 4096] by the config"
        ),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains("num_hidden_layers is 32 but the weights hold 2 such layers"),
        "{}",
        r.stderr
    );

    // One wrong size.
    let mut config = tiny_config();
    config.insert("num_hidden_layers".into(), 3.into());
    let dir = model_with_config(&Value::Object(config).to_string());
    let r = run_expecting(qalign().arg("info").arg(dir.path()), 1);
    assert!(
        r.stderr
            .contains("num_hidden_layers is 3 but the weights hold 2 such layers"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("warning"), "{}", r.stderr);

    // A key missing whose default cannot be checked against the tensors: named, not an error.
    let mut config = tiny_config();
    config.remove("rms_norm_eps");
    let dir = model_with_config(&Value::Object(config).to_string());
    let r = run_expecting(qalign().arg("info").arg(dir.path()), 0);
    assert!(
        r.stderr.contains("warning:") && r.stderr.contains("lacks rms_norm_eps"),
        "{}",
        r.stderr
    );
    assert!(r.stdout.contains("RMSNorm eps 1e-6"), "{}", r.stdout);

    // The fixture itself: no warning.
    let r = run_expecting(qalign().arg("info").arg(tiny_model()), 0);
    assert!(r.stderr.is_empty(), "{}", r.stderr);
    let folder = format!("model        {}", tiny_model().display());
    assert!(r.stdout.contains(&folder), "{}", r.stdout);

    // Without a MODEL argument, `$QALIGN_MODEL` names it, as for the other commands.
    let r = run_expecting(qalign().arg("info").env("QALIGN_MODEL", tiny_model()), 0);
    assert!(r.stdout.contains(&folder), "{}", r.stdout);
}

/// Rewrites a safetensors file without `tensor` (every other tensor as it was).
fn remove_tensor(file: &Path, tensor: &str) {
    let device = candle_core::Device::Cpu;
    let mut tensors = candle_core::safetensors::load(file, &device).unwrap();
    assert!(
        tensors.remove(tensor).is_some(),
        "{tensor} is in {}",
        file.display()
    );
    candle_core::safetensors::save(&tensors, file).unwrap();
}

#[test]
fn info_reports_a_checkpoint_without_its_lm_head() {
    let dir = model_with_config(&Value::Object(tiny_config()).to_string());
    remove_tensor(&dir.path().join("model.safetensors"), "lm_head.weight");
    let r = run_expecting(qalign().arg("info").arg(dir.path()), 1);
    assert!(r.stdout.is_empty(), "{}", r.stdout);
    assert!(
        r.stderr.contains("does not describe the weights beside it")
            && r.stderr.contains("the weights have no `lm_head.weight`"),
        "{}",
        r.stderr
    );
    // It is the only problem named: every other checked tensor is there.
    assert_eq!(
        r.stderr.matches("the weights have no").count(),
        1,
        "{}",
        r.stderr
    );
    // Scoring fails on that folder too.
    let image = images_dir().join("boy_colorful.jpg");
    let r = run_expecting(
        qalign()
            .arg("score")
            .arg("--model")
            .arg(dir.path())
            .arg(&image),
        1,
    );
    assert!(r.stderr.contains("lm_head"), "{}", r.stderr);

    // With tied embeddings the head is the embedding table: no head is needed.
    let mut config = tiny_config();
    config.insert("tie_word_embeddings".into(), true.into());
    std::fs::write(
        dir.path().join("config.json"),
        Value::Object(config).to_string(),
    )
    .unwrap();
    let r = run_expecting(qalign().arg("info").arg(dir.path()), 0);
    assert!(r.stderr.is_empty(), "{}", r.stderr);
    assert!(
        r.stdout.contains("llm          2 layers, hidden 64"),
        "{}",
        r.stdout
    );
}

/// Overwrites every element of a bf16 tensor of a safetensors file with NaN.
fn fill_with_nan(file: &Path, tensor: &str) {
    let mut bytes = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let entry = &header[tensor];
    assert_eq!(entry["dtype"], "BF16");
    let start = 8 + n + entry["data_offsets"][0].as_u64().unwrap() as usize;
    let end = 8 + n + entry["data_offsets"][1].as_u64().unwrap() as usize;
    for pair in bytes[start..end].chunks_mut(2) {
        pair.copy_from_slice(&0x7fc0u16.to_le_bytes());
    }
    std::fs::write(file, bytes).unwrap();
}

#[test]
fn nan_weights_are_blamed_on_the_model_not_the_image() {
    let dir = model_with_config(&Value::Object(tiny_config()).to_string());
    fill_with_nan(&dir.path().join("model.safetensors"), "model.norm.weight");
    let image = images_dir().join("boy_colorful.jpg");
    let r = run_expecting(
        qalign()
            .arg("score")
            .arg("--model")
            .arg(dir.path())
            .arg(&image)
            .arg(images_dir().join("synth_rgba_255x180.png"))
            .args(["--format", "jsonl"]),
        1,
    );
    assert!(r.stdout.is_empty(), "{}", r.stdout);
    let errors: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.starts_with("error:"))
        .collect();
    assert_eq!(errors.len(), 1, "one error for the run:\n{}", r.stderr);
    assert!(
        errors[0].contains("the model produced a non-finite logit"),
        "{}",
        errors[0]
    );
    assert!(errors[0].contains("weights"), "{}", errors[0]);
    assert!(
        errors[0].contains("the input is not at fault"),
        "{}",
        errors[0]
    );
}

#[test]
fn every_bad_flag_value_exits_2() {
    let image = images_dir().join("boy_colorful.jpg");
    let image = image.to_str().unwrap();
    let model = tiny_model();
    let model = model.to_str().unwrap();
    let train = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "train", "--model", model, "--data", "sft.json", "--output", "out",
        ]
        .map(String::from)
        .to_vec();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            ["score", "--model", model, image, "--device", "tpu"]
                .map(String::from)
                .to_vec(),
            "--device",
        ),
        (
            ["score", "--model", model, image, "--device", "cuda:x"]
                .map(String::from)
                .to_vec(),
            "--device",
        ),
        (
            ["bench", "--model", model, "--device", "tpu"]
                .map(String::from)
                .to_vec(),
            "--device",
        ),
        (
            ["bench", "--model", model, "--iters", "0"]
                .map(String::from)
                .to_vec(),
            "--iters",
        ),
        (
            ["bench", "--model", model, "--batch-sizes", "1,0"]
                .map(String::from)
                .to_vec(),
            "--batch-sizes",
        ),
        (
            ["info", model, "--format", "xml"]
                .map(String::from)
                .to_vec(),
            "--format",
        ),
        (
            ["info", model, "--weights", "gguf"]
                .map(String::from)
                .to_vec(),
            "--weights",
        ),
        (train(&["--device", "tpu"]), "--device"),
        (train(&["--lr", "-1"]), "--lr"),
        (train(&["--lr", "nan"]), "--lr"),
        (train(&["--warmup-ratio", "1.5"]), "--warmup-ratio"),
        (train(&["--weight-decay", "-0.1"]), "--weight-decay"),
        (train(&["--max-grad-norm", "inf"]), "--max-grad-norm"),
        (train(&["--lora-alpha", "nan"]), "--lora-alpha"),
        (train(&["--lora-dropout", "1"]), "--lora-dropout"),
        (train(&["--soft-sigma", "0"]), "--soft-sigma"),
        (train(&["--fps", "-2"]), "--fps"),
        (train(&["--lora-r", "0"]), "--lora-r"),
        (train(&["--loss", "l2"]), "--loss"),
    ];
    for (args, flag) in cases {
        let r = run(qalign().args(&args));
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains(flag), "{args:?}: {}", r.stderr);
        assert!(r.stdout.is_empty(), "{args:?}: {}", r.stdout);
    }
}

#[test]
fn help_lists_the_exit_codes_and_quiet_is_accepted() {
    let r = run_expecting(qalign().arg("--help"), 0);
    let section = r
        .stdout
        .split("Exit codes:")
        .nth(1)
        .unwrap_or_else(|| panic!("no exit codes in --help:\n{}", r.stdout));
    for code in ["0", "1", "2", "3", "130"] {
        assert!(
            section
                .lines()
                .any(|l| l.trim_start().starts_with(&format!("{code}  "))),
            "exit code {code} missing:\n{section}"
        );
    }
    assert!(
        section.contains("invalid command-line arguments"),
        "{section}"
    );
    let r = run_expecting(
        score()
            .arg("--quiet")
            .arg(images_dir().join("boy_colorful.jpg"))
            .args(["--format", "jsonl"]),
        0,
    );
    assert_eq!(r.stdout.lines().count(), 1);
    run_expecting(
        qalign()
            .args(["-q", "info"])
            .arg(tiny_model())
            .args(["--format", "json"]),
        0,
    );
}

#[test]
fn error_lines_name_the_file_once() {
    let error_line = |r: &Run| -> String {
        let lines: Vec<&str> = r
            .stderr
            .lines()
            .filter(|l| l.starts_with("error:"))
            .collect();
        assert_eq!(lines.len(), 1, "{}", r.stderr);
        lines[0].to_string()
    };
    // A broken config.json, read by info.
    let dir = model_with_config("{");
    let r = run_expecting(qalign().arg("info").arg(dir.path()), 1);
    let line = error_line(&r);
    let name = dir.path().display().to_string();
    assert!(line.contains(&format!("{name}/config.json")), "{line}");
    assert_eq!(line.matches(&name).count(), 1, "{line}");

    // A broken LoRA adapter, and a missing one.
    let adapter = tempfile::tempdir().unwrap();
    std::fs::write(adapter.path().join("adapter_config.json"), "{").unwrap();
    for dir in [adapter.path().to_path_buf(), adapter.path().join("missing")] {
        let r = run_expecting(
            score()
                .arg("--lora")
                .arg(&dir)
                .arg(images_dir().join("boy_colorful.jpg")),
            1,
        );
        let line = error_line(&r);
        assert!(line.contains("cannot load the LoRA adapter"), "{line}");
        assert_eq!(
            line.matches(&dir.display().to_string()).count(),
            1,
            "{line}"
        );
    }
}
