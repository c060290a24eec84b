//! `qalign score --manifest --shard I/N --out FILE` through the real binary: the shards' union is
//! the unsharded run, a rerun skips finished work, a record cut off by a crash is scored again,
//! and bad shard flags are usage errors.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;

/// `(path, task) → score` of a JSONL file.
fn jsonl_scores(path: &Path) -> BTreeMap<(String, String), f64> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let key = (
            v["path"].as_str().unwrap().to_owned(),
            v["task"].as_str().unwrap().to_owned(),
        );
        assert!(
            out.insert(key, num(&v["score"])).is_none(),
            "a duplicate record: {line}"
        );
    }
    out
}

fn manifest(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("files.txt");
    let mut text = String::from("# the fixture images\n\n");
    for entry in std::fs::read_dir(images_dir()).unwrap() {
        text += &format!("{}\n", entry.unwrap().path().display());
    }
    std::fs::write(&path, text).unwrap();
    path
}

fn sharded(manifest: &Path, shard: &str, out: &Path) -> Run {
    run(score()
        .arg("--manifest")
        .arg(manifest)
        .args(["--task", "all", "--shard", shard, "--out"])
        .arg(out))
}

#[test]
fn the_shards_union_is_the_unsharded_run_and_reruns_resume() {
    let dir = tempfile::tempdir().unwrap();
    let list = manifest(dir.path());
    let whole = dir.path().join("whole.jsonl");
    let r = run(score()
        .arg("--manifest")
        .arg(&list)
        .args(["--task", "all", "--out"])
        .arg(&whole));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.is_empty(), "records go to the file");
    let whole = jsonl_scores(&whole);
    assert_eq!(whole.len(), 10, "5 images × 2 tasks");
    let mut union = BTreeMap::new();
    for i in 0..3 {
        let part = dir.path().join(format!("part-{i}.jsonl"));
        let r = sharded(&list, &format!("{i}/3"), &part);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let scores = jsonl_scores(&part);
        assert!(!scores.is_empty());
        for (k, v) in scores {
            assert!(union.insert(k, v).is_none(), "an input in two shards");
        }
    }
    assert_eq!(union, whole);

    // A rerun of a finished shard scores nothing and leaves its file as it was.
    let part = dir.path().join("part-1.jsonl");
    let before = std::fs::read(&part).unwrap();
    let r = sharded(&list, "1/3", &part);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("already in"), "{}", r.stderr);
    assert!(
        !r.stderr.contains("loading model"),
        "nothing left to score: {}",
        r.stderr
    );
    assert_eq!(std::fs::read(&part).unwrap(), before);

    // A crash cut the last record: the rerun drops that input's records and scores it again.
    let part = dir.path().join("part-0.jsonl");
    let full = jsonl_scores(&part);
    let text = std::fs::read_to_string(&part).unwrap();
    let cut = &text[..text.len() - 40];
    std::fs::write(&part, cut).unwrap();
    let r = sharded(&list, "0/3", &part);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("scored only in part"), "{}", r.stderr);
    assert_eq!(jsonl_scores(&part), full);
}

/// `(path, task, question, scale)` of each line of a JSONL file, in order.
fn record_kinds(path: &Path) -> Vec<(String, String, Option<String>, String)> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let text = |key: &str| v[key].as_str().map(str::to_owned);
            (
                text("path").unwrap(),
                text("task").unwrap(),
                text("question"),
                text("scale").unwrap(),
            )
        })
        .collect()
}

#[test]
fn one_out_file_collects_tasks_questions_and_scales() {
    let dir = tempfile::tempdir().unwrap();
    let image = images_dir().join("boy_colorful.jpg");
    let out = dir.path().join("scores.jsonl");
    let score_into = |extra: &[&str]| {
        let r = run(score().arg(&image).args(extra).arg("--out").arg(&out));
        assert_eq!(r.code, 0, "{}", r.stderr);
        r
    };
    score_into(&["--task", "quality"]);
    // Another task adds its records and keeps the earlier ones.
    let r = score_into(&["--task", "aesthetics"]);
    assert!(!r.stderr.contains("dropping"), "{}", r.stderr);
    let sharp = ["--question", "How sharp is it?", "--answer-prefix", "It is"];
    score_into(&sharp);
    // Another question is not the one answered: it is asked too.
    let noisy = ["--question", "How noisy is it?", "--answer-prefix", "It is"];
    let r = score_into(&noisy);
    assert!(!r.stderr.contains("already in"), "{}", r.stderr);
    score_into(&["--task", "quality", "--scale", "0-1"]);
    let name = image.display().to_string();
    let kind = |task: &str, question: Option<&str>, scale: &str| {
        (
            name.clone(),
            task.to_owned(),
            question.map(str::to_owned),
            scale.to_owned(),
        )
    };
    let expected = vec![
        kind("quality", None, "1-5"),
        kind("aesthetics", None, "1-5"),
        kind("custom", Some("How sharp is it?"), "1-5"),
        kind("custom", Some("How noisy is it?"), "1-5"),
        kind("quality", None, "0-1"),
    ];
    assert_eq!(record_kinds(&out), expected);
    // Rerunning any of them finds it done and leaves the file as it is.
    let before = std::fs::read(&out).unwrap();
    for extra in [&sharp[..], &["--task", "all"]] {
        let r = score_into(extra);
        assert!(r.stderr.contains("already in"), "{}", r.stderr);
    }
    assert_eq!(std::fs::read(&out).unwrap(), before);
}

#[test]
fn a_missing_file_in_a_manifest_fails_alone() {
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("files.txt");
    let image = images_dir().join("boy_colorful.jpg");
    std::fs::write(
        &list,
        format!("/nonexistent/gone.jpg\n{}\n", image.display()),
    )
    .unwrap();
    let out = dir.path().join("scores.jsonl");
    let r = run(score().arg("--manifest").arg(&list).arg("--out").arg(&out));
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("/nonexistent/gone.jpg"), "{}", r.stderr);
    let scored = jsonl_scores(&out);
    assert_eq!(
        scored.keys().collect::<Vec<_>>(),
        [&(image.display().to_string(), "quality".to_string())]
    );
    // On the command line the same path is a typo: refused before anything is scored.
    let r = run(score().arg(&image).arg("/nonexistent/gone.jpg"));
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stdout.is_empty());
}

#[test]
fn bad_shard_flags_are_usage_errors() {
    let image = images_dir().join("boy_colorful.jpg");
    for bad in ["3/3", "1/0", "x/2", "2"] {
        let r = run(score().arg(&image).args(["--shard", bad]));
        assert_eq!(r.code, 2, "{bad}: {}", r.stderr);
        assert!(r.stderr.contains("--shard"), "{}", r.stderr);
    }
    let r = run(score().args(["--manifest", "/nonexistent/files.txt"]));
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("/nonexistent/files.txt"), "{}", r.stderr);
    let dir = tempfile::tempdir().unwrap();
    let not_ours = dir.path().join("other.jsonl");
    std::fs::write(&not_ours, "hello\nworld\n").unwrap();
    let r = run(score().arg(&image).arg("--out").arg(&not_ours));
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("not a qalign record"), "{}", r.stderr);
    assert_eq!(
        std::fs::read_to_string(&not_ours).unwrap(),
        "hello\nworld\n"
    );
}
