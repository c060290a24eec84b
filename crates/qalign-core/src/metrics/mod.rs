//! Agreement between predicted scores and human opinion scores: SRCC, PLCC, KRCC, RMSE.
//!
//! These are the numbers every IQA/VQA paper reports, and the official Q-Align evaluation takes
//! them from scipy (`spearmanr`, `pearsonr`, `kendalltau`) on the raw predictions. The functions
//! here reproduce scipy's definitions (average ranks for ties, Kendall's tau-b) so results can be
//! compared with published tables; the optional 4-parameter logistic fit lives in [`logistic`]
//! and bootstrap confidence intervals in [`bootstrap`](mod@bootstrap).

pub mod bootstrap;
pub mod logistic;

use std::cmp::Ordering;

use serde::Serialize;

pub use bootstrap::{BootstrapOptions, Interval, MetricIntervals, bootstrap};
pub use logistic::Logistic4;

/// Fewest pairs for which the metrics are computed.
pub const MIN_PAIRS: usize = 3;

/// Which of the two input vectors an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    First,
    Second,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::First => "first (x)",
            Side::Second => "second (y)",
        })
    }
}

/// Why a metric could not be computed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MetricError {
    #[error("the two vectors differ in length ({first} vs {second})")]
    LengthMismatch { first: usize, second: usize },
    #[error("need at least {MIN_PAIRS} pairs, got {0}")]
    TooFewPairs(usize),
    #[error("{side} vector has a non-finite value at index {index} ({value})")]
    NonFinite {
        side: Side,
        index: usize,
        value: f64,
    },
    #[error("{0} vector is constant, so the correlation is undefined")]
    Constant(Side),
    #[error("invalid option: {0}")]
    InvalidOption(String),
    #[error("logistic fit failed: {0}")]
    FitFailed(String),
}

/// The standard metrics on one set of pairs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Metrics {
    pub n: usize,
    pub srcc: f64,
    pub plcc: f64,
    pub krcc: f64,
    pub rmse: f64,
}

impl Metrics {
    /// All four metrics; fails if any is undefined (see [`MetricError`]).
    pub fn compute(x: &[f64], y: &[f64]) -> Result<Self, MetricError> {
        Ok(Self {
            n: x.len(),
            srcc: srcc(x, y)?,
            plcc: plcc(x, y)?,
            krcc: krcc(x, y)?,
            rmse: rmse(x, y)?,
        })
    }
}

/// Check lengths, the minimum count and finiteness.
pub fn check_pairs(x: &[f64], y: &[f64]) -> Result<(), MetricError> {
    if x.len() != y.len() {
        return Err(MetricError::LengthMismatch {
            first: x.len(),
            second: y.len(),
        });
    }
    if x.len() < MIN_PAIRS {
        return Err(MetricError::TooFewPairs(x.len()));
    }
    for (side, v) in [(Side::First, x), (Side::Second, y)] {
        if let Some((index, &value)) = v.iter().enumerate().find(|(_, a)| !a.is_finite()) {
            return Err(MetricError::NonFinite { side, index, value });
        }
    }
    Ok(())
}

fn check_not_constant(x: &[f64], y: &[f64]) -> Result<(), MetricError> {
    for (side, v) in [(Side::First, x), (Side::Second, y)] {
        if v.iter().all(|&a| a == v[0]) {
            return Err(MetricError::Constant(side));
        }
    }
    Ok(())
}

/// Pearson's linear correlation (scipy `pearsonr` statistic), clipped to [−1, 1].
pub fn plcc(x: &[f64], y: &[f64]) -> Result<f64, MetricError> {
    check_pairs(x, y)?;
    check_not_constant(x, y)?;
    Ok(pearson_unchecked(x, y))
}

pub(crate) fn pearson_unchecked(x: &[f64], y: &[f64]) -> f64 {
    let (dx, dy) = (deviations(x), deviations(y));
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (&a, &b) in dx.iter().zip(&dy) {
        sxy += a * b;
        sxx += a * a;
        syy += b * b;
    }
    (sxy / (sxx.sqrt() * syy.sqrt())).clamp(-1.0, 1.0)
}

/// The power of two that brings `max_abs` into [1, 4) (1 for 0 or non-finite values). Scaling by
/// a power of two is exact in floating point, so it changes no result except those that would
/// have overflowed or underflowed.
pub(crate) fn unit_scale(max_abs: f64) -> f64 {
    if max_abs == 0.0 || !max_abs.is_finite() {
        return 1.0;
    }
    let exponent = (max_abs.log2().floor() as i64).clamp(-1022, 1022);
    f64::from_bits(((1023 - exponent) as u64) << 52)
}

pub(crate) fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0.0, |m, a| m.max(a.abs()))
}

