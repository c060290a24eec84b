//! Metrics against scipy on real label data. The reference values come from
//! `scripts/metrics_reference.py` (scipy 1.17.1 / numpy 2.4: `spearmanr`, `pearsonr`,
//! `kendalltau`, and `curve_fit` with pyiqa's starting point for the logistic) on the same files
//! and the same deterministic transforms; `--check` compares them with the values here.

mod common;

use common::{assert_close, labels};
use qalign_core::dataset::{Columns, read_labels};
use qalign_core::metrics::logistic::fitted_metrics;
use qalign_core::metrics::{
    self, BootstrapOptions, Logistic4, MetricError, Metrics, Side, average_ranks, bootstrap,
};

const TOL: f64 = 1e-9;

fn mos(file: &str) -> Vec<f64> {
    read_labels(&labels(file), &Columns::default())
        .unwrap()
        .scores()
}

fn check(name: &str, x: &[f64], y: &[f64], expected: [f64; 4]) {
    let m = Metrics::compute(x, y).unwrap();
    assert_eq!(m.n, x.len());
    assert_close(m.srcc, expected[0], TOL, &format!("{name} SRCC"));
    assert_close(m.plcc, expected[1], TOL, &format!("{name} PLCC"));
    assert_close(m.krcc, expected[2], TOL, &format!("{name} KRCC"));
    assert_close(m.rmse, expected[3], TOL, &format!("{name} RMSE"));
}

#[test]
fn koniq_mos_against_official_levels() {
    let ds = read_labels(&labels("train_koniq.json"), &Columns::default()).unwrap();
    let words = ["bad", "poor", "fair", "good", "excellent"];
    let x = ds.scores();
    let y: Vec<f64> = ds
        .items
        .iter()
        .map(|i| {
            let w = i.answer_level_word().unwrap();
            (words.iter().position(|&v| v == w).unwrap() + 1) as f64
        })
        .collect();
    assert_eq!(x.len(), 7046);
    check(
        "koniq",
        &x,
        &y,
        [
            0.951690227341178,
            0.9605520609333121,
            0.844239402053305,
            56.77831790535728,
        ],
    );
}

#[test]
fn livec_mos_against_shifted_mos() {
    let x = mos("livec.json");
    let y: Vec<f64> = x
        .iter()
        .enumerate()
        .map(|(i, &v)| v + ((i * 37) % 101) as f64 * 0.5)
        .collect();
    check(
        "livec",
        &x,
        &y,
        [
            0.7837840852667397,
            0.8147046424909985,
            0.5832343381285585,
            28.937094394447357,
        ],
    );
}

#[test]
fn csiq_ties_on_both_sides() {
    let x = mos("csiq.json");
    let y: Vec<f64> = (0..x.len()).map(|i| ((i * 37) % 11) as f64).collect();
    check(
        "csiq",
        &x,
        &y,
        [
            -0.011885253676209753,
            -0.014293583688868383,
            -0.008569584246349918,
            5.63965515340551,
        ],
    );
}

#[test]
fn kadid_negative_correlation() {
    let x = mos("test_kadid.json");
    let y: Vec<f64> = x
        .iter()
        .enumerate()
        .map(|(i, &v)| -(v * v) + (i % 7) as f64 * 0.25)
        .collect();
    check(
        "kadid",
        &x,
        &y,
        [
            -0.9956538060149147,
            -0.9858601970357824,
            -0.9461350021119658,
            14.731912474433521,
        ],
    );
}

#[test]
fn average_ranks_match_scipy_rankdata() {
    assert_eq!(
        average_ranks(&[10.0, 20.0, 10.0, 30.0, 20.0, 10.0]),
        vec![2.0, 4.5, 2.0, 6.0, 4.5, 2.0]
    );
}

