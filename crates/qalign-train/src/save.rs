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
pub const COMPANION_FILES: [&str; 6] = [
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

/// The header metadata `save_pretrained` writes. transformers' loader (4.36, the version the
/// official code pins) reads `__metadata__["format"]` and fails on a file without it.
fn safetensors_metadata() -> HashMap<String, String> {
    HashMap::from([("format".to_string(), "pt".to_string())])
}

/// safetensors writes the file by path (its own owner-only temporary file renamed over `tmp`);
/// [`qalign_core::atomic::write_atomic`] then gives it an ordinary mode and syncs it.
fn save_safetensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    qalign_core::atomic::write_atomic(path, |_, tmp| {
        // For a device or pipe, `tmp` is the destination itself, which would be replaced.
        if !std::fs::metadata(tmp)?.is_file() {
            return Err(std::io::Error::other(
                "not a regular file (safetensors are only written to files)",
            ));
        }
        safetensors::serialize_to_file(tensors, Some(safetensors_metadata()), tmp)
            .map_err(std::io::Error::other)
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

/// The weights file of a checkpoint folder.
pub const MODEL_SAFETENSORS: &str = "model.safetensors";
/// The optimizer state of a training checkpoint.
pub const OPTIMIZER_SAFETENSORS: &str = "optimizer.safetensors";

/// A folder a command writes whole with [`write_dir_atomic`]: what messages call it, and the
/// files it writes besides the base's [`COMPANION_FILES`]. Together they are all an earlier run
/// of the same command can have left there.
#[derive(Debug, Clone, Copy)]
pub struct OutputFolder {
    pub what: &'static str,
    pub files: &'static [&'static str],
}

impl OutputFolder {
    fn owns(&self, name: &std::ffi::OsStr) -> bool {
        self.files
            .iter()
            .chain(&COMPANION_FILES)
            .any(|f| name == *f)
    }
}

/// A checkpoint folder as [`write_checkpoint`] writes it (`qalign merge`).
pub const MERGED: OutputFolder = OutputFolder {
    what: "the merged model",
    files: &[MODEL_SAFETENSORS],
};

/// `model.safetensors` from `tensors`, plus the companion files of `model_dir`.
pub fn write_checkpoint(
    dir: &Path,
    tensors: &HashMap<String, Tensor>,
    model_dir: Option<&Path>,
) -> Result<()> {
    if let Some(model_dir) = model_dir {
        copy_companions(model_dir, dir)?;
        set_torch_dtype(&dir.join("config.json"), tensors)?;
    }
    save_safetensors(&dir.join(MODEL_SAFETENSORS), tensors)
}

/// Makes `config.json`'s `torch_dtype` name the dtype most of the written parameters have, as
/// `save_pretrained` does (f32 weights trained from a bf16 base would otherwise load as bf16
/// under `torch_dtype="auto"`). A config that already says so is left byte for byte.
fn set_torch_dtype(config_path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let mut elements: HashMap<DType, usize> = HashMap::new();
    for t in tensors.values() {
        *elements.entry(t.dtype()).or_default() += t.elem_count();
    }
    let Some(name) =
        elements
            .into_iter()
            .max_by_key(|&(_, n)| n)
            .and_then(|(dtype, _)| match dtype {
                DType::F32 => Some("float32"),
                DType::F16 => Some("float16"),
                DType::BF16 => Some("bfloat16"),
                _ => None,
            })
    else {
        return Ok(());
    };
    let Ok(text) = std::fs::read(config_path) else {
        return Ok(());
    };
    let Ok(serde_json::Value::Object(mut config)) = serde_json::from_slice(&text) else {
        return Ok(());
    };
    if config.get("torch_dtype").and_then(|v| v.as_str()) == Some(name) {
        return Ok(());
    }
    config.insert("torch_dtype".into(), name.into());
    let json =
        serde_json::to_vec_pretty(&config).map_err(|e| TrainError::Internal(e.to_string()))?;
    write_atomic(config_path, &json)
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

/// Refuses an output folder that is the model folder or contains it (writing there would replace
/// or mix with the model the command reads); `what` names the output in the message. The one
/// check of this kind, shared by `train`, `merge` and `quantize`.
pub fn refuse_model_folder(out: &Path, model_dir: &Path, what: &str) -> Result<()> {
    let (Some(out_real), Some(model_real)) = (resolved(out), resolved(model_dir)) else {
        return Ok(());
    };
    if out_real == model_real {
        return Err(TrainError::Overwrite(format!(
            "the output folder {} is the model folder; write {what} elsewhere",
            out.display()
        )));
    }
    if model_real.starts_with(&out_real) {
        return Err(TrainError::Overwrite(format!(
            "the output folder {} contains the model folder {}; write {what} elsewhere",
            out.display(),
            model_dir.display()
        )));
    }
    Ok(())
}

/// Checks that `out` may be replaced through [`write_dir_atomic`] by a folder of kind `kind`: it
/// must not exist, or be a folder that is empty or holds nothing but files `kind` owns (what an
/// earlier run of the same command wrote). Anything else is refused before any work, since
/// replacing the folder would delete it.
pub fn check_output_folder(out: &Path, kind: &OutputFolder) -> Result<()> {
    let what = kind.what;
    let meta = match std::fs::metadata(out) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // A dangling link would be replaced by the folder: refuse it too.
            if std::fs::symlink_metadata(out).is_ok() {
                return Err(TrainError::Overwrite(format!(
                    "the output {} is a broken symbolic link; write {what} to a new or empty folder",
                    out.display()
                )));
            }
            return Ok(());
        }
        Err(source) => {
            return Err(TrainError::Io {
                path: out.to_owned(),
                source,
            });
        }
    };
    if !meta.is_dir() {
        return Err(TrainError::Overwrite(format!(
            "the output {} exists and is not a folder; write {what} to a new or empty folder",
            out.display()
        )));
    }
    let io_err = |source| TrainError::Io {
        path: out.to_owned(),
        source,
    };
    let mut foreign = Vec::new();
    for entry in std::fs::read_dir(out).map_err(io_err)? {
        let entry = entry.map_err(io_err)?;
        let name = entry.file_name();
        let is_dir = entry.file_type().map_err(io_err)?.is_dir();
        // A folder is never ours, even under one of our file names.
        if is_dir || !kind.owns(&name) {
            foreign.push(name.to_string_lossy().into_owned());
        }
    }
    if foreign.is_empty() {
        return Ok(());
    }
    foreign.sort();
    const SHOWN: usize = 3;
    let mut list = foreign[..foreign.len().min(SHOWN)].join(", ");
    if foreign.len() > SHOWN {
        list.push_str(&format!(" and {} more", foreign.len() - SHOWN));
    }
    Err(TrainError::Overwrite(format!(
        "the output folder {} is not empty and holds files that {what} does not write ({list}); \
         it would be replaced, so write to a new or empty folder",
        out.display()
    )))
}

/// Both checks an output folder of `merge` or `quantize` takes before any work:
/// [`refuse_model_folder`], then [`check_output_folder`].
pub fn check_model_output(out: &Path, model_dir: &Path, kind: &OutputFolder) -> Result<()> {
    refuse_model_folder(out, model_dir, kind.what)?;
    check_output_folder(out, kind)
}

/// Builds a folder under a temporary name next to `dest` with `fill`, then renames it to `dest`,
/// replacing an older one only if [`check_output_folder`] accepts it for `kind`, both before the
/// work and again just before the swap (so nothing added meanwhile is deleted). A `dest` that is
/// a symbolic link to a folder replaces the folder it points to, so the link stays.
pub fn write_dir_atomic(
    dest: &Path,
    kind: &OutputFolder,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    check_output_folder(dest, kind)?;
    let linked;
    let dest = match std::fs::symlink_metadata(dest) {
        Ok(meta) if meta.file_type().is_symlink() => {
            linked = dest.canonicalize().map_err(write_err(dest))?;
            linked.as_path()
        }
        _ => dest,
    };
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(parent).map_err(write_err(parent))?;
    // The temporary folder is named after `dest`, so that what a killed run left half-built for
    // it is found and removed here (a folder moved aside as `.old-*` is kept: it may be all that
    // is left of the previous output).
    let name = dest.file_name().map_or_else(
        || "output".to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let prefix = format!(".{name}.tmp-");
    if let Ok(entries) = std::fs::read_dir(parent) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix)
                && entry.file_type().is_ok_and(|t| t.is_dir())
            {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let tmp = tempfile::Builder::new()
        .prefix(&prefix)
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
    check_output_folder(dest, kind)?;
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
    save_safetensors(&dir.join(OPTIMIZER_SAFETENSORS), &cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_folder_replaces_only_what_the_same_output_wrote() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let own = OutputFolder {
            what: "the test output",
            files: &["a.bin", "b.json"],
        };
        let write = |bytes: &'static [u8]| {
            write_dir_atomic(&out, &own, |dir| write_atomic(&dir.join("a.bin"), bytes))
        };
        write(b"1").unwrap();
        std::fs::write(out.join("b.json"), "{}").unwrap();
        write(b"2").unwrap();
        assert_eq!(names(&out), ["a.bin"]);
        assert_eq!(std::fs::read(out.join("a.bin")).unwrap(), b"2");
        // A file that appears while the new folder is being built is not deleted.
        let err = write_dir_atomic(&out, &own, |dir| {
            std::fs::write(out.join("notes.txt"), "mine").unwrap();
            write_atomic(&dir.join("a.bin"), b"3")
        })
        .unwrap_err();
        assert!(err.to_string().contains("(notes.txt)"), "{err}");
        assert_eq!(names(&out), ["a.bin", "notes.txt"]);
        assert_eq!(std::fs::read(out.join("a.bin")).unwrap(), b"2");
        assert_eq!(names(tmp.path()), ["out"], "no temporary folder left");
    }

    #[test]
    fn what_a_killed_write_left_half_built_is_removed_by_the_next() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let own = OutputFolder {
            what: "the test output",
            files: &["a.bin"],
        };
        // As a run killed while filling its temporary folder leaves it; and the folder another
        // output's run is building, and a previous output moved aside, which both stay.
        for left in [".out.tmp-x1", ".other.tmp-x2", ".old-x3"] {
            std::fs::create_dir_all(tmp.path().join(left)).unwrap();
            std::fs::write(tmp.path().join(left).join("a.bin"), "partial").unwrap();
        }
        write_dir_atomic(&out, &own, |dir| write_atomic(&dir.join("a.bin"), b"1")).unwrap();
        assert_eq!(names(tmp.path()), [".old-x3", ".other.tmp-x2", "out"]);
    }

    #[test]
    fn safetensors_carry_the_metadata_transformers_checks() {
        let tmp = tempfile::tempdir().unwrap();
        let t = Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        write_checkpoint(tmp.path(), &HashMap::from([("w".to_string(), t)]), None).unwrap();
        let bytes = std::fs::read(tmp.path().join(MODEL_SAFETENSORS)).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(meta.metadata(), &Some(safetensors_metadata()));
        assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
    }

    #[test]
    fn config_torch_dtype_follows_the_written_weights() {
        let base = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/tiny-onealign"
        ));
        let base_config = std::fs::read(base.join("config.json")).unwrap();
        let tensors = |dtype: DType| {
            let big = Tensor::zeros((4, 4), dtype, &Device::Cpu).unwrap();
            let small = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
            HashMap::from([("big".to_string(), big), ("small".to_string(), small)])
        };
        // Mostly bf16, as the base says: the config is copied byte for byte.
        let tmp = tempfile::tempdir().unwrap();
        write_checkpoint(tmp.path(), &tensors(DType::BF16), Some(base)).unwrap();
        assert_eq!(
            std::fs::read(tmp.path().join("config.json")).unwrap(),
            base_config
        );
        // f32 weights (full SFT on the CPU): the config says float32, the rest unchanged.
        let tmp = tempfile::tempdir().unwrap();
        write_checkpoint(tmp.path(), &tensors(DType::F32), Some(base)).unwrap();
        let read = |bytes: &[u8]| serde_json::from_slice::<serde_json::Value>(bytes).unwrap();
        let written = read(&std::fs::read(tmp.path().join("config.json")).unwrap());
        let mut want = read(&base_config);
        want["torch_dtype"] = "float32".into();
        assert_eq!(written, want);
    }

    #[test]
    fn the_model_folder_and_its_ancestors_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let model = tmp.path().join("models/base");
        std::fs::create_dir_all(&model).unwrap();
        for out in [
            model.clone(),
            model.join("."),
            tmp.path().join("models"),
            tmp.path().to_owned(),
        ] {
            let err = refuse_model_folder(&out, &model, "it").unwrap_err();
            assert!(err.to_string().contains("model folder"), "{err}");
        }
        for out in [
            model.join("lora"),
            tmp.path().join("models/base2"),
            tmp.path().join("elsewhere/x"),
        ] {
            refuse_model_folder(&out, &model, "it").unwrap();
        }
    }
}
