//! The syllabus: the paper's Table 2 acceptance on the official training files, the SFT item
//! format, seeded determinism, few-shot subsets, ranges and atomic output.

mod common;

use common::{assert_close, labels};
use qalign_core::dataset::{Columns, Dataset, LabelItem, read_labels};
use qalign_core::levels::{LevelSet, ScoreRange};
use qalign_core::syllabus::{
    SftItem, SyllabusError, SyllabusOptions, build_syllabus, question_pool, write_json_atomic,
};
use qalign_core::{MediaKind, Task};

fn dataset(file: &str) -> Dataset {
    read_labels(&labels(file), &Columns::default()).unwrap()
}

fn quality_image() -> SyllabusOptions {
    SyllabusOptions::new(Task::Quality, MediaKind::Image)
}

fn level_word(item: &SftItem) -> &str {
    item.conversations[1]
        .value
        .strip_prefix("The quality of the image is ")
        .and_then(|s| s.strip_suffix('.'))
        .unwrap()
}

/// Fraction of items whose generated level word equals the official one.
fn agreement(ds: &Dataset, items: &[SftItem]) -> f64 {
    let same = ds
        .items
        .iter()
        .zip(items)
        .filter(|(official, ours)| official.answer_level_word() == Some(level_word(ours)))
        .count();
    same as f64 / items.len() as f64
}

#[test]
fn koniq_conversion_precision_is_table_2() {
    let ds = dataset("train_koniq.json");
    let s = build_syllabus(std::slice::from_ref(&ds), &quality_image()).unwrap();
    let r = &s.reports[0];
    assert_eq!((r.name.as_str(), r.n), ("train_koniq", 7046));
    assert_eq!((r.m, r.max), (6.68487394958, 85.0608108108));
    // Table 2: SRCC 0.952, PLCC 0.961 (to 3 decimals). Measured: 0.9519743722355466 and
    // 0.9607837262707731 (scipy on the same levels gives the same to 1e-15).
    assert_eq!(format!("{:.3}/{:.3}", r.srcc, r.plcc), "0.952/0.961");
    assert_close(r.srcc, 0.9519743722355466, 1e-9, "srcc");
    assert_close(r.plcc, 0.9607837262707731, 1e-9, "plcc");
    // Levels agree with the official ones on ≥ 98.5% of items (measured: 98.95%).
    let agree = agreement(&ds, &s.items);
    assert!(agree >= 0.985, "agreement {agree}");
    assert_close(agree, 6972.0 / 7046.0, 1e-12, "agreement count");
    let counts: usize = r.level_counts.0.iter().map(|(_, c)| c).sum();
    assert_eq!(counts, 7046);
}

#[test]
fn spaq_conversion_precision_is_table_2() {
    let ds = dataset("train_spaq.json");
    let s = build_syllabus(std::slice::from_ref(&ds), &quality_image()).unwrap();
    let r = &s.reports[0];
    // Table 2: 0.969 / 0.968; measured 0.9701606089358322 / 0.969471057923114.
    assert!((r.srcc - 0.969).abs() <= 0.002, "srcc {}", r.srcc);
    assert!((r.plcc - 0.968).abs() <= 0.002, "plcc {}", r.plcc);
    assert_close(r.srcc, 0.9701606089358322, 1e-9, "srcc");
    assert_close(r.plcc, 0.969471057923114, 1e-9, "plcc");
}

#[test]
fn items_have_the_official_shape() {
    let ds = dataset("train_koniq.json");
    let s = build_syllabus(std::slice::from_ref(&ds), &quality_image()).unwrap();
    let pool = question_pool(Task::Quality, MediaKind::Image);
    assert_eq!(pool.len(), 9);
    let mut used = [0usize; 9];
    for (item, source) in s.items.iter().zip(&ds.items) {
        assert_eq!(item.image, source.path);
        assert_eq!(
            item.id,
            source.id.clone().unwrap(),
            "the id round-trips name->MOS"
        );
        assert_eq!(item.conversations.len(), 2);
        assert_eq!(item.conversations[0].from, "human");
        assert_eq!(item.conversations[1].from, "gpt");
        let question = item.conversations[0]
            .value
            .strip_suffix("\n<|image|>")
            .unwrap();
        used[pool.iter().position(|q| *q == question).unwrap()] += 1;
        assert!(["excellent", "good", "fair", "poor", "bad"].contains(&level_word(item)));
    }
    // Questions are drawn about uniformly (7046 / 9 ≈ 783 each).
    assert!(used.iter().all(|&u| (650..=920).contains(&u)), "{used:?}");
    let json = serde_json::to_value(&s.items[0]).unwrap();
    let keys: Vec<&str> = json
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, ["conversations", "id", "image"]);
}