#[test]
fn kendall_small_cases() {
    // Perfect agreement, perfect disagreement, and a hand-counted case with ties:
    // x = [1,2,2,3], y = [1,3,2,2]: concordant 3, discordant 1, x-ties 1, y-ties 1,
    // tau_b = (3−1)/sqrt((6−1)(6−1)) = 0.4.
    assert_close(
        metrics::krcc(&[1.0, 2.0, 3.0], &[4.0, 5.0, 6.0]).unwrap(),
        1.0,
        0.0,
        "+1",
    );
    assert_close(
        metrics::krcc(&[1.0, 2.0, 3.0], &[6.0, 5.0, 4.0]).unwrap(),
        -1.0,
        0.0,
        "-1",
    );
    assert_close(
        metrics::krcc(&[1.0, 2.0, 2.0, 3.0], &[1.0, 3.0, 2.0, 2.0]).unwrap(),
        0.4,
        1e-15,
        "ties",
    );
}

#[test]
fn degenerate_inputs_are_errors_not_panics() {
    assert_eq!(
        Metrics::compute(&[1.0, 2.0], &[1.0, 2.0]),
        Err(MetricError::TooFewPairs(2))
    );
    assert_eq!(metrics::srcc(&[], &[]), Err(MetricError::TooFewPairs(0)));
    assert_eq!(
        metrics::plcc(&[1.0, 2.0, 3.0], &[1.0, 2.0]),
        Err(MetricError::LengthMismatch {
            first: 3,
            second: 2
        })
    );
    assert_eq!(
        metrics::srcc(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]),
        Err(MetricError::Constant(Side::First))
    );
    assert_eq!(
        metrics::krcc(&[1.0, 2.0, 3.0], &[5.0, 5.0, 5.0]),
        Err(MetricError::Constant(Side::Second))
    );
    assert!(matches!(
        metrics::plcc(&[1.0, f64::NAN, 3.0], &[1.0, 2.0, 3.0]),
        Err(MetricError::NonFinite {
            side: Side::First,
            index: 1,
            ..
        })
    ));
    assert!(matches!(
        metrics::rmse(&[1.0, 2.0, 3.0], &[1.0, 2.0, f64::INFINITY]),
        Err(MetricError::NonFinite {
            side: Side::Second,
            index: 2,
            ..
        })
    ));
    // RMSE is defined for constant vectors.
    assert_eq!(metrics::rmse(&[1.0; 3], &[1.0; 3]), Ok(0.0));
    assert!(Logistic4::fit(&[2.0; 4], &[1.0, 2.0, 3.0, 4.0]).is_err());
}

#[test]
fn logistic_fit_matches_scipy_curve_fit() {
    let y = mos("livec.json");
    let x: Vec<f64> = y
        .iter()
        .enumerate()
        .map(|(i, &v)| (v / (100.0 - v)).ln() + ((i * 37) % 101) as f64 * 0.01)
        .collect();
    let fit = fitted_metrics(&x, &y).unwrap();
    // scipy `curve_fit` from pyiqa's start, run to convergence (ftol = xtol = gtol = 1e-15; its
    // default 1.5e-8 stops ~4e-5 short in β2): popt = [96.24190808680181, -2.5755361931191034,
    // 0.2986125246117232, 1.0982677419918954], SSE 39939.1790612776.
    let expected = [
        96.24190808680181,
        -2.5755361931191034,
        0.2986125246117232,
        1.0982677419918954,
    ];
    for (k, (&got, &want)) in fit.curve.beta.iter().zip(&expected).enumerate() {
        assert_close(
            got,
            want,
            1e-5 * want.abs().max(1.0),
            &format!("beta{}", k + 1),
        );
    }
    assert_close(fit.plcc, 0.9575575839022197, 1e-9, "fitted PLCC");
    assert_close(fit.rmse, 5.845104922020203, 1e-9, "fitted RMSE");
    // Raw PLCC for comparison (scipy 0.9513760805519967): the fit helps, as expected.
    assert_close(
        metrics::plcc(&x, &y).unwrap(),
        0.9513760805519967,
        TOL,
        "raw PLCC",
    );
}

