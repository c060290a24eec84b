//! `qalign eval`: join predictions to labels by path and report SRCC/PLCC/KRCC/RMSE with
//! bootstrap confidence intervals, as a table or JSON, optionally with a scatter plot.
use std::path::PathBuf;
use std::process::ExitCode;

use indicatif::ProgressBar;

use qalign_core::dataset::{Columns, Prediction, duplicate_paths, read_labels, read_predictions};
use qalign_core::eval::{EvalOptions, EvalReport, JoinOutcome, evaluate, join, normalize_path};
use qalign_core::metrics::bootstrap::MAX_RESAMPLES;
use qalign_core::metrics::{BootstrapOptions, Interval, Logistic4};
use qalign_core::plot::{PlotFormat, ScatterPlot, draw_scatter};

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

#[derive(clap::Args)]
pub struct Args {
    /// Predictions: JSONL/JSON (qalign score output, official eval results) or CSV, each item a
    /// path and a score.
    #[arg(long, value_name = "PRED")]
    pred: PathBuf,
    /// Human labels (any Q-Align label schema, JSONL or CSV).
    #[arg(long, value_name = "LABELS")]
    labels: PathBuf,
    /// Evaluate the predictions of this task only (`quality`, `aesthetics`, `custom`): needed
    /// when PRED holds several, as `qalign score --task all` writes.
    #[arg(long, value_name = "TASK")]
    task: Option<String>,
    /// Output format on stdout.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
    /// Draw prediction vs MOS with the fitted logistic curve (.png or .svg).
    #[arg(long, value_name = "PATH", value_parser = parse_plot_path)]
    plot: Option<PathBuf>,
    /// Bootstrap resamples for the confidence intervals (0 = none, at most 100000).
    #[arg(long, value_name = "N", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(0..=MAX_RESAMPLES as u64))]
    bootstrap: u64,
    /// Confidence level of the intervals, in (0, 1).
    #[arg(long, value_name = "C", default_value_t = 0.95, value_parser = parse_confidence,
          allow_negative_numbers = true)]
    confidence: f64,
    /// Seed of the bootstrap.
    #[arg(long, value_name = "S", default_value_t = 0)]
    seed: u64,
    /// Also report PLCC and RMSE after the 4-parameter logistic fit (raw is the default, as in
    /// the official evaluation).
    #[arg(long)]
    logistic: bool,
    /// Path key/column in the predictions (default: path, image, img_path).
    #[arg(long, value_name = "KEY")]
    pred_path_key: Option<String>,
    /// Score key/column in the predictions (default: score, pred, prediction, else `logits`).
    #[arg(long, value_name = "KEY")]
    pred_score_key: Option<String>,
    /// Path key/column in the labels (default: image, img_path, path).
    #[arg(long, value_name = "KEY")]
    label_path_key: Option<String>,
    /// Score key/column in the labels (default: gt_score, mos, score, else the MOS in `id`).
    #[arg(long, value_name = "KEY")]
    label_score_key: Option<String>,
}

/// Bootstrap work (resamples × items) above which a progress bar is worth showing.
const PROGRESS_THRESHOLD: usize = 2_000_000;

fn parse_plot_path(s: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(s);
    match PlotFormat::of_path(&path) {
        Some(_) => Ok(path),
        None => Err("the plot file must end in .png or .svg".to_string()),
    }
}

