//! End-to-end parity of the `Scorer` (files → preprocessing → tokenizer → network → levels)
//! against the official fixtures: images, the video from its frames and from the mp4, windows,
//! and batches of clips of unequal length.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::Command;

use qalign_model::{
    LevelScores, Query, Scale, ScoreError, ScoreWarning, Scorer, ScorerOptions, Task, VideoOptions,
    balanced_windows,
};
use serde_json::Value;

const LOGIT_TOL: f64 = 1e-5;
const PROB_TOL: f64 = 2e-6;
const SCORE01_TOL: f64 = 2e-6;
const SCORE15_TOL: f64 = 8e-6;

fn fixtures() -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures")).to_path_buf()
}

fn expected() -> Value {
    let text = std::fs::read_to_string(fixtures().join("expected/expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn scorer() -> Scorer {
    Scorer::load(&fixtures().join("tiny-onealign"), &ScorerOptions::default()).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// Asserts logits, probabilities and both scores of `got` against a fixture entry.
fn assert_matches(got: &LevelScores, want: &Value, what: &str) {
    let logits = floats(&want["level_logits"]);
    let probs = floats(&want["level_probs"]);
    for (i, (g, w)) in got.logits.iter().zip(&logits).enumerate() {
        assert!(
            (f64::from(*g) - w).abs() <= LOGIT_TOL,
            "{what}: logit {i}: {g} vs {w}"
        );
    }
    for (i, (g, w)) in got.distribution.probs().iter().zip(&probs).enumerate() {
        assert!((g - w).abs() <= PROB_TOL, "{what}: prob {i}: {g} vs {w}");
    }
    let s01 = got.distribution.score(Scale::ZeroToOne).value;
    let s15 = got.distribution.score(Scale::OneToFive).value;
    let w01 = want["score01"].as_f64().unwrap();
    let w15 = want["score15"].as_f64().unwrap();
    assert!(
        (s01 - w01).abs() <= SCORE01_TOL,
        "{what}: score01 {s01} vs {w01}"
    );
    assert!(
        (s15 - w15).abs() <= SCORE15_TOL,
        "{what}: score15 {s15} vs {w15}"
    );
}

const TASKS: [(Task, &str); 2] = [(Task::Quality, "quality"), (Task::Aesthetics, "aesthetics")];

fn image_names(expected: &Value) -> Vec<String> {
    let mut names: Vec<String> = expected["images"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    names.sort();
    names
}

#[test]
fn images_from_files_match_the_official_scores_for_both_tasks() {
    let expected = expected();
    let scorer = scorer();
    let names = image_names(&expected);
    let pixels: Vec<_> = names
        .iter()
        .map(|n| {
            scorer
                .load_image(&fixtures().join("images").join(n))
                .unwrap()
        })
        .collect();
    let refs: Vec<_> = pixels.iter().collect();
    let queries: Vec<Query> = TASKS.iter().map(|(t, _)| Query::Task(*t)).collect();
    let results = scorer.score_images(&refs, &queries).unwrap();
    for (name, per_query) in names.iter().zip(&results) {
        for ((_, task), got) in TASKS.iter().zip(per_query) {
            let want = &expected["images"][name]["tasks"][task];
            assert_matches(got, want, &format!("{name} {task}"));
        }
    }
}

#[test]
fn prompt_ids_are_the_official_ones() {
    let expected = expected();
    let scorer = scorer();
    for (task, key) in TASKS {
        let want: Vec<i64> = expected["images"]["boy_colorful.jpg"]["tasks"][key]["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        let got = scorer
            .prompt_ids(&Query::Task(task), qalign_model::MediaKind::Image)
            .unwrap();
        assert_eq!(got, want, "{key}");
    }
    assert_eq!(scorer.level_ids(), &[15129, 1781, 6534, 6460, 4319]);
}

#[test]
fn batched_images_equal_single_images() {
    let expected = expected();
    let scorer = scorer();
    let names = image_names(&expected);
    let pixels: Vec<_> = names
        .iter()
        .map(|n| {
            scorer
                .load_image(&fixtures().join("images").join(n))
                .unwrap()
        })
        .collect();
    let query = [Query::Task(Task::Quality)];
    let batch = scorer
        .score_images(&pixels.iter().collect::<Vec<_>>(), &query)
        .unwrap();
    for (i, p) in pixels.iter().enumerate() {
        let single = scorer.score_images(&[p], &query).unwrap();
        for (a, b) in single[0][0].logits.iter().zip(&batch[i][0].logits) {
            assert!((a - b).abs() <= 1e-5, "{}: {a} vs {b}", names[i]);
        }
    }
}

#[test]
fn custom_question_with_the_official_wording_equals_the_quality_task() {
    let scorer = scorer();
    let p = scorer
        .load_image(&fixtures().join("images/boy_colorful.jpg"))
        .unwrap();
    let custom = Query::Custom {
        question: "How would you rate the quality of this image?".into(),
        answer_prefix: "The quality of the image is".into(),
    };
    let got = scorer
        .score_images(&[&p], &[custom, Query::Task(Task::Quality)])
        .unwrap();
    assert_eq!(got[0][0].logits, got[0][1].logits);
}

/// The fixture's sampled frames (PNG, as decoded by decord), preprocessed.
fn fixture_frames(scorer: &Scorer) -> Vec<(usize, qalign_media::Pixels)> {
    let frames = fixtures().join("video/frames");
    let mut names: Vec<_> = std::fs::read_dir(&frames)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
        .iter()
        .map(|n| {
            let index: usize = n[n.find("src").unwrap() + 3..n.len() - 4].parse().unwrap();
            (index, scorer.load_image(&frames.join(n)).unwrap())
        })
        .collect()
}

fn score_frames(
    scorer: &Scorer,
    frames: &[(usize, qalign_media::Pixels)],
    options: &VideoOptions,
) -> qalign_model::ClipResult {
    scorer
        .score_frame_stream(
            frames.iter().map(|(i, p)| Ok((*i, p.clone()))),
            frames.len(),
            29.97,
            &[Query::Task(Task::Quality)],
            options,
            &mut |_| ControlFlow::Continue(()),
        )
        .unwrap()
}

#[test]
fn video_from_fixture_frames_matches_the_official_video_scores() {
    let expected = expected();
    let scorer = scorer();
    let frames = fixture_frames(&scorer);
    let all = score_frames(&scorer, &frames, &VideoOptions::default());
    assert!(!all.is_windowed());
    assert_matches(
        &all.scores[0],
        &expected["video"]["video_all_frames"],
        "8 frames",
    );
    let first3 = score_frames(&scorer, &frames[..3], &VideoOptions::default());
    assert_matches(
        &first3.scores[0],
        &expected["video"]["video_first3_frames"],
        "3 frames",
    );
}

#[test]
fn clips_of_unequal_length_score_in_one_batch_as_alone() {
    let expected = expected();
    let scorer = scorer();
    let frames = fixture_frames(&scorer);
    let refs: Vec<_> = frames.iter().map(|(_, p)| p).collect();
    let long = scorer.encode(&refs).unwrap();
    let short = scorer.encode(&refs[..3]).unwrap();
    let query = Query::Task(Task::Quality);
    // Short clip first, so that the padding bug of the official code would show.
    let batch = scorer
        .score_encoded_clips(&[short.clone(), long.clone()], &query)
        .unwrap();
    let alone_short = scorer.score_encoded_clips(&[short], &query).unwrap();
    let alone_long = scorer.score_encoded_clips(&[long], &query).unwrap();
    for (batched, alone) in [(&batch[0], &alone_short[0]), (&batch[1], &alone_long[0])] {
        for (a, b) in batched.logits.iter().zip(&alone.logits) {
            assert!((a - b).abs() <= 1e-5, "{a} vs {b}");
        }
    }
    assert_matches(
        &batch[0],
        &expected["video"]["video_first3_frames"],
        "short in batch",
    );
    assert_matches(
        &batch[1],
        &expected["video"]["video_all_frames"],
        "long in batch",
    );
}

#[test]
fn windows_combine_by_frame_count_and_each_window_is_a_clip_of_its_own() {
    let expected = expected();
    let scorer = scorer();
    let frames = fixture_frames(&scorer);
    let options = VideoOptions {
        window: Some(3),
        ..VideoOptions::default()
    };
    let clip = score_frames(&scorer, &frames, &options);
    assert!(clip.is_windowed());
    let shape: Vec<_> = clip
        .windows
        .iter()
        .map(|w| (w.start_frame, w.end_frame, w.frames))
        .collect();
    assert_eq!(shape, vec![(0, 59, 3), (89, 149, 3), (179, 209, 2)]);
    // The first window holds exactly the fixture's first three frames.
    assert_matches(
        &clip.windows[0].scores[0],
        &expected["video"]["video_first3_frames"],
        "window 0",
    );
    let mut mean = [0.0f64; 5];
    for w in &clip.windows {
        for (m, p) in mean.iter_mut().zip(w.scores[0].distribution.probs()) {
            *m += p * w.frames as f64 / 8.0;
        }
    }
    for (m, p) in mean.iter().zip(clip.scores[0].distribution.probs()) {
        assert!((m - p).abs() < 1e-12);
    }
}

#[test]
fn per_frame_scores_use_the_image_prompt() {
    let scorer = scorer();
    let frames = fixture_frames(&scorer);
    let options = VideoOptions {
        per_frame: true,
        ..VideoOptions::default()
    };
    let clip = score_frames(&scorer, &frames[..2], &options);
    assert_eq!(clip.per_frame.len(), 2);
    assert_eq!(clip.per_frame[1].source_index, 29);
    assert!((clip.per_frame[1].time_s - 29.0 / 29.97).abs() < 1e-12);
    let alone = scorer
        .score_images(&[&frames[1].1], &[Query::Task(Task::Quality)])
        .unwrap();
    assert_eq!(clip.per_frame[1].scores[0].logits, alone[0][0].logits);
}

#[test]
fn video_file_is_sampled_decoded_and_scored_like_the_official_scorer() {
    let expected = expected();
    let scorer = scorer();
    let video = scorer
        .score_video(
            &fixtures().join("video/baby.mp4"),
            &[Query::Task(Task::Quality)],
            &VideoOptions::default(),
            &mut |_, _| ControlFlow::Continue(()),
        )
        .unwrap();
    assert_eq!(
        video.sampled_indices,
        vec![0, 29, 59, 89, 119, 149, 179, 209]
    );
    assert!(video.warnings.is_empty(), "{:?}", video.warnings);
    assert_matches(
        &video.clip.scores[0],
        &expected["video"]["video_all_frames"],
        "baby.mp4",
    );
}

fn ffmpeg_clip(dir: &Path, name: &str, args: &[&str]) -> PathBuf {
    let out = dir.join(name);
    let status = Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-f", "lavfi"])
        .args(args)
        .args(["-pix_fmt", "yuv420p"])
        .arg(&out)
        .status()
        .expect("ffmpeg runs (apt-get install ffmpeg)");
    assert!(status.success());
    out
}

#[test]
fn long_clip_is_scored_in_windows_within_the_context() {
    let dir = tempfile::tempdir().unwrap();
    // 70 s at 1 fps: 70 sampled frames, more than the tiny model's 4096-position context holds
    // in one pass ((4096 − 27) / 65 = 62 frames).
    let clip = ffmpeg_clip(
        dir.path(),
        "long.mp4",
        &["-i", "testsrc=size=64x48:rate=1:duration=70"],
    );
    let scorer = scorer();
    let query = Query::Task(Task::Quality);
    assert_eq!(scorer.max_frames_per_pass(&query).unwrap(), 62);
    let mut seen = Vec::new();
    let video = scorer
        .score_video(
            &clip,
            &[query],
            &VideoOptions::default(),
            &mut |done, total| {
                seen.push((done, total));
                ControlFlow::Continue(())
            },
        )
        .unwrap();
    assert_eq!(video.sampled_indices.len(), 70);
    // Before and after each window's forward pass.
    assert_eq!(seen, vec![(0, 70), (35, 70), (35, 70), (70, 70)]);
    let windows: Vec<_> = video.clip.windows.iter().map(|w| w.frames).collect();
    assert_eq!(windows, vec![35, 35]);
    assert_eq!(balanced_windows(70, 62), vec![(0, 35), (35, 35)]);
    let probs = video.clip.scores[0].distribution.probs();
    for (i, p) in probs.iter().enumerate() {
        let mean: f64 = video
            .clip
            .windows
            .iter()
            .map(|w| w.scores[0].distribution.probs()[i] * 0.5)
            .sum();
        assert!((p - mean).abs() < 1e-12);
    }
}

#[test]
fn a_progress_callback_stops_a_clip_between_its_windows() {
    let dir = tempfile::tempdir().unwrap();
    let clip = ffmpeg_clip(
        dir.path(),
        "five.mp4",
        &["-i", "testsrc=size=64x48:rate=1:duration=5"],
    );
    let scorer = scorer();
    let queries = [Query::Task(Task::Quality)];
    // Windows of at most 2 frames: passes of 2, 2 and 1 frames.
    let options = VideoOptions {
        window: Some(2),
        ..Default::default()
    };
    // Stop after the first window: the other two never run.
    let mut seen = Vec::new();
    let result = scorer.score_video(&clip, &queries, &options, &mut |done, total| {
        seen.push((done, total));
        if done >= 2 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    assert!(matches!(result, Err(ScoreError::Cancelled)), "{result:?}");
    assert_eq!(seen, vec![(0, 5), (2, 5)]);
    // Stopping once the last window is done loses nothing: the clip is scored.
    let mut seen = Vec::new();
    let whole = scorer
        .score_video(&clip, &queries, &options, &mut |done, total| {
            seen.push((done, total));
            if done == total {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
    assert_eq!(seen, vec![(0, 5), (2, 5), (2, 5), (4, 5), (4, 5), (5, 5)]);
    assert_eq!(whole.clip.windows.len(), 3);
}

#[test]
fn clip_shorter_than_a_second_is_scored_on_its_first_frame_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let clip = ffmpeg_clip(
        dir.path(),
        "short.mp4",
        &["-i", "testsrc=size=64x48:rate=10:duration=0.5"],
    );
    let scorer = scorer();
    let video = scorer
        .score_video(
            &clip,
            &[Query::Task(Task::Quality)],
            &VideoOptions::default(),
            &mut |_, _| ControlFlow::Continue(()),
        )
        .unwrap();
    assert_eq!(video.sampled_indices, vec![0]);
    assert_eq!(video.warnings.len(), 1, "{:?}", video.warnings);
    assert!(
        matches!(video.warnings[0], ScoreWarning::ShortClip { .. }),
        "{:?}",
        video.warnings
    );
    assert!(video.warnings[0].to_string().contains("first frame"));
}
