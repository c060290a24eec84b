//! `qalign syllabus`: label files → the official SFT JSON, with the conversion precision.
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use qalign_core::dataset::{Columns, read_labels};
use qalign_core::levels::ScoreRange;
use qalign_core::syllabus::{
    self, ConversionReport, SftItem, SyllabusOptions, build_syllabus, write_json_atomic,
};
use qalign_core::{MediaKind, Task};

use super::eval::number;
use super::usage_error;

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum TaskArg {
    Quality,
    Aesthetics,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum InputArg {
    Image,
    Video,
}

#[derive(clap::Args)]
pub struct Args {
    /// Label files (JSON in any Q-Align schema, JSONL or CSV); several are mixed, each binned by
    /// its own range.
    #[arg(required = true, value_name = "LABELS")]
    labels: Vec<PathBuf>,
    /// What the answers rate.
    #[arg(long, value_enum)]
    task: TaskArg,
    /// Whether the items are images or videos (checked against each path's extension).
    #[arg(long, value_enum)]
    input: InputArg,
    /// Output SFT JSON (written atomically).
    #[arg(long, value_name = "OUT.json")]
    out: PathBuf,
    /// Bin over [m, M] (finite, m < M) instead of each file's own min and max.
    #[arg(long, num_args = 2, value_names = ["m", "M"], allow_negative_numbers = true,
          value_parser = parse_finite)]
    range: Option<Vec<f64>>,
    /// With --range: put scores outside [m, M] in the end levels instead of failing.
    #[arg(long, requires = "range")]
    clamp: bool,
    /// Keep a seeded random fraction of each file (few-shot), in (0, 1].
    #[arg(long, value_name = "F", value_parser = parse_fraction, allow_negative_numbers = true)]
    fraction: Option<f64>,
    /// Seed of the subset and of the question draws.
    #[arg(long, value_name = "S", default_value_t = 0)]
    seed: u64,
    /// Also write the conversion precision as JSON.
    #[arg(long, value_name = "PATH")]
    report_json: Option<PathBuf>,
    /// Path key/column in the label files (default: image, img_path, path).
    #[arg(long, value_name = "KEY")]
    path_key: Option<String>,
    /// Score key/column in the label files (default: gt_score, mos, score, else the MOS in `id`).
    #[arg(long, value_name = "KEY")]
    score_key: Option<String>,
}

fn parse_finite(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => Err(format!("expected a finite number, got `{s}`")),
    }
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(f) if f > 0.0 && f <= 1.0 => Ok(f),
        _ => Err(format!("expected a fraction in (0, 1], got `{s}`")),
    }
}