fn parse_confidence(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(c) if c > 0.0 && c < 1.0 => Ok(c),
        _ => Err(format!(
            "expected a confidence level strictly between 0 and 1 (e.g. 0.95), got `{s}`"
        )),
    }
}
/// Examples of unmatched paths shown per category.
const EXAMPLES: usize = 3;

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let predictions = read_predictions(
        &args.pred,
        &Columns {
            path: args.pred_path_key.clone(),
            score: args.pred_score_key.clone(),
        },
    )?;
    let predictions = select_task(predictions, args.task.as_deref(), &args.pred)?;
    let labels = read_labels(
        &args.labels,
        &Columns {
            path: args.label_path_key.clone(),
            score: args.label_score_key.clone(),
        },
    )?;
    let keys: Vec<String> = labels
        .items
        .iter()
        .map(|l| normalize_path(&l.path))
        .collect();
    let repeated = duplicate_paths(keys.iter().map(String::as_str));
    if !repeated.is_empty() {
        eprintln!(
            "warning: {} path(s) occur more than once in {}, so their predictions are ambiguous, e.g. {}",
            repeated.len(),
            args.labels.display(),
            examples(&repeated)
        );
    }
    let joined = join(&predictions, &labels.items);
    report_join(&joined);
    if joined.pairs.is_empty() {
        anyhow::bail!(
            "no prediction path matched a label path (e.g. prediction {:?}, label {:?})",
            predictions.first().map(|p| p.path.as_str()).unwrap_or(""),
            labels.items.first().map(|l| l.path.as_str()).unwrap_or("")
        );
    }
    let pred = joined.predictions();
    let mos = joined.mos();

    let resamples = args.bootstrap as usize;
    let bootstrap = (resamples > 0).then_some(BootstrapOptions {
        resamples,
        seed: args.seed,
        confidence: args.confidence,
    });
    let bar = progress_bar(resamples, pred.len());
    let options = EvalOptions {
        bootstrap,
        logistic: args.logistic || args.plot.is_some(),
    };
    let mut report = evaluate(&pred, &mos, options, &|k| bar.inc(k as u64))?;
    bar.finish_and_clear();
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }

    if let Some(path) = &args.plot {
        let curve: Option<&Logistic4> = report.logistic.as_ref().map(|f| &f.curve);
        let title = format!(
            "N={}  SRCC={:.4}  PLCC={:.4}",
            report.n, report.srcc, report.plcc
        );
        draw_scatter(
            path,
            &ScatterPlot {
                prediction: &pred,
                mos: &mos,
                curve,
                title: &title,
            },
        )?;
        eprintln!("wrote plot {}", path.display());
    }
    if !args.logistic {
        // Fitted only for the plot's curve: not part of the reported numbers.
        report.logistic = None;
    }

    match args.format {
        Format::Json => crate::output::write_all(&format!("{}\n", json_output(&report, &joined)?))?,
        Format::Table => crate::output::write_all(&table(&report))?,
    }
    Ok(ExitCode::SUCCESS)
}

