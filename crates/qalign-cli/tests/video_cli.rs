//! `qalign score` on videos, run as the real binary: the official 1 fps sampling of the fixture
//! clip against the fixture scores, windows, per-frame timelines, frame caps, content sniffing,
//! mixed image/video batches and broken or very short clips (generated with ffmpeg).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command as Process;

use common::*;
use serde_json::Value;

const BABY_FPS: f64 = 29.97;
const BABY_INDICES: [usize; 8] = [0, 29, 59, 89, 119, 149, 179, 209];

fn baby_mp4() -> PathBuf {
    fixtures().join("video/baby.mp4")
}

fn expected_video(key: &str) -> &'static Value {
    let v = &expected()["video"][key];
    assert!(v.is_object(), "no expected.video.{key}");
    v
}

/// A 64×48 test-pattern clip of `seconds` at 10 fps, H.264 in MP4.
fn test_clip(dir: &Path, name: &str, seconds: &str) -> PathBuf {
    let out = dir.join(name);
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc=size=64x48:rate=10",
        "-t",
        seconds,
        "-pix_fmt",
        "yuv420p",
        out.to_str().unwrap(),
    ]);
    out
}

fn ffmpeg(args: &[&str]) {
    let status = Process::new("ffmpeg")
        .args(["-v", "error", "-y", "-nostdin"])
        .args(args)
        .status()
        .expect("ffmpeg must be installed for the video tests");
    assert!(status.success(), "ffmpeg {args:?} failed");
}

