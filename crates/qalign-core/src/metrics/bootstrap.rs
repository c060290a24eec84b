//! Percentile-bootstrap confidence intervals for the metrics.
//!
//! A correlation measured on a few hundred images has a sampling error large enough to change
//! the ranking of methods, so the evaluation reports an interval next to each number. Resample
//! `b` draws its n indices from a ChaCha8 stream seeded with `(seed, stream = b)`, and the
//! resamples run on rayon's pool and are collected in order, so the result depends only on the
//! seed and the resample count — not on the thread count or scheduling.
//!
//! Percentiles need every resample's value, so memory grows with the resample count (32 bytes
//! each); [`MAX_RESAMPLES`] bounds it.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::Serialize;

use super::{MetricError, check_pairs, deviations, max_abs, unit_scale};

/// Most resamples one bootstrap may ask for: 3.2 MB of results, and far past the point where
/// more resamples change a 95% interval's reported digits.
pub const MAX_RESAMPLES: usize = 100_000;

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
    if options.resamples > MAX_RESAMPLES {
        return Err(MetricError::InvalidOption(format!(
            "at most {MAX_RESAMPLES} bootstrap resamples, got {}",
            options.resamples
        )));
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
    let prepared = Prepared::new(x, y);
    (0..options.resamples)
        .into_par_iter()
        .map_init(
            || Scratch::new(&prepared),
            |scratch, b| {
                draw_counts(&mut scratch.counts, options.seed, b);
                let r = prepared.metrics(scratch);
                progress(1);
                r
            },
        )
        .collect()
}

/// Resample `b` as multiplicities: `counts[i]` = how often pair i was drawn (n draws in all).
fn draw_counts(counts: &mut [u64], seed: u64, b: usize) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(b as u64);
    counts.fill(0);
    let n = counts.len() as u64;
    for _ in 0..n {
        counts[rng.random_range(0..n) as usize] += 1;
    }
}

/// What every resample shares: the tie structure of the original data. A resample is then a
/// vector of multiplicities, and its metrics need no sorting: average ranks come from running
/// sums of group weights, Kendall's discordant pairs from a Fenwick tree over y ranks.
struct Prepared {
    /// x and y centred and rescaled (see [`deviations`]): Pearson's r is invariant to both, and
    /// the sums of squares cannot overflow.
    x: Vec<f64>,
    y: Vec<f64>,
    /// x − y, rescaled by powers of two so the RMSE's squares stay finite.
    diff: Vec<f64>,
    /// The two power-of-two factors applied to `diff` (kept apart: their product may overflow).
    diff_scale: (f64, f64),
    /// Dense rank (0-based tie group) of each x and y value.
    x_group: Vec<usize>,
    y_group: Vec<usize>,
    x_groups: usize,
    y_groups: usize,
    /// Indices sorted by (x, y).
    by_xy: Vec<usize>,
}

/// Per-thread buffers.
struct Scratch {
    counts: Vec<u64>,
    x_weight: Vec<u64>,
    y_weight: Vec<u64>,
    x_rank: Vec<f64>,
    y_rank: Vec<f64>,
    fenwick: Vec<u64>,
}

impl Scratch {
    fn new(p: &Prepared) -> Self {
        Self {
            counts: vec![0; p.x.len()],
            x_weight: vec![0; p.x_groups],
            y_weight: vec![0; p.y_groups],
            x_rank: vec![0.0; p.x_groups],
            y_rank: vec![0.0; p.y_groups],
            fenwick: vec![0; p.y_groups + 1],
        }
    }
}

fn dense_groups(v: &[f64]) -> (Vec<usize>, usize) {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| super::cmp_f64(&v[a], &v[b]));
    let mut group = vec![0; v.len()];
    let mut g = 0;
    for k in 0..order.len() {
        if k > 0 && v[order[k]] != v[order[k - 1]] {
            g += 1;
        }
        group[order[k]] = g;
    }
    (group, if v.is_empty() { 0 } else { g + 1 })
}