/// The predictions of `task`; with no `--task`, all of them when they are of one task (or carry
/// none), else an error: scores of two tasks for one path are not one evaluation.
fn select_task(
    predictions: Vec<Prediction>,
    task: Option<&str>,
    file: &std::path::Path,
) -> anyhow::Result<Vec<Prediction>> {
    let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
    for p in &predictions {
        *counts.entry(p.task.as_deref().unwrap_or("")).or_default() += 1;
    }
    let listed = || {
        counts
            .iter()
            .map(|(t, n)| match *t {
                "" => format!("no task: {n}"),
                t => format!("{t}: {n}"),
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    match task {
        None if counts.len() > 1 => anyhow::bail!(
            "{} holds predictions of several tasks ({}); choose one with --task",
            file.display(),
            listed()
        ),
        None => Ok(predictions),
        Some(task) => {
            if !counts.contains_key(task) {
                anyhow::bail!(
                    "{} holds no prediction of task `{task}` ({})",
                    file.display(),
                    listed()
                );
            }
            Ok(predictions
                .into_iter()
                .filter(|p| p.task.as_deref() == Some(task))
                .collect())
        }
    }
}

fn progress_bar(resamples: usize, n: usize) -> ProgressBar {
    if resamples.saturating_mul(n) < PROGRESS_THRESHOLD {
        return ProgressBar::hidden();
    }
    crate::progress::bar(resamples as u64, "bootstrap")
}

fn examples(paths: &[String]) -> String {
    let shown: Vec<&str> = paths.iter().take(EXAMPLES).map(String::as_str).collect();
    let more = if paths.len() > EXAMPLES { ", …" } else { "" };
    format!("{}{more}", shown.join(", "))
}

fn report_join(j: &JoinOutcome) {
    let categories = [
        ("prediction(s) matched no label", &j.unmatched_predictions),
        (
            "prediction(s) matched several labels equally well (ambiguous, skipped)",
            &j.ambiguous_predictions,
        ),
        (
            "prediction(s) repeat an already matched label (skipped)",
            &j.duplicate_predictions,
        ),
        ("label(s) have no prediction", &j.unmatched_labels),
    ];
    for (what, paths) in categories {
        if !paths.is_empty() {
            eprintln!("warning: {} {what}, e.g. {}", paths.len(), examples(paths));
        }
    }
}

/// `--format json`: the report's fields, then how the join went.
#[derive(serde::Serialize)]
struct JsonOutput<'a> {
    #[serde(flatten)]
    report: &'a EvalReport,
    join: JoinCounts,
}

#[derive(serde::Serialize)]
struct JoinCounts {
    matched: usize,
    unmatched_predictions: usize,
    ambiguous_predictions: usize,
    duplicate_predictions: usize,
    unmatched_labels: usize,
}

fn json_output(report: &EvalReport, joined: &JoinOutcome) -> anyhow::Result<String> {
    let out = JsonOutput {
        report,
        join: JoinCounts {
            matched: joined.pairs.len(),
            unmatched_predictions: joined.unmatched_predictions.len(),
            ambiguous_predictions: joined.ambiguous_predictions.len(),
            duplicate_predictions: joined.duplicate_predictions.len(),
            unmatched_labels: joined.unmatched_labels.len(),
        },
    };
    Ok(serde_json::to_string_pretty(&out)?)
}

/// A value for a table: 4 decimals, or scientific notation when that would print a very long or
/// an all-zero number (MOS × 1e155 is allowed and must stay readable).
pub(crate) fn number(v: f64) -> String {
    let magnitude = v.abs();
    if v.is_finite() && (magnitude >= 1e6 || (magnitude > 0.0 && magnitude < 1e-3)) {
        format!("{v:.4e}")
    } else {
        format!("{v:.4}")
    }
}

fn fmt_interval(ci: Option<Interval>) -> String {
    match ci {
        Some(i) => format!("[{}, {}]", number(i.low), number(i.high)),
        None => "-".to_string(),
    }
}

fn table(r: &EvalReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let ci = r.ci.as_ref();
    let header = match ci {
        Some(c) => format!(
            "{:.0}% CI (bootstrap, {} resamples, seed {})",
            c.confidence * 100.0,
            c.resamples,
            c.seed
        ),
        None => "CI".to_string(),
    };
    let _ = writeln!(out, "{:<16} {:>10}  {header}", "metric", "value");
    let _ = writeln!(out, "{:<16} {:>10}", "n", r.n);
    let rows = [
        ("SRCC", r.srcc, ci.map(|c| c.srcc)),
        ("PLCC", r.plcc, ci.map(|c| c.plcc)),
        ("KRCC", r.krcc, ci.map(|c| c.krcc)),
        ("RMSE (raw)", r.rmse, ci.map(|c| c.rmse)),
    ];
    for (name, value, interval) in rows {
        let _ = writeln!(
            out,
            "{name:<16} {:>10}  {}",
            number(value),
            fmt_interval(interval)
        );
    }
    if let Some(f) = &r.logistic {
        for (name, value) in [("PLCC (logistic)", f.plcc), ("RMSE (logistic)", f.rmse)] {
            let _ = writeln!(
                out,
                "{name:<16} {:>10}  (after 4-parameter logistic fit)",
                number(value)
            );
        }
    }
    out
}
