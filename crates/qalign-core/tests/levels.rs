//! Levels: Eq. 1 binning (exact edges), softmax and scores against the official fixtures,
//! custom level sets, the Q-Bench binary case, and properties.

mod common;

use common::{assert_close, fixtures};
use proptest::prelude::*;
use qalign_core::LEVEL_WORDS;
use qalign_core::levels::{
    LevelDistribution, LevelError, LevelSet, Scale, Score, ScoreRange, softmax, softmax_f64,
};

fn range(m: f64, big_m: f64) -> ScoreRange {
    ScoreRange::new(m, big_m).unwrap()
}

#[test]
fn itu_words_and_weights() {
    let set = LevelSet::itu();
    assert_eq!(set.words(), LEVEL_WORDS);
    assert_eq!(set.weights(Scale::OneToFive), vec![5.0, 4.0, 3.0, 2.0, 1.0]);
    assert_eq!(
        set.weights(Scale::ZeroToOne),
        vec![1.0, 0.75, 0.5, 0.25, 0.0]
    );
    assert_eq!(set.word(set.level(1).unwrap()), "bad");
    assert_eq!(set.word(set.best()), "excellent");
    assert_eq!(set.level_of_word("fair").unwrap().number(), 3);
    assert!(set.level(0).is_none() && set.level(6).is_none());
}

#[test]
fn edges_are_exact_and_closed_on_the_right() {
    let set = LevelSet::itu();
    for (m, big_m) in [
        (6.68487394958, 85.0608108108),
        (2.0, 93.67),
        (0.0, 1.0),
        (1.07, 4.84),
        (-3.3, 7.1),
        (0.1, 0.3),
    ] {
        let r = range(m, big_m);
        // The minimum itself is level 1, the maximum level 5.
        assert_eq!(set.level_of(m, r).unwrap().number(), 1);
        assert_eq!(set.level_of(big_m, r).unwrap().number(), 5);
        for i in 1..5 {
            // The documented formula, evaluated in the documented order.
            let edge = m + (i as f64) * (big_m - m) / 5.0;
            assert_eq!(set.edge(r, i), edge);
            // Exactly on the edge: the lower level (intervals are closed on the right).
            assert_eq!(
                set.level_of(edge, r).unwrap().number(),
                i,
                "edge {i} of [{m}, {big_m}]"
            );
            // One ulp above: the next level.
            assert_eq!(set.level_of(edge.next_up(), r).unwrap().number(), i + 1);
            // One ulp below: still the lower level.
            assert_eq!(set.level_of(edge.next_down(), r).unwrap().number(), i);
        }
        assert_eq!(set.level_of(m.next_up(), r).unwrap().number(), 1);
        assert_eq!(set.edge(r, 0), m);
        assert_eq!(set.edge(r, 5), big_m);
    }
}

#[test]
fn ties_on_an_edge_share_the_lower_level() {
    let set = LevelSet::itu();
    let r = range(0.0, 100.0);
    // 0, 20, 40, 60, 80 and 100 are exact in binary after 20·i: every tie lands on the edge.
    let scores = [0.0, 20.0, 20.0, 20.0, 40.0, 40.0, 60.0, 80.0, 80.0, 100.0];
    let levels: Vec<usize> = scores
        .iter()
        .map(|&s| set.level_of(s, r).unwrap().number())
        .collect();
    assert_eq!(levels, vec![1, 1, 1, 1, 2, 2, 3, 4, 4, 5]);
}

#[test]
fn out_of_range_is_an_error_unless_clamped() {
    let set = LevelSet::itu();
    let r = range(1.0, 5.0);
    assert_eq!(
        set.level_of(5.0000001, r),
        Err(LevelError::OutOfRange {
            score: 5.0000001,
            min: 1.0,
            max: 5.0
        })
    );
    assert!(matches!(
        set.level_of(0.5, r),
        Err(LevelError::OutOfRange { .. })
    ));
    assert_eq!(set.level_of_clamped(0.5, r).unwrap().number(), 1);
    assert_eq!(set.level_of_clamped(9.0, r).unwrap().number(), 5);
    assert!(matches!(
        set.level_of(f64::NAN, r),
        Err(LevelError::NotFinite(_))
    ));
    assert!(matches!(
        set.level_of_clamped(f64::NAN, r),
        Err(LevelError::NotFinite(_))
    ));
}

