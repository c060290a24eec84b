//! `qalign score` and `qalign info` run as the real binary on the tiny fixture model: every
//! output format against the fixture scores, weight layouts, batching, input expansion, custom
//! questions and the error paths (exit codes and messages).

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::*;
use serde_json::Value;

const QUALITY_QUESTION: &str = "How would you rate the quality of this image?";
const QUALITY_PREFIX: &str = "The quality of the image is";

/// `qalign score <images dir> --task all --format json --scale <scale>` → records checked
/// against the fixtures; returns them.
fn score_dir_all_tasks(scale: &str) -> Vec<Value> {
    let r = run_expecting(
        score()
            .arg(images_dir())
            .args(["--task", "all", "--format", "json", "--scale", scale]),
        0,
    );
    let records = json_records(&r.stdout);
    assert_eq!(records.len(), 10, "5 images × 2 tasks");
    let mut seen = BTreeSet::new();
    for rec in &records {
        check_against_fixture(rec, scale);
        assert!(seen.insert((file_name(rec), rec["task"].as_str().unwrap().to_string())));
        assert!(
            rec.get("frames").is_none() && rec.get("windows").is_none(),
            "image records carry no video fields: {rec}"
        );
    }
    let names: BTreeSet<String> = seen.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(names, image_names().into_iter().collect());
    records
}

#[test]
fn json_scores_every_image_and_task_on_both_scales() {
    let five = score_dir_all_tasks("1-5");
    let one = score_dir_all_tasks("0-1");
    // Same distributions, only the scale differs: score15 = 1 + 4·score01, std15 = 4·std01.
    for (a, b) in five.iter().zip(&one) {
        assert_eq!(a["path"], b["path"]);
        assert_eq!(a["task"], b["task"]);
        assert_eq!(a["probs"], b["probs"]);
        assert_eq!(a["logits"], b["logits"]);
        assert_close(
            num(&a["score"]),
            1.0 + 4.0 * num(&b["score"]),
            1e-12,
            "1-5 vs 0-1",
        );
        assert_close(
            num(&a["std"]),
            4.0 * num(&b["std"]),
            1e-12,
            "std 1-5 vs 0-1",
        );
        assert_eq!(a["entropy"], b["entropy"]);
    }
}

#[test]
fn jsonl_gives_one_record_per_line_with_the_fixture_values() {
    let r = run_expecting(
        score()
            .arg(images_dir())
            .args(["--task", "all", "--format", "jsonl"]),
        0,
    );
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 10, "{}", r.stdout);
    for line in lines {
        let rec: Value = serde_json::from_str(line).unwrap();
        check_against_fixture(&rec, "1-5");
    }
}

#[test]
fn csv_has_a_header_and_one_row_per_image_and_task() {
    let r = run_expecting(
        score()
            .arg(images_dir())
            .args(["--task", "all", "--format", "csv", "--scale", "0-1"]),
        0,
    );
    let mut lines = r.stdout.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let mut expected_header = vec!["path", "task", "input", "score", "scale"];
    let p_cols: Vec<String> = LEVELS.iter().map(|l| format!("p_{l}")).collect();
    let logit_cols: Vec<String> = LEVELS.iter().map(|l| format!("logit_{l}")).collect();
    expected_header.extend(p_cols.iter().map(String::as_str));
    expected_header.extend(logit_cols.iter().map(String::as_str));
    expected_header.extend(["std", "entropy", "frames", "fps"]);
    assert_eq!(header, expected_header);
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 10);
    for row in rows {
        assert_eq!(row.len(), header.len(), "{row:?}");
        let name = Path::new(row[0]).file_name().unwrap().to_str().unwrap();
        let task = row[1];
        assert_eq!(row[2], "image");
        assert_eq!(row[4], "0-1");
        let e = expected_task(name, task);
        let score: f64 = row[3].parse().unwrap();
        assert_close(
            score,
            num(&e["score01"]),
            TOL_SCORE01,
            &format!("{name} {task}"),
        );
        let probs: Vec<f64> = row[5..10].iter().map(|s| s.parse().unwrap()).collect();
        assert_all_close(&probs, &f64s(&e["level_probs"]), TOL_PROBS, "csv probs");
        let logits: Vec<f64> = row[10..15].iter().map(|s| s.parse().unwrap()).collect();
        assert_all_close(&logits, &f64s(&e["level_logits"]), TOL_LOGITS, "csv logits");
        assert_eq!(row[17], "", "no frame count for an image");
        assert_eq!(row[18], "", "no fps for an image");
    }
}

