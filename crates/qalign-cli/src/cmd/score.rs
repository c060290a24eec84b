//! `qalign score`: score images and videos with a OneAlign / Q-Align checkpoint. Parses flags
//! into a validated [`ScoreConfig`], then drives the library's `Scorer`; a file that fails is
//! reported and skipped, and the run exits with code 3 at the end.

use std::collections::HashSet;
use std::io::{self, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use qalign_core::Scale;
use qalign_media::SamplingOptions;
use qalign_model::hub::DEFAULT_MODEL;
use qalign_model::{
    Device, Dtype, LoadOptions, Quant, Query, ScoreError, ScoreOptions, ScoreRecord, Scorer,
    ScorerBuilder, Task, VideoOptions, WeightFormat,
};

use crate::cmd::{EXIT_PARTIAL, usage_error};
use crate::inputs::Missing;
use crate::progress;
use crate::{flags, inputs, output, shard, stdin};

#[derive(Copy, Clone, Debug, ValueEnum)]
enum TaskArg {
    Quality,
    Aesthetics,
    /// Quality and aesthetics (each image is encoded once).
    All,
}

#[derive(Copy, Clone, Debug, ValueEnum, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
    Jsonl,
    Csv,
}

#[derive(Copy, Clone, Debug, ValueEnum, PartialEq, Eq)]
pub enum DtypeArg {
    F32,
    F16,
    Bf16,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
pub enum WeightsArg {
    Auto,
    Safetensors,
    Bin,
}

#[derive(clap::Args)]
pub struct Args {
    /// Image or video files, directories (searched recursively) or glob patterns. A file reached
    /// twice is scored once, with a warning; a folder or link that cannot be read while searching
    /// is reported and skipped, and the exit code is then 3. `-` reads one image or video from
    /// stdin (at most 512 MiB); its records say `-`.
    #[arg(required_unless_present = "manifest", value_name = "PATH")]
    paths: Vec<PathBuf>,
    /// A file listing inputs, one path, directory or glob per line (blank lines and `#` comments
    /// skipped), scored after the PATHs. A listed file that is missing fails alone (exit code 3).
    /// `-` reads the list from stdin (`find photos -name '*.jpg' | qalign score --manifest -`).
    #[arg(long, value_name = "FILE")]
    manifest: Option<PathBuf>,
    /// Score only part I of N (0-based) of the inputs: those whose position in the full list is
    /// I mod N. With --out, N jobs score a list in parallel (docs/SCALE-OUT.md).
    #[arg(long, value_name = "I/N", value_parser = shard::parse_shard)]
    shard: Option<shard::Shard>,
    /// Append the records as JSONL to FILE instead of printing them. A rerun skips the inputs FILE
    /// already holds for the same task, question and scale (and re-scores one whose records a
    /// crash cut off): it resumes. Records of other tasks stay in FILE.
    #[arg(long, value_name = "FILE", conflicts_with = "format")]
    out: Option<PathBuf>,
    /// What to rate.
    #[arg(long, value_enum, default_value = "quality")]
    task: TaskArg,
    /// A custom question instead of --task (needs --answer-prefix), e.g. "How clear is this image?".
    #[arg(long, requires = "answer_prefix", conflicts_with = "task", value_parser = flags::prompt_text)]
    question: Option<String>,
    /// The start of the answer after which the level word is read, e.g. "The clarity of the image is".
    #[arg(long, requires = "question", value_parser = flags::prompt_text)]
    answer_prefix: Option<String>,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Build the network of --model's config.json with random weights instead of reading a
    /// checkpoint (the folder needs only config.json). For timing only: the scores mean nothing.
    #[arg(long)]
    random_weights: bool,
    /// Images per forward pass.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=1024))]
    batch_size: u64,
    /// Score scale: 1-5 (HF `.score`) or 0-1 (GitHub scorer classes).
    #[arg(long, default_value = "1-5", value_parser = parse_scale)]
    scale: Scale,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
    /// Apply the EXIF orientation tag before scoring (off, as in the official code).
    #[arg(long)]
    exif_orientation: bool,
    /// Video: frames sampled per second (the official loader takes 1).
    #[arg(long, default_value_t = 1.0, value_parser = flags::positive, allow_negative_numbers = true)]
    fps: f64,
    /// Video: at most this many frames, spread uniformly over the clip.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    max_frames: Option<u64>,
    /// Video: at most this many frames per forward pass; longer clips are scored in windows.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    window: Option<u64>,
    /// Video: also score each sampled frame alone with the image prompt (a per-second timeline).
    #[arg(long)]
    per_frame: bool,
    /// Treat warnings (a truncated video, repeated or capped frames) as errors for that input.
    #[arg(long)]
    strict: bool,
}

/// Flags shared by every command that loads a model.
#[derive(clap::Args)]
pub struct ModelArgs {
    /// Model folder, or a Hugging Face hub id resolved through the HF cache (HF_HOME).
    #[arg(long, default_value = DEFAULT_MODEL, env = "QALIGN_MODEL")]
    pub model: String,
    /// The branch, tag or commit hash of a hub id (default: main).
    #[arg(long, value_name = "REV", value_parser = crate::flags::revision)]
    pub revision: Option<String>,
    /// Never touch the network (also set by HF_HUB_OFFLINE=1 or TRANSFORMERS_OFFLINE=1).
    #[arg(long)]
    pub offline: bool,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// Compute dtype. f32 reproduces the reference; f16/bf16 halve memory (see docs/PARITY.md).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DtypeArg,
    /// Quantise the weights of the linear layers as they load: q8_0 or q4k (about 4× / 7× less
    /// weight memory; on an AVX2-only CPU not faster than f32, see docs/PERFORMANCE.md; f32
    /// activations, so only with --dtype f32). Layers whose
    /// input size does not fit the format fall back to q8_0 or f32 (`qalign info --quant` lists
    /// them). See docs/PARITY.md for the score deviations.
    #[arg(long, value_name = "TYPE")]
    pub quant: Option<Quant>,
    /// Which weight files to read when a folder has several layouts.
    #[arg(long, value_enum, default_value = "auto")]
    pub weights: WeightsArg,
    /// A LoRA adapter folder (official or from `qalign train`), merged into the base as it loads.
    #[arg(long, value_name = "DIR")]
    pub lora: Option<PathBuf>,
}

impl From<WeightsArg> for WeightFormat {
    fn from(arg: WeightsArg) -> Self {
        match arg {
            WeightsArg::Auto => WeightFormat::Auto,
            WeightsArg::Safetensors => WeightFormat::Safetensors,
            WeightsArg::Bin => WeightFormat::PytorchBin,
        }
    }
}

fn parse_scale(s: &str) -> std::result::Result<Scale, String> {
    s.parse()
}

impl From<DtypeArg> for Dtype {
    fn from(arg: DtypeArg) -> Self {
        match arg {
            DtypeArg::F32 => Dtype::F32,
            DtypeArg::F16 => Dtype::F16,
            DtypeArg::Bf16 => Dtype::Bf16,
        }
    }
}

impl ModelArgs {
    /// Whether the model loads with quantised weights: `--quant`, or a folder written by
    /// `qalign quantize`.
    pub fn loads_quantised(&self) -> bool {
        self.quant.is_some()
            || std::path::Path::new(&self.model)
                .join(qalign_model::GGUF_FILE)
                .is_file()
    }

