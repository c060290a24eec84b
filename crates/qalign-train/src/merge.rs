//! `qalign merge`: bakes a LoRA adapter into its base, W' = W + s·B·A (s = alpha/r per module, as PEFT
//! computes it: see `AdapterConfig::module_scale`) with the adapter's other tensors replacing the base's,
//! and writes a plain safetensors checkpoint that loads (and scores) without the adapter, exactly as the
//! official `merge_and_unload` does.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device};
use qalign_model::adapter::Adapter;
use qalign_model::{ModelConfig, WeightFormat, WeightStore, Weights};

use crate::error::Result;
use crate::save;

/// What a merge wrote.
#[derive(Debug, Clone)]
pub struct MergeSummary {
    pub tensors: usize,
    pub merged_modules: usize,
    pub replaced_tensors: usize,
}

/// Merges `adapter_dir` into the checkpoint of `base_dir` and writes `out` (replaced atomically; see
/// [`save::check_output_folder`] for what it may already hold). Tensors keep their stored dtype unless
/// `dtype` is given.
pub fn merge_adapter(
    base_dir: &Path,
    adapter_dir: &Path,
    out: &Path,
    dtype: Option<DType>,
) -> Result<MergeSummary> {
    // Before any work: the output folder, then a config that scoring would refuse (a checkpoint
    // that cannot be loaded is no result).
    save::check_model_output(out, base_dir, &save::MERGED)?;
    ModelConfig::from_file(&base_dir.join("config.json"))?;
    let adapter = Adapter::load(adapter_dir)?;
    let adaptation = Arc::new(adapter.merged_adaptation());
    let store = Arc::new(WeightStore::open_dir(base_dir, WeightFormat::Auto)?);
    let root = Weights::new(store.clone(), DType::F32, Device::Cpu)
        .with_adaptation(Some(adaptation.clone()));
    let mut tensors = HashMap::new();
    for key in store.keys() {
        let Some((shape, stored)) = store.entry(key) else {
            continue;
        };
        let shape = shape.to_vec();
        let t = root.get_as(&shape, key, dtype.unwrap_or(stored))?;
        tensors.insert(key.to_owned(), t);
    }
    adaptation.check_all_used()?;
    let summary = MergeSummary {
        tensors: tensors.len(),
        merged_modules: adapter.lora.len(),
        replaced_tensors: adapter.non_lora.len(),
    };
    save::write_dir_atomic(out, &save::MERGED, |dir| {
        save::write_checkpoint(dir, &tensors, Some(base_dir))
    })?;
    Ok(summary)
}