/// Splits one CSV line with RFC 4180 quoting.
fn csv_fields(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                chars.next();
                fields.last_mut().unwrap().push('"');
            }
            ('"', _) => quoted = !quoted,
            (',', false) => fields.push(String::new()),
            (c, _) => fields.last_mut().unwrap().push(c),
        }
    }
    fields
}

#[test]
fn csv_quotes_odd_paths_and_the_model_can_come_from_the_environment() {
    let tmp = tempfile::tempdir().unwrap();
    let odd = copy_to(
        &images_dir().join("synth_portrait_120x333_gray.png"),
        tmp.path(),
        "portrait, \"gray\".png",
    );
    let r = run_expecting(
        qalign()
            .env("QALIGN_MODEL", tiny_model())
            .arg("score")
            .arg(&odd)
            .args(["--format", "csv"]),
        0,
    );
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", r.stdout);
    let header = csv_fields(lines[0]);
    let row = csv_fields(lines[1]);
    assert_eq!(row.len(), header.len(), "{row:?}");
    assert_eq!(row[0], odd.to_str().unwrap());
    let e = expected_task("synth_portrait_120x333_gray.png", "quality");
    assert_close(
        row[3].parse().unwrap(),
        num(&e["score15"]),
        TOL_SCORE15,
        "score",
    );
}

#[test]
fn table_lists_every_path_and_names_the_scale() {
    let r = run_expecting(score().arg(images_dir()).args(["--format", "table"]), 0);
    for name in image_names() {
        let line = r
            .stdout
            .lines()
            .find(|l| l.contains(&name))
            .unwrap_or_else(|| panic!("{name} missing from the table:\n{}", r.stdout));
        // path, task, input, score, level, std
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cols[1], "quality");
        assert_eq!(cols[2], "image");
        let score: f64 = cols[3].parse().unwrap();
        let e = expected_task(&name, "quality");
        assert_close(score, num(&e["score15"]), 5e-5, "table score (4 decimals)");
        let probs = f64s(&e["level_probs"]);
        let best = (0..5).fold(0, |b, i| if probs[i] > probs[b] { i } else { b });
        assert_eq!(cols[4], LEVELS[best], "most likely level of {name}");
    }
    assert!(r.stdout.contains("scores on the 1-5 scale"), "{}", r.stdout);
}

#[test]
fn bin_and_safetensors_weights_give_identical_output() {
    let out = |weights: &str| {
        run_expecting(
            score().arg(images_dir()).args([
                "--task",
                "all",
                "--format",
                "json",
                "--weights",
                weights,
            ]),
            0,
        )
        .stdout
    };
    let bin = out("bin");
    let safetensors = out("safetensors");
    assert_eq!(bin, safetensors);
    for rec in json_records(&bin) {
        check_against_fixture(&rec, "1-5");
    }
}

#[test]
fn batch_size_does_not_change_the_scores() {
    let out = |batch: &str| {
        json_records(
            &run_expecting(
                score().arg(images_dir()).args([
                    "--task",
                    "all",
                    "--format",
                    "json",
                    "--batch-size",
                    batch,
                ]),
                0,
            )
            .stdout,
        )
    };
    let one = out("1");
    let five = out("5");
    assert_eq!(one.len(), 10);
    assert_eq!(five.len(), 10);
    for (a, b) in one.iter().zip(&five) {
        assert_eq!(a["path"], b["path"]);
        assert_eq!(a["task"], b["task"]);
        assert_close(num(&a["score"]), num(&b["score"]), 1e-5, "batch 1 vs 5");
        assert_all_close(&f64s(&a["probs"]), &f64s(&b["probs"]), 1e-6, "probs");
    }
}