#[test]
fn video_and_aesthetics_wording() {
    let ds = dataset("ft/maxwell_train_split_1.json");
    let s = build_syllabus(
        std::slice::from_ref(&ds),
        &SyllabusOptions::new(Task::Quality, MediaKind::Video),
    )
    .unwrap();
    assert_eq!(s.items[0].id, "0001.mp4->1.057142857");
    assert_eq!(
        s.items[0].conversations[1].value,
        "The quality of the video is bad."
    );
    assert!(s.items[0].conversations[0].value.contains("video"));

    let ds = dataset("csiq.json");
    let s = build_syllabus(
        std::slice::from_ref(&ds),
        &SyllabusOptions::new(Task::Aesthetics, MediaKind::Image),
    )
    .unwrap();
    assert!(s.items[0].conversations[0].value.contains("aesthetics"));
    assert!(
        s.items[0].conversations[1]
            .value
            .starts_with("The aesthetics of the image is ")
    );

    // An image file with --input video is an error naming the record.
    let err = build_syllabus(
        std::slice::from_ref(&ds),
        &SyllabusOptions::new(Task::Quality, MediaKind::Video),
    )
    .unwrap_err();
    assert!(
        matches!(err, SyllabusError::WrongInput { index: 0, .. }),
        "{err}"
    );
}

#[test]
fn seeded_output_is_deterministic() {
    let ds = dataset("csiq.json");
    let mut opts = quality_image();
    opts.seed = 42;
    let a = build_syllabus(std::slice::from_ref(&ds), &opts).unwrap();
    let b = build_syllabus(std::slice::from_ref(&ds), &opts).unwrap();
    assert_eq!(a, b);
    opts.seed = 43;
    let c = build_syllabus(std::slice::from_ref(&ds), &opts).unwrap();
    assert_ne!(a.items, c.items, "another seed draws other questions");
    // The levels do not depend on the seed.
    let words = |s: &qalign_core::syllabus::Syllabus| {
        s.items
            .iter()
            .map(|i| i.conversations[1].value.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(words(&a), words(&c));
}

#[test]
fn fraction_selects_a_seeded_subset_binned_over_the_full_range() {
    let ds = dataset("train_koniq.json");
    let full = build_syllabus(std::slice::from_ref(&ds), &quality_image()).unwrap();
    let mut opts = quality_image();
    opts.fraction = Some(0.2);
    opts.seed = 5;
    let few = build_syllabus(std::slice::from_ref(&ds), &opts).unwrap();
    assert_eq!(few.items.len(), 1409); // round(0.2 · 7046)
    assert_eq!(few.reports[0].n, 1409);
    assert_eq!(
        few.reports[0].m, full.reports[0].m,
        "range of the whole file"
    );
    // A subset, in file order, with the same level each item has in the full syllabus.
    let mut cursor = full.items.iter();
    for item in &few.items {
        let same = cursor
            .find(|f| f.image == item.image)
            .expect("in file order");
        assert_eq!(same.conversations[1], item.conversations[1]);
    }
    assert_eq!(
        few,
        build_syllabus(std::slice::from_ref(&ds), &opts).unwrap()
    );
    opts.seed = 6;
    assert_ne!(
        few.items,
        build_syllabus(std::slice::from_ref(&ds), &opts)
            .unwrap()
            .items
    );

    for bad in [0.0, -0.1, 1.5, f64::NAN] {
        opts.fraction = Some(bad);
        assert!(matches!(
            build_syllabus(std::slice::from_ref(&ds), &opts),
            Err(SyllabusError::BadFraction(_))
        ));
    }
}

#[test]
fn mixing_bins_each_dataset_by_its_own_range() {
    let a = dataset("csiq.json"); // 0..1
    let b = dataset("test_kadid.json"); // 1.03..4.83
    let s = build_syllabus(&[a.clone(), b.clone()], &quality_image()).unwrap();
    assert_eq!(s.items.len(), a.items.len() + b.items.len());
    assert_eq!(s.reports.len(), 2);
    assert_eq!((s.reports[0].m, s.reports[0].max), (0.0, 1.0));
    assert_eq!((s.reports[1].m, s.reports[1].max), (1.03, 4.83));
    // The best csiq item (1.0) is excellent although 1.0 is the bottom of kadid's range.
    let best = a.items.iter().position(|i| i.score == 1.0).unwrap();
    assert_eq!(level_word(&s.items[best]), "excellent");
}

#[test]
fn explicit_range_and_out_of_range_scores() {
    let ds = Dataset {
        name: "toy".into(),
        source: "toy.json".into(),
        items: [10.0, 30.0, 50.0, 70.0, 90.0]
            .iter()
            .map(|&score| LabelItem {
                path: format!("img/{score}.jpg"),
                score,
                kind: MediaKind::Image,
                id: None,
                answer: None,
            })
            .collect(),
    };
    let mut opts = quality_image();
    opts.range = Some(ScoreRange::new(0.0, 100.0).unwrap());
    let s = build_syllabus(std::slice::from_ref(&ds), &opts).unwrap();
    let words: Vec<&str> = s.items.iter().map(level_word).collect();
    assert_eq!(words, ["bad", "poor", "fair", "good", "excellent"]);
    assert_eq!(s.items[2].id, "50.jpg->50.0");

    opts.range = Some(ScoreRange::new(20.0, 100.0).unwrap());
    let err = build_syllabus(std::slice::from_ref(&ds), &opts).unwrap_err();
    assert_eq!(
        err.to_string(),
        "dataset toy, record 0 (img/10.jpg): score 10 is outside the range [20, 100] (ask for clamping to allow this)"
    );

    // A constant dataset has no range of its own.
    let mut flat = ds.clone();
    flat.items.truncate(1);
    let err = build_syllabus(&[flat], &quality_image()).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("dataset toy: invalid score range"),
        "{err}"
    );
}

#[test]
fn custom_levels_in_the_syllabus() {
    let ds = dataset("csiq.json");
    let mut opts = quality_image();
    opts.levels = LevelSet::good_poor();
    let s = build_syllabus(std::slice::from_ref(&ds), &opts).unwrap();
    let counts = &s.reports[0].level_counts.0;
    assert_eq!(
        counts.iter().map(|(w, _)| w.as_str()).collect::<Vec<_>>(),
        ["good", "poor"]
    );
    let json = serde_json::to_string(&s.reports[0].level_counts).unwrap();
    assert!(json.starts_with("{\"good\":"), "{json}");
}

#[test]
fn atomic_write_leaves_only_the_output() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset("csiq.json");
    let s = build_syllabus(std::slice::from_ref(&ds), &quality_image()).unwrap();
    let out = dir.path().join("sft.json");
    write_json_atomic(&out, &s.items).unwrap();
    let back: Vec<SftItem> = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(back, s.items);
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["sft.json"]);
    // Overwrites in place; a missing folder is a clear error and leaves nothing behind.
    write_json_atomic(&out, &s.items[..2]).unwrap();
    let back: Vec<SftItem> = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(back.len(), 2);
    let err = write_json_atomic(&dir.path().join("no/such/dir/x.json"), &s.items).unwrap_err();
    assert!(err.to_string().contains("cannot write"), "{err}");
}