#[test]
fn bad_ranges_are_rejected() {
    assert!(ScoreRange::new(1.0, 1.0).is_err());
    assert!(ScoreRange::new(2.0, 1.0).is_err());
    assert!(ScoreRange::new(f64::NAN, 1.0).is_err());
    assert_eq!(ScoreRange::of(&[]), Err(LevelError::EmptyScores));
    assert!(ScoreRange::of(&[3.0, 3.0]).is_err());
    let r = ScoreRange::of(&[3.0, -1.0, 7.5]).unwrap();
    assert_eq!((r.min(), r.max()), (-1.0, 7.5));
}

#[test]
fn custom_level_sets() {
    let three = LevelSet::new(["high", "medium", "low"]).unwrap();
    assert_eq!(three.n_levels(), 3);
    assert_eq!(three.weights(Scale::OneToFive), vec![3.0, 2.0, 1.0]);
    assert_eq!(three.weights(Scale::ZeroToOne), vec![1.0, 0.5, 0.0]);
    let r = range(0.0, 3.0);
    let words: Vec<&str> = [0.0, 1.0, 1.5, 2.0, 2.5, 3.0]
        .iter()
        .map(|&s| three.word(three.level_of(s, r).unwrap()))
        .collect();
    assert_eq!(words, ["low", "low", "medium", "medium", "high", "high"]);

    let ten: Vec<String> = (0..10).map(|i| format!("w{i}")).collect();
    let ten = LevelSet::new(ten).unwrap();
    let r = range(0.0, 10.0);
    for k in 0..=10 {
        let expected = k.max(1);
        assert_eq!(ten.level_of(k as f64, r).unwrap().number(), expected);
    }
    assert_eq!(ten.word(ten.best()), "w0");

    assert_eq!(LevelSet::new(["only"]), Err(LevelError::TooFewLevels(1)));
    assert!(matches!(
        LevelSet::new(["a", "b", "a"]),
        Err(LevelError::BadWord(_))
    ));
    assert!(matches!(
        LevelSet::new(["a", ""]),
        Err(LevelError::BadWord(_))
    ));
    assert!(matches!(
        LevelSet::new(["a", " b"]),
        Err(LevelError::BadWord(_))
    ));
}

#[test]
fn scale_names_serialise() {
    assert_eq!(serde_json::to_string(&Scale::OneToFive).unwrap(), "\"1-5\"");
    assert_eq!(serde_json::to_string(&Scale::ZeroToOne).unwrap(), "\"0-1\"");
    let s: Scale = serde_json::from_str("\"0-1\"").unwrap();
    assert_eq!(s, Scale::ZeroToOne);
    assert_eq!("1-5".parse::<Scale>().unwrap(), Scale::OneToFive);
    assert!("1..5".parse::<Scale>().is_err());
    let score = Score {
        value: 2.5,
        scale: Scale::OneToFive,
    };
    assert_eq!(
        serde_json::to_string(&score).unwrap(),
        r#"{"value":2.5,"scale":"1-5"}"#
    );
}

/// One scored prompt of the official fixtures.
struct FixtureCase {
    name: String,
    logits: Vec<f32>,
    probs: Vec<f64>,
    score01: Option<f64>,
    score15: f64,
}

/// Every (level_logits, level_probs, score01, score15) in the official fixtures.
fn fixture_cases() -> Vec<FixtureCase> {
    let text = std::fs::read_to_string(fixtures().join("expected/expected.json")).unwrap();
    let e: serde_json::Value = serde_json::from_str(&text).unwrap();
    let floats = |v: &serde_json::Value| -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let mut cases = Vec::new();
    let mut push = |name: String, rec: &serde_json::Value| {
        cases.push(FixtureCase {
            name,
            logits: floats(&rec["level_logits"])
                .iter()
                .map(|&x| x as f32)
                .collect(),
            probs: floats(&rec["level_probs"]),
            score01: rec.get("score01").and_then(|v| v.as_f64()),
            score15: rec["score15"].as_f64().unwrap(),
        });
    };
    for (image, entry) in e["images"].as_object().unwrap() {
        for (task, rec) in entry["tasks"].as_object().unwrap() {
            push(format!("{image}/{task}"), rec);
        }
    }
    for (key, rec) in e["video"].as_object().unwrap() {
        push(key.clone(), rec);
    }
    for (key, rec) in e["model_score_method"]["runs"].as_object().unwrap() {
        push(format!("score()/{key}"), rec);
    }
    cases
}