/// Score paths (quality, JSON, run from `cwd`) and return the printed paths in order.
fn scored_paths(cwd: &Path, args: &[&str]) -> Vec<String> {
    let r = run_expecting(
        score()
            .current_dir(cwd)
            .args(args)
            .args(["--format", "json"]),
        0,
    );
    json_records(&r.stdout)
        .iter()
        .map(|rec| {
            check_against_fixture(rec, "1-5");
            rec["path"].as_str().unwrap().to_string()
        })
        .collect()
}

#[test]
fn globs_directories_and_files_expand_in_order_without_duplicates() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let nested = root.join("a/b");
    std::fs::create_dir_all(&nested).unwrap();
    copy_to(
        &images_dir().join("boy_colorful.jpg"),
        root,
        "boy_colorful.jpg",
    );
    copy_to(
        &images_dir().join("synth_landscape_300x200_rgb.png"),
        &nested,
        "synth_landscape_300x200_rgb.png",
    );
    copy_to(
        &images_dir().join("synth_rgba_255x180.png"),
        &root.join("a"),
        "synth_rgba_255x180.png",
    );
    std::fs::write(root.join("notes.txt"), "not an image").unwrap();
    std::fs::write(nested.join("README"), "not an image either").unwrap();

    // A directory is searched recursively, non-media names skipped, sorted.
    assert_eq!(
        scored_paths(root, &["."]),
        [
            "./a/b/synth_landscape_300x200_rgb.png",
            "./a/synth_rgba_255x180.png",
            "./boy_colorful.jpg"
        ]
    );
    // A glob (quoted: the binary expands it), sorted.
    assert_eq!(
        scored_paths(root, &["a/**/*.png"]),
        [
            "a/b/synth_landscape_300x200_rgb.png",
            "a/synth_rgba_255x180.png"
        ]
    );
    // Explicit files keep their order; a file named again (directly, through a glob or a
    // directory) is scored once.
    assert_eq!(
        scored_paths(
            root,
            &[
                "boy_colorful.jpg",
                "a/b",
                "boy_colorful.jpg",
                "*.jpg",
                "a/b/*.png"
            ]
        ),
        ["boy_colorful.jpg", "a/b/synth_landscape_300x200_rgb.png"]
    );
}

#[test]
fn the_same_file_spelled_differently_is_scored_once() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    copy_to(
        &images_dir().join("boy_colorful.jpg"),
        root,
        "boy_colorful.jpg",
    );
    let absolute = root.join("boy_colorful.jpg");
    let paths = scored_paths(
        root,
        &[
            "boy_colorful.jpg",
            "./boy_colorful.jpg",
            absolute.to_str().unwrap(),
            ".",
        ],
    );
    assert_eq!(paths, ["boy_colorful.jpg"]);
}

#[test]
fn a_missing_path_or_an_empty_glob_is_an_error_before_loading_the_model() {
    let r = run_expecting(score().arg(images_dir()).arg("/nonexistent/photo.jpg"), 1);
    assert!(
        r.stderr
            .contains("no such file or directory: /nonexistent/photo.jpg"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("loading model"), "{}", r.stderr);
    assert!(r.stdout.is_empty());

    let pattern = format!("{}/*.nothing", images_dir().display());
    let r = run_expecting(score().arg(&pattern), 1);
    assert!(
        r.stderr.contains(&format!("no file matches `{pattern}`")),
        "{}",
        r.stderr
    );

    let empty = tempfile::tempdir().unwrap();
    std::fs::write(empty.path().join("notes.txt"), "x").unwrap();
    let r = run_expecting(score().arg(empty.path()), 1);
    assert!(
        r.stderr.contains("holds no image or video files"),
        "{}",
        r.stderr
    );
}

#[test]
fn bad_files_are_reported_and_skipped_with_exit_code_3() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let text = dir.join("notes.txt");
    std::fs::write(&text, "this is not an image\n").unwrap();
    let empty = dir.join("empty.png");
    std::fs::write(&empty, b"").unwrap();
    let jpeg = std::fs::read(images_dir().join("boy_colorful.jpg")).unwrap();
    let truncated = dir.join("truncated.jpg");
    std::fs::write(&truncated, &jpeg[..600]).unwrap();
    let good_a = images_dir().join("boy_colorful.jpg");
    let good_b = images_dir().join("synth_rgba_255x180.png");

    let r = run_expecting(
        score()
            .arg(&good_a)
            .arg(&text)
            .arg(&empty)
            .arg(&truncated)
            .arg(&good_b)
            .args(["--format", "json", "--batch-size", "2"]),
        3,
    );
    let records = json_records(&r.stdout);
    let names: Vec<String> = records.iter().map(file_name).collect();
    assert_eq!(names, ["boy_colorful.jpg", "synth_rgba_255x180.png"]);
    for rec in &records {
        check_against_fixture(rec, "1-5");
    }
    // One error line per bad file, naming it once.
    for bad in [&text, &empty, &truncated] {
        let name = bad.display().to_string();
        let lines: Vec<&str> = r.stderr.lines().filter(|l| l.contains(&name)).collect();
        assert_eq!(lines.len(), 1, "{name}:\n{}", r.stderr);
        assert!(lines[0].starts_with("error: "), "{}", lines[0]);
        assert_eq!(lines[0].matches(&name).count(), 1, "{}", lines[0]);
    }
    assert!(r.stderr.contains("3 of 5 input(s) failed"), "{}", r.stderr);
}

