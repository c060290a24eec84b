//! Evaluation: join predictions to human labels by media path, then measure agreement.
//!
//! Predictions and labels come from different tools, so their paths rarely agree character for
//! character (absolute vs. relative, `./` prefixes, Windows separators). The join rule:
//!
//! 1. Paths are normalised: `\` becomes `/`, empty and `.` components are dropped.
//! 2. A prediction whose normalised path equals a label's is matched to it.
//! 3. Otherwise it is matched to the label with the same file name that shares the most trailing
//!    path components with it (`/data/koniq/1.jpg` ↔ `koniq/1.jpg`), if exactly one label has
//!    that longest match; if several tie it is *ambiguous* and left out.
//! 4. A label belongs to the prediction that matches it most closely (exact beats any suffix, a
//!    longer suffix a shorter one), wherever that prediction stands in the file. A weaker match
//!    is left out: as *unmatched* when its path differs from the label's in a directory
//!    (`live/jp2k/img1.bmp` vs. `live/jpeg/img1.bmp`: LIVE reuses file names across folders, so
//!    a whole folder's predictions meet a split's labels this way), else as a *duplicate*; so is
//!    a second match as close as the first.
//!
//! Everything left out is reported, never silently dropped.

use std::collections::HashMap;

use serde::Serialize;

use crate::dataset::{LabelItem, Prediction};
use crate::metrics::logistic::{FittedMetrics, fitted_metrics};
use crate::metrics::{self, BootstrapOptions, MetricError, MetricIntervals, Side};

/// A prediction matched to a label.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MatchedPair {
    pub label_path: String,
    pub prediction_path: String,
    pub prediction: f64,
    pub mos: f64,
}

/// The result of joining predictions to labels.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct JoinOutcome {
    pub pairs: Vec<MatchedPair>,
    /// Prediction paths that matched no label, or only labels that other predictions match more
    /// closely while their own path differs from the label's in a directory (rule 4).
    pub unmatched_predictions: Vec<String>,
    /// Prediction paths whose best suffix match was shared by several labels.
    pub ambiguous_predictions: Vec<String>,
    /// Prediction paths whose label was matched as closely by an earlier prediction, or more
    /// closely by another one (rule 4 of the module documentation).
    pub duplicate_predictions: Vec<String>,
    /// Label paths no prediction matched.
    pub unmatched_labels: Vec<String>,
}

impl JoinOutcome {
    pub fn predictions(&self) -> Vec<f64> {
        self.pairs.iter().map(|p| p.prediction).collect()
    }
    pub fn mos(&self) -> Vec<f64> {
        self.pairs.iter().map(|p| p.mos).collect()
    }
}

/// Normalise a path for matching: `\` → `/`, drop empty and `.` components.
pub fn normalize_path(path: &str) -> String {
    path.replace('\\', "/")
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect::<Vec<_>>()
        .join("/")
}

fn common_suffix_components(a: &str, b: &str) -> usize {
    a.rsplit('/')
        .zip(b.rsplit('/'))
        .take_while(|(x, y)| x == y)
        .count()
}

/// How closely a prediction matches a label: the normalised paths are equal (strongest), else
/// the number of trailing components they share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Strength {
    Suffix(usize),
    Exact,
}

/// A prediction's closest labels (several when they tie) and how close they are.
struct Candidates {
    labels: Vec<usize>,
    strength: Strength,
    /// The shorter of the two paths is a whole suffix of the other (always so for `Exact`).
    full_suffix: bool,
}