/// `v` minus its mean, rescaled by a power of two so the largest deviation lies in [1, 4):
/// sums of squares then neither overflow (MOS × 1e155) nor underflow (× 1e-155), and a huge
/// common offset cancels before anything is squared. Pearson's r is invariant to both steps.
pub(crate) fn deviations(v: &[f64]) -> Vec<f64> {
    let scale = unit_scale(max_abs(v));
    let mut d: Vec<f64> = v.iter().map(|a| a * scale).collect();
    let n = d.len() as f64;
    let mean = d.iter().sum::<f64>() / n;
    d.iter_mut().for_each(|a| *a -= mean);
    // The rounded mean is off by up to half an ulp of the values (1e12 + 1e-3·i: 6e-5, as much
    // as the spread itself); the deviations' own mean is that error, and small enough to hold.
    let residual = d.iter().sum::<f64>() / n;
    d.iter_mut().for_each(|a| *a -= residual);
    let rescale = unit_scale(max_abs(&d));
    d.iter_mut().for_each(|a| *a *= rescale);
    d
}

/// Spearman's rank correlation (scipy `spearmanr`): Pearson on average ranks.
pub fn srcc(x: &[f64], y: &[f64]) -> Result<f64, MetricError> {
    check_pairs(x, y)?;
    check_not_constant(x, y)?;
    Ok(pearson_unchecked(&average_ranks(x), &average_ranks(y)))
}

/// Kendall's tau-b (scipy `kendalltau`, default variant), O(n log n) by Knight's algorithm.
pub fn krcc(x: &[f64], y: &[f64]) -> Result<f64, MetricError> {
    check_pairs(x, y)?;
    check_not_constant(x, y)?;
    Ok(kendall_tau_b_unchecked(x, y))
}

/// Root mean squared difference of the raw values (no fitting; both must share a scale).
/// Computed on power-of-two rescaled values, so it overflows only if the result itself does.
pub fn rmse(x: &[f64], y: &[f64]) -> Result<f64, MetricError> {
    check_pairs(x, y)?;
    let scale = unit_scale(max_abs(x).max(max_abs(y)));
    let mut d: Vec<f64> = x
        .iter()
        .zip(y)
        .map(|(a, b)| a * scale - b * scale)
        .collect();
    let rescale = unit_scale(max_abs(&d));
    d.iter_mut().for_each(|a| *a *= rescale);
    let sum: f64 = d.iter().map(|a| a * a).sum();
    Ok((sum / x.len() as f64).sqrt() / rescale / scale)
}

fn cmp_f64(a: &f64, b: &f64) -> Ordering {
    a.partial_cmp(b).unwrap_or(Ordering::Equal)
}

/// 1-based ranks with ties given their average rank (scipy `rankdata(method="average")`).
/// Values must be finite.
pub fn average_ranks(v: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| cmp_f64(&v[a], &v[b]));
    let mut ranks = vec![0.0; v.len()];
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && v[order[end]] == v[order[start]] {
            end += 1;
        }
        // Positions start..end (0-based) share ranks start+1..=end; their mean:
        let rank = (start + 1 + end) as f64 / 2.0;
        for &idx in &order[start..end] {
            ranks[idx] = rank;
        }
        start = end;
    }
    ranks
}

/// Number of tied pairs Σ c(c−1)/2 over runs of equal values in an already sorted slice.
fn tied_pairs<T: PartialEq>(sorted: &[T]) -> u64 {
    let mut total = 0u64;
    let mut start = 0;
    while start < sorted.len() {
        let mut end = start + 1;
        while end < sorted.len() && sorted[end] == sorted[start] {
            end += 1;
        }
        let c = (end - start) as u64;
        total += c * (c - 1) / 2;
        start = end;
    }
    total
}

/// Count inversions (pairs i < j with v[i] > v[j]) while merge-sorting `v` in place.
fn count_inversions(v: &mut [f64], buf: &mut Vec<f64>) -> u64 {
    let n = v.len();
    if n < 2 {
        return 0;
    }
    let mid = n / 2;
    let mut inv = count_inversions(&mut v[..mid], buf) + count_inversions(&mut v[mid..], buf);
    buf.clear();
    let (mut i, mut j) = (0, mid);
    while i < mid && j < n {
        if v[j] < v[i] {
            inv += (mid - i) as u64;
            buf.push(v[j]);
            j += 1;
        } else {
            buf.push(v[i]);
            i += 1;
        }
    }
    buf.extend_from_slice(&v[i..mid]);
    buf.extend_from_slice(&v[j..n]);
    v.copy_from_slice(buf);
    inv
}

fn kendall_tau_b_unchecked(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| cmp_f64(&x[a], &x[b]).then_with(|| cmp_f64(&y[a], &y[b])));
    let xs: Vec<f64> = order.iter().map(|&i| x[i]).collect();
    let pairs: Vec<(f64, f64)> = order.iter().map(|&i| (x[i], y[i])).collect();
    let x_ties = tied_pairs(&xs);
    let joint_ties = tied_pairs(&pairs);
    let mut ys: Vec<f64> = order.iter().map(|&i| y[i]).collect();
    let mut buf = Vec::with_capacity(n);
    // After sorting by (x, y), every strict inversion of y is a discordant pair.
    let discordant = count_inversions(&mut ys, &mut buf);
    let y_ties = tied_pairs(&ys); // ys is now sorted
    let total = (n as u64) * (n as u64 - 1) / 2;
    let con_minus_dis =
        total as f64 - x_ties as f64 - y_ties as f64 + joint_ties as f64 - 2.0 * discordant as f64;
    let tau = con_minus_dis / ((total - x_ties) as f64).sqrt() / ((total - y_ties) as f64).sqrt();
    tau.clamp(-1.0, 1.0)
}
