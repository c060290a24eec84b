//! `qalign train` (LoRA or full SFT on the official SFT JSON) and `qalign merge` (an adapter baked into
//! its base). Flags become a validated [`TrainConfig`]; the loop, the optimizer and the output formats
//! live in `qalign-train`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use qalign_model::candle::{DType, Device};
use qalign_train::optim::Schedule;
use qalign_train::{DEFAULT_LORA_TARGETS, LossKind, Mode, TrainConfig, TrainError, Trainer};

use crate::cmd::score::DtypeArg;
use crate::flags;

#[derive(Copy, Clone, Debug, ValueEnum)]
enum TrainDtype {
    /// f32 on the CPU, bf16 on a GPU (trainable tensors and optimizer state stay f32).
    Auto,
    F32,
    F16,
    Bf16,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum LossArg {
    /// One-hot cross-entropy on the answer (the official objective).
    Hard,
    /// A Gaussian over the levels around each sample's MOS at the level word (DeQA-Score style).
    Soft,
}

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    base: flags::BaseModel,
    /// Training data: the official SFT JSON (what `qalign syllabus` writes).
    #[arg(long, value_name = "JSON")]
    data: PathBuf,
    /// Folder the `image` paths of the JSON are relative to.
    #[arg(long, value_name = "DIR", default_value = ".")]
    image_folder: PathBuf,
    /// Where the adapter (or, with --full, the checkpoint) and checkpoint-N folders go (never the
    /// model folder or a folder containing it).
    #[arg(long, value_name = "DIR")]
    output: PathBuf,
    /// LoRA on the LLM plus the whole visual abstractor (the official recipe; the default).
    #[arg(long, conflicts_with = "full")]
    lora: bool,
    /// Train every parameter (the official OneAlign SFT recipe).
    #[arg(long)]
    full: bool,
    /// Continue from an adapter: its r, alpha, targets, matrices and abstractor.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["full", "lora_r", "lora_alpha", "lora_targets"])]
    lora_init: Option<PathBuf>,
    /// LoRA rank.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..=65536))]
    lora_r: u64,
    /// LoRA alpha (the update is scaled by alpha / r).
    #[arg(long, default_value_t = 256.0, value_parser = flags::finite, allow_negative_numbers = true)]
    lora_alpha: f64,
    /// LoRA dropout on the branch inputs.
    #[arg(long, default_value_t = 0.05, value_parser = flags::dropout, allow_negative_numbers = true)]
    lora_dropout: f32,
    /// Comma-separated LoRA targets: module names or suffixes such as q_proj, v_proj.multiway.1, o_proj.
    #[arg(long, value_delimiter = ',', default_value = default_lora_targets(), value_parser = lora_target)]
    lora_targets: Vec<String>,
    /// Peak learning rate (default 2e-4 with LoRA, 2e-5 with --full).
    #[arg(long, value_parser = flags::non_negative, allow_negative_numbers = true)]
    lr: Option<f64>,
    /// How the learning rate falls after the warm-up: cosine, linear or constant.
    #[arg(long, default_value = "cosine", value_parser = parse_schedule)]
    lr_schedule: Schedule,
    /// Fraction of the steps spent warming up linearly from 0.
    #[arg(long, default_value_t = 0.03, value_parser = flags::unit_interval, allow_negative_numbers = true)]
    warmup_ratio: f64,
    /// AdamW weight decay (never applied to biases and norms).
    #[arg(long, default_value_t = 0.0, value_parser = flags::non_negative, allow_negative_numbers = true)]
    weight_decay: f64,
    /// Clip the total gradient norm to this (0 turns clipping off).
    #[arg(long, default_value_t = 1.0, value_parser = flags::non_negative, allow_negative_numbers = true)]
    max_grad_norm: f64,
    /// Samples per micro-batch.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=4096))]
    batch_size: u64,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=4096))]
    grad_accum: u64,
    /// Passes over the training data.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=100000))]
    epochs: u64,
    /// Stop after this many optimizer steps (overrides --epochs).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    max_steps: Option<u64>,
    /// Seeds the data order, the LoRA initialisation and dropout.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Write a resumable OUTPUT/checkpoint-N every this many steps.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    save_steps: Option<u64>,
    /// Continue from a checkpoint-N folder of an earlier run with the same settings.
    #[arg(long, value_name = "DIR")]
    resume: Option<PathBuf>,
    /// Also write one JSON object per optimizer step to this file, a line as each step ends. An
    /// existing file is replaced when the run starts (with --resume, by the checkpoint's log).
    #[arg(long, value_name = "FILE")]
    log_json: Option<PathBuf>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: qalign_model::Device,
    /// Compute dtype of the frozen weights.
    #[arg(long, value_enum, default_value = "auto")]
    dtype: TrainDtype,
    #[arg(long, value_enum, default_value = "hard")]
    loss: LossArg,
    /// Width of the soft target in levels (--loss soft).
    #[arg(long, default_value_t = 0.5, value_parser = flags::positive, allow_negative_numbers = true)]
    soft_sigma: f64,
    /// Video samples: frames per second (1, as in scoring).
    #[arg(long, default_value_t = 1.0, value_parser = flags::positive, allow_negative_numbers = true)]
    fps: f64,
    /// Video samples: at most this many frames.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    max_frames: Option<u64>,
    /// Build the base with random weights of the folder's config.json (for benchmarks only).
    #[arg(long, hide = true)]
    random_weights: bool,
}

