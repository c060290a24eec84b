//! The VQEG 4-parameter logistic mapping from predictions to MOS, fitted by least squares.
//!
//! Many IQA papers report PLCC (and RMSE) *after* mapping predictions through
//! `f(x) = (β1 − β2) / (1 + exp(−(x − β3)/|β4|)) + β2` (pyiqa's `logistic_4params`), to remove a
//! monotone non-linearity between the two scales. The official Q-Align evaluation does not
//! (raw PLCC), so this is an optional, clearly labelled extra. The fit is a small
//! Levenberg–Marquardt started where pyiqa starts scipy's `curve_fit`:
//! `[max(y), min(y), mean(x), std(x)/4]`.

use serde::Serialize;

use super::{MetricError, check_pairs, max_abs, pearson_unchecked, unit_scale};

const MAX_ITERATIONS: usize = 500;
const MAX_DAMPING: f64 = 1e20;
const RELATIVE_TOLERANCE: f64 = 1e-14;

/// A fitted 4-parameter logistic curve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Logistic4 {
    /// β1 (upper asymptote), β2 (lower asymptote), β3 (midpoint), β4 (scale; its sign is ignored).
    pub beta: [f64; 4],
}

fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

impl Logistic4 {
    /// The curve at `x`.
    pub fn eval(&self, x: f64) -> f64 {
        let [b1, b2, b3, b4] = self.beta;
        (b1 - b2) * sigmoid((x - b3) / b4.abs()) + b2
    }

    /// Value and gradient with respect to β at `x`.
    fn eval_with_gradient(&self, x: f64) -> (f64, [f64; 4]) {
        let [b1, b2, b3, b4] = self.beta;
        let scale = b4.abs();
        let z = (x - b3) / scale;
        let s = sigmoid(z);
        let ds = (b1 - b2) * s * (1.0 - s);
        let grad = [s, 1.0 - s, -ds / scale, -ds * z / scale * b4.signum()];
        ((b1 - b2) * s + b2, grad)
    }

    /// Least-squares fit of `y ≈ f(x)`. The fit runs on x and y rescaled by powers of two (exact,
    /// so ordinary data fits bit for bit as unscaled) so that MOS × 1e155 neither overflows nor,
    /// × 1e-155, underflows; β is scaled back at the end.
    pub fn fit(x: &[f64], y: &[f64]) -> Result<Self, MetricError> {
        check_pairs(x, y)?;
        let (sx, sy) = (unit_scale(max_abs(x)), unit_scale(max_abs(y)));
        let xs: Vec<f64> = x.iter().map(|a| a * sx).collect();
        let ys: Vec<f64> = y.iter().map(|a| a * sy).collect();
        let mut model = Self::fit_scaled(&xs, &ys)?;
        let [b1, b2, b3, b4] = model.beta;
        model.beta = [b1 / sy, b2 / sy, b3 / sx, b4 / sx];
        if model.beta.iter().all(|b| b.is_finite()) {
            Ok(model)
        } else {
            Err(MetricError::FitFailed(format!(
                "parameters out of range: {:?}",
                model.beta
            )))
        }
    }