#[test]
fn logistic_recovers_an_exact_curve() {
    let truth = Logistic4 {
        beta: [80.0, 10.0, 3.0, 0.5],
    };
    let x: Vec<f64> = (0..200).map(|i| 1.0 + 4.0 * i as f64 / 199.0).collect();
    let y: Vec<f64> = x.iter().map(|&v| truth.eval(v)).collect();
    let fit = Logistic4::fit(&x, &y).unwrap();
    for (got, want) in fit.beta.iter().zip(truth.beta) {
        assert_close(got.abs(), want, 1e-6, "beta");
    }
}

#[test]
fn bootstrap_is_seeded_and_brackets_the_estimate() {
    let x = mos("livec.json");
    let y: Vec<f64> = x
        .iter()
        .enumerate()
        .map(|(i, &v)| v + ((i * 37) % 101) as f64 * 0.5)
        .collect();
    let opts = BootstrapOptions {
        resamples: 100,
        seed: 7,
        confidence: 0.95,
    };
    let calls = std::sync::atomic::AtomicUsize::new(0);
    let count = |k: usize| {
        calls.fetch_add(k, std::sync::atomic::Ordering::Relaxed);
    };
    let a = bootstrap(&x, &y, opts, &count).unwrap();
    assert_eq!(calls.into_inner(), 100);
    let b = bootstrap(&x, &y, opts, &|_| {}).unwrap();
    assert_eq!(a, b, "same seed, same intervals");
    let c = bootstrap(&x, &y, BootstrapOptions { seed: 8, ..opts }, &|_| {}).unwrap();
    assert_ne!(a.srcc, c.srcc, "another seed, other intervals");
    let m = Metrics::compute(&x, &y).unwrap();
    for (name, iv, point) in [
        ("srcc", a.srcc, m.srcc),
        ("plcc", a.plcc, m.plcc),
        ("krcc", a.krcc, m.krcc),
        ("rmse", a.rmse, m.rmse),
    ] {
        assert!(
            iv.low < point && point < iv.high,
            "{name}: {iv:?} vs {point}"
        );
        // With n = 1169 the 95% interval of a correlation near 0.8 is a few hundredths wide.
        assert!(
            iv.high - iv.low < 0.2 * point.abs().max(1.0),
            "{name}: {iv:?}"
        );
    }
    assert_eq!(a.degenerate_resamples, 0);
}

#[test]
fn bootstrap_of_tiny_samples_skips_constant_resamples() {
    let x = [1.0, 2.0, 3.0];
    let y = [1.0, 3.0, 2.0];
    let opts = BootstrapOptions {
        resamples: 300,
        seed: 1,
        confidence: 0.9,
    };
    let ci = bootstrap(&x, &y, opts, &|_| {}).unwrap();
    // P(all three draws equal) = 3/27, so about 33 of 300 resamples are constant.
    assert!(ci.degenerate_resamples > 10 && ci.degenerate_resamples < 70);
    assert!(ci.srcc.low >= -1.0 && ci.srcc.high <= 1.0);
    assert!(matches!(
        bootstrap(
            &x,
            &y,
            BootstrapOptions {
                resamples: 0,
                ..opts
            },
            &|_| {}
        ),
        Err(MetricError::InvalidOption(_))
    ));
    assert!(matches!(
        bootstrap(
            &x,
            &y,
            BootstrapOptions {
                confidence: 1.0,
                ..opts
            },
            &|_| {}
        ),
        Err(MetricError::InvalidOption(_))
    ));
}

/// Kendall tau-b by direct O(n²) pair counting, the textbook definition.
fn naive_tau_b(x: &[f64], y: &[f64]) -> f64 {
    let (mut c, mut d, mut tx, mut ty) = (0i64, 0i64, 0i64, 0i64);
    for i in 0..x.len() {
        for j in i + 1..x.len() {
            let sx = (x[i] - x[j]).signum() * f64::from(u8::from(x[i] != x[j]));
            let sy = (y[i] - y[j]).signum() * f64::from(u8::from(y[i] != y[j]));
            match (sx == 0.0, sy == 0.0) {
                (true, true) => {}
                (true, false) => tx += 1,
                (false, true) => ty += 1,
                (false, false) if sx == sy => c += 1,
                _ => d += 1,
            }
        }
    }
    (c - d) as f64 / (((c + d + tx) as f64) * ((c + d + ty) as f64)).sqrt()
}

