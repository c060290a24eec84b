//! Writing what training produces without ever leaving a half-written result: LoRA adapters in the
//! official layout (see [`qalign_model::adapter`]), full checkpoints that `qalign score --model` loads,
//! and resumable checkpoints. Every file goes through a temporary file and a rename; a checkpoint folder
//! is assembled under a temporary name and renamed into place; a final adapter's `adapter_config.json`
//! (the file loaders look for) is removed first and written last.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use qalign_model::adapter::{
    ADAPTER_CONFIG, ADAPTER_SAFETENSORS, AdapterConfig, NON_LORA_TRAINABLES, lora_key, non_lora_key,
};
use qalign_model::{Param, WeightFormat, WeightStore};

use crate::error::{Result, TrainError};
use crate::torch_pickle::{StorageDtype, TensorEntry, save_state_dict};

/// Model-folder files copied next to trained weights so the folder is self-describing.
const COMPANION_FILES: [&str; 6] = [
    "config.json",
    "preprocessor_config.json",
    "generation_config.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

fn write_err(path: &Path) -> impl Fn(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Write {
        path: path.to_owned(),
        source,
    }
}

/// Writes `bytes` to `path` through a temporary file in the same folder.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    qalign_core::atomic::write_bytes_atomic(path, bytes).map_err(write_err(path))
}

fn save_safetensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    qalign_core::atomic::write_atomic(path, |_, tmp| {
        candle_core::safetensors::save(tensors, tmp).map_err(std::io::Error::other)
    })
    .map_err(write_err(path))
}

/// A CPU copy of every trainable tensor, by name, in `dtype`; `masters` (f32 copies kept by a
/// mixed-precision optimizer) win over the model's own lower-precision values.
fn snapshot(
    params: &[Param],
    masters: &HashMap<String, Tensor>,
    dtype: DType,
) -> Result<HashMap<String, Tensor>> {
    params
        .iter()
        .map(|p| {
            let t = masters.get(&p.name).unwrap_or(p.var.as_tensor());
            Ok((p.name.clone(), t.to_device(&Device::Cpu)?.to_dtype(dtype)?))
        })
        .collect()
}

fn is_lora(name: &str) -> bool {
    name.ends_with(".lora_A.weight") || name.ends_with(".lora_B.weight")
}

/// The files of a LoRA adapter (f32 tensors), written into `dir` (which must exist).
pub fn write_adapter(
    dir: &Path,
    config: &AdapterConfig,
    params: &[Param],
    masters: &HashMap<String, Tensor>,
    model_dir: &Path,
) -> Result<()> {
    let config_path = dir.join(ADAPTER_CONFIG);
    if config_path.exists() {
        std::fs::remove_file(&config_path).map_err(write_err(&config_path))?;
    }
    let tensors = snapshot(params, masters, DType::F32)?;
    let mut lora = HashMap::new();
    let mut others: Vec<(&String, &Tensor)> = Vec::new();
    for (name, t) in &tensors {
        if is_lora(name) {
            let (module, matrix) = name
                .strip_suffix(".weight")
                .and_then(|n| n.rsplit_once(".lora_"))
                .ok_or_else(|| TrainError::Internal(format!("bad LoRA name {name}")))?;
            lora.insert(lora_key(module, matrix), t.clone());
        } else {
            others.push((name, t));
        }
    }
    save_safetensors(&dir.join(ADAPTER_SAFETENSORS), &lora)?;
    others.sort_by(|a, b| a.0.cmp(b.0));
    let keys: Vec<String> = others.iter().map(|(n, _)| non_lora_key(n)).collect();
    let data: Vec<Vec<u8>> = others
        .iter()
        .map(|(_, t)| f32_bytes(t))
        .collect::<Result<_>>()?;
    let dims: Vec<Vec<usize>> = others.iter().map(|(_, t)| t.dims().to_vec()).collect();
    let entries: Vec<TensorEntry> = keys
        .iter()
        .zip(&data)
        .zip(&dims)
        .map(|((name, data), shape)| TensorEntry {
            name,
            dtype: StorageDtype::F32,
            shape,
            data,
        })
        .collect();
    save_state_dict(&dir.join(NON_LORA_TRAINABLES), &entries)?;
    copy_companions(model_dir, dir)?;
    let json =
        serde_json::to_vec_pretty(config).map_err(|e| TrainError::Internal(e.to_string()))?;
    write_atomic(&config_path, &json)
}

