//! `qalign bench`: times each stage of scoring on one model, device and dtype (model load,
//! preprocessing, ViT + abstractor, LLM, `score_images` with one and two queries, scoring files
//! with decoding overlapped, a video clip),
//! so that every performance figure comes with a command anyone can rerun. Each stage runs
//! `--warmup` untimed times, then `--iters` timed times; the median and the minimum are reported.
//! `--random-weights` times a configuration without its checkpoint (the scores are then meaningless).

use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use qalign_media::{MediaKind, Pixels, RgbImage};
use qalign_model::candle::{Device, Tensor};
use qalign_model::{
    ModelConfig, OneAlignModel, Query, ScoreOptions, Scorer, ScorerOptions, Task, Visual,
};
use serde::Serialize;

use crate::cmd::score::ModelArgs;
use crate::inputs;

/// Side of the synthetic image used when no image is given.
const SYNTHETIC_WIDTH: u32 = 640;
const SYNTHETIC_HEIGHT: u32 = 480;

#[derive(Copy, Clone, Debug, ValueEnum, PartialEq, Eq)]
enum BenchFormat {
    Table,
    Json,
}

#[derive(clap::Args)]
pub struct Args {
    /// Images (files, directories or globs) to preprocess and score; videos among them are
    /// skipped. Without any, a synthetic 640×480 image is used and preprocessing excludes decoding.
    #[arg(value_name = "IMAGE", conflicts_with = "train")]
    images: Vec<String>,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Build the network of --model's config.json with random weights instead of reading a
    /// checkpoint (the folder needs only config.json). For timing only: the scores mean nothing.
    #[arg(long)]
    random_weights: bool,
    /// Batch sizes for the encode, LLM and end-to-end rows.
    #[arg(long, value_delimiter = ',', default_value = "1,8",
          value_parser = clap::value_parser!(u64).range(1..=1024))]
    batch_sizes: Vec<u64>,
    /// Timed runs of each stage.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    iters: u64,
    /// Untimed runs of each stage before the timed ones.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(0..=1000))]
    warmup: u64,
    /// Frames of the video clip rows (0 leaves them out).
    #[arg(long, default_value_t = 8, conflicts_with = "train",
          value_parser = clap::value_parser!(u64).range(0..=1024))]
    frames: u64,
    /// Batches of the IMAGE files scored per timed run of the `files_1q` rows, which time
    /// `qalign score`'s path (decoding overlapped with scoring); 0 leaves them out.
    #[arg(long, default_value_t = 4, conflicts_with = "train",
          value_parser = clap::value_parser!(u64).range(0..=1000))]
    file_batches: u64,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    format: BenchFormat,
    /// Time training steps (forward, backward, AdamW) instead of scoring, one row per batch size.
    #[arg(long)]
    train: bool,
    /// What --train trains: LoRA r 128 on the official targets + the abstractor, or everything.
    #[arg(long, value_enum, default_value = "lora", requires = "train")]
    train_mode: TrainModeArg,
}

#[derive(Copy, Clone, Debug, clap::ValueEnum, PartialEq, Eq)]
pub enum TrainModeArg {
    Lora,
    Full,
}

/// One timed stage.
#[derive(Debug, Serialize)]
struct Row {
    /// Machine-readable stage name: load, preprocess, encode, vision, abstractor, llm,
    /// llm_whole_prompt, score_1q, score_2q, files_1q (only with IMAGE files), video_llm,
    /// video_clip.
    stage: &'static str,
    /// What was timed, in words.
    label: String,
    /// Images (or frames) per call, when the stage is batched.
    batch: Option<usize>,
    /// Items (images or frames) handled by one timed call.
    items: usize,
    /// Sequence length of the LLM pass, for the video rows.
    positions: Option<usize>,
    /// Timed runs behind the figures.
    runs: usize,
    median_ms: f64,
    min_ms: f64,
    median_ms_per_item: f64,
    min_ms_per_item: f64,
    /// Items per second at the median.
    items_per_s: f64,
}