#[test]
fn ids_write_the_mos_like_python() {
    use qalign_core::syllabus::python_float_repr;
    for (v, text) in [
        (67.0, "67.0"),
        (77.3836206897, "77.3836206897"),
        (0.1, "0.1"),
        (0.0, "0.0"),
        (-2.5, "-2.5"),
        (1e-5, "1e-05"),
        (1.5e16, "1.5e+16"),
        (0.0001, "0.0001"),
    ] {
        assert_eq!(python_float_repr(v), text);
    }
}

fn scaled(ds: &Dataset, k: f64) -> Dataset {
    let mut out = ds.clone();
    for item in &mut out.items {
        item.score *= k;
    }
    out
}

fn words(items: &[SftItem]) -> Vec<&str> {
    items.iter().map(level_word).collect()
}

/// MOS × 1e155 (or × 1e-155) bins into the same levels with the same conversion precision as
/// the plain MOS; before, the sums of squares overflowed and the precision came out NaN with a
/// warning blaming "all items got the same level".
#[test]
fn extreme_magnitudes_keep_levels_and_precision() {
    let ds = dataset("train_koniq.json");
    let plain = build_syllabus(std::slice::from_ref(&ds), &quality_image()).unwrap();
    // Powers of two scale exactly, so the levels are those of the plain MOS; 1e±155 may move
    // a score sitting on an edge by an ulp, hence the ≥ 99.9% agreement there.
    for k in [2f64.powi(515), 2f64.powi(-515), 1e155, 1e-155] {
        let big = build_syllabus(&[scaled(&ds, k)], &quality_image()).unwrap();
        let (a, b) = (&plain.reports[0], &big.reports[0]);
        assert_eq!(b.undefined, None, "×{k}");
        let same = words(&plain.items)
            .iter()
            .zip(words(&big.items))
            .filter(|(x, y)| **x == *y)
            .count();
        if k.log2().fract() == 0.0 {
            assert_eq!(same, plain.items.len(), "×{k}");
            assert_eq!((b.srcc, b.plcc), (a.srcc, a.plcc), "×{k}");
        } else {
            assert!(
                same as f64 >= 0.999 * plain.items.len() as f64,
                "×{k}: {same}"
            );
            assert_close(b.srcc, a.srcc, 1e-4, "srcc");
            assert_close(b.plcc, a.plcc, 1e-4, "plcc");
        }
    }
}