/// An output path that is one of the label files, however spelled: writing there would
/// replace the labels with the syllabus.
fn overwritten_input(args: &Args) -> Option<(&'static str, &Path, &Path)> {
    let outputs = [
        ("--out", Some(&args.out)),
        ("--report-json", args.report_json.as_ref()),
    ];
    outputs.into_iter().find_map(|(flag, out)| {
        let out = out?;
        syllabus::overwritten_input(out, &args.labels).map(|input| (flag, out.as_path(), input))
    })
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if let Some((flag, out, input)) = overwritten_input(&args) {
        return Ok(usage_error(&format!(
            "{flag} {} is the label file {}: refusing to overwrite an input",
            out.display(),
            input.display()
        )));
    }
    if let Some(path) = &args.report_json
        && syllabus::overwritten_input(path, std::slice::from_ref(&args.out)).is_some()
    {
        return Ok(usage_error(&format!(
            "--report-json {} is the --out file {}",
            path.display(),
            args.out.display()
        )));
    }
    if let Some([m, big_m]) = args.range.as_deref()
        && m >= big_m
    {
        return Ok(usage_error(&format!("--range {m} {big_m}: need m < M")));
    }
    let columns = Columns {
        path: args.path_key,
        score: args.score_key,
    };
    let datasets = args
        .labels
        .iter()
        .map(|p| read_labels(p, &columns))
        .collect::<Result<Vec<_>, _>>()?;
    let mut options = SyllabusOptions::new(
        match args.task {
            TaskArg::Quality => Task::Quality,
            TaskArg::Aesthetics => Task::Aesthetics,
        },
        match args.input {
            InputArg::Image => MediaKind::Image,
            InputArg::Video => MediaKind::Video,
        },
    );
    if let Some(r) = args.range.as_deref() {
        let [m, big_m] = r else {
            anyhow::bail!("--range takes two numbers, m and M");
        };
        options.range = Some(ScoreRange::new(*m, *big_m).context("--range")?);
    }
    options.clamp = args.clamp;
    options.fraction = args.fraction;
    options.seed = args.seed;
    let syllabus = build_syllabus(&datasets, &options)?;
    // The small report first: a report path that cannot be written then leaves no SFT JSON
    // behind that looks like a finished run.
    if let Some(path) = &args.report_json {
        write_json_atomic(
            path,
            &ReportFile {
                datasets: &syllabus.reports,
            },
        )?;
    }
    write_json_atomic(&args.out, &syllabus.items)?;
    if let Some(warning) = repeated_images_warning(&syllabus.items) {
        eprintln!("{warning}");
    }
    crate::output::write_all(&reports_table(&syllabus.reports))?;
    for r in &syllabus.reports {
        if let Some(why) = &r.undefined {
            eprintln!(
                "warning: {}: the conversion precision is undefined ({why})",
                r.name
            );
        }
    }
    eprintln!(
        "wrote {} items from {} file(s) to {}",
        syllabus.items.len(),
        datasets.len(),
        args.out.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Images that are items more than once (a label file given twice, a dataset that repeats
/// itself): they weigh more in training, and with different levels they teach both.
fn repeated_images_warning(items: &[SftItem]) -> Option<String> {
    let mut answers: std::collections::HashMap<&str, Vec<&str>> = Default::default();
    for item in items {
        let answer = item.conversations.last().map_or("", |t| t.value.as_str());
        answers.entry(item.image.as_str()).or_default().push(answer);
    }
    let mut repeated: Vec<(&str, &Vec<&str>)> = answers
        .iter()
        .filter(|(_, a)| a.len() > 1)
        .map(|(image, a)| (*image, a))
        .collect();
    if repeated.is_empty() {
        return None;
    }
    repeated.sort();
    let conflicting = repeated
        .iter()
        .filter(|(_, a)| a.iter().any(|x| x != &a[0]))
        .count();
    let examples: Vec<String> = repeated
        .iter()
        .take(3)
        .map(|(image, a)| format!("{image} ×{}", a.len()))
        .collect();
    Some(format!(
        "warning: {} image(s) are items more than once ({}{}), {conflicting} of them with different levels; \
         repeats weigh more in training",
        repeated.len(),
        examples.join(", "),
        if repeated.len() > 3 { ", ..." } else { "" }
    ))
}

/// `--report-json`: `{"datasets": [{"name", "n", "m", "M", "srcc", "plcc", "level_counts"}]}`.
#[derive(serde::Serialize)]
struct ReportFile<'a> {
    datasets: &'a [ConversionReport],
}

fn reports_table(reports: &[ConversionReport]) -> String {
    use std::fmt::Write;
    let mut out = String::from("conversion precision (MOS vs level, paper Table 2)\n");
    let _ = writeln!(
        out,
        "{:<24} {:>7} {:>10} {:>10} {:>7} {:>7}  levels",
        "dataset", "n", "m", "M", "SRCC", "PLCC"
    );
    for r in reports {
        let counts = r
            .level_counts
            .0
            .iter()
            .map(|(w, c)| format!("{w}={c}"))
            .collect::<Vec<_>>()
            .join(" ");
        let _ = writeln!(
            out,
            "{:<24} {:>7} {:>10} {:>10} {:>7.4} {:>7.4}  {counts}",
            r.name,
            r.n,
            number(r.m),
            number(r.max),
            r.srcc,
            r.plcc
        );
    }
    out
}