fn indices(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

#[test]
fn the_fixture_clip_scores_like_the_official_video_scorer() {
    let r = run_expecting(score().arg(baby_mp4()).args(["--format", "json"]), 0);
    let records = json_records(&r.stdout);
    assert_eq!(records.len(), 1);
    let rec = &records[0];
    check_record_shape(rec, "video", "1-5");
    assert_eq!(rec["task"], "quality");
    assert_eq!(rec["frames"], 8);
    assert_close(num(&rec["fps"]), BABY_FPS, 1e-9, "fps");
    assert_eq!(indices(&rec["sampled_indices"]), BABY_INDICES);
    let e = expected_video("video_all_frames");
    assert_eq!(e["n_frames"], 8);
    assert_close(
        num(&rec["score"]),
        num(&e["score15"]),
        TOL_SCORE15,
        "score15",
    );
    assert_all_close(
        &f64s(&rec["probs"]),
        &f64s(&e["level_probs"]),
        TOL_PROBS,
        "probs",
    );
    assert_all_close(
        &f64s(&rec["logits"]),
        &f64s(&e["level_logits"]),
        TOL_LOGITS,
        "logits",
    );
    assert!(rec.get("windows").is_none(), "one pass, no windows: {rec}");
    assert!(rec.get("per_frame").is_none(), "{rec}");
    assert!(!r.stderr.contains("warning"), "{}", r.stderr);
}

/// `baby.mp4` in windows of 3 frames with a per-frame timeline, plus the fixture's 8 decoded
/// frames as images in the same call: the per-frame scores must equal those images' scores
/// (the decoded frames are bit-identical to the PNGs).
#[test]
fn windows_and_per_frame_scores_with_images_in_the_same_call() {
    let mut frames: Vec<PathBuf> = std::fs::read_dir(fixtures().join("video/frames"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    frames.sort();
    assert_eq!(frames.len(), 8);
    let r = run_expecting(
        score().arg(baby_mp4()).args(&frames).args([
            "--window",
            "3",
            "--per-frame",
            "--format",
            "json",
        ]),
        0,
    );
    let records = json_records(&r.stdout);
    assert_eq!(records.len(), 9, "1 video + 8 images");
    let video = &records[0];
    check_record_shape(video, "video", "1-5");
    assert_eq!(indices(&video["sampled_indices"]), BABY_INDICES);

    let windows = video["windows"].as_array().expect("a windows list");
    let spans: Vec<(u64, u64, u64)> = windows
        .iter()
        .map(|w| {
            (
                w["start_frame"].as_u64().unwrap(),
                w["end_frame"].as_u64().unwrap(),
                w["frames"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(spans, [(0, 59, 3), (89, 149, 3), (179, 209, 2)]);
    let first3 = expected_video("video_first3_frames");
    assert_close(
        num(&windows[0]["score"]),
        num(&first3["score15"]),
        TOL_SCORE15,
        "first window = the fixture's first 3 frames",
    );
    // The combined probabilities are the frame-weighted mean of the windows' probabilities, and
    // the score is linear in them, so it is the frame-weighted mean of the window scores.
    let weighted: f64 = windows
        .iter()
        .map(|w| num(&w["score"]) * num(&w["frames"]))
        .sum::<f64>()
        / 8.0;
    assert_close(num(&video["score"]), weighted, 1e-12, "combined score");
    let all8 = num(&expected_video("video_all_frames")["score15"]);
    assert!(
        (num(&video["score"]) - all8).abs() > 1e-3,
        "windowing changes the prompt, so the score differs from one pass"
    );

    let images: Vec<&Value> = records[1..].iter().collect();
    let per_frame = video["per_frame"].as_array().expect("a per_frame list");
    assert_eq!(per_frame.len(), 8);
    for ((entry, &index), image) in per_frame.iter().zip(&BABY_INDICES).zip(&images) {
        check_record_shape(image, "image", "1-5");
        assert!(image.get("frames").is_none(), "{image}");
        let name = file_name(image);
        assert!(
            name.ends_with(&format!("_src{index:04}.png")),
            "{name} is frame {index}"
        );
        assert_eq!(entry["frame"].as_u64().unwrap() as usize, index);
        assert_close(
            num(&entry["time_s"]),
            index as f64 / BABY_FPS,
            1e-12,
            "time_s",
        );
        assert_close(
            num(&entry["score"]),
            num(&image["score"]),
            TOL_SCORE15,
            &format!("frame {index} alone vs {name}"),
        );
    }
}

#[test]
fn a_capped_clip_is_found_by_content_whatever_its_name() {
    let tmp = tempfile::tempdir().unwrap();
    let clip = copy_to(&baby_mp4(), tmp.path(), "clip.dat");
    let image = images_dir().join("boy_colorful.jpg");
    let r = run_expecting(
        score().arg(&clip).arg(&image).args([
            "--max-frames",
            "4",
            "--task",
            "all",
            "--format",
            "json",
        ]),
        0,
    );
    let records = json_records(&r.stdout);
    assert_eq!(records.len(), 4, "video and image, 2 tasks each");
    for video in &records[..2] {
        check_record_shape(video, "video", "1-5");
        assert_eq!(video["path"], clip.to_str().unwrap());
        assert_eq!(video["frames"], 4);
        // The middle of 4 equal bins over the 8 one-per-second candidates.
        assert_eq!(indices(&video["sampled_indices"]), [29, 89, 149, 209]);
    }
    assert_eq!(records[0]["task"], "quality");
    assert_eq!(records[1]["task"], "aesthetics");
    for rec in &records[2..] {
        check_against_fixture(rec, "1-5");
    }
    assert!(
        r.stderr.contains("8 sampled frames capped to 4"),
        "{}",
        r.stderr
    );
}

#[test]
fn broken_videos_are_reported_and_the_rest_is_scored() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let empty = dir.join("empty.mp4");
    std::fs::write(&empty, b"").unwrap();
    let corrupt = dir.join("corrupt.mp4");
    let mut state = 0x2545_f491_u32;
    let noise: Vec<u8> = (0..4096)
        .map(|_| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 24) as u8
        })
        .collect();
    std::fs::write(&corrupt, noise).unwrap();
    let audio = dir.join("audio.mp4");
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "sine=duration=1",
        audio.to_str().unwrap(),
    ]);
    let clip = test_clip(dir, "two_seconds.mp4", "2");
    let image = images_dir().join("synth_rgba_255x180.png");

    let r = run_expecting(
        score()
            .arg(&empty)
            .arg(&corrupt)
            .arg(&clip)
            .arg(&audio)
            .arg(&image)
            .args(["--format", "jsonl"]),
        3,
    );
    let records: Vec<Value> = r
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 2, "{}", r.stdout);
    let video = &records[0];
    check_record_shape(video, "video", "1-5");
    assert_eq!(video["path"], clip.to_str().unwrap());
    assert_eq!(indices(&video["sampled_indices"]), [0, 10]);
    assert_close(num(&video["fps"]), 10.0, 1e-9, "fps");
    check_against_fixture(&records[1], "1-5");
    for (bad, why) in [
        (&empty, "file is empty"),
        (&corrupt, "not a readable media file"),
        (&audio, "no video stream"),
    ] {
        // One error line per bad file, naming it once.
        let name = bad.display().to_string();
        let line = r
            .stderr
            .lines()
            .find(|l| l.starts_with("error: ") && l.contains(&name))
            .unwrap_or_else(|| panic!("no error line for {name}:\n{}", r.stderr));
        // (ffprobe's own words, quoted after "ffprobe:", may name it again.)
        let ours = line.split(" (ffprobe:").next().unwrap();
        assert_eq!(ours.matches(&name).count(), 1, "{line}");
        assert!(line.contains(why), "{line}");
    }
    assert!(r.stderr.contains("3 of 5 input(s) failed"), "{}", r.stderr);
}

#[test]
fn a_clip_shorter_than_a_second_is_scored_on_its_first_frame() {
    let tmp = tempfile::tempdir().unwrap();
    let clip = test_clip(tmp.path(), "short.mp4", "0.5");
    let r = run_expecting(
        score()
            .arg(&clip)
            .args(["--format", "csv", "--scale", "0-1"]),
        0,
    );
    assert!(
        r.stderr.contains(&format!(
            "warning: {}: shorter than one sampling period (5 frames at 10.000 fps): scored on its first frame",
            clip.display()
        )),
        "{}",
        r.stderr
    );
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", r.stdout);
    let header: Vec<&str> = lines[0].split(',').collect();
    let row: Vec<&str> = lines[1].split(',').collect();
    let col = |name: &str| row[header.iter().position(|h| *h == name).unwrap()];
    assert_eq!(col("input"), "video");
    assert_eq!(col("scale"), "0-1");
    assert_eq!(col("frames"), "1");
    assert_eq!(col("fps"), "10");
    let score: f64 = col("score").parse().unwrap();
    assert!((0.0..=1.0).contains(&score), "{score}");
}

#[test]
fn a_directory_walk_finds_other_video_containers_but_not_typescript() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mpg = dir.join("clip.mpg");
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc=size=64x48:rate=25",
        "-t",
        "2",
        mpg.to_str().unwrap(),
    ]);
    let y4m = dir.join("clip.y4m");
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc=size=64x48:rate=10",
        "-t",
        "2",
        "-pix_fmt",
        "yuv420p",
        y4m.to_str().unwrap(),
    ]);
    std::fs::write(dir.join("app.ts"), "export const x = 1;\n").unwrap();
    let r = run_expecting(score().arg(dir).args(["--format", "json"]), 0);
    let records = json_records(&r.stdout);
    let got: Vec<(String, f64, Vec<usize>)> = records
        .iter()
        .map(|rec| {
            check_record_shape(rec, "video", "1-5");
            (
                file_name(rec),
                num(&rec["fps"]),
                indices(&rec["sampled_indices"]),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("clip.mpg".to_string(), 25.0, vec![0, 25]),
            ("clip.y4m".to_string(), 10.0, vec![0, 10]),
        ]
    );
}