proptest::proptest! {
    #[test]
    fn knight_kendall_equals_pair_counting(
        pairs in proptest::collection::vec((0u8..6, 0u8..6), 3..60)
    ) {
        let x: Vec<f64> = pairs.iter().map(|p| f64::from(p.0)).collect();
        let y: Vec<f64> = pairs.iter().map(|p| f64::from(p.1)).collect();
        match metrics::krcc(&x, &y) {
            Ok(tau) => proptest::prop_assert!((tau - naive_tau_b(&x, &y)).abs() < 1e-12),
            Err(MetricError::Constant(_)) => {
                proptest::prop_assert!(x.iter().all(|&v| v == x[0]) || y.iter().all(|&v| v == y[0]))
            }
            Err(e) => proptest::prop_assert!(false, "{e}"),
        }
    }
}

/// Values that the metrics must treat alike: `(a + offset) · scale` for a positive scale.
fn affine(v: &[f64], scale: f64, offset: f64) -> Vec<f64> {
    v.iter().map(|&a| (a + offset) * scale).collect()
}

const SCALES: [f64; 6] = [1.0, 1e155, 1e-155, 3.5e290, 2.5e-290, 7.25];
/// 2^40 and 10^12 keep integers up to 2^21 exact, so the offset data are still distinct.
const OFFSETS: [f64; 3] = [0.0, 1_099_511_627_776.0, -1e12];

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(400))]
    #[test]
    fn correlations_are_invariant_under_positive_affine_maps(
        pairs in proptest::collection::vec((-1_000_000i32..1_000_000, -1_000_000i32..1_000_000), 3..80),
        sx in 0..SCALES.len(), sy in 0..SCALES.len(),
        ox in 0..OFFSETS.len(), oy in 0..OFFSETS.len(),
    ) {
        let x: Vec<f64> = pairs.iter().map(|p| f64::from(p.0)).collect();
        let y: Vec<f64> = pairs.iter().map(|p| f64::from(p.1)).collect();
        proptest::prop_assume!(x.iter().any(|&v| v != x[0]) && y.iter().any(|&v| v != y[0]));
        let (x2, y2) = (affine(&x, SCALES[sx], OFFSETS[ox]), affine(&y, SCALES[sy], OFFSETS[oy]));
        let base = Metrics::compute(&x, &y).unwrap();
        let moved = Metrics::compute(&x2, &y2).unwrap();
        proptest::prop_assert!((base.plcc - moved.plcc).abs() < 1e-9, "PLCC {} vs {}", base.plcc, moved.plcc);
        proptest::prop_assert!((base.srcc - moved.srcc).abs() < 1e-12, "SRCC {} vs {}", base.srcc, moved.srcc);
        proptest::prop_assert!((base.krcc - moved.krcc).abs() < 1e-12, "KRCC {} vs {}", base.krcc, moved.krcc);
        // RMSE scales with a shared scale.
        let k = SCALES[sx];
        let scaled = metrics::rmse(&affine(&x, k, 0.0), &affine(&y, k, 0.0)).unwrap();
        proptest::prop_assert!(scaled.is_finite());
        proptest::prop_assert!((scaled / k - base.rmse).abs() <= 1e-12 * base.rmse, "RMSE {scaled} vs {} · {k}", base.rmse);
    }
}