    /// `--random-weights` builds the network of a folder's config.json: a hub id or a missing
    /// folder is a usage error.
    pub fn random_weights_conflict(&self, random_weights: bool) -> Option<String> {
        (random_weights && !std::path::Path::new(&self.model).is_dir()).then(|| {
            format!(
                "--random-weights needs --model to be a folder with config.json, not `{}`",
                self.model
            )
        })
    }

    /// A combination of these flags that cannot run (a usage error, found before any work):
    /// quantised weights run with f32 activations only.
    pub fn conflict(&self) -> Option<String> {
        if self.dtype == DtypeArg::F32 || !self.loads_quantised() {
            return None;
        }
        let dtype = Dtype::from(self.dtype);
        Some(match self.quant {
            Some(quant) => format!(
                "--quant {quant} runs with f32 activations: leave out --dtype {dtype} or --quant"
            ),
            None => format!(
                "{} holds quantised weights (`{}`), which run with f32 activations: leave out --dtype {dtype}",
                self.model,
                qalign_model::GGUF_FILE
            ),
        })
    }

    /// The library's scorer builder for these flags.
    pub fn builder(&self) -> ScorerBuilder {
        let mut builder = Scorer::builder()
            .model(&self.model)
            .device(self.device)
            .dtype(self.dtype.into())
            .quant(self.quant)
            .weights(self.weights.into());
        if self.offline {
            builder = builder.offline(true);
        }
        if let Some(revision) = &self.revision {
            builder = builder.revision(revision);
        }
        if let Some(dir) = &self.lora {
            builder = builder.lora(dir);
        }
        builder
    }