/// Σ w(w − 1)/2: the tied pairs among w equal values.
fn tied(w: u64) -> u64 {
    w * w.saturating_sub(1) / 2
}

/// Average rank (1-based) of each tie group given the group weights.
fn group_ranks(weight: &[u64], rank: &mut [f64]) {
    let mut before = 0u64;
    for (w, r) in weight.iter().zip(rank.iter_mut()) {
        *r = before as f64 + (*w as f64 + 1.0) / 2.0;
        before += w;
    }
}

/// Pearson correlation of the pairs (a(i), b(i)) each repeated counts[i] times.
fn weighted_pearson(counts: &[u64], a: impl Fn(usize) -> f64, b: impl Fn(usize) -> f64) -> f64 {
    let total: u64 = counts.iter().sum();
    let n = total as f64;
    let (mut sa, mut sb) = (0.0, 0.0);
    for (i, &c) in counts.iter().enumerate() {
        if c > 0 {
            sa += c as f64 * a(i);
            sb += c as f64 * b(i);
        }
    }
    let (ma, mb) = (sa / n, sb / n);
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (i, &c) in counts.iter().enumerate() {
        if c > 0 {
            let (da, db) = (a(i) - ma, b(i) - mb);
            let w = c as f64;
            sab += w * da * db;
            saa += w * da * da;
            sbb += w * db * db;
        }
    }
    (sab / (saa.sqrt() * sbb.sqrt())).clamp(-1.0, 1.0)
}

impl Prepared {
    fn new(x: &[f64], y: &[f64]) -> Self {
        let (x_group, x_groups) = dense_groups(x);
        let (y_group, y_groups) = dense_groups(y);
        let mut by_xy: Vec<usize> = (0..x.len()).collect();
        by_xy.sort_by_key(|&i| (x_group[i], y_group[i]));
        let scale = unit_scale(max_abs(x).max(max_abs(y)));
        let mut diff: Vec<f64> = x
            .iter()
            .zip(y)
            .map(|(a, b)| a * scale - b * scale)
            .collect();
        let rescale = unit_scale(max_abs(&diff));
        diff.iter_mut().for_each(|d| *d *= rescale);
        Self {
            x: deviations(x),
            y: deviations(y),
            diff,
            diff_scale: (scale, rescale),
            x_group,
            y_group,
            x_groups,
            y_groups,
            by_xy,
        }
    }

    fn metrics(&self, s: &mut Scratch) -> Resample {
        let counts = &s.counts;
        let total: u64 = counts.iter().sum();
        let sq: f64 = counts
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0)
            .map(|(i, &c)| c as f64 * self.diff[i] * self.diff[i])
            .sum();
        let rmse = (sq / total as f64).sqrt() / self.diff_scale.1 / self.diff_scale.0;

