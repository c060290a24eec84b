//! Percentile-bootstrap confidence intervals for the metrics.
//!
//! A correlation measured on a few hundred images has a sampling error large enough to change
//! the ranking of methods, so the evaluation reports an interval next to each number. Resample
//! `b` draws its n indices from a ChaCha8 stream seeded with `(seed, stream = b)`, so the result
//! depends only on the seed and the resample count — not on thread scheduling.

use std::sync::atomic::{AtomicUsize, Ordering};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::{
    MetricError, check_not_constant, check_pairs, kendall_tau_b_unchecked, pearson_unchecked,
};

/// How to bootstrap.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BootstrapOptions {
    /// Number of resamples (default 1000).
    pub resamples: usize,
    /// Seed of the ChaCha8 generator (default 0).
    pub seed: u64,
    /// Two-sided coverage of the interval, in (0, 1) (default 0.95).
    pub confidence: f64,
}

impl Default for BootstrapOptions {
    fn default() -> Self {
        Self {
            resamples: 1000,
            seed: 0,
            confidence: 0.95,
        }
    }
}

/// A two-sided interval; both ends NaN when too few resamples were usable.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Interval {
    pub low: f64,
    pub high: f64,
}

/// Intervals for every metric, plus how they were obtained.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetricIntervals {
    pub srcc: Interval,
    pub plcc: Interval,
    pub krcc: Interval,
    pub rmse: Interval,
    pub confidence: f64,
    pub resamples: usize,
    pub seed: u64,
    /// Resamples in which a vector came out constant, so the correlations were undefined and
    /// left out of the correlation intervals (RMSE still uses them).
    pub degenerate_resamples: usize,
}

/// Bootstrap intervals of SRCC, PLCC, KRCC and RMSE. `progress` is called with 1 after each
/// resample (from worker threads).
pub fn bootstrap(
    x: &[f64],
    y: &[f64],
    options: BootstrapOptions,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<MetricIntervals, MetricError> {
    check_pairs(x, y)?;
    if options.resamples == 0 {
        return Err(MetricError::InvalidOption(
            "bootstrap needs at least one resample".to_string(),
        ));
    }
    if !(options.confidence > 0.0 && options.confidence < 1.0) {
        return Err(MetricError::InvalidOption(format!(
            "confidence must lie in (0, 1), got {}",
            options.confidence
        )));
    }
    let results = run_resamples(x, y, options, progress);
    let mut srcc = Vec::new();
    let mut plcc = Vec::new();
    let mut krcc = Vec::new();
    let mut rmse = Vec::new();
    let mut degenerate = 0;
    for r in &results {
        rmse.push(r.rmse);
        match r.correlations {
            Some((s, p, k)) => {
                srcc.push(s);
                plcc.push(p);
                krcc.push(k);
            }
            None => degenerate += 1,
        }
    }
    let alpha = (1.0 - options.confidence) / 2.0;
    Ok(MetricIntervals {
        srcc: percentile_interval(&mut srcc, alpha),
        plcc: percentile_interval(&mut plcc, alpha),
        krcc: percentile_interval(&mut krcc, alpha),
        rmse: percentile_interval(&mut rmse, alpha),
        confidence: options.confidence,
        resamples: options.resamples,
        seed: options.seed,
        degenerate_resamples: degenerate,
    })
}

struct Resample {
    correlations: Option<(f64, f64, f64)>,
    rmse: f64,
}

fn run_resamples(
    x: &[f64],
    y: &[f64],
    options: BootstrapOptions,
    progress: &(dyn Fn(usize) + Sync),
) -> Vec<Resample> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .min(options.resamples);
    let next = AtomicUsize::new(0);
    let mut collected: Vec<(usize, Resample)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut local = Vec::new();
                    let mut xs = vec![0.0; x.len()];
                    let mut ys = vec![0.0; y.len()];
                    loop {
                        let b = next.fetch_add(1, Ordering::Relaxed);
                        if b >= options.resamples {
                            break;
                        }
                        local.push((b, one_resample(x, y, &mut xs, &mut ys, options.seed, b)));
                        progress(1);
                    }
                    local
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });
    collected.sort_by_key(|(b, _)| *b);
    collected.into_iter().map(|(_, r)| r).collect()
}

fn one_resample(
    x: &[f64],
    y: &[f64],
    xs: &mut [f64],
    ys: &mut [f64],
    seed: u64,
    b: usize,
) -> Resample {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(b as u64);
    let n = x.len() as u64;
    for (xo, yo) in xs.iter_mut().zip(ys.iter_mut()) {
        let i = rng.random_range(0..n) as usize;
        *xo = x[i];
        *yo = y[i];
    }
    let rmse = (xs
        .iter()
        .zip(ys.iter())
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f64>()
        / xs.len() as f64)
        .sqrt();
    let correlations = check_not_constant(xs, ys).ok().map(|()| {
        let rx = super::average_ranks(xs);
        let ry = super::average_ranks(ys);
        (
            pearson_unchecked(&rx, &ry),
            pearson_unchecked(xs, ys),
            kendall_tau_b_unchecked(xs, ys),
        )
    });
    Resample { correlations, rmse }
}

/// The `alpha` and `1 − alpha` quantiles with linear interpolation (numpy's default method).
fn percentile_interval(values: &mut [f64], alpha: f64) -> Interval {
    if values.len() < 2 {
        return Interval {
            low: f64::NAN,
            high: f64::NAN,
        };
    }
    values.sort_by(f64::total_cmp);
    Interval {
        low: quantile_sorted(values, alpha),
        high: quantile_sorted(values, 1.0 - alpha),
    }
}

fn quantile_sorted(sorted: &[f64], q: f64) -> f64 {
    let h = (sorted.len() - 1) as f64 * q;
    let lo = h.floor() as usize;
    let hi = (lo + 1).min(sorted.len() - 1);
    sorted[lo] + (h - lo as f64) * (sorted[hi] - sorted[lo])
}