#[test]
fn a_custom_question_with_the_official_wording_reproduces_the_quality_scores() {
    let r = run_expecting(
        score().arg(images_dir()).args([
            "--question",
            QUALITY_QUESTION,
            "--answer-prefix",
            QUALITY_PREFIX,
            "--format",
            "json",
        ]),
        0,
    );
    let records = json_records(&r.stdout);
    assert_eq!(records.len(), 5);
    for rec in &records {
        assert_eq!(rec["task"], "custom");
        let mut as_quality = rec.clone();
        as_quality["task"] = "quality".into();
        check_against_fixture(&as_quality, "1-5");
    }

    // Another wording is another prompt: different scores, still well-formed.
    let r = run_expecting(
        score().arg(images_dir().join("boy_colorful.jpg")).args([
            "--question",
            "How clear is this image?",
            "--answer-prefix",
            "The clarity of the image is",
            "--format",
            "json",
            "--scale",
            "0-1",
        ]),
        0,
    );
    let rec = &json_records(&r.stdout)[0];
    check_record_shape(rec, "image", "0-1");
    let quality = num(&expected_task("boy_colorful.jpg", "quality")["score01"]);
    assert!((num(&rec["score"]) - quality).abs() > 1e-4, "{rec}");
}

#[test]
fn custom_question_usage_errors() {
    let image = images_dir().join("boy_colorful.jpg");
    // --question needs --answer-prefix and the other way round; neither goes with --task.
    for args in [
        &["--question", "How clear is this image?"][..],
        &["--answer-prefix", "The clarity of the image is"][..],
        &[
            "--question",
            "q?",
            "--answer-prefix",
            "a",
            "--task",
            "aesthetics",
        ][..],
    ] {
        let r = run_expecting(score().arg(&image).args(args), 2);
        assert!(r.stderr.contains("error:"), "{}", r.stderr);
        assert!(r.stdout.is_empty());
    }
    let r = run_expecting(
        score()
            .arg(&image)
            .args(["--question", "  ", "--answer-prefix", "x"]),
        2,
    );
    assert!(r.stderr.contains("must not be empty"), "{}", r.stderr);
    let r = run_expecting(
        score()
            .arg(&image)
            .args(["--question", "Rate <|image|> it", "--answer-prefix", "x"]),
        2,
    );
    assert!(
        r.stderr.contains("must not contain `<|image|>`"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("--question"), "{}", r.stderr);
}

#[test]
fn a_question_longer_than_the_context_is_a_usage_error_before_any_file_is_read() {
    // ~100 KB of text: far more tokens than the tiny model's 4096 positions. It is refused
    // once, for the whole run, not as a failure of each input.
    let question = "How would you rate the quality of this image? ".repeat(2200);
    let r = run_expecting(
        score().arg(images_dir().join("boy_colorful.jpg")).args([
            "--question",
            &question,
            "--answer-prefix",
            QUALITY_PREFIX,
        ]),
        2,
    );
    assert!(r.stdout.is_empty());
    assert!(
        r.stderr.contains("--question/--answer-prefix"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("prompt is too long"), "{}", r.stderr);
    assert!(
        r.stderr.contains("context of 4096 positions"),
        "{}",
        r.stderr
    );
    assert!(
        !r.stderr.contains("boy_colorful"),
        "no input was blamed: {}",
        r.stderr
    );
}

#[test]
fn a_model_path_that_does_not_exist_is_a_clear_error() {
    let image = images_dir().join("boy_colorful.jpg");
    let r = run_expecting(
        qalign()
            .arg("score")
            .arg(&image)
            .args(["--model", "/nonexistent"]),
        1,
    );
    assert!(
        r.stderr
            .contains("`/nonexistent` is neither an existing directory nor a hub id"),
        "{}",
        r.stderr
    );
}

#[test]
fn an_uncached_hub_id_offline_says_where_it_looked_and_how_to_get_weights() {
    let image = images_dir().join("boy_colorful.jpg");
    let hf_home = tempfile::tempdir().unwrap();
    let check = |r: &Run| {
        assert!(
            r.stderr
                .contains("model `q-future/one-align` is not in the Hugging Face cache"),
            "{}",
            r.stderr
        );
        assert!(
            r.stderr.contains(&hf_home.path().display().to_string()),
            "the cache folder is named: {}",
            r.stderr
        );
        assert!(r.stderr.contains("without --offline"), "{}", r.stderr);
        assert!(r.stderr.contains("--model DIR"), "{}", r.stderr);
    };
    // The default model, --offline flag.
    let r = run_expecting(
        qalign()
            .env("HF_HOME", hf_home.path())
            .arg("score")
            .arg(&image)
            .arg("--offline"),
        1,
    );
    check(&r);
    // HF_HUB_OFFLINE=1 does the same, also for `info`.
    let r = run_expecting(
        qalign()
            .env("HF_HOME", hf_home.path())
            .env("HF_HUB_OFFLINE", "1")
            .args(["info", "q-future/one-align"]),
        1,
    );
    check(&r);
}

/// A copy of the tiny model folder with only the files named (plus config and tokenizer files).
fn model_copy(weights: &[&str]) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for name in [
        "config.json",
        "generation_config.json",
        "preprocessor_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    .iter()
    .chain(weights)
    {
        copy_to(&tiny_model().join(name), tmp.path(), name);
    }
    tmp
}

/// Rewrites a safetensors file with one tensor renamed in its header (data untouched).
fn rename_tensor(file: &Path, from: &str, to: &str) {
    let bytes = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let entry = header.remove(from).unwrap();
    header.insert(to.to_string(), entry);
    let text = serde_json::to_vec(&Value::Object(header)).unwrap();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    out.extend(&bytes[8 + n..]);
    std::fs::write(file, out).unwrap();
}

#[test]
fn broken_weights_name_the_file_or_the_tensor() {
    let image = images_dir().join("boy_colorful.jpg");
    let score_with = |dir: &Path, extra: &[&str]| {
        let r = run_expecting(
            qalign()
                .arg("score")
                .arg(&image)
                .arg("--model")
                .arg(dir)
                .args(extra),
            1,
        );
        assert!(r.stdout.is_empty());
        assert!(
            r.stderr.contains("cannot load the model in"),
            "{}",
            r.stderr
        );
        r
    };

    // Truncated single-file safetensors.
    let truncated = model_copy(&["model.safetensors"]);
    let file = truncated.path().join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let r = score_with(truncated.path(), &[]);
    assert!(r.stderr.contains("model.safetensors"), "{}", r.stderr);

    // A tensor missing (renamed away) from the header.
    let renamed = model_copy(&["model.safetensors"]);
    rename_tensor(
        &renamed.path().join("model.safetensors"),
        "model.norm.weight",
        "model.norm.weight_renamed",
    );
    let r = score_with(renamed.path(), &[]);
    assert!(r.stderr.contains("model.norm.weight"), "{}", r.stderr);

    // A shard listed in the .bin index is gone.
    let no_shard = model_copy(&[
        "pytorch_model.bin.index.json",
        "pytorch_model-00001-of-00003.bin",
        "pytorch_model-00003-of-00003.bin",
    ]);
    let r = score_with(no_shard.path(), &["--weights", "bin"]);
    assert!(
        r.stderr.contains("pytorch_model-00002-of-00003.bin"),
        "{}",
        r.stderr
    );

    // No weights at all.
    let none = model_copy(&[]);
    let r = score_with(none.path(), &[]);
    assert!(
        r.stderr.contains(&none.path().display().to_string()),
        "{}",
        r.stderr
    );
}

#[test]
fn cuda_on_a_cpu_build_says_how_to_enable_it() {
    let r = run_expecting(
        score()
            .arg(images_dir().join("boy_colorful.jpg"))
            .args(["--device", "cuda"]),
        1,
    );
    assert!(r.stderr.contains("--features cuda"), "{}", r.stderr);
    let r = run_expecting(
        score()
            .arg(images_dir().join("boy_colorful.jpg"))
            .args(["--device", "tpu"]),
        2,
    );
    assert!(r.stderr.contains("unknown device `tpu`"), "{}", r.stderr);
}

#[test]
fn bad_flag_values_are_usage_errors() {
    let image = images_dir().join("boy_colorful.jpg");
    for (args, mention) in [
        (&["--scale", "0-10"][..], "--scale"),
        (&["--dtype", "f64"][..], "--dtype"),
        (&["--batch-size", "0"][..], "--batch-size"),
        (&["--format", "xml"][..], "--format"),
        (&["--task", "beauty"][..], "--task"),
        (&["--weights", "gguf"][..], "--weights"),
        (&["--max-frames", "0"][..], "--max-frames"),
        (&["--window", "0"][..], "--window"),
        (&["--fps", "0"][..], "--fps"),
        (&["--fps", "-1"][..], "--fps"),
        (&["--fps", "nan"][..], "--fps"),
    ] {
        let r = run_expecting(score().arg(&image).args(args), 2);
        assert!(r.stderr.contains(mention), "{args:?}: {}", r.stderr);
        assert!(r.stdout.is_empty());
    }
    // No path at all.
    run_expecting(qalign().arg("score"), 2);
}

/// Parameter counts per part, read from the safetensors header (buffers = the abstractor's
/// sin-cos tables).
fn counts_from_header() -> (u64, u64, u64, u64) {
    let bytes = std::fs::read(tiny_model().join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let (mut vision, mut abstractor, mut llm, mut buffers) = (0, 0, 0, 0);
    for (key, v) in header.iter().filter(|(k, _)| *k != "__metadata__") {
        let count: u64 = v["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap())
            .product();
        if key.ends_with("_pos_embed") {
            buffers += count;
        } else if key.starts_with("model.vision_model.") {
            vision += count;
        } else if key.starts_with("model.visual_abstractor.") {
            abstractor += count;
        } else {
            llm += count;
        }
    }
    (vision, abstractor, llm, buffers)
}

#[test]
fn info_prints_parameter_counts_by_part() {
    let (vision, abstractor, llm, buffers) = counts_from_header();
    assert_eq!(
        (vision, abstractor, llm, buffers),
        (203_520, 111_488, 4_211_776, 139_392)
    );
    let r = run_expecting(qalign().arg("info").arg(tiny_model()), 0);
    let count_of = |part: &str| -> String {
        let line = r
            .stdout
            .lines()
            .find(|l| l.starts_with("  ") && l.split_whitespace().next() == Some(part))
            .unwrap_or_else(|| panic!("no `{part}` count in:\n{}", r.stdout));
        line.split_whitespace().nth(1).unwrap().to_string()
    };
    assert_eq!(count_of("vision"), "203,520");
    assert_eq!(count_of("abstractor"), "111,488");
    assert_eq!(count_of("llm"), "4,211,776");
    assert_eq!(count_of("total"), "4,526,784");
    assert_eq!(count_of("buffers"), "139,392");
    assert!(r.stdout.contains("safetensors"), "{}", r.stdout);
    assert!(r.stdout.contains("model.safetensors"), "{}", r.stdout);

    let r = run_expecting(
        qalign()
            .arg("info")
            .arg(tiny_model())
            .args(["--format", "json"]),
        0,
    );
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    let parts: Vec<(String, u64)> = v["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["part"].as_str().unwrap().to_string(),
                p["parameters"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        parts,
        [
            ("vision".to_string(), vision),
            ("abstractor".to_string(), abstractor),
            ("llm".to_string(), llm)
        ]
    );
    let tensors: u64 = v["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["tensors"].as_u64().unwrap())
        .sum::<u64>()
        + v["buffers"]["tensors"].as_u64().unwrap();
    assert_eq!(tensors, 112, "the fixture README counts 112 tensors");
    assert_eq!(v["buffers"]["parameters"], buffers);
    assert_eq!(v["buffers"]["tensors"], 4);
    assert_eq!(v["ignored"], 0);
    assert_eq!(v["format"], "safetensors");
    assert_eq!(
        v["dtypes"],
        serde_json::json!({"bf16": vision + abstractor + llm, "f32": buffers})
    );
}

#[test]
fn info_reads_the_bin_layout_with_the_same_counts() {
    let text = run_expecting(qalign().arg("info").arg(tiny_model()), 0).stdout;
    let r = run_expecting(
        qalign()
            .arg("info")
            .arg(tiny_model())
            .args(["--weights", "bin", "--format", "json"]),
        0,
    );
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["format"], "pytorch-bin");
    assert_eq!(v["weight_files"].as_array().unwrap().len(), 3);
    let total: u64 = v["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["parameters"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 4_526_784);
    assert!(text.contains("4,526,784"));
    let r = run_expecting(qalign().args(["info", "/nonexistent"]), 1);
    assert!(r.stderr.contains("/nonexistent"), "{}", r.stderr);
}

#[test]
fn dash_scores_an_image_from_stdin_and_names_it_dash() {
    let image = images_dir().join("boy_colorful.jpg");
    let r = run_expecting(
        score()
            .args(["-", "--task", "all", "--format", "json"])
            .pipe_stdin(&image)
            .unwrap(),
        0,
    );
    let records = json_records(&r.stdout);
    assert_eq!(records.len(), 2, "{}", r.stdout);
    for mut rec in records {
        assert_eq!(rec["path"], "-");
        rec["path"] = "boy_colorful.jpg".into();
        check_against_fixture(&rec, "1-5");
    }
    let r = run_expecting(score().arg("-").write_stdin(""), 1);
    assert!(r.stderr.contains("stdin is empty"), "{}", r.stderr);
    assert!(r.stdout.is_empty());
}

/// `--revision` picks a snapshot of a cached hub id (here a tag whose ref names it; `main` is not
/// cached); it is a usage error when it cannot be a git revision, and an error for a folder.
#[test]
fn a_revision_of_a_cached_hub_id_is_scored_offline() {
    let image = images_dir().join("boy_colorful.jpg");
    let hf_home = tempfile::tempdir().unwrap();
    hub_cache_with_tiny_model(hf_home.path(), "v1");
    let score = |extra: &[&str]| {
        let mut cmd = qalign();
        cmd.env("HF_HOME", hf_home.path())
            .env("HF_HUB_OFFLINE", "1")
            .args(["score", "--model", "org/tiny", "--format", "json"])
            .arg(&image)
            .args(extra);
        run(&mut cmd)
    };
    let r = score(&["--revision", "v1"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let records: Value = serde_json::from_str(&r.stdout).unwrap();
    check_against_fixture(&records[0], "1-5");
    assert_eq!(score(&["--revision", TINY_COMMIT]).code, 0);

    let r = score(&[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("model `org/tiny` is not in"),
        "{}",
        r.stderr
    );
    let r = score(&["--revision", "v2"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("model `org/tiny@v2` is not in"),
        "{}",
        r.stderr
    );
    let r = score(&["--revision", "../v1"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("--revision"), "{}", r.stderr);

    let r = run_expecting(
        qalign().env("HF_HOME", hf_home.path()).args([
            "info",
            "org/tiny",
            "--offline",
            "--revision",
            "v1",
        ]),
        0,
    );
    assert!(r.stdout.contains("revision     v1"), "{}", r.stdout);
    let r = run_expecting(
        qalign()
            .args(["score", "--revision", "v1", "--model"])
            .arg(tiny_model())
            .arg(&image),
        1,
    );
    assert!(r.stderr.contains("applies to a hub id"), "{}", r.stderr);
}