#[test]
fn softmax_and_scores_match_the_official_fixtures() {
    let cases = fixture_cases();
    assert!(cases.len() >= 15, "found {} cases", cases.len());
    let set = LevelSet::itu();
    for FixtureCase {
        name,
        logits,
        probs,
        score01,
        score15,
    } in cases
    {
        // Tolerances from fixtures/README.md: probabilities and score01 2e-6, score15 8e-6.
        let p32 = softmax(&logits);
        let dist = set.distribution_from_logits(&logits).unwrap();
        for k in 0..5 {
            assert_close(
                f64::from(p32[k]),
                probs[k],
                2e-6,
                &format!("{name} p[{k}] (f32)"),
            );
            assert_close(dist.probs()[k], probs[k], 2e-6, &format!("{name} p[{k}]"));
        }
        if let Some(s01) = score01 {
            let s = dist.score(Scale::ZeroToOne);
            assert_eq!(s.scale, Scale::ZeroToOne);
            assert_close(s.value, s01, 2e-6, &format!("{name} score01"));
        }
        let s15 = dist.score(Scale::OneToFive);
        assert_close(s15.value, score15, 8e-6, &format!("{name} score15"));
        // hf = 1 + 4·github, both ways.
        let s01 = dist.score(Scale::ZeroToOne);
        assert_close(
            dist.rescale(s01, Scale::OneToFive).value,
            s15.value,
            1e-12,
            "rescale up",
        );
        assert_close(
            set.rescale(s15, Scale::ZeroToOne).value,
            s01.value,
            1e-12,
            "rescale down",
        );
    }
}

#[test]
fn softmax_is_stable_for_large_logits() {
    let p = softmax(&[1000.0, 999.0, -1000.0]);
    let e = (-1.0f64).exp();
    assert_close(f64::from(p[0]), 1.0 / (1.0 + e), 1e-7, "p0");
    assert_close(f64::from(p[1]), e / (1.0 + e), 1e-7, "p1");
    assert_eq!(p[2], 0.0);
    assert!(softmax(&[]).is_empty());
}

#[test]
fn distribution_rejects_bad_input() {
    assert!(matches!(
        LevelDistribution::from_logits(&[1.0, f32::NAN, 0.0]),
        Err(LevelError::NonFiniteLogit { index: 1, .. })
    ));
    assert!(matches!(
        LevelDistribution::from_logits(&[f32::INFINITY, 0.0]),
        Err(LevelError::NonFiniteLogit { index: 0, .. })
    ));
    assert_eq!(
        LevelDistribution::from_logits(&[1.0]),
        Err(LevelError::TooFewEntries(1))
    );
    assert_eq!(
        LevelSet::itu().distribution_from_logits(&[0.0; 4]),
        Err(LevelError::WrongCount {
            expected: 5,
            got: 4
        })
    );
    assert!(LevelDistribution::from_probs(vec![0.5, 0.6]).is_err());
    assert!(LevelDistribution::from_probs(vec![1.2, -0.2]).is_err());
    assert!(LevelDistribution::from_probs(vec![f64::NAN, 0.5]).is_err());
    assert!(LevelDistribution::from_probs(vec![0.25, 0.75]).is_ok());
}

#[test]
fn uncertainty_of_known_distributions() {
    let uniform = LevelDistribution::from_probs(vec![0.2; 5]).unwrap();
    assert_close(uniform.score(Scale::OneToFive).value, 3.0, 1e-12, "mean");
    assert_close(uniform.std(Scale::OneToFive), 2f64.sqrt(), 1e-12, "std 1-5");
    assert_close(
        uniform.std(Scale::ZeroToOne),
        2f64.sqrt() / 4.0,
        1e-12,
        "std 0-1",
    );
    assert_close(uniform.entropy(), 5f64.ln(), 1e-12, "entropy uniform");

    let certain = LevelDistribution::from_probs(vec![0.0, 1.0, 0.0, 0.0, 0.0]).unwrap();
    assert_eq!(certain.score(Scale::OneToFive).value, 4.0);
    assert_eq!(certain.std(Scale::OneToFive), 0.0);
    assert_eq!(certain.entropy(), 0.0);
    assert_eq!(certain.most_likely().number(), 4);

    // Half excellent, half bad: mean 3, std 2 on 1-5.
    let split = LevelDistribution::from_probs(vec![0.5, 0.0, 0.0, 0.0, 0.5]).unwrap();
    assert_close(split.std(Scale::OneToFive), 2.0, 1e-12, "std split");
    assert_close(split.entropy(), 2f64.ln(), 1e-12, "entropy split");
}