/// A range so wide that M − m overflows (scores near ±f64::MAX) still spreads over all levels.
#[test]
fn range_wider_than_f64_max_still_bins() {
    let ds = dataset("train_koniq.json");
    // Map [m, M] onto [−0.9·MAX, 0.9·MAX]: affine, so the levels must stay the same.
    let (m, big_m) = (6.68487394958, 85.0608108108);
    let mut wide = ds.clone();
    for item in &mut wide.items {
        let t = (item.score - m) / (big_m - m);
        item.score = (2.0 * t - 1.0) * (0.9 * f64::MAX);
    }
    assert!(wide.scores().iter().all(|s| s.is_finite()));
    let plain = build_syllabus(std::slice::from_ref(&ds), &quality_image()).unwrap();
    let s = build_syllabus(&[wide], &quality_image()).unwrap();
    let r = &s.reports[0];
    assert_eq!(r.undefined, None);
    assert!(
        r.level_counts.0.iter().all(|(_, c)| *c > 0),
        "{:?}",
        r.level_counts
    );
    let same = words(&plain.items)
        .iter()
        .zip(words(&s.items))
        .filter(|(x, y)| **x == *y)
        .count();
    assert!(same as f64 >= 0.999 * plain.items.len() as f64, "{same}");
    assert_close(r.srcc, plain.reports[0].srcc, 1e-3, "srcc");
    // Out-of-range errors still name the caller's numbers.
    let mut opts = quality_image();
    opts.range = Some(ScoreRange::new(-f64::MAX, f64::MAX / 2.0).unwrap());
    let mut high = ds.clone();
    high.items[0].score = f64::MAX;
    match build_syllabus(&[high], &opts) {
        Err(SyllabusError::Item { error, .. }) => assert_eq!(
            error,
            qalign_core::levels::LevelError::OutOfRange {
                score: f64::MAX,
                min: -f64::MAX,
                max: f64::MAX / 2.0
            }
        ),
        other => panic!("{other:?}"),
    }
}

/// When the conversion precision is undefined the report says why, and the reason is the real
/// one: one level for all items, one MOS for all items, or too few items.
#[test]
fn undefined_precision_names_the_real_cause() {
    let ds = dataset("live.json");
    let mut opts = quality_image();
    opts.range = Some(ScoreRange::new(-1000.0, 1000.0).unwrap());
    let r = &build_syllabus(std::slice::from_ref(&ds), &opts)
        .unwrap()
        .reports[0];
    assert!(r.srcc.is_nan() && r.plcc.is_nan());
    assert_eq!(
        r.undefined.as_deref(),
        Some(format!("all {} items got the same level", r.n).as_str())
    );
    let mut same_mos = ds.clone();
    same_mos.items.iter_mut().for_each(|i| i.score = 50.0);
    opts.range = Some(ScoreRange::new(0.0, 100.0).unwrap());
    let r = &build_syllabus(&[same_mos], &opts).unwrap().reports[0];
    assert_eq!(
        r.undefined.as_deref(),
        Some(format!("all {} items have the same MOS", r.n).as_str())
    );
    let mut few = ds.clone();
    few.items.truncate(2);
    let r = &build_syllabus(&[few], &quality_image()).unwrap().reports[0];
    assert_eq!(
        r.undefined.as_deref(),
        Some("only 2 item(s), and a correlation needs at least 3")
    );
    // Defined precision: no reason, and none in the JSON report.
    let r = &build_syllabus(std::slice::from_ref(&ds), &quality_image())
        .unwrap()
        .reports[0];
    assert_eq!(r.undefined, None);
    assert!(serde_json::to_value(r).unwrap().get("undefined").is_none());
}