#[test]
fn a_faststart_mp4_cut_in_half_is_scored_with_a_warning_and_refused_in_strict_mode() {
    let tmp = tempfile::tempdir().unwrap();
    let whole = tmp.path().join("whole.mp4");
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc=size=64x48:rate=30",
        "-t",
        "8",
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-pix_fmt",
        "yuv420p",
        "-movflags",
        "+faststart",
        whole.to_str().unwrap(),
    ]);
    let bytes = std::fs::read(&whole).unwrap();
    let cut = tmp.path().join("cut.mp4");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();

    let r = run_expecting(score().arg(&cut).args(["--format", "json"]), 0);
    let records = json_records(&r.stdout);
    assert_eq!(records.len(), 1);
    let warnings = records[0]["warnings"].as_array().expect("a warnings field");
    let truncated: Vec<&Value> = warnings
        .iter()
        .filter(|w| w["code"] == "truncated")
        .collect();
    assert_eq!(truncated.len(), 1, "{warnings:?}");
    let message = truncated[0]["message"].as_str().unwrap();
    assert!(message.contains("promises 240 frames"), "{message}");
    let stderr_line = r
        .stderr
        .lines()
        .find(|l| l.starts_with("warning:") && l.contains("truncated video"))
        .unwrap_or_else(|| panic!("no warning on stderr:\n{}", r.stderr));
    assert_eq!(stderr_line.matches("cut.mp4").count(), 1, "{stderr_line}");

    // The complete file has no warnings field at all.
    let r = run_expecting(score().arg(&whole).args(["--format", "json"]), 0);
    assert!(json_records(&r.stdout)[0].get("warnings").is_none());

    // --strict: that input fails (exit 1: it was the only one), with the reason.
    let r = run_expecting(score().arg(&cut).args(["--format", "json", "--strict"]), 1);
    assert!(r.stderr.contains("truncated video"), "{}", r.stderr);
    assert!(r.stderr.contains("strict mode"), "{}", r.stderr);
}