#[test]
fn qbench_binary_form_is_the_two_level_case() {
    // Q-Bench scores p(good) = softmax over the (good, poor) logits.
    let set = LevelSet::good_poor();
    assert_eq!(set.words(), ["good", "poor"]);
    for (good, poor) in [(1.5f32, -0.25f32), (-2.0, 3.0), (0.0, 0.0), (7.25, 7.0)] {
        let p_good = 1.0 / (1.0 + (f64::from(poor) - f64::from(good)).exp());
        let dist = set.distribution_from_logits(&[good, poor]).unwrap();
        assert_close(dist.score(Scale::ZeroToOne).value, p_good, 1e-12, "p(good)");
        assert_close(
            dist.score(Scale::OneToFive).value,
            1.0 + p_good,
            1e-12,
            "1..2 scale",
        );
        assert_close(
            dist.std(Scale::ZeroToOne),
            (p_good * (1.0 - p_good)).sqrt(),
            1e-12,
            "Bernoulli std",
        );
        let h = -(p_good * p_good.ln() + (1.0 - p_good) * (1.0 - p_good).ln());
        assert_close(dist.entropy(), h, 1e-12, "binary entropy");
    }
    // Binning: above the midpoint is good, the midpoint itself and below are poor.
    let r = range(0.0, 1.0);
    assert_eq!(set.word(set.level_of(0.5, r).unwrap()), "poor");
    assert_eq!(set.word(set.level_of(0.5f64.next_up(), r).unwrap()), "good");
    assert_eq!(set.word(set.level_of(0.0, r).unwrap()), "poor");
}

fn logits_strategy() -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(-60.0f32..60.0, 2..12)
}

proptest! {
    #[test]
    fn probabilities_sum_to_one_and_scores_stay_in_range(logits in logits_strategy()) {
        let dist = LevelDistribution::from_logits(&logits).unwrap();
        let n = logits.len() as f64;
        let sum: f64 = dist.probs().iter().sum();
        prop_assert!((sum - 1.0).abs() < 1e-12);
        prop_assert!(dist.probs().iter().all(|&p| (0.0..=1.0).contains(&p)));
        let s15 = dist.score(Scale::OneToFive).value;
        let s01 = dist.score(Scale::ZeroToOne).value;
        prop_assert!((1.0 - 1e-12..=n + 1e-12).contains(&s15));
        prop_assert!((-1e-12..=1.0 + 1e-12).contains(&s01));
        prop_assert!((s15 - (1.0 + (n - 1.0) * s01)).abs() < 1e-9);
        prop_assert!(dist.entropy() >= -1e-12 && dist.entropy() <= n.ln() + 1e-12);
        prop_assert!(dist.std(Scale::OneToFive) <= (n - 1.0) / 2.0 + 1e-9);
        let f32_sum: f32 = softmax(&logits).iter().sum();
        prop_assert!((f32_sum - 1.0).abs() < 1e-5);
    }

    #[test]
    fn softmax_is_shift_invariant(
        ints in prop::collection::vec(-4000i32..4000, 2..10),
        shift in -100_000i32..100_000,
    ) {
        // Multiples of 1/64 keep every sum exact, so the invariance must be exact.
        let z: Vec<f64> = ints.iter().map(|&k| f64::from(k) / 64.0).collect();
        let c = f64::from(shift) / 64.0;
        let shifted: Vec<f64> = z.iter().map(|&v| v + c).collect();
        prop_assert_eq!(softmax_f64(&z), softmax_f64(&shifted));
        // And in f32 with arbitrary shifts, up to rounding of the shifted logits.
        let z32: Vec<f32> = z.iter().map(|&v| v as f32).collect();
        let s32: Vec<f32> = z32.iter().map(|&v| v + 3.5).collect();
        for (a, b) in softmax(&z32).iter().zip(softmax(&s32)) {
            prop_assert!((a - b).abs() < 1e-6);
        }
    }

    #[test]
    fn level_is_monotone_in_score(
        m in -1000.0f64..1000.0,
        width in 1e-6f64..1000.0,
        n in 2usize..12,
        a in 0.0f64..=1.0,
        b in 0.0f64..=1.0,
    ) {
        let big_m = m + width;
        prop_assume!(big_m > m);
        let r = ScoreRange::new(m, big_m).unwrap();
        let set = LevelSet::new((0..n).map(|i| format!("w{i}"))).unwrap();
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        let s_lo = (m + lo * width).clamp(m, big_m);
        let s_hi = (m + hi * width).clamp(m, big_m);
        let l_lo = set.level_of(s_lo, r).unwrap();
        let l_hi = set.level_of(s_hi, r).unwrap();
        prop_assert!(l_lo <= l_hi);
        prop_assert!((1..=n).contains(&l_hi.number()));
        // The level's interval really contains the score.
        let i = l_lo.number();
        prop_assert!(s_lo <= set.edge(r, i));
        prop_assert!(i == 1 || s_lo > set.edge(r, i - 1));
    }
}