/// The whole report, as `--format json` prints it.
#[derive(Debug, Serialize)]
struct Report {
    model: String,
    /// `checkpoint` or `random` (made-up weights: timing only).
    weights: &'static str,
    device: String,
    dtype: String,
    /// Quantised linear-layer weights (`q8_0`, `q4k`), when asked for.
    quant: Option<String>,
    /// Linear layers that did not get the asked quantisation (Q8_0 or f32 instead).
    quant_fallbacks: usize,
    /// Peak resident memory of the process (VmHWM), MiB, over the whole run.
    peak_rss_mib: Option<f64>,
    /// Logical CPUs seen by the process (the CPU backend's thread pool size unless RAYON_NUM_THREADS says otherwise).
    cpus: usize,
    rayon_num_threads: Option<String>,
    /// The CPU matrix-product kernels picked here (`QALIGN_CPU_KERNELS` and the processor);
    /// absent on a GPU.
    cpu_kernels: Option<qalign_model::CpuKernels>,
    warmup: usize,
    iters: usize,
    /// The images preprocessed (`synthetic WxH` when none was given).
    images: Vec<String>,
    config: ModelConfig,
    rows: Vec<Row>,
    /// Ratios of medians measured in this run.
    ratios: Vec<Ratio>,
}

#[derive(Debug, Serialize)]
struct Ratio {
    name: String,
    value: f64,
    meaning: String,
}

