//! How `qalign score` turns its arguments into inputs, through the real binary on the tiny model:
//! macOS AppleDouble files and hidden names in searches, `--out` resuming a file spelled another
//! way, and manifest lines (byte order mark, CRLF, names that are not UTF-8).

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

/// What macOS writes as `._NAME` beside each file on a FAT/exFAT/SMB volume: the AppleDouble
/// magic and version, then a header, no pixels.
const APPLE_DOUBLE: &[u8] = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        \x00\x02";

/// `qalign score ARGS --format jsonl` run in `cwd`: exit code, records, stderr.
fn score_in(cwd: &Path, args: &[&str]) -> (i32, Vec<Value>, String) {
    let r = run(score()
        .current_dir(cwd)
        .args(args)
        .args(["--format", "jsonl"]));
    (r.code, jsonl(&r.stdout), r.stderr)
}

fn jsonl(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn paths(records: &[Value]) -> Vec<&str> {
    records
        .iter()
        .map(|r| r["path"].as_str().unwrap())
        .collect()
}

fn error_lines(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| l.starts_with("error")).collect()
}

#[test]
fn apple_double_files_and_hidden_glob_matches_are_passed_over() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let photos = root.join("photos");
    std::fs::create_dir_all(photos.join(".cache")).unwrap();
    copy_to(
        &images_dir().join("boy_colorful.jpg"),
        &photos,
        "boy_colorful.jpg",
    );
    copy_to(
        &images_dir().join("singapore_flyer.jpg"),
        &photos.join(".cache"),
        "singapore_flyer.jpg",
    );
    std::fs::write(photos.join("._boy_colorful.jpg"), APPLE_DOUBLE).unwrap();
    std::fs::write(photos.join(".cache/._singapore_flyer.jpg"), APPLE_DOUBLE).unwrap();
    std::fs::write(photos.join(".DS_Store"), b"\x00\x00\x00\x01Bud1").unwrap();

    // A directory: every media name, hidden folders included, but not the AppleDouble files
    // (they failed as undecodable images before, and the run ended with exit code 3).
    let (code, records, stderr) = score_in(root, &["photos"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        paths(&records),
        [
            "photos/.cache/singapore_flyer.jpg",
            "photos/boy_colorful.jpg"
        ]
    );
    for r in &records {
        check_against_fixture(r, "1-5");
    }
    assert!(error_lines(&stderr).is_empty(), "{stderr}");
    assert!(
        stderr.contains("note: 2 macOS metadata file(s) (`._NAME`, AppleDouble) passed over"),
        "{stderr}"
    );

    // A glob: as in a shell, a wildcard does not match a leading dot (`.DS_Store` and the
    // AppleDouble files were matched and failed before).
    let (code, records, stderr) = score_in(root, &["photos/*"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(paths(&records), ["photos/boy_colorful.jpg"]);
    check_against_fixture(&records[0], "1-5");
    assert!(error_lines(&stderr).is_empty(), "{stderr}");
    let (code, records, stderr) = score_in(root, &["./photos/**/*.jpg"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(paths(&records), ["photos/boy_colorful.jpg"]);
    // A dot written in the pattern takes hidden names; AppleDouble files still are passed over.
    let (code, records, stderr) = score_in(root, &["photos/.*/*.jpg"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(paths(&records), ["photos/.cache/singapore_flyer.jpg"]);
    check_against_fixture(&records[0], "1-5");
    assert!(
        stderr.contains("note: 1 macOS metadata file(s)"),
        "{stderr}"
    );

    // Named directly, an AppleDouble file is an input like any other, and fails alone.
    let (code, _, stderr) = score_in(root, &["photos/._boy_colorful.jpg"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("cannot decode photos/._boy_colorful.jpg"),
        "{stderr}"
    );
}

#[test]
fn out_resumes_a_file_named_another_way() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    std::fs::create_dir(root.join("sub")).unwrap();
    copy_to(
        &images_dir().join("boy_colorful.jpg"),
        root,
        "boy_colorful.jpg",
    );
    let out = root.join("scores.jsonl");
    let lines = || std::fs::read_to_string(&out).unwrap().lines().count();
    let score_out = |input: &str| {
        let r = run(score()
            .current_dir(root)
            .args([input, "--out", "scores.jsonl"]));
        (r.code, (), r.stderr)
    };

    let (code, _, stderr) = score_out("boy_colorful.jpg");
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(lines(), 1);
    let absolute = root.join("boy_colorful.jpg");
    for spelling in [
        "./boy_colorful.jpg",
        "sub/../boy_colorful.jpg",
        absolute.to_str().unwrap(),
    ] {
        let (code, _, stderr) = score_out(spelling);
        assert_eq!(code, 0, "{spelling}: {stderr}");
        assert!(
            stderr.contains("1 of 1 input(s) already in scores.jsonl: skipped"),
            "{spelling}: {stderr}"
        );
        assert!(!stderr.contains("loading model"), "{spelling}: {stderr}");
        assert_eq!(lines(), 1, "{spelling} was scored again");
    }

    // A new file beside it, found by a directory walk: only that one is scored.
    copy_to(
        &images_dir().join("singapore_flyer.jpg"),
        root,
        "singapore_flyer.jpg",
    );
    let (code, _, stderr) = score_out(".");
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("1 of 2 input(s) already in scores.jsonl: skipped"),
        "{stderr}"
    );
    let records = jsonl(&std::fs::read_to_string(&out).unwrap());
    assert_eq!(
        paths(&records),
        ["boy_colorful.jpg", "./singapore_flyer.jpg"]
    );
    for r in &records {
        check_against_fixture(r, "1-5");
    }
}

#[test]
fn manifest_lines_with_a_byte_order_mark_crlf_and_names_that_are_not_utf8() {
    use std::os::unix::ffi::OsStrExt;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    copy_to(
        &images_dir().join("boy_colorful.jpg"),
        root,
        "boy_colorful.jpg",
    );
    std::fs::create_dir(root.join("sub")).unwrap();
    // `find sub -name '*.jpg' > list.txt` writes this name as its bytes.
    let odd = root
        .join("sub")
        .join(std::ffi::OsStr::from_bytes(b"caf\xe9.jpg"));
    std::fs::copy(images_dir().join("singapore_flyer.jpg"), &odd).unwrap();
    // Written on Windows: a byte order mark, CRLF, an indented line, a comment.
    let mut list =
        b"\xEF\xBB\xBFboy_colorful.jpg\r\n\r\n# a comment\r\n  sub/caf\xe9.jpg \r\n".to_vec();
    list.extend_from_slice(b"missing.jpg\r\n");
    std::fs::write(root.join("list.txt"), list).unwrap();

    let (code, records, stderr) = score_in(root, &["--manifest", "list.txt"]);
    // The missing file fails alone: exit code 3, the two others scored.
    assert_eq!(code, 3, "{stderr}");
    assert_eq!(
        error_lines(&stderr),
        ["error: cannot read missing.jpg: No such file or directory (os error 2)"],
        "{stderr}"
    );
    assert_eq!(paths(&records), ["boy_colorful.jpg", "sub/caf\u{FFFD}.jpg"]);
    check_against_fixture(&records[0], "1-5");
    let flyer = expected_task("singapore_flyer.jpg", "quality");
    assert_close(
        num(&records[1]["score"]),
        num(&flyer["score15"]),
        TOL_SCORE15,
        "sub/café.jpg score",
    );
    assert_all_close(
        &f64s(&records[1]["probs"]),
        &f64s(&flyer["level_probs"]),
        TOL_PROBS,
        "sub/café.jpg probs",
    );
}

/// `--manifest -` reads the list from stdin (as `find … | qalign score --manifest -` writes it);
/// a listed `-` is the file of that name; `-` and `--manifest -` together are a usage error.
#[test]
fn a_manifest_on_stdin() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    copy_to(
        &images_dir().join("boy_colorful.jpg"),
        root,
        "boy_colorful.jpg",
    );
    let r = run(score()
        .current_dir(root)
        .args(["--manifest", "-", "--format", "jsonl"])
        .write_stdin("./boy_colorful.jpg\n-\n"));
    // The file named `-` does not exist: it fails alone, and stdin is not read as an image.
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert_eq!(
        error_lines(&r.stderr),
        ["error: cannot read ./-: No such file or directory (os error 2)"],
        "{}",
        r.stderr
    );
    let records = jsonl(&r.stdout);
    assert_eq!(paths(&records), ["./boy_colorful.jpg"]);
    check_against_fixture(&records[0], "1-5");

    let r = run(score()
        .current_dir(root)
        .args(["--manifest", "-"])
        .write_stdin("# nothing\n\n"));
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("stdin (--manifest -) lists no input"),
        "{}",
        r.stderr
    );

    let r = run(score()
        .current_dir(root)
        .args(["-", "--manifest", "-"])
        .write_stdin("boy_colorful.jpg\n"));
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("both read stdin"), "{}", r.stderr);
}

/// The table shows a control character in a file name escaped, one record per line; JSONL keeps
/// the name as it is.
#[test]
fn a_newline_in_a_file_name_stays_on_its_table_line() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    copy_to(&images_dir().join("boy_colorful.jpg"), root, "a\nb.jpg");
    let r = run(score().current_dir(root).arg("a\nb.jpg"));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", r.stdout);
    assert!(lines[0].starts_with("path      task"), "{}", lines[0]);
    assert!(lines[1].starts_with("a\\nb.jpg  quality"), "{}", lines[1]);

    let (code, records, stderr) = score_in(root, &["a\nb.jpg"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(paths(&records), ["a\nb.jpg"]);
}