/// Join predictions to labels by the rule in the module documentation.
pub fn join(predictions: &[Prediction], labels: &[LabelItem]) -> JoinOutcome {
    let label_keys: Vec<String> = labels.iter().map(|l| normalize_path(&l.path)).collect();
    let mut by_path: HashMap<&str, Vec<usize>> = HashMap::new();
    let mut by_name: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, key) in label_keys.iter().enumerate() {
        by_path.entry(key.as_str()).or_default().push(i);
        let name = key.rsplit('/').next().unwrap_or(key);
        by_name.entry(name).or_default().push(i);
    }
    let candidates: Vec<Candidates> = predictions
        .iter()
        .map(|prediction| {
            let key = normalize_path(&prediction.path);
            if let Some(exact) = by_path.get(key.as_str()) {
                return Candidates {
                    labels: exact.clone(),
                    strength: Strength::Exact,
                    full_suffix: true,
                };
            }
            let name = key.rsplit('/').next().unwrap_or(&key);
            let same_name = by_name.get(name).map(Vec::as_slice).unwrap_or(&[]);
            let best = same_name
                .iter()
                .map(|&i| common_suffix_components(&key, &label_keys[i]))
                .max()
                .unwrap_or(0);
            let labels: Vec<usize> = same_name
                .iter()
                .copied()
                .filter(|&i| best > 0 && common_suffix_components(&key, &label_keys[i]) == best)
                .collect();
            let components = |p: &str| p.split('/').count();
            let full_suffix = labels
                .iter()
                .any(|&i| best == components(&key).min(components(&label_keys[i])));
            Candidates {
                labels,
                strength: Strength::Suffix(best),
                full_suffix,
            }
        })
        .collect();
    // The closest match each label gets from any prediction.
    let mut claim: Vec<Option<Strength>> = vec![None; labels.len()];
    for c in &candidates {
        for &i in &c.labels {
            claim[i] = claim[i].max(Some(c.strength));
        }
    }
    let mut taken = vec![false; labels.len()];
    let mut out = JoinOutcome::default();
    for (prediction, c) in predictions.iter().zip(&candidates) {
        let path = prediction.path.clone();
        let outmatched = c.labels.iter().all(|&i| claim[i] > Some(c.strength));
        match c.labels.as_slice() {
            [] => out.unmatched_predictions.push(path),
            _ if outmatched && c.full_suffix => out.duplicate_predictions.push(path),
            _ if outmatched => out.unmatched_predictions.push(path),
            [i] if taken[*i] => out.duplicate_predictions.push(path),
            [i] => {
                taken[*i] = true;
                out.pairs.push(MatchedPair {
                    label_path: labels[*i].path.clone(),
                    prediction_path: path,
                    prediction: prediction.score,
                    mos: labels[*i].score,
                });
            }
            _ => out.ambiguous_predictions.push(path),
        }
    }
    out.unmatched_labels = labels
        .iter()
        .zip(&taken)
        .filter(|(_, t)| !**t)
        .map(|(l, _)| l.path.clone())
        .collect();
    out
}

/// What to compute besides the raw metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalOptions {
    /// Bootstrap confidence intervals; `None` skips them.
    pub bootstrap: Option<BootstrapOptions>,
    /// Also fit the 4-parameter logistic and report PLCC/RMSE after it.
    pub logistic: bool,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            bootstrap: Some(BootstrapOptions::default()),
            logistic: false,
        }
    }
}

/// The evaluation result. Undefined correlations are NaN (JSON null) with a warning.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalReport {
    pub n: usize,
    /// Raw SRCC, PLCC, KRCC and RMSE (as the official evaluation: no fitting).
    pub srcc: f64,
    pub plcc: f64,
    pub krcc: f64,
    /// RMSE of the raw prediction against the MOS: only meaningful on a shared scale.
    pub rmse: f64,
    pub ci: Option<MetricIntervals>,
    /// PLCC and RMSE after the 4-parameter logistic fit, when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logistic: Option<FittedMetrics>,
    pub warnings: Vec<String>,
}

fn side_name(side: Side) -> &'static str {
    match side {
        Side::First => "predictions",
        Side::Second => "MOS values",
    }
}

/// Compute the metrics of `pred` against `mos`. Length mismatch, fewer than 3 pairs or a
/// non-finite value is an error; a constant vector makes the correlations NaN with a warning.
pub fn evaluate(
    pred: &[f64],
    mos: &[f64],
    options: EvalOptions,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<EvalReport, MetricError> {
    metrics::check_pairs(pred, mos)?;
    let mut warnings = Vec::new();
    let mut lenient = |r: Result<f64, MetricError>, what: &str| match r {
        Ok(v) => Ok(v),
        Err(MetricError::Constant(side)) => {
            warnings.push(format!(
                "{what} is undefined (NaN): all {} are equal",
                side_name(side)
            ));
            Ok(f64::NAN)
        }
        Err(e) => Err(e),
    };
    let srcc = lenient(metrics::srcc(pred, mos), "SRCC")?;
    let plcc = lenient(metrics::plcc(pred, mos), "PLCC")?;
    let krcc = lenient(metrics::krcc(pred, mos), "KRCC")?;
    let rmse = metrics::rmse(pred, mos)?;
    let ci = match options.bootstrap {
        Some(b) => {
            let ci = metrics::bootstrap(pred, mos, b, progress)?;
            if ci.degenerate_resamples > 0 {
                warnings.push(format!(
                    "{} of {} bootstrap resamples had a constant vector and were left out of the correlation intervals",
                    ci.degenerate_resamples, ci.resamples
                ));
            }
            Some(ci)
        }
        None => None,
    };
    let logistic = if options.logistic {
        match fitted_metrics(pred, mos) {
            Ok(f) => Some(f),
            Err(MetricError::Constant(side)) => {
                warnings.push(format!(
                    "no logistic fit: all {} are equal",
                    side_name(side)
                ));
                None
            }
            Err(e) => {
                warnings.push(format!("no logistic fit: {e}"));
                None
            }
        }
    } else {
        None
    };
    Ok(EvalReport {
        n: pred.len(),
        srcc,
        plcc,
        krcc,
        rmse,
        ci,
        logistic,
        warnings,
    })
}