fn f32_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let values: Vec<f32> = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
    Ok(values.iter().flat_map(|v| v.to_le_bytes()).collect())
}

/// A full checkpoint (`model.safetensors` + the model folder's config and tokenizer files): the trained
/// tensors in the compute dtype, plus every checkpoint tensor that is not a parameter (the fixed
/// position tables), read from the base model.
pub fn write_full(
    dir: &Path,
    params: &[Param],
    masters: &HashMap<String, Tensor>,
    model_dir: Option<&Path>,
) -> Result<()> {
    let dtype = params.first().map_or(DType::F32, |p| p.var.dtype());
    let mut tensors = snapshot(params, masters, dtype)?;
    if let Some(model_dir) = model_dir {
        let store = WeightStore::open_dir(model_dir, WeightFormat::Auto)?;
        for key in store.keys() {
            if !tensors.contains_key(key)
                && let Some((shape, dtype)) = store.entry(key)
            {
                let shape = shape.to_vec();
                tensors.insert(
                    key.to_owned(),
                    store.load(key, &shape, dtype, &Device::Cpu)?,
                );
            }
        }
    }
    write_checkpoint(dir, &tensors, model_dir)
}

/// `model.safetensors` from `tensors`, plus the companion files of `model_dir`.
pub fn write_checkpoint(
    dir: &Path,
    tensors: &HashMap<String, Tensor>,
    model_dir: Option<&Path>,
) -> Result<()> {
    if let Some(model_dir) = model_dir {
        copy_companions(model_dir, dir)?;
    }
    save_safetensors(&dir.join("model.safetensors"), tensors)
}

/// Copies the base model's configuration, tokenizer and preprocessor files into `to`.
pub fn copy_companions(from: &Path, to: &Path) -> Result<()> {
    for name in COMPANION_FILES {
        let src = from.join(name);
        if src.is_file() {
            let bytes = std::fs::read(&src).map_err(|source| TrainError::Io {
                path: src.clone(),
                source,
            })?;
            write_atomic(&to.join(name), &bytes)?;
        }
    }
    Ok(())
}

/// The folder `path` names once it exists: its canonical form, or its parent's plus its name.
fn resolved(path: &Path) -> Option<PathBuf> {
    if let Ok(p) = path.canonicalize() {
        return Some(p);
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    Some(parent.canonicalize().ok()?.join(path.file_name()?))
}

/// Refuses an output folder that is the input model folder (which [`write_dir_atomic`] would
/// replace); `what` names the output in the message.
pub fn refuse_replacing(out: &Path, model_dir: &Path, what: &str) -> Result<()> {
    if resolved(out).is_some_and(|o| Some(o) == resolved(model_dir)) {
        return Err(TrainError::Overwrite(format!(
            "the output folder {} is the model folder; write {what} elsewhere",
            out.display()
        )));
    }
    Ok(())
}

/// Builds a folder under a temporary name next to `dest` with `fill`, then renames it to `dest`
/// (replacing an older one).
pub fn write_dir_atomic(dest: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(write_err(parent))?;
    let tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempdir_in(parent)
        .map_err(write_err(dest))?;
    fill(tmp.path())?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))
            .map_err(write_err(dest))?;
    }
    // An older folder is moved aside first and deleted only once the new one is in place.
    let old = if dest.exists() {
        let aside = tempfile::Builder::new()
            .prefix(".old-")
            .tempdir_in(parent)
            .map_err(write_err(dest))?
            .keep();
        let aside = aside.join("previous");
        std::fs::rename(dest, &aside).map_err(write_err(dest))?;
        Some(aside)
    } else {
        None
    };
    let tmp_path: PathBuf = tmp.keep();
    std::fs::rename(&tmp_path, dest).map_err(write_err(dest))?;
    if let Some(old) = old
        && let Some(holder) = old.parent()
    {
        let _ = std::fs::remove_dir_all(holder);
    }
    Ok(())
}

/// Saves the optimizer state (a safetensors file).
pub fn write_optimizer(dir: &Path, state: &HashMap<String, Tensor>) -> Result<()> {
    let cpu = state
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_device(&Device::Cpu)?)))
        .collect::<Result<HashMap<_, _>>>()?;
    save_safetensors(&dir.join("optimizer.safetensors"), &cpu)
}