impl Row {
    fn new(
        stage: &'static str,
        label: String,
        batch: Option<usize>,
        items: usize,
        samples_s: &[f64],
    ) -> Self {
        let mut ms: Vec<f64> = samples_s.iter().map(|s| s * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        let median_ms = median_of_sorted(&ms);
        let min_ms = ms.first().copied().unwrap_or(f64::NAN);
        let per = items.max(1) as f64;
        Self {
            stage,
            label,
            batch,
            items,
            positions: None,
            runs: ms.len(),
            median_ms,
            min_ms,
            median_ms_per_item: median_ms / per,
            min_ms_per_item: min_ms / per,
            items_per_s: per / (median_ms / 1e3),
        }
    }
}

fn median_of_sorted(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => sorted[n / 2],
        _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Runs `f` `warmup` times, then `iters` timed times, waiting for the device after each call so
/// that asynchronous GPU work is counted where it is issued. Returns seconds per timed run.
fn time_runs<T>(
    device: &Device,
    warmup: usize,
    iters: usize,
    mut f: impl FnMut() -> Result<T>,
) -> Result<Vec<f64>> {
    for _ in 0..warmup {
        f()?;
        device.synchronize()?;
    }
    (0..iters)
        .map(|_| {
            let start = Instant::now();
            f()?;
            device.synchronize()?;
            Ok(start.elapsed().as_secs_f64())
        })
        .collect()
}

/// Where the preprocessing rows take their input from.
enum ImageSource {
    Files(Vec<PathBuf>),
    Synthetic(RgbImage),
}

impl ImageSource {
    fn names(&self) -> Vec<String> {
        match self {
            ImageSource::Files(paths) => paths.iter().map(|p| p.display().to_string()).collect(),
            ImageSource::Synthetic(img) => {
                vec![format!("synthetic {}x{}", img.width(), img.height())]
            }
        }
    }

    fn len(&self) -> usize {
        match self {
            ImageSource::Files(paths) => paths.len(),
            ImageSource::Synthetic(_) => 1,
        }
    }

    fn preprocess_all(&self, scorer: &Scorer) -> Result<Vec<Pixels>> {
        match self {
            ImageSource::Files(paths) => paths
                .iter()
                .map(|p| {
                    scorer
                        .load_image(p)
                        .with_context(|| format!("cannot read {}", p.display()))
                })
                .collect(),
            ImageSource::Synthetic(img) => Ok(vec![scorer.preprocess_rgb(img)]),
        }
    }
}

/// Scores `files` the way `qalign score` does (decoding the next batch while one is scored);
/// any input that fails fails the run.
fn score_files(scorer: &Scorer, files: &[&PathBuf], options: &ScoreOptions) -> Result<()> {
    let mut failed = None;
    scorer.score_paths_with(
        files,
        &[Query::Task(Task::Quality)],
        options,
        &mut |item| match item.result {
            Ok(_) => ControlFlow::Continue(()),
            Err(e) => {
                failed = Some(anyhow::Error::new(e).context(format!("{}", item.path.display())));
                ControlFlow::Break(())
            }
        },
        None,
    )?;
    failed.map_or(Ok(()), Err)
}

/// A colour gradient: deterministic, with detail in both directions for the resampler.
fn synthetic_image() -> Result<RgbImage> {
    let (w, h) = (SYNTHETIC_WIDTH, SYNTHETIC_HEIGHT);
    let mut data = Vec::with_capacity((w * h * 3) as usize);
    for y in 0..h {
        for x in 0..w {
            data.extend([
                (x * 255 / w) as u8,
                (y * 255 / h) as u8,
                ((x + y) % 256) as u8,
            ]);
        }
    }
    RgbImage::from_raw(w, h, data).context("synthetic image buffer of the wrong size")
}

impl Args {
    fn image_source(&self) -> Result<ImageSource> {
        if self.images.is_empty() {
            return Ok(ImageSource::Synthetic(synthetic_image()?));
        }
        let mut images = Vec::new();
        for path in inputs::expand(&self.images)? {
            match qalign_media::sniff_kind(&path) {
                Ok(Some(MediaKind::Video)) => eprintln!("note: skipping video {}", path.display()),
                _ => images.push(path),
            }
        }
        if images.is_empty() {
            bail!("no image among the given paths (videos are skipped)");
        }
        Ok(ImageSource::Files(images))
    }
}

/// Loads the scorer from the checkpoint, or builds it with random weights.
pub fn load_scorer(dir: &Path, options: &ScorerOptions, random: bool) -> Result<Scorer> {
    if !random {
        return Scorer::load(dir, options)
            .with_context(|| format!("cannot load the model in {}", dir.display()));
    }
    let load = options
        .model_load_options(dir)
        .with_context(|| format!("cannot build the model of {}", dir.display()))?;
    let model = OneAlignModel::random_init(dir, &load)
        .with_context(|| format!("cannot build the model of {}", dir.display()))?;
    Ok(Scorer::with_model(model, dir, options)?)
}

/// [`load_scorer`] with a progress bar over the model's layers (on a terminal, unless `--quiet`).
pub fn load_scorer_showing_progress(
    dir: &Path,
    options: &ScorerOptions,
    random: bool,
) -> Result<Scorer> {
    let (bar, observer) = crate::progress::load_bar();
    let mut options = options.clone();
    options.load.on_progress = Some(observer);
    let loaded = load_scorer(dir, &options, random);
    bar.finish_and_clear();
    loaded
}

pub fn run(args: Args) -> Result<ExitCode> {
    if let Some(message) = args.model.random_weights_conflict(args.random_weights) {
        return Ok(crate::cmd::usage_error(&message));
    }
    if args.train {
        if args.model.quant.is_some() {
            return Ok(crate::cmd::usage_error(
                "--quant is for scoring: training runs on dense weights (drop --quant or --train)",
            ));
        }
        return run_train(&args);
    }
    let images = args.image_source()?;
    let (dir, load) = args.model.resolve()?;
    let device = load.device.clone();
    let dtype = load.dtype;
    let warmup = args.warmup as usize;
    let iters = args.iters as usize;
    let mut batch_sizes: Vec<usize> = args.batch_sizes.iter().map(|&b| b as usize).collect();
    batch_sizes.sort_unstable();
    batch_sizes.dedup();

    let quant = load.quant;
    eprintln!(
        "{} model from {} on {} ({}{})",
        if args.random_weights {
            "building a random-weight"
        } else {
            "loading the"
        },
        dir.display(),
        args.model.device,
        dtype.as_str(),
        quant.map(|q| format!(", {q} weights")).unwrap_or_default()
    );
    let options = ScorerOptions {
        load,
        ..Default::default()
    };
    let start = Instant::now();
    let scorer = load_scorer_showing_progress(&dir, &options, args.random_weights)?;
    device.synchronize()?;
    let load_s = start.elapsed().as_secs_f64();
    let load_label = if args.random_weights {
        "random init (no checkpoint read)"
    } else {
        "model load (checkpoint → device)"
    };
    let mut rows = vec![Row::new("load", load_label.into(), None, 1, &[load_s])];

    eprintln!("timing preprocessing");
    let per_pass = images.len();
    let samples = time_runs(&Device::Cpu, warmup, iters, || {
        images.preprocess_all(&scorer)
    })?;
    let preprocess_label = match images {
        ImageSource::Files(_) => "preprocess (decode + pad + resize + normalise)",
        ImageSource::Synthetic(_) => "preprocess (pad + resize + normalise, no decode)",
    };
    rows.push(Row::new(
        "preprocess",
        preprocess_label.into(),
        None,
        per_pass,
        &samples,
    ));
    let pixels = images.preprocess_all(&scorer)?;
    let batch_of = |n: usize| -> Vec<&Pixels> { pixels.iter().cycle().take(n).collect() };

    let quality = Query::Task(Task::Quality);
    let both = [quality.clone(), Query::Task(Task::Aesthetics)];
    for &b in &batch_sizes {
        eprintln!("timing batch {b}");
        let batch = batch_of(b);
        let samples = time_runs(&device, warmup, iters, || Ok(scorer.encode(&batch)?))?;
        rows.push(Row::new(
            "encode",
            "encode (ViT + abstractor)".into(),
            Some(b),
            b,
            &samples,
        ));
        // The two halves of the encode, in the same chunks as `encode_images`.
        let model = scorer.model();
        let pixels_in = scorer.pixels_tensor(&batch)?;
        let per_batch = model.images_per_vision_batch();
        let chunks: Vec<Tensor> = (0..b)
            .step_by(per_batch)
            .map(|start| pixels_in.narrow(0, start, per_batch.min(b - start)))
            .collect::<std::result::Result<_, _>>()?;
        let samples = time_runs(&device, warmup, iters, || {
            chunks
                .iter()
                .map(|c| Ok(model.vision_forward(c)?))
                .collect::<Result<Vec<_>>>()
        })?;
        rows.push(Row::new(
            "vision",
            "ViT alone (part of encode)".into(),
            Some(b),
            b,
            &samples,
        ));
        let hidden = chunks
            .iter()
            .map(|c| model.vision_forward(c))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let samples = time_runs(&device, warmup, iters, || {
            hidden
                .iter()
                .map(|h| Ok(model.abstract_visual(h)?))
                .collect::<Result<Vec<_>>>()
        })?;
        rows.push(Row::new(
            "abstractor",
            "abstractor alone (part of encode)".into(),
            Some(b),
            b,
            &samples,
        ));
        let visual = scorer.encode(&batch)?;
        let samples = time_runs(&device, warmup, iters, || {
            Ok(scorer.score_encoded_images(&visual, &quality)?)
        })?;
        rows.push(Row::new(
            "llm",
            "LLM scoring, 1 query (splice + decoder + level logits)".into(),
            Some(b),
            b,
            &samples,
        ));
        let ids = scorer.prompt_ids(&quality, qalign_model::MediaKind::Image)?;
        let blocks = (0..visual.len())
            .map(|i| visual.tensor().get(i))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let samples = time_runs(&device, warmup, iters, || {
            Ok(model.shared_prompt_level_logits(&ids, None, &blocks, scorer.level_ids())?)
        })?;
        rows.push(Row::new(
            "llm_whole_prompt",
            "LLM scoring, 1 query, rerunning the prompt's shared prefix".into(),
            Some(b),
            b,
            &samples,
        ));
        let samples = time_runs(&device, warmup, iters, || {
            Ok(scorer.score_images(&batch, &both[..1])?)
        })?;
        rows.push(Row::new(
            "score_1q",
            "score_images, 1 query (encode + LLM)".into(),
            Some(b),
            b,
            &samples,
        ));
        let samples = time_runs(&device, warmup, iters, || {
            Ok(scorer.score_images(&batch, &both)?)
        })?;
        rows.push(Row::new(
            "score_2q",
            "score_images, 2 queries (encode once + 2 LLM)".into(),
            Some(b),
            b,
            &samples,
        ));
        if let ImageSource::Files(paths) = &images
            && args.file_batches > 0
        {
            let file_batches = args.file_batches as usize;
            let files: Vec<&PathBuf> = paths.iter().cycle().take(file_batches * b).collect();
            let options = ScoreOptions {
                batch_size: b,
                ..Default::default()
            };
            let samples = time_runs(&device, warmup, iters, || {
                score_files(&scorer, &files, &options)
            })?;
            rows.push(Row::new(
                "files_1q",
                format!(
                    "score_paths from files, 1 query, {file_batches} batches (decode overlapped)"
                ),
                Some(b),
                files.len(),
                &samples,
            ));
        }
    }

    if args.frames > 0 {
        let t = args.frames as usize;
        eprintln!("timing a {t}-frame clip");
        let positions = scorer
            .prompt_ids(&quality, qalign_model::MediaKind::Video)?
            .len()
            - 1
            + t * scorer.model().tokens_per_image();
        let config = scorer.model().config();
        let tokens = Tensor::randn(
            0f32,
            1f32,
            (
                t,
                config.abstractor.tokens_per_image(),
                config.llm.hidden_size,
            ),
            &device,
        )?
        .to_dtype(dtype)?;
        let tokens = Visual::from_tensor(tokens);
        let samples = time_runs(&device, warmup, iters, || {
            Ok(scorer.score_encoded_clips(std::slice::from_ref(&tokens), &quality)?)
        })?;
        let mut row = Row::new(
            "video_llm",
            format!("video LLM, {t} frames (synthetic visual tokens)"),
            None,
            t,
            &samples,
        );
        row.positions = Some(positions);
        rows.push(row);
        let frames = batch_of(t);
        let samples = time_runs(&device, warmup, iters, || {
            let visual = scorer.encode(&frames)?;
            Ok(scorer.score_encoded_clips(&[visual], &quality)?)
        })?;
        let mut row = Row::new(
            "video_clip",
            format!("video clip, {t} frames (encode frames + LLM)"),
            None,
            t,
            &samples,
        );
        row.positions = Some(positions);
        rows.push(row);
    }

    let report = Report {
        model: dir.display().to_string(),
        weights: if args.random_weights {
            "random"
        } else {
            "checkpoint"
        },
        device: args.model.device.to_string(),
        dtype: dtype.as_str().to_string(),
        quant: quant.map(|q| q.to_string()),
        quant_fallbacks: scorer
            .model()
            .quant_report()
            .map_or(0, |r| r.fallbacks().count()),
        peak_rss_mib: peak_rss_mib(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        rayon_num_threads: std::env::var("RAYON_NUM_THREADS").ok(),
        cpu_kernels: scorer
            .model()
            .device()
            .is_cpu()
            .then(qalign_model::cpu_kernels),
        warmup,
        iters,
        images: images.names(),
        config: scorer.model().config().clone(),
        ratios: ratios(&rows, &batch_sizes),
        rows,
    };
    let mut w = crate::output::stdout();
    match args.format {
        BenchFormat::Json => writeln!(w, "{}", serde_json::to_string_pretty(&report)?)?,
        BenchFormat::Table => write_table(&mut w, &report)?,
    }
    w.flush()?;
    Ok(ExitCode::SUCCESS)
}

fn find<'a>(rows: &'a [Row], stage: &str, batch: usize) -> Option<&'a Row> {
    rows.iter()
        .find(|r| r.stage == stage && r.batch == Some(batch))
}

/// Ratios of medians from this run: batching gains and the saving of encoding once for two queries.
fn ratios(rows: &[Row], batch_sizes: &[usize]) -> Vec<Ratio> {
    let mut out = Vec::new();
    if let (Some(&small), Some(&large)) = (batch_sizes.first(), batch_sizes.last())
        && small != large
    {
        for (stage, what) in [
            ("encode", "encode"),
            ("llm", "LLM"),
            ("score_1q", "score_images"),
        ] {
            if let (Some(a), Some(b)) = (find(rows, stage, small), find(rows, stage, large)) {
                out.push(Ratio {
                    name: format!("{stage}_per_image_b{small}_over_b{large}"),
                    value: a.median_ms_per_item / b.median_ms_per_item,
                    meaning: format!(
                        "{what} time per image at batch {small} / at batch {large} (>1: batching helps)"
                    ),
                });
            }
        }
    }
    for &b in batch_sizes {
        if let (Some(cached), Some(whole)) =
            (find(rows, "llm", b), find(rows, "llm_whole_prompt", b))
        {
            out.push(Ratio {
                name: format!("llm_whole_prompt_over_llm_b{b}"),
                value: whole.median_ms / cached.median_ms,
                meaning: format!(
                    "LLM rerunning the prompt's text before the image / reusing its K/V, at batch {b} (>1: the prefix cache helps)"
                ),
            });
        }
        if let (Some(pixels), Some(files)) = (find(rows, "score_1q", b), find(rows, "files_1q", b))
        {
            out.push(Ratio {
                name: format!("files_1q_over_score_1q_per_image_b{b}"),
                value: files.median_ms_per_item / pixels.median_ms_per_item,
                meaning: format!(
                    "per image, scoring files (decode included, overlapped) / scoring decoded pixels, at batch {b} (1.0: decoding is hidden)"
                ),
            });
        }
        if let (Some(one), Some(two)) = (find(rows, "score_1q", b), find(rows, "score_2q", b)) {
            out.push(Ratio {
                name: format!("score_2q_over_1q_b{b}"),
                value: two.median_ms / one.median_ms,
                meaning: format!(
                    "2 queries / 1 query at batch {b} (2.0 would mean encoding each image twice)"
                ),
            });
        }
    }
    out
}

fn write_table(w: &mut impl Write, report: &Report) -> Result<()> {
    let c = &report.config;
    writeln!(
        w,
        "qalign bench: {} ({} weights{}) on {}, {}{}, {} CPUs{}",
        report.model,
        report.weights,
        if report.weights == "random" {
            ": timing only, scores meaningless"
        } else {
            ""
        },
        report.device,
        report.dtype,
        report
            .quant
            .as_deref()
            .map(|q| format!(
                " with {q} linear weights ({} layers fell back)",
                report.quant_fallbacks
            ))
            .unwrap_or_default(),
        report.cpus,
        report
            .rayon_num_threads
            .as_deref()
            .map(|n| format!(" (RAYON_NUM_THREADS={n})"))
            .unwrap_or_default()
    )?;
    if let Some(k) = &report.cpu_kernels {
        writeln!(
            w,
            "cpu kernels ({}): f32 {}, bf16 {}, quantised {}",
            k.mode, k.f32_matmul, k.bf16_matmul, k.quant_matmul
        )?;
    }
    writeln!(
        w,
        "config: ViT {}×{} layers ({} px, {} tokens), abstractor {}×{} layers ({} tokens/image), \
         LLM {}×{} layers (MLP {}, {} heads), vocab {}",
        c.vision.hidden_size,
        c.vision.num_layers,
        c.vision.image_size,
        c.vision.num_positions,
        c.abstractor.hidden_size,
        c.abstractor.num_layers,
        c.abstractor.tokens_per_image(),
        c.llm.hidden_size,
        c.llm.num_layers,
        c.llm.intermediate_size,
        c.llm.num_heads,
        c.llm.vocab_size
    )?;
    writeln!(
        w,
        "images: {}; {} warm-up + {} timed runs per stage",
        report.images.join(", "),
        report.warmup,
        report.iters
    )?;
    writeln!(w)?;
    let labels: Vec<String> = report
        .rows
        .iter()
        .map(|r| match r.positions {
            Some(p) => format!("{} [{p} positions]", r.label),
            None => r.label.clone(),
        })
        .collect();
    let label_width = labels
        .iter()
        .map(|l| l.chars().count())
        .max()
        .unwrap_or(5)
        .max(5);
    writeln!(
        w,
        "{:<label_width$}  {:>5}  {:>5}  {:>11}  {:>11}  {:>11}  {:>10}",
        "stage", "batch", "items", "median ms", "min ms", "ms/item", "items/s"
    )?;
    for (r, label) in report.rows.iter().zip(labels) {
        let batch = r.batch.map(|b| b.to_string()).unwrap_or_else(|| "-".into());
        writeln!(
            w,
            "{:<label_width$}  {:>5}  {:>5}  {:>11.2}  {:>11.2}  {:>11.2}  {:>10.2}",
            label, batch, r.items, r.median_ms, r.min_ms, r.median_ms_per_item, r.items_per_s
        )?;
    }
    if let Some(peak) = report.peak_rss_mib {
        writeln!(w, "peak RSS {peak:.0} MiB")?;
    }
    if !report.ratios.is_empty() {
        writeln!(w)?;
        for ratio in &report.ratios {
            writeln!(w, "{:>6.2}  {}", ratio.value, ratio.meaning)?;
        }
    }
    Ok(())
}

/// One `bench --train` row: a training step at one batch size.
#[derive(Debug, Serialize)]
struct TrainRow {
    batch: usize,
    steps: usize,
    median_ms_per_step: f64,
    min_ms_per_step: f64,
    samples_per_s: f64,
}

#[derive(Debug, Serialize)]
struct TrainReport {
    model: String,
    weights: &'static str,
    device: String,
    dtype: String,
    mode: String,
    cpus: usize,
    warmup: usize,
    iters: usize,
    trainable_params: usize,
    /// Peak resident memory of the process (VmHWM), MiB: the whole run, all batch sizes.
    peak_rss_mib: Option<f64>,
    rows: Vec<TrainRow>,
}

/// Peak resident set size of this process in MiB (Linux).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// `bench --train`: trains on a synthetic 640×480 image (one SFT sample per batch slot) for `warmup +
/// iters` optimizer steps per batch size and reports the timed steps.
fn run_train(args: &Args) -> Result<ExitCode> {
    use qalign_train::{Mode, TrainConfig, Trainer};
    let (dir, load) = if args.random_weights {
        (PathBuf::from(&args.model.model), args.model.resolve_load()?)
    } else {
        args.model.resolve()?
    };
    let tmp = tempfile::tempdir()?;
    let image = qalign_media::RgbImage::from_fn(640, 480, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x + y) % 256) as u8])
    });
    image.save(tmp.path().join("synthetic.png"))?;
    let (warmup, iters) = (args.warmup as usize, args.iters as usize);
    let mut batch_sizes: Vec<usize> = args.batch_sizes.iter().map(|&b| b as usize).collect();
    batch_sizes.sort_unstable();
    batch_sizes.dedup();
    let mut rows = Vec::new();
    let mut trainable_params = 0;
    for &batch in &batch_sizes {
        let steps = warmup + iters;
        let items: Vec<serde_json::Value> = (0..batch)
            .map(|i| {
                serde_json::json!({
                    "id": format!("synthetic.png->{}", i % 5),
                    "image": "synthetic.png",
                    "conversations": [
                        {"from": "human", "value": "How would you rate the quality of this image?\n<|image|>"},
                        {"from": "gpt", "value": "The quality of the image is good."}
                    ]
                })
            })
            .collect();
        let data = tmp.path().join(format!("bench-{batch}.json"));
        std::fs::write(&data, serde_json::to_vec(&items)?)?;
        let mode = match args.train_mode {
            TrainModeArg::Lora => Mode::Lora {
                rank: 128,
                alpha: 256.0,
                dropout: 0.05,
                targets: qalign_train::DEFAULT_LORA_TARGETS
                    .map(String::from)
                    .to_vec(),
                init: None,
            },
            TrainModeArg::Full => Mode::Full,
        };
        let config = TrainConfig {
            model_dir: dir.clone(),
            model_name: args.model.model.clone(),
            model_revision: args.model.revision.clone(),
            random_weights: args.random_weights,
            data,
            image_folder: tmp.path().to_owned(),
            output: tmp.path().join(format!("out-{batch}")),
            mode,
            lr: 1e-5,
            schedule: qalign_train::optim::Schedule::Constant,
            warmup_ratio: 0.0,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            batch_size: batch,
            grad_accum: 1,
            epochs: 1,
            max_steps: Some(steps),
            seed: 0,
            save_steps: None,
            resume: None,
            log_json: None,
            device: load.device.clone(),
            dtype: load.dtype,
            loss: qalign_train::LossKind::Hard,
            sampling: Default::default(),
        };
        let mut trainer = Trainer::new(config)?;
        trainable_params = trainer.params().iter().map(|p| p.var.elem_count()).sum();
        let mut secs = Vec::new();
        trainer.run(&mut |log, _| {
            if log.step > warmup {
                secs.push(batch as f64 / log.samples_per_s);
            }
            eprintln!(
                "batch {batch}: step {}/{steps} {:.3} s",
                log.step,
                batch as f64 / log.samples_per_s
            );
        })?;
        let mut ms: Vec<f64> = secs.iter().map(|s| s * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        let median = median_of_sorted(&ms);
        rows.push(TrainRow {
            batch,
            steps: ms.len(),
            median_ms_per_step: median,
            min_ms_per_step: ms.first().copied().unwrap_or(f64::NAN),
            samples_per_s: batch as f64 / (median / 1e3),
        });
    }
    let report = TrainReport {
        model: dir.display().to_string(),
        weights: if args.random_weights {
            "random"
        } else {
            "checkpoint"
        },
        device: args.model.device.to_string(),
        dtype: load.dtype.as_str().to_owned(),
        mode: format!("{:?}", args.train_mode).to_lowercase(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        warmup,
        iters,
        trainable_params,
        peak_rss_mib: peak_rss_mib(),
        rows,
    };
    let mut w = crate::output::stdout();
    match args.format {
        BenchFormat::Json => writeln!(w, "{}", serde_json::to_string_pretty(&report)?)?,
        BenchFormat::Table => {
            writeln!(
                w,
                "training ({} mode, {} weights, {} on {}): {} trainable parameters, peak RSS {} MiB",
                report.mode,
                report.weights,
                report.dtype,
                report.device,
                report.trainable_params,
                report
                    .peak_rss_mib
                    .map_or("?".into(), |m| format!("{m:.0}"))
            )?;
            writeln!(
                w,
                "{:>6} {:>6} {:>14} {:>14} {:>12}",
                "batch", "steps", "median ms/step", "min ms/step", "samples/s"
            )?;
            for r in &report.rows {
                writeln!(
                    w,
                    "{:>6} {:>6} {:>14.1} {:>14.1} {:>12.3}",
                    r.batch, r.steps, r.median_ms_per_step, r.min_ms_per_step, r.samples_per_s
                )?;
            }
        }
    }
    w.flush()?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::Row;

    /// Against numpy 2.4: `np.median(ms)`, `ms.min()`, each over 4 items, and
    /// `4 / (np.median(ms) / 1e3)`, with `ms = np.array(seconds) * 1e3`.
    #[test]
    fn row_figures_equal_numpy() {
        for (seconds, median, items_per_s) in [
            (
                &[0.003, 0.001, 0.0042, 0.0015, 0.005][..],
                3.0,
                1333.3333333333333,
            ),
            (
                &[0.003, 0.001, 0.0042, 0.0015, 0.005, 0.0091][..],
                3.6,
                1111.111111111111,
            ),
        ] {
            let row = Row::new("encode", String::new(), Some(4), 4, seconds);
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs();
            assert_eq!(row.runs, seconds.len());
            assert!(close(row.median_ms, median), "{row:?}");
            assert!(close(row.min_ms, 1.0), "{row:?}");
            assert!(close(row.median_ms_per_item, median / 4.0), "{row:?}");
            assert!(close(row.min_ms_per_item, 0.25), "{row:?}");
            assert!(close(row.items_per_s, items_per_s), "{row:?}");
        }
    }
}