        s.x_weight.fill(0);
        s.y_weight.fill(0);
        for (i, &c) in counts.iter().enumerate() {
            s.x_weight[self.x_group[i]] += c;
            s.y_weight[self.y_group[i]] += c;
        }
        let constant = |w: &[u64]| w.contains(&total);
        if constant(&s.x_weight) || constant(&s.y_weight) {
            return Resample {
                correlations: None,
                rmse,
            };
        }
        group_ranks(&s.x_weight, &mut s.x_rank);
        group_ranks(&s.y_weight, &mut s.y_rank);
        let (xr, yr) = (&s.x_rank, &s.y_rank);
        let srcc = weighted_pearson(counts, |i| xr[self.x_group[i]], |i| yr[self.y_group[i]]);
        let plcc = weighted_pearson(counts, |i| self.x[i], |i| self.y[i]);
        let krcc = self.weighted_kendall(s, total);
        Resample {
            correlations: Some((srcc, plcc, krcc)),
            rmse,
        }
    }

    /// Kendall's tau-b of the resample (Knight's algorithm with multiplicities).
    fn weighted_kendall(&self, s: &mut Scratch, total: u64) -> f64 {
        let counts = &s.counts;
        let x_ties: u64 = s.x_weight.iter().map(|&w| tied(w)).sum();
        let y_ties: u64 = s.y_weight.iter().map(|&w| tied(w)).sum();
        s.fenwick.fill(0);
        let mut joint_ties = 0u64;
        let mut discordant = 0u64;
        let mut inserted = 0u64;
        let mut start = 0;
        while start < self.by_xy.len() {
            // One group of equal x: count pairs with earlier (smaller) x first, then insert.
            let gx = self.x_group[self.by_xy[start]];
            let mut end = start;
            while end < self.by_xy.len() && self.x_group[self.by_xy[end]] == gx {
                end += 1;
            }
            let group = &self.by_xy[start..end];
            let mut run_weight = 0u64;
            for (k, &i) in group.iter().enumerate() {
                let c = counts[i];
                if k > 0 && self.y_group[group[k - 1]] != self.y_group[i] {
                    joint_ties += tied(run_weight);
                    run_weight = 0;
                }
                run_weight += c;
                if c > 0 {
                    let not_greater = fenwick_prefix(&s.fenwick, self.y_group[i]);
                    discordant += c * (inserted - not_greater);
                }
            }
            joint_ties += tied(run_weight);
            for &i in group {
                if counts[i] > 0 {
                    fenwick_add(&mut s.fenwick, self.y_group[i], counts[i]);
                    inserted += counts[i];
                }
            }
            start = end;
        }
        let pairs = tied(total);
        let con_minus_dis = pairs as f64 - x_ties as f64 - y_ties as f64 + joint_ties as f64
            - 2.0 * discordant as f64;
        let tau =
            con_minus_dis / ((pairs - x_ties) as f64).sqrt() / ((pairs - y_ties) as f64).sqrt();
        tau.clamp(-1.0, 1.0)
    }
}

/// Σ of the weights at y ranks 0..=k.
fn fenwick_prefix(tree: &[u64], k: usize) -> u64 {
    let mut sum = 0;
    let mut i = k + 1;
    while i > 0 {
        sum += tree[i];
        i &= i - 1;
    }
    sum
}

fn fenwick_add(tree: &mut [u64], k: usize, w: u64) {
    let mut i = k + 1;
    while i < tree.len() {
        tree[i] += w;
        i += i & i.wrapping_neg();
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The multiplicity shortcut equals the metrics of the explicitly expanded resample.
    #[test]
    fn counts_match_expanded_resamples() {
        let x: Vec<f64> = (0..60).map(|i| ((i * 7) % 11) as f64).collect();
        let y: Vec<f64> = (0..60)
            .map(|i| ((i * 5) % 9) as f64 + 0.5 * (i % 2) as f64)
            .collect();
        let p = Prepared::new(&x, &y);
        let mut s = Scratch::new(&p);
        for b in 0..50 {
            draw_counts(&mut s.counts, 99, b);
            let mut xs = Vec::new();
            let mut ys = Vec::new();
            for (i, &c) in s.counts.iter().enumerate() {
                for _ in 0..c {
                    xs.push(x[i]);
                    ys.push(y[i]);
                }
            }
            let r = p.metrics(&mut s);
            let (srcc, plcc, krcc) = r.correlations.unwrap();
            assert!((srcc - super::super::srcc(&xs, &ys).unwrap()).abs() < 1e-12);
            assert!((plcc - super::super::plcc(&xs, &ys).unwrap()).abs() < 1e-12);
            assert!((krcc - super::super::krcc(&xs, &ys).unwrap()).abs() < 1e-12);
            assert!((r.rmse - super::super::rmse(&xs, &ys).unwrap()).abs() < 1e-12);
        }
    }
}