/// The default targets as `--lora-targets` takes them (comma-separated), so that the default the
/// help shows can be passed back.
fn default_lora_targets() -> &'static str {
    static JOINED: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    JOINED.get_or_init(|| DEFAULT_LORA_TARGETS.join(","))
}

fn lora_target(s: &str) -> std::result::Result<String, String> {
    let target = s.trim();
    if target.is_empty() {
        return Err("an empty LoRA target (two commas in a row?)".into());
    }
    Ok(target.to_string())
}

fn parse_schedule(s: &str) -> std::result::Result<Schedule, String> {
    s.parse()
}

impl Args {
    fn validate(&self) -> Result<TrainConfig> {
        let device = self.device.to_candle()?;
        let dtype = match (self.dtype, &device) {
            (TrainDtype::Auto, Device::Cpu) | (TrainDtype::F32, _) => DType::F32,
            (TrainDtype::Auto, _) | (TrainDtype::Bf16, _) => DType::BF16,
            (TrainDtype::F16, _) => DType::F16,
        };
        let model_dir = if self.random_weights {
            PathBuf::from(&self.base.model)
        } else {
            self.base.resolve()?
        };
        let mode = if self.full {
            Mode::Full
        } else {
            Mode::Lora {
                rank: self.lora_r as usize,
                alpha: self.lora_alpha,
                dropout: self.lora_dropout,
                targets: self.lora_targets.clone(),
                init: self.lora_init.clone(),
            }
        };
        let lr = self.lr.unwrap_or(if self.full { 2e-5 } else { 2e-4 });
        if !self.data.is_file() {
            bail!("--data {}: no such file", self.data.display());
        }
        if !self.image_folder.is_dir() {
            bail!(
                "--image-folder {}: no such directory",
                self.image_folder.display()
            );
        }
        if let Some(resume) = &self.resume
            && !resume.is_dir()
        {
            bail!("--resume {}: no such directory", resume.display());
        }
        let sampling =
            qalign_media::SamplingOptions::new(self.fps, self.max_frames.map(|m| m as usize))?;
        Ok(TrainConfig {
            model_dir,
            model_name: self.base.model.clone(),
            model_revision: self.base.revision.clone(),
            random_weights: self.random_weights,
            data: self.data.clone(),
            image_folder: self.image_folder.clone(),
            output: self.output.clone(),
            mode,
            lr,
            schedule: self.lr_schedule,
            warmup_ratio: self.warmup_ratio,
            weight_decay: self.weight_decay,
            max_grad_norm: self.max_grad_norm,
            batch_size: self.batch_size as usize,
            grad_accum: self.grad_accum as usize,
            epochs: self.epochs as usize,
            max_steps: self.max_steps.map(|s| s as usize),
            seed: self.seed,
            save_steps: self.save_steps.map(|s| s as usize),
            resume: self.resume.clone(),
            log_json: self.log_json.clone(),
            device,
            dtype,
            loss: match self.loss {
                LossArg::Hard => LossKind::Hard,
                LossArg::Soft => LossKind::Soft {
                    sigma: self.soft_sigma,
                },
            },
            sampling,
        })
    }
}