    /// Resolves the model folder and the load options.
    pub fn resolve(&self) -> Result<(PathBuf, LoadOptions)> {
        let builder = self.builder();
        Ok((builder.resolve()?, self.resolve_load()?))
    }

    /// The load options alone (device, dtype, format, adapter), for a folder found another way.
    pub fn resolve_load(&self) -> Result<LoadOptions> {
        self.builder()
            .load_options()
            .map_err(|e| self.adapter_context(e))
    }

    /// Names the adapter folder in a load error, once.
    fn adapter_context(&self, err: ScoreError) -> anyhow::Error {
        match &self.lora {
            Some(dir) => output::context_naming(err, dir, "cannot load the LoRA adapter", |d| {
                format!("cannot load the LoRA adapter {d}")
            }),
            None => err.into(),
        }
    }
}

/// The validated configuration of one `score` run.
struct ScoreConfig {
    inputs: Vec<PathBuf>,
    queries: Vec<Query>,
    batch_size: usize,
    scale: Scale,
    format: Format,
    video: VideoOptions,
    strict: bool,
    /// The temporary file holding stdin, when `-` is an input: its records say `-`.
    stdin_path: Option<PathBuf>,
}

impl Args {
    fn validate(&self) -> Result<ScoreConfig> {
        let queries = match (&self.question, &self.answer_prefix) {
            (Some(question), Some(answer_prefix)) => {
                vec![Query::custom(question, answer_prefix).context("--question/--answer-prefix")?]
            }
            _ => match self.task {
                TaskArg::Quality => vec![Query::Task(Task::Quality)],
                TaskArg::Aesthetics => vec![Query::Task(Task::Aesthetics)],
                TaskArg::All => vec![Query::Task(Task::Quality), Query::Task(Task::Aesthetics)],
            },
        };
        let sampling = SamplingOptions::new(self.fps, self.max_frames.map(|n| n as usize))
            .map_err(|e| anyhow::anyhow!("--fps/--max-frames: {e}"))?;
        let listed = match &self.manifest {
            Some(manifest) => shard::read_manifest(manifest)?,
            None => Vec::new(),
        };
        let entries = (self.paths.iter().map(|p| (p.as_path(), Missing::Refuse)))
            .chain(listed.iter().map(|p| (p.as_path(), Missing::Keep)));
        let mut all = inputs::expand_entries(entries)?;
        if let Some(shard) = self.shard {
            all = shard.select(all);
        }
        Ok(ScoreConfig {
            inputs: all,
            queries,
            batch_size: self.batch_size as usize,
            scale: self.scale,
            format: self.format,
            video: VideoOptions {
                sampling,
                window: self.window.map(|n| n as usize),
                per_frame: self.per_frame,
            },
            strict: self.strict,
            stdin_path: None,
        })
    }
}

pub fn run(args: Args) -> Result<ExitCode> {
    if let Some(message) = args.model.random_weights_conflict(args.random_weights) {
        return Ok(usage_error(&message));
    }
    if args.manifest.as_deref().is_some_and(stdin::is_stdin)
        && args.paths.iter().any(|p| stdin::is_stdin(p))
    {
        return Ok(usage_error(
            "`-` and `--manifest -` both read stdin: give the image on stdin or the list, not both",
        ));
    }
    let mut config = args.validate()?;
    let spooled_stdin = stdin::substitute(&mut config.inputs)?;
    config.stdin_path = spooled_stdin.as_ref().map(|s| s.path().to_path_buf());
    // `--out`: what an earlier run of this job wrote is skipped before the model loads.
    let resumable = if let Some(path) = &args.out {
        let scale = config.scale.to_string();
        let kinds: Vec<String> = config
            .queries
            .iter()
            .map(|query| {
                let question = match query {
                    Query::Custom { question, .. } => Some(question.as_str()),
                    Query::Task(_) => None,
                };
                shard::record_kind(query.name(), question, &scale)
            })
            .collect();
        let file = shard::ResumableOut::open(path, &kinds)?;
        let before = config.inputs.len();
        // By file, not by spelling: `./a.jpg` or `/abs/a.jpg` is done when `a.jpg` is. A record's
        // path is the input's display, so a name that is not UTF-8 matches no record and is
        // scored again rather than mistaken for another one spelled alike.
        let mut identities = inputs::Identities::default();
        let done: HashSet<PathBuf> = file
            .done
            .iter()
            .map(|p| identities.of(Path::new(p)))
            .collect();
        config
            .inputs
            .retain(|p| p.to_str().is_none() || !done.contains(&identities.of(p)));
        if config.inputs.len() < before {
            eprintln!(
                "{} of {before} input(s) already in {}: skipped",
                before - config.inputs.len(),
                path.display()
            );
        }
        if config.inputs.is_empty() {
            return Ok(ExitCode::SUCCESS);
        }
        Some(file)
    } else {
        None
    };
    let builder = args.model.builder().exif_orientation(args.exif_orientation);
    let dir = builder.resolve()?;
    let started = Instant::now();
    eprintln!("loading model from {}", dir.display());
    let options = builder
        .scorer_options()
        .map_err(|e| args.model.adapter_context(e))?;
    let scorer =
        crate::cmd::bench::load_scorer_showing_progress(&dir, &options, args.random_weights)?;
    eprintln!("model loaded in {:.1} s", started.elapsed().as_secs_f64());
    if let Some(report) = scorer.model().quant_report() {
        let count = |format| report.layers.iter().filter(|l| l.format == format).count();
        let mut line = format!(
            "{} linear layers as {}",
            count(Some(report.asked)),
            report.asked
        );
        if report.asked != Quant::Q8_0 && count(Some(Quant::Q8_0)) > 0 {
            line += &format!(", {} as q8_0", count(Some(Quant::Q8_0)));
        }
        if count(None) > 0 {
            line += &format!(", {} as f32", count(None));
        }
        if report.fallbacks().next().is_some() {
            line += &format!(
                " (input sizes that do not fit; `qalign info --quant {}` lists them)",
                report.asked
            );
        }
        eprintln!("{line}");
    }
    let mut out = Output::new(config.format, config.scale);
    out.file = resumable;
    let failures = match score_all(&scorer, &config, &mut out) {
        // Only a custom question can outgrow the context: that is a bad flag value.
        Err(err) if is_prompt_too_long(&err) => {
            return Ok(usage_error(&format!("--question/--answer-prefix: {err}")));
        }
        result => result?,
    };
    out.finish()?;
    let total = config.inputs.len();
    if failures == total {
        bail!("none of the {total} input(s) could be scored (see the errors above)");
    }
    if failures > 0 {
        eprintln!("{failures} of {total} input(s) failed (see the errors above)");
        return Ok(ExitCode::from(EXIT_PARTIAL));
    }
    Ok(ExitCode::SUCCESS)
}

fn is_prompt_too_long(err: &anyhow::Error) -> bool {
    matches!(
        err.downcast_ref::<ScoreError>(),
        Some(ScoreError::PromptTooLong { .. })
    )
}

/// Scores every input through the library's one-call path, writing each record as it comes;
/// returns the number of failures.
fn score_all(scorer: &Scorer, config: &ScoreConfig, out: &mut Output) -> Result<usize> {
    let bar = progress::bar(config.inputs.len() as u64, "scoring");
    let mut failures = 0;
    let mut write_error = None;
    let options = ScoreOptions {
        batch_size: config.batch_size,
        video: config.video.clone(),
        strict: config.strict,
        decode_ahead: true,
    };
    let mut on_item = |item: qalign_model::ItemOutcome| {
        let name = match &config.stdin_path {
            Some(spooled) if *spooled == item.path => stdin::STDIN_ARG.to_string(),
            _ => item.path.display().to_string(),
        };
        match item.result {
            Ok(scored) => {
                for warning in scored.warnings() {
                    bar.suspend(|| eprintln!("warning: {name}: {warning}"));
                }
                let records = ScoreRecord::for_scored(
                    &name,
                    &config.queries,
                    &scored,
                    scorer.levels(),
                    config.scale,
                );
                if let Err(e) = out.emit_input(records) {
                    write_error = Some(e);
                    return ControlFlow::Break(());
                }
            }
            // Broken weights fail every input alike: stop the run and say whose fault it is.
            Err(err @ ScoreError::NonFiniteOutput { .. }) => {
                write_error = Some(
                    anyhow::Error::new(err)
                        .context(format!("scoring {name}: the input is not at fault")),
                );
                return ControlFlow::Break(());
            }
            Err(err) => {
                failures += 1;
                bar.suspend(|| eprintln!("{}", output::input_error_line(&name, &err)));
            }
        }
        ControlFlow::Continue(())
    };
    let mut on_progress = |p: qalign_model::Progress<'_>| {
        bar.set_position(p.done as u64);
        match p.frames {
            Some((done, total)) => {
                bar.set_message(format!("{} ({done}/{total} frames)", p.current.display()))
            }
            None => bar.set_message(p.current.display().to_string()),
        }
        ControlFlow::Continue(())
    };
    scorer.score_paths_with(
        &config.inputs,
        &config.queries,
        &options,
        &mut on_item,
        Some(&mut on_progress),
    )?;
    bar.finish_and_clear();
    if let Some(e) = write_error {
        return Err(e);
    }
    Ok(failures)
}

