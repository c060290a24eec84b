//! `qalign quantize`: writes a pre-quantised copy of a model (GGUF) that `--model` loads directly,
//! so quantised scoring skips the quantisation at every start.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use qalign_model::Quant;

use crate::flags;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    base: flags::BaseModel,
    /// Block format of the linear layers: q8_0 or q4k (layers whose input size does not fit fall
    /// back to q8_0 or f32, as with `score --quant`).
    #[arg(long, value_name = "TYPE")]
    quant: Quant,
    /// A LoRA adapter folder, merged into the base before quantising.
    #[arg(long, value_name = "DIR")]
    lora: Option<PathBuf>,
    /// Output folder: model.gguf with the base's config, tokenizer and preprocessor files. New,
    /// empty, or from an earlier quantize (replaced atomically; never the model folder or a folder
    /// containing it, nor one holding other files).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

pub fn run(args: Args) -> Result<ExitCode> {
    // Before a hub model is downloaded (a local model folder is checked as named here, and
    // again once resolved).
    qalign_train::save::check_model_output(
        &args.out,
        Path::new(&args.base.model),
        &qalign_train::quantize::QUANTIZED,
    )?;
    let base = args.base.resolve()?;
    let started = Instant::now();
    eprintln!(
        "quantising {} to {} (reading the checkpoint, then writing {})",
        base.display(),
        args.quant,
        args.out.display()
    );
    let (bar, observer) = crate::progress::load_bar();
    let summary = qalign_train::quantize::quantize_dir(
        &base,
        &args.out,
        args.quant,
        args.lora.as_deref(),
        &args.base.model,
        Some(observer),
    );
    bar.finish_and_clear();
    let summary = summary.with_context(|| format!("cannot quantise {}", base.display()))?;
    eprintln!(
        "wrote {} ({} linear layers, {} other tensors, {:.1} MiB) in {:.1} s",
        summary.path.display(),
        summary.layers,
        summary.dense,
        summary.bytes as f64 / (1 << 20) as f64,
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}