pub fn run(args: Args) -> Result<ExitCode> {
    let config = args.validate()?;
    eprintln!(
        "loading {} and {}",
        config.model_dir.display(),
        config.data.display()
    );
    let (lr, schedule, warmup_ratio) = (config.lr, config.schedule, config.warmup_ratio);
    // Every sample's media header is read before training: a bar for a large dataset.
    let mut check_bar = None;
    let trainer = Trainer::with_progress(config, &mut |done, total| {
        check_bar
            .get_or_insert_with(|| crate::progress::bar(total as u64, "checking the data"))
            .set_position(done as u64);
    });
    if let Some(bar) = check_bar {
        bar.finish_and_clear();
    }
    let mut trainer = trainer.context("cannot set up training")?;
    let total = trainer.total_steps();
    let n_params: usize = trainer.params().iter().map(|p| p.var.elem_count()).sum();
    eprintln!(
        "{} samples, {} trainable tensors ({} parameters), {total} optimizer steps",
        trainer.dataset().samples.len(),
        trainer.params().len(),
        n_params
    );
    if let Some(n) = trainer.one_hot_soft_samples().filter(|&n| n > 0) {
        eprintln!(
            "warning: {n} of {} samples have no MOS in their id (`name->score`) or an answer that \
             does not end with a level word: the soft loss trains them on the one-hot answer",
            trainer.dataset().samples.len()
        );
    }
    let warmup = qalign_train::optim::warmup_steps(total, warmup_ratio);
    if lr == 0.0 {
        eprintln!(
            "warning: the learning rate is 0 at every one of the {total} step(s) (--lr 0), so \
             nothing is trained: the result will equal the starting weights"
        );
    } else if (0..total)
        .all(|step| qalign_train::optim::lr_factor(schedule, step, warmup, total) == 0.0)
    {
        eprintln!(
            "warning: the learning rate is 0 at every one of the {total} step(s) (warm-up starts \
             at 0 and takes {warmup}), so the result will equal the base: train more steps, or \
             use --warmup-ratio 0"
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    let signal = Arc::new(AtomicU8::new(0));
    catch_stop_signals(stop.clone(), signal.clone())?;
    trainer.set_stop(stop);
    let bar = crate::progress::bar(total as u64, "training");
    let summary = trainer.run(&mut |log, _| {
        bar.set_position(log.step as u64);
        bar.set_message(format!(
            "loss {:.4}  lr {:.2e}  {:.2} samples/s",
            log.loss, log.lr, log.samples_per_s
        ));
        if bar.is_hidden() {
            eprintln!(
                "step {}/{total}: loss {:.4}, lr {:.3e}, grad norm {:.4}, {:.2} samples/s",
                log.step, log.loss, log.lr, log.grad_norm, log.samples_per_s
            );
        }
    });
    bar.finish_and_clear();
    let summary = match summary {
        Err(err @ (TrainError::Interrupted(_) | TrainError::Stopped { .. }))
            if signal.load(Ordering::SeqCst) != 0 =>
        {
            eprintln!("error: {err}");
            return Ok(ExitCode::from(signal.load(Ordering::SeqCst)));
        }
        other => other?,
    };
    eprintln!(
        "trained {} steps on {} samples in {:.1} s: loss {} → {}; wrote {}",
        summary.steps,
        summary.samples_seen,
        summary.seconds,
        summary.first_loss.map_or("-".into(), |l| format!("{l:.4}")),
        summary.last_loss.map_or("-".into(), |l| format!("{l:.4}")),
        summary.output.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// From here on, the first Ctrl-C (SIGINT) or SIGTERM raises `stop` (the trainer then stops
/// before its next micro-batch and keeps a checkpoint of the last completed step) and records the
/// exit code a shell gives that signal (130, 143) in `signal`; a second one ends the process at once.
fn catch_stop_signals(stop: Arc<AtomicBool>, signal: Arc<AtomicU8>) -> Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal as on};
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot catch Ctrl-C")?;
        let (mut int, mut term) = runtime
            .block_on(async {
                anyhow::Ok((on(SignalKind::interrupt())?, on(SignalKind::terminate())?))
            })
            .context("cannot catch Ctrl-C")?;
        std::thread::spawn(move || {
            runtime.block_on(async move {
                loop {
                    let code: u8 = tokio::select! {
                        _ = int.recv() => crate::cmd::EXIT_INTERRUPTED,
                        _ = term.recv() => crate::cmd::EXIT_TERMINATED,
                    };
                    if signal.swap(code, Ordering::SeqCst) != 0 {
                        std::process::exit(i32::from(code));
                    }
                    stop.store(true, Ordering::SeqCst);
                    eprintln!(
                        "\nstopping: the unfinished step is dropped and a checkpoint of the last \
                         completed one is written (signal again to quit at once, keeping nothing new)"
                    );
                }
            });
        });
    }
    #[cfg(not(unix))]
    let _ = (stop, signal);
    Ok(())
}

#[derive(clap::Args)]
pub struct MergeArgs {
    #[command(flatten)]
    base: flags::BaseModel,
    /// The LoRA adapter folder.
    #[arg(long, value_name = "DIR")]
    lora: PathBuf,
    /// Output folder: new, empty, or from an earlier merge (replaced atomically; never the model
    /// folder or a folder containing it, nor one holding other files).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Store every tensor in this dtype (default: each tensor's dtype in the base; f32 keeps the merge
    /// exact, as `score --lora` scores, where a bf16 base rounds the merged weights).
    #[arg(long, value_enum)]
    dtype: Option<DtypeArg>,
}

pub fn run_merge(args: MergeArgs) -> Result<ExitCode> {
    // Before a hub model is downloaded (a local model folder is checked as named here, and
    // again once resolved).
    qalign_train::save::check_model_output(
        &args.out,
        Path::new(&args.base.model),
        &qalign_train::save::MERGED,
    )?;
    let base = args.base.resolve()?;
    let dtype = args.dtype.map(|d| match d {
        DtypeArg::F32 => DType::F32,
        DtypeArg::F16 => DType::F16,
        DtypeArg::Bf16 => DType::BF16,
    });
    let summary = qalign_train::merge::merge_adapter(&base, &args.lora, &args.out, dtype)
        .with_context(|| {
            format!(
                "cannot merge {} into {}",
                args.lora.display(),
                base.display()
            )
        })?;
    eprintln!(
        "merged {} LoRA modules and {} replaced tensors; wrote {} tensors to {}",
        summary.merged_modules,
        summary.replaced_tensors,
        summary.tensors,
        args.out.display()
    );
    Ok(ExitCode::SUCCESS)
}