/// Writes records to stdout as they come (jsonl, csv) or at the end (json, table).
struct Output {
    format: Format,
    scale: Scale,
    held: Vec<ScoreRecord>,
    /// Created with the first csv record, which also gives the header its level columns.
    csv: Option<csv::Writer<output::Stdout>>,
    /// `--out`: JSONL appended to a file instead of stdout.
    file: Option<shard::ResumableOut>,
}

impl Output {
    fn new(format: Format, scale: Scale) -> Self {
        Self {
            format,
            scale,
            held: Vec::new(),
            csv: None,
            file: None,
        }
    }

    /// The records of one input; to a `--out` file in one write, so a crash cuts at most one line.
    fn emit_input(&mut self, records: Vec<ScoreRecord>) -> Result<()> {
        if let Some(file) = &mut self.file {
            let mut lines = String::new();
            for record in &records {
                lines += &serde_json::to_string(record)?;
                lines.push('\n');
            }
            return file.append(&lines);
        }
        records.into_iter().try_for_each(|r| self.emit(r))
    }

    fn emit(&mut self, record: ScoreRecord) -> Result<()> {
        match self.format {
            Format::Jsonl => {
                let line = format!("{}\n", serde_json::to_string(&record)?);
                output::stdout().write_all(line.as_bytes())?;
            }
            Format::Csv => {
                let w = match &mut self.csv {
                    Some(w) => w,
                    None => {
                        let mut w = csv::Writer::from_writer(output::stdout());
                        w.write_record(csv_header(&record)).map_err(csv_io)?;
                        self.csv.insert(w)
                    }
                };
                w.write_record(csv_row(&record)).map_err(csv_io)?;
                // A row reaches a pipe as soon as it is scored.
                w.flush()?;
            }
            Format::Json | Format::Table => self.held.push(record),
        }
        Ok(())
    }