    fn fit_scaled(x: &[f64], y: &[f64]) -> Result<Self, MetricError> {
        let n = x.len() as f64;
        let mean_x = x.iter().sum::<f64>() / n;
        let std_x = (x.iter().map(|a| (a - mean_x) * (a - mean_x)).sum::<f64>() / n).sqrt();
        if std_x == 0.0 {
            return Err(MetricError::Constant(super::Side::First));
        }
        let max_y = y.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let min_y = y.iter().copied().fold(f64::INFINITY, f64::min);
        let mut model = Self {
            beta: [max_y, min_y, mean_x, std_x / 4.0],
        };
        let mut sse = model.sse(x, y);
        let mut damping = 1e-3;
        for _ in 0..MAX_ITERATIONS {
            let (jtj, jtr) = model.normal_equations(x, y);
            let mut improved = false;
            while damping <= MAX_DAMPING {
                let mut a = jtj;
                for (i, row) in a.iter_mut().enumerate() {
                    row[i] += damping * jtj[i][i].max(1e-12);
                }
                let Some(step) = solve4(a, jtr) else {
                    damping *= 10.0;
                    continue;
                };
                let mut candidate = model;
                for (b, d) in candidate.beta.iter_mut().zip(step) {
                    *b += d;
                }
                let candidate_sse = candidate.sse(x, y);
                if candidate_sse.is_finite() && candidate_sse <= sse && candidate.beta[3] != 0.0 {
                    let reduction = sse - candidate_sse;
                    model = candidate;
                    sse = candidate_sse;
                    damping = (damping / 10.0).max(1e-15);
                    improved = reduction > RELATIVE_TOLERANCE * sse.max(f64::MIN_POSITIVE);
                    break;
                }
                damping *= 10.0;
            }
            if !improved {
                break;
            }
        }
        if model.beta.iter().all(|b| b.is_finite()) && sse.is_finite() {
            Ok(model)
        } else {
            Err(MetricError::FitFailed(format!(
                "parameters diverged to {:?}",
                model.beta
            )))
        }
    }

    fn sse(&self, x: &[f64], y: &[f64]) -> f64 {
        x.iter()
            .zip(y)
            .map(|(&a, &b)| {
                let r = b - self.eval(a);
                r * r
            })
            .sum()
    }

    fn normal_equations(&self, x: &[f64], y: &[f64]) -> ([[f64; 4]; 4], [f64; 4]) {
        let mut jtj = [[0.0; 4]; 4];
        let mut jtr = [0.0; 4];
        for (&a, &b) in x.iter().zip(y) {
            let (f, g) = self.eval_with_gradient(a);
            let r = b - f;
            for i in 0..4 {
                jtr[i] += g[i] * r;
                for j in 0..4 {
                    jtj[i][j] += g[i] * g[j];
                }
            }
        }
        (jtj, jtr)
    }
}

/// Solve a 4×4 linear system by Gaussian elimination with partial pivoting.
fn solve4(mut a: [[f64; 4]; 4], mut b: [f64; 4]) -> Option<[f64; 4]> {
    for col in 0..4 {
        let pivot = (col..4).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[pivot][col].abs() < 1e-300 || !a[pivot][col].is_finite() {
            return None;
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        for row in col + 1..4 {
            let factor = a[row][col] / a[col][col];
            let pivot_row = a[col];
            for (target, source) in a[row][col..].iter_mut().zip(&pivot_row[col..]) {
                *target -= factor * source;
            }
            b[row] -= factor * b[col];
        }
    }
    let mut out = [0.0; 4];
    for row in (0..4).rev() {
        let tail: f64 = (row + 1..4).map(|k| a[row][k] * out[k]).sum();
        out[row] = (b[row] - tail) / a[row][row];
    }
    out.iter().all(|v| v.is_finite()).then_some(out)
}

/// Metrics after mapping `pred` through the fitted logistic: PLCC and RMSE against `mos`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct FittedMetrics {
    pub plcc: f64,
    pub rmse: f64,
    pub curve: Logistic4,
}

/// Fit `mos ≈ f(pred)` and report PLCC / RMSE of `f(pred)` against `mos`.
pub fn fitted_metrics(pred: &[f64], mos: &[f64]) -> Result<FittedMetrics, MetricError> {
    let curve = Logistic4::fit(pred, mos)?;
    let mapped: Vec<f64> = pred.iter().map(|&p| curve.eval(p)).collect();
    if mapped.iter().all(|&v| v == mapped[0]) {
        return Err(MetricError::FitFailed(
            "the fitted curve is flat over the predictions".to_string(),
        ));
    }
    let plcc = pearson_unchecked(&mapped, mos);
    let rmse = super::rmse(&mapped, mos)?;
    Ok(FittedMetrics { plcc, rmse, curve })
}
