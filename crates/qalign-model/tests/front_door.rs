//! The library's front door as a user outside the CLI meets it: the builder, the one-call
//! `score_paths` (order, per-item errors, progress, strict mode), configurable level words,
//! and typed errors for bad queries, with the official fixture numbers.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use qalign_core::LevelSet;
use qalign_model::{
    Device, Dtype, MediaKind, Query, Scale, ScoreError, ScoreOptions, ScoreWarning, Scored, Scorer,
    Task,
};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures")).to_path_buf()
}

fn tiny() -> String {
    fixtures().join("tiny-onealign").display().to_string()
}

fn expected_score15(image: &str, task: &str) -> f64 {
    let text = std::fs::read_to_string(fixtures().join("expected/expected.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["images"][image]["tasks"][task]["score15"]
        .as_f64()
        .unwrap()
}

fn scorer() -> Scorer {
    Scorer::builder()
        .model(tiny())
        .device(Device::Cpu)
        .dtype(Dtype::F32)
        .offline(true)
        .build()
        .unwrap()
}

#[test]
fn score_paths_gives_one_outcome_per_input_in_order_with_the_official_numbers() {
    let scorer = scorer();
    let dir = tempfile::tempdir().unwrap();
    let not_an_image = dir.path().join("notes.jpg");
    std::fs::write(&not_an_image, b"plain text, not a JPEG").unwrap();
    let images = fixtures().join("images");
    let paths = vec![
        images.join("boy_colorful.jpg"),
        dir.path().join("missing.png"),
        images.join("singapore_flyer.jpg"),
        not_an_image.clone(),
        images.join("synth_rgba_255x180.png"),
    ];
    let outcomes = scorer
        .score_paths(&paths, &[Task::Quality, Task::Aesthetics])
        .unwrap();
    assert_eq!(outcomes.len(), paths.len());
    for (i, outcome) in outcomes.iter().enumerate() {
        assert_eq!(outcome.index, i);
        assert_eq!(outcome.path, paths[i]);
    }
    for (i, name) in [
        (0, "boy_colorful.jpg"),
        (2, "singapore_flyer.jpg"),
        (4, "synth_rgba_255x180.png"),
    ] {
        let scored = outcomes[i].result.as_ref().unwrap();
        assert_eq!(scored.kind(), MediaKind::Image);
        assert!(scored.warnings().is_empty());
        for (q, task) in ["quality", "aesthetics"].iter().enumerate() {
            let got = scored.scores()[q].score(Scale::OneToFive);
            let want = expected_score15(name, task);
            assert!((got - want).abs() <= 8e-6, "{name} {task}: {got} vs {want}");
        }
    }
    for i in [1, 3] {
        let err = outcomes[i].result.as_ref().unwrap_err();
        assert!(matches!(err, ScoreError::Media(_)), "{err}");
        assert!(err.names_path(&paths[i]), "{err}");
    }
}

#[test]
fn progress_hears_every_input_and_the_sink_can_stop_the_run() {
    let scorer = scorer();
    let images = fixtures().join("images");
    let paths: Vec<PathBuf> = [
        "boy_colorful.jpg",
        "singapore_flyer.jpg",
        "synth_rgba_255x180.png",
    ]
    .iter()
    .map(|n| images.join(n))
    .collect();
    // Decoding ahead (on its own thread) or not, the same outcomes in the same order.
    let mut scores = Vec::new();
    for decode_ahead in [true, false] {
        let options = ScoreOptions {
            batch_size: 2,
            decode_ahead,
            ..Default::default()
        };
        let mut done = Vec::new();
        let mut seen = Vec::new();
        scorer
            .score_paths_with(
                &paths,
                &[Query::Task(Task::Quality)],
                &options,
                &mut |item| {
                    let scored = item.result.unwrap();
                    seen.push((item.index, scored.scores()[0].score(Scale::OneToFive)));
                    ControlFlow::Continue(())
                },
                Some(&mut |p| {
                    done.push((p.done, p.total));
                    ControlFlow::Continue(())
                }),
            )
            .unwrap();
        assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(done, vec![(1, 3), (2, 3), (3, 3)]);
        scores.push(seen);
    }
    assert_eq!(scores[0], scores[1]);

    // Batches of one: the next image is decoding when the sink stops the run.
    let mut seen = 0;
    scorer
        .score_paths_with(
            &paths,
            &[Query::Task(Task::Quality)],
            &ScoreOptions {
                batch_size: 1,
                decode_ahead: true,
                ..Default::default()
            },
            &mut |_| {
                seen += 1;
                ControlFlow::Break(())
            },
            None,
        )
        .unwrap();
    assert_eq!(seen, 1);
}

#[test]
fn level_words_come_from_the_configuration() {
    let scorer = Scorer::builder()
        .model(tiny())
        .offline(true)
        .levels(LevelSet::good_poor())
        .build()
        .unwrap();
    assert_eq!(scorer.levels().words(), ["good", "poor"]);
    assert_eq!(scorer.level_ids(), &[1781, 6460]);
    let outcome = scorer
        .score_paths(
            &[fixtures().join("images/boy_colorful.jpg")],
            &[Task::Quality],
        )
        .unwrap()
        .remove(0);
    let scored = outcome.result.unwrap();
    let probs = scored.scores()[0].distribution.probs();
    assert_eq!(probs.len(), 2);
    // The two-word softmax of the full model's "good" and "poor" logits.
    let (good, poor) = (-0.6037551760673523f64, 1.2086379528045654f64);
    let want = good.exp() / (good.exp() + poor.exp());
    assert!((probs[0] - want).abs() < 2e-6, "{} vs {want}", probs[0]);
}

#[test]
fn bad_queries_are_typed_errors_before_any_file_is_read() {
    let err = Query::custom("Rate <|image|> this", "The rating is").unwrap_err();
    assert!(
        matches!(err, ScoreError::MarkerInText { which: "question" }),
        "{err}"
    );
    let err = Query::custom("How sharp?", "  ").unwrap_err();
    assert!(
        matches!(
            err,
            ScoreError::EmptyText {
                which: "answer prefix"
            }
        ),
        "{err}"
    );

    let scorer = scorer();
    let err = scorer
        .score_paths(&[Path::new("never/read.jpg")], &[])
        .unwrap_err();
    assert!(
        matches!(err, ScoreError::Empty { what: "queries" }),
        "{err}"
    );

    // A 10 MB question is refused at once, with the context limit in the message.
    let started = Instant::now();
    let huge = Query::custom("why? ".repeat(2_000_000), "The answer is").unwrap();
    let mut called = false;
    let err = scorer
        .score_paths_with(
            &[Path::new("never/read.jpg")],
            &[huge],
            &ScoreOptions::default(),
            &mut |_| {
                called = true;
                ControlFlow::Continue(())
            },
            None,
        )
        .unwrap_err();
    assert!(started.elapsed().as_secs_f64() < 5.0);
    assert!(!called);
    assert!(
        matches!(err, ScoreError::PromptTooLong { limit: 4096, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("4096"), "{err}");

    // Just over the limit after tokenising: 4096 positions hold 65 visual tokens and the text.
    let long = Query::custom("why ".repeat(4100), "The answer is").unwrap();
    let err = scorer.prompt_ids(&long, MediaKind::Image).unwrap_err();
    match err {
        ScoreError::PromptTooLong {
            text_tokens,
            visual_tokens,
            limit,
        } => {
            assert!(text_tokens > 4096 - 65, "{text_tokens}");
            assert_eq!((visual_tokens, limit), (65, 4096));
        }
        other => panic!("{other}"),
    }
}

fn ffmpeg_available() -> bool {
    std::process::Command::new("ffmpeg")
        .arg("-version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn a_progress_callback_stops_the_run_between_inputs_and_between_video_windows() {
    let scorer = scorer();
    let image = fixtures().join("images/boy_colorful.jpg");
    let queries = [Query::Task(Task::Quality)];
    // A stop heard with a finished input still hands that input over, and ends the run there.
    let one_at_a_time = ScoreOptions {
        batch_size: 1,
        ..Default::default()
    };
    let mut outcomes = Vec::new();
    scorer
        .score_paths_with(
            &[&image, &image, &image],
            &queries,
            &one_at_a_time,
            &mut |item| {
                outcomes.push(item.index);
                ControlFlow::Continue(())
            },
            Some(&mut |p| match p.done {
                1 => ControlFlow::Break(()),
                _ => ControlFlow::Continue(()),
            }),
        )
        .unwrap();
    assert_eq!(outcomes, [0]);

    if !ffmpeg_available() {
        eprintln!("skipped the video half: ffmpeg is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let clip = dir.path().join("five_seconds.mp4");
    let status = std::process::Command::new("ffmpeg")
        .args(["-v", "error", "-f", "lavfi"])
        .args(["-i", "testsrc=size=64x48:rate=1:duration=5"])
        .args(["-pix_fmt", "yuv420p"])
        .arg(&clip)
        .status()
        .unwrap();
    assert!(status.success());
    // Windows of at most 2 frames: 5 frames take three passes; stop after the first.
    let mut options = one_at_a_time.clone();
    options.video.window = Some(2);
    let mut outcomes = Vec::new();
    let mut frames_heard = Vec::new();
    scorer
        .score_paths_with(
            &[&image, &clip, &image],
            &queries,
            &options,
            &mut |item| {
                outcomes.push(item.index);
                ControlFlow::Continue(())
            },
            Some(&mut |p| match p.frames {
                Some((done, total)) => {
                    frames_heard.push((done, total));
                    if done > 0 {
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    }
                }
                None => ControlFlow::Continue(()),
            }),
        )
        .unwrap();
    // The image before the clip was handed over; the stopped clip and the image after it never are.
    assert_eq!(outcomes, [0]);
    assert_eq!(frames_heard, [(0, 5), (2, 5)]);
}

#[test]
fn strict_mode_turns_a_warning_into_that_input_s_error() {
    if !ffmpeg_available() {
        eprintln!("skipped: ffmpeg is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let clip = dir.path().join("short.mp4");
    let status = std::process::Command::new("ffmpeg")
        .args([
            "-v",
            "error",
            "-f",
            "lavfi",
            "-i",
            "testsrc=size=64x48:rate=10:duration=0.5",
        ])
        .args(["-pix_fmt", "yuv420p"])
        .arg(&clip)
        .status()
        .unwrap();
    assert!(status.success());
    let scorer = scorer();
    let paths = [clip.clone(), fixtures().join("images/boy_colorful.jpg")];
    let queries = [Query::Task(Task::Quality)];
    let mut lenient = Vec::new();
    scorer
        .score_paths_with(
            &paths,
            &queries,
            &ScoreOptions::default(),
            &mut |item| {
                lenient.push(item);
                ControlFlow::Continue(())
            },
            None,
        )
        .unwrap();
    match &lenient[0].result {
        Ok(Scored::Video(video)) => {
            assert!(matches!(
                video.warnings.as_slice(),
                [ScoreWarning::ShortClip { frames: 5, .. }]
            ));
        }
        other => panic!("{other:?}"),
    }
    let strict = ScoreOptions {
        strict: true,
        ..Default::default()
    };
    let mut outcomes = Vec::new();
    scorer
        .score_paths_with(
            &paths,
            &queries,
            &strict,
            &mut |item| {
                outcomes.push(item);
                ControlFlow::Continue(())
            },
            None,
        )
        .unwrap();
    let err = outcomes[0].result.as_ref().unwrap_err();
    assert!(
        matches!(err, ScoreError::Strict(ScoreWarning::ShortClip { .. })),
        "{err}"
    );
    assert!(
        outcomes[1].result.is_ok(),
        "an image after it is still scored"
    );
}

#[test]
fn a_scorer_keeps_only_its_level_rows_of_lm_head_with_identical_scores() {
    use qalign_model::{LoadOptions, OneAlignModel, ScorerOptions};
    let dir = PathBuf::from(tiny());
    let options = ScorerOptions {
        levels: LevelSet::good_poor(),
        ..Default::default()
    };
    assert_eq!(
        options.model_load_options(&dir).unwrap().lm_head_rows,
        Some(vec![1781, 6460])
    );
    let trimmed = Scorer::load(&dir, &options).unwrap();
    let whole = Scorer::with_model(
        OneAlignModel::load(&dir, &LoadOptions::default()).unwrap(),
        &dir,
        &options,
    )
    .unwrap();
    let paths = [
        fixtures().join("images/boy_colorful.jpg"),
        fixtures().join("images/singapore_flyer.jpg"),
    ];
    let probs = |scorer: &Scorer| -> Vec<Vec<f64>> {
        scorer
            .score_paths(&paths, &[Task::Quality, Task::Aesthetics])
            .unwrap()
            .into_iter()
            .flat_map(|o| o.result.unwrap().scores().to_vec())
            .map(|s| s.distribution.probs().to_vec())
            .collect()
    };
    // The same rows multiply the same hidden states: the same bits.
    assert_eq!(probs(&trimmed), probs(&whole));
    // Full-vocabulary logits need the whole head, and say so.
    let hidden = qalign_model::candle::Tensor::zeros(
        (1, trimmed.model().config().llm.hidden_size),
        qalign_model::candle::DType::F32,
        &qalign_model::candle::Device::Cpu,
    )
    .unwrap();
    let err = trimmed.model().lm_logits(&hidden).unwrap_err().to_string();
    assert!(err.contains("need the whole lm_head"), "{err}");
    assert_eq!(
        whole.model().lm_logits(&hidden).unwrap().dims(),
        &[1, trimmed.model().config().llm.vocab_size]
    );
}
