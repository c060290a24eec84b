//! `qalign quantize`: quantises a checkpoint once (merging an adapter first) and writes a folder
//! that `--model` loads directly, so that quantised scoring does not pay for quantisation at every
//! start. The folder holds `model.gguf` (see [`qalign_model::gguf`]) beside the base's config,
//! tokenizer and preprocessor files.

use std::path::Path;
use std::sync::Arc;

use qalign_model::adapter::Adapter;
use qalign_model::{GGUF_FILE, GgufSummary, LoadObserver, LoadOptions, OneAlignModel, Quant};

use crate::error::Result;
use crate::save;

/// A quantised folder: `model.gguf` beside the base's companion files.
pub const QUANTIZED: save::OutputFolder = save::OutputFolder {
    what: "the quantised model",
    files: &[GGUF_FILE],
};

/// Quantises the checkpoint of `base_dir` to `quant` (with `adapter_dir` merged first) and writes
/// `out` (replaced atomically: a failure leaves no half-written folder; see
/// [`save::check_output_folder`] for what it may already hold). `source` is recorded in
/// the file's metadata (the model id or folder the user named); `on_progress` hears the layers as
/// they are read and quantised.
pub fn quantize_dir(
    base_dir: &Path,
    out: &Path,
    quant: Quant,
    adapter_dir: Option<&Path>,
    source: &str,
    on_progress: Option<LoadObserver>,
) -> Result<GgufSummary> {
    save::check_model_output(out, base_dir, &QUANTIZED)?;
    let adaptation = match adapter_dir {
        Some(dir) => Some(Arc::new(Adapter::load(dir)?.merged_adaptation())),
        None => None,
    };
    let opts = LoadOptions {
        adaptation,
        on_progress,
        ..LoadOptions::default()
    };
    let mut summary = None;
    save::write_dir_atomic(out, &QUANTIZED, |dir| {
        save::copy_companions(base_dir, dir)?;
        summary = Some(OneAlignModel::write_quantized(
            base_dir, &opts, quant, dir, source,
        )?);
        Ok(())
    })?;
    let mut summary = summary.expect("write_dir_atomic ran the fill");
    summary.path = out.join(GGUF_FILE);
    Ok(summary)
}