    fn finish(self) -> Result<()> {
        if self.file.is_some() {
            return Ok(());
        }
        let mut w = output::stdout();
        match self.format {
            Format::Json => writeln!(w, "{}", serde_json::to_string_pretty(&self.held)?)?,
            Format::Table => write_table(&mut w, &self.held, self.scale)?,
            Format::Jsonl | Format::Csv => {}
        }
        w.flush()?;
        Ok(())
    }
}

/// The I/O error inside a csv error (writing text records can fail in no other way), so that
/// a stdout failure keeps its kind.
fn csv_io(err: csv::Error) -> io::Error {
    match err.into_kind() {
        csv::ErrorKind::Io(err) => err,
        other => io::Error::other(format!("{other:?}")),
    }
}

fn csv_header(record: &ScoreRecord) -> Vec<String> {
    let mut cols = vec![
        "path".to_string(),
        "task".into(),
        "input".into(),
        "score".into(),
        "scale".into(),
    ];
    cols.extend(record.levels.iter().map(|l| format!("p_{l}")));
    cols.extend(record.levels.iter().map(|l| format!("logit_{l}")));
    cols.extend(["std", "entropy", "frames", "fps"].map(String::from));
    cols
}

fn csv_row(r: &ScoreRecord) -> Vec<String> {
    let mut cols = vec![
        r.path.clone(),
        r.task.clone(),
        r.input.to_string(),
        r.score.to_string(),
        r.scale.to_string(),
    ];
    cols.extend(r.probs.iter().map(|p| p.to_string()));
    cols.extend(r.logits.iter().map(|z| z.to_string()));
    cols.push(r.std.to_string());
    cols.push(r.entropy.to_string());
    cols.push(r.frames.map(|f| f.to_string()).unwrap_or_default());
    cols.push(r.fps.map(|f| f.to_string()).unwrap_or_default());
    cols
}