#[test]
fn extreme_magnitudes_keep_the_real_values() {
    // Before centring and rescaling, MOS × 1e155 overflowed the sums of squares: PLCC 0 or NaN.
    let x = mos("livec.json");
    let y: Vec<f64> = x
        .iter()
        .enumerate()
        .map(|(i, &v)| v + ((i * 37) % 101) as f64 * 0.5)
        .collect();
    for k in [1e155, 1e-155, 1e300] {
        let m = Metrics::compute(&affine(&x, k, 0.0), &affine(&y, k, 0.0)).unwrap();
        assert_close(m.srcc, 0.7837840852667397, TOL, "SRCC");
        assert_close(m.plcc, 0.8147046424909985, TOL, "PLCC");
        assert_close(m.krcc, 0.5832343381285585, TOL, "KRCC");
        assert_close(m.rmse / k, 28.937094394447357, 1e-9, "RMSE / k");
    }
    // The logistic fit too: the same curve, scaled.
    let z: Vec<f64> = x
        .iter()
        .enumerate()
        .map(|(i, &v)| (v / (100.0 - v)).ln() + ((i * 37) % 101) as f64 * 0.01)
        .collect();
    let plain = fitted_metrics(&z, &x).unwrap();
    for k in [1e155, 1e-155] {
        let big = fitted_metrics(&affine(&z, k, 0.0), &affine(&x, k, 0.0)).unwrap();
        assert_close(big.plcc, plain.plcc, 1e-12, "fitted PLCC");
        assert_close(big.rmse / k, plain.rmse, 1e-9, "fitted RMSE / k");
        for (b, p) in big.curve.beta.iter().zip(plain.curve.beta) {
            assert_close(b / k, p, 1e-9 * p.abs(), "beta / k");
        }
    }
    // And the bootstrap: the same correlation intervals, the RMSE interval scaled.
    let opts = BootstrapOptions {
        resamples: 50,
        seed: 3,
        confidence: 0.9,
    };
    let plain = bootstrap(&x, &y, opts, &|_| {}).unwrap();
    let big = bootstrap(
        &affine(&x, 1e155, 0.0),
        &affine(&y, 1e155, 0.0),
        opts,
        &|_| {},
    )
    .unwrap();
    for (a, b) in [
        (plain.srcc, big.srcc),
        (plain.plcc, big.plcc),
        (plain.krcc, big.krcc),
    ] {
        assert_close(b.low, a.low, 1e-12, "low");
        assert_close(b.high, a.high, 1e-12, "high");
    }
    assert_close(big.rmse.low / 1e155, plain.rmse.low, 1e-9, "RMSE low");
    assert_close(big.rmse.high / 1e155, plain.rmse.high, 1e-9, "RMSE high");
}

#[test]
fn bootstrap_does_not_depend_on_the_thread_count() {
    let x = mos("csiq.json");
    let y: Vec<f64> = (0..x.len()).map(|i| ((i * 37) % 11) as f64).collect();
    let opts = BootstrapOptions {
        resamples: 200,
        seed: 11,
        confidence: 0.95,
    };
    let on = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| bootstrap(&x, &y, opts, &|_| {}).unwrap())
    };
    let one = on(1);
    assert_eq!(one, on(2));
    assert_eq!(one, on(7));
}

#[test]
fn bootstrap_resamples_are_bounded() {
    let x = [1.0, 2.0, 3.0, 4.0];
    let y = [1.0, 3.0, 2.0, 4.0];
    let at_most = BootstrapOptions {
        resamples: metrics::bootstrap::MAX_RESAMPLES + 1,
        ..BootstrapOptions::default()
    };
    match bootstrap(&x, &y, at_most, &|_| {}) {
        Err(MetricError::InvalidOption(m)) => assert!(m.contains("at most 100000"), "{m}"),
        other => panic!("{other:?}"),
    }
}

/// A spread far below the values' ulp-scale offset: the rounded mean used to be off by up to
/// half an ulp of 1e12 (6e-5), comparable to the spread, and PLCC came out 0.9952295 instead of
/// the exact 0.99523 (exact rational arithmetic in Python; scipy's `pearsonr` itself gives
/// 0.9952167, with a "nearly constant" warning).
#[test]
fn pearson_survives_a_large_common_offset() {
    let x: Vec<f64> = (0..50).map(|i| 1e12 + f64::from(i) * 1e-3).collect();
    let y: Vec<f64> = (0..50)
        .map(|i| f64::from(i) + f64::from((i * 7) % 5))
        .collect();
    assert_close(
        metrics::plcc(&x, &y).unwrap(),
        0.995_233_189_213_027,
        1e-12,
        "PLCC",
    );
}