/// A path as one table cell: control characters (a newline or an escape sequence in a file name)
/// are shown escaped (`\n`, `\u{1b}`) so that each record stays on one line of the terminal.
fn table_cell(path: &str) -> std::borrow::Cow<'_, str> {
    if !path.chars().any(char::is_control) {
        return path.into();
    }
    path.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

fn write_table(w: &mut impl Write, records: &[ScoreRecord], scale: Scale) -> Result<()> {
    let paths: Vec<_> = records.iter().map(|r| table_cell(&r.path)).collect();
    let path_width = paths
        .iter()
        .map(|p| p.chars().count())
        .max()
        .unwrap_or(4)
        .max(4);
    writeln!(
        w,
        "{:<path_width$}  {:<10}  {:<5}  {:>7}  {:<9}  {:>5}",
        "path",
        "task",
        "input",
        format!("score"),
        "level",
        "std"
    )?;
    for (r, path) in records.iter().zip(&paths) {
        let best = r
            .probs
            .iter()
            .enumerate()
            .fold(0, |b, (i, &p)| if p > r.probs[b] { i } else { b });
        writeln!(
            w,
            "{:<path_width$}  {:<10}  {:<5}  {:>7.4}  {:<9}  {:>5.3}",
            path, r.task, r.input, r.score, r.levels[best], r.std
        )?;
    }
    writeln!(w, "(scores on the {scale} scale; level = most likely word)")?;
    Ok(())
}
