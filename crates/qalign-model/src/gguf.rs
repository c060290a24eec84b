//! Pre-quantised checkpoints: `qalign quantize` writes a model's quantised linear layers and its
//! other tensors into one GGUF file (the format of the llama.cpp / candle ecosystem), so that users
//! quantise once instead of at every start, and a later load reads ready blocks.
//!
//! The file is `model.gguf` in a folder beside `config.json`, the tokenizer and the preprocessor
//! files. Each linear layer is stored under `<layer name>.weight` exactly as the layer multiplies by
//! it: the vision QKV regrouped as q, k, v; the multiway K and V fused under the name
//! `...self_attn.{k,v}_proj.multiway.M` (the names of [`crate::QuantLayer`]); layers that fell back
//! to f32 as F32. Every other tensor (norms, biases, embeddings, `lm_head`) is stored as F32 under
//! its checkpoint key and layout. Metadata `qalign.layout` names this layout, so a GGUF written for
//! another program is refused rather than misread.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::device::Quant;
use crate::error::{ModelError, Result};

/// The file name of a pre-quantised checkpoint in a model folder.
pub const GGUF_FILE: &str = "model.gguf";
/// The value of `qalign.layout` this version writes and reads.
const LAYOUT: &str = "qalign-onealign-linear-v1";
const KEY_LAYOUT: &str = "qalign.layout";
const KEY_QUANT: &str = "qalign.quant";
const KEY_SOURCE: &str = "qalign.source";

/// What one linear layer multiplies by, as a quantised load leaves it.
#[derive(Debug, Clone)]
pub(crate) enum StoredKernel {
    Blocks(Arc<QTensor>),
    Dense(Tensor),
}

/// The kernels of a quantised load, kept for [`write`] (captured only when asked for).
#[derive(Debug, Default)]
pub(crate) struct KernelCapture {
    kernels: Mutex<Vec<(String, StoredKernel)>>,
}

impl KernelCapture {
    pub(crate) fn push(&self, name: &str, kernel: StoredKernel) {
        if let Ok(mut k) = self.kernels.lock() {
            k.push((name.to_owned(), kernel));
        }
    }

    fn take(&self) -> Vec<(String, StoredKernel)> {
        self.kernels
            .lock()
            .map(|mut k| std::mem::take(&mut *k))
            .unwrap_or_default()
    }
}

/// The keys a layer name stands for: `a.{k,v}_proj.m` → `a.k_proj.m`, `a.v_proj.m`.
fn expand_braces(name: &str) -> Vec<String> {
    match (name.find('{'), name.find('}')) {
        (Some(open), Some(close)) if open < close => name[open + 1..close]
            .split(',')
            .map(|alt| format!("{}{alt}{}", &name[..open], &name[close + 1..]))
            .collect(),
        _ => vec![name.to_owned()],
    }
}

/// An open `model.gguf`: its header, read once, and the file to read tensors from.
pub struct GgufStore {
    path: PathBuf,
    content: gguf_file::Content,
    file: Mutex<BufReader<File>>,
    quant: Quant,
}

impl std::fmt::Debug for GgufStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufStore")
            .field("path", &self.path)
            .field("tensors", &self.content.tensor_infos.len())
            .field("quant", &self.quant)
            .finish()
    }
}

impl GgufStore {
    /// Opens `path` and checks its header: a GGUF written by `qalign quantize`, every tensor's data
    /// inside the file.
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |message: String| ModelError::WeightFile {
            path: path.to_owned(),
            message,
        };
        let file = File::open(path).map_err(|source| ModelError::Io {
            path: path.to_owned(),
            source,
        })?;
        let len = file
            .metadata()
            .map_err(|source| ModelError::Io {
                path: path.to_owned(),
                source,
            })?
            .len();
        let mut reader = BufReader::new(file);
        let content = gguf_file::Content::read(&mut reader)
            .map_err(|e| bad(format!("not a readable GGUF file: {e}")))?;
        match content.metadata.get(KEY_LAYOUT) {
            Some(Value::String(layout)) if layout == LAYOUT => {}
            Some(Value::String(layout)) => {
                return Err(bad(format!(
                    "its tensor layout is `{layout}`; this qalign reads `{LAYOUT}` (re-run `qalign quantize`)"
                )));
            }
            _ => {
                return Err(bad(
                    "a GGUF file not written by `qalign quantize` (no `qalign.layout`)".into(),
                ));
            }
        }
        let quant = match content.metadata.get(KEY_QUANT) {
            Some(Value::String(q)) => q.parse::<Quant>().map_err(|e| bad(e.to_string()))?,
            _ => return Err(bad("no `qalign.quant` in its metadata".into())),
        };
        for (name, info) in &content.tensor_infos {
            let elems = info.shape.elem_count();
            let block = info.ggml_dtype.block_size();
            let bytes = (elems / block.max(1)) as u64 * info.ggml_dtype.type_size() as u64;
            let end = content
                .tensor_data_offset
                .checked_add(info.offset)
                .and_then(|start| start.checked_add(bytes));
            if !elems.is_multiple_of(block) || end.is_none_or(|end| end > len) {
                return Err(bad(format!(
                    "tensor `{name}` ({:?}, {:?}) lies beyond the end of the file ({len} bytes): the file is truncated or corrupt",
                    info.shape.dims(),
                    info.ggml_dtype
                )));
            }
        }
        Ok(Self {
            path: path.to_owned(),
            content,
            file: Mutex::new(reader),
            quant,
        })
    }

    /// The file this store reads.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The format `qalign quantize` was asked for.
    pub fn quant(&self) -> Quant {
        self.quant
    }

    /// Whether the file holds `key`.
    pub fn contains(&self, key: &str) -> bool {
        self.content.tensor_infos.contains_key(key)
    }

    /// Every tensor name, sorted.
    pub fn keys(&self) -> Vec<&str> {
        let mut keys: Vec<&str> = self
            .content
            .tensor_infos
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        keys
    }

    /// The shape and block format of `key`.
    pub fn entry(&self, key: &str) -> Option<(&[usize], GgmlDType)> {
        self.content
            .tensor_infos
            .get(key)
            .map(|info| (info.shape.dims(), info.ggml_dtype))
    }

    /// Reads `key` as stored, after checking that it has `shape`.
    fn read(&self, key: &str, shape: &[usize], device: &Device) -> Result<QTensor> {
        let Some(info) = self.content.tensor_infos.get(key) else {
            return Err(ModelError::MissingKey {
                key: key.to_owned(),
                file: self.path.clone(),
            });
        };
        if info.shape.dims() != shape {
            return Err(ModelError::ShapeMismatch {
                key: key.to_owned(),
                expected: shape.to_vec(),
                found: info.shape.dims().to_vec(),
                file: self.path.clone(),
            });
        }
        let mut file = self.file.lock().map_err(|_| ModelError::WeightFile {
            path: self.path.clone(),
            message: "the reader was poisoned by an earlier failure".into(),
        })?;
        info.read(&mut *file, self.content.tensor_data_offset, device)
            .map_err(|e| ModelError::WeightFile {
                path: self.path.clone(),
                message: format!("tensor `{key}`: {e}"),
            })
    }

    /// Reads a dense tensor (norms, biases, embeddings) in `dtype`.
    pub(crate) fn dense(
        &self,
        key: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let q = self.read(key, shape, &Device::Cpu)?;
        if !matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
            return Err(ModelError::WeightFile {
                path: self.path.clone(),
                message: format!("tensor `{key}` is {:?}, expected a dense F32", q.dtype()),
            });
        }
        Ok(q.dequantize(&Device::Cpu)?
            .to_device(device)?
            .to_dtype(dtype)?
            .contiguous()?)
    }

    /// Reads the weight of linear layer `name`, `[out, in]`: quantised blocks, or dense F32 for a
    /// layer that fell back.
    pub(crate) fn kernel(
        &self,
        name: &str,
        out_dim: usize,
        in_dim: usize,
        device: &Device,
    ) -> Result<StoredKernel> {
        let key = format!("{name}.weight");
        let q = self.read(&key, &[out_dim, in_dim], device)?;
        match q.dtype() {
            GgmlDType::F32 => Ok(StoredKernel::Dense(q.dequantize(device)?)),
            GgmlDType::Q8_0 | GgmlDType::Q4K => Ok(StoredKernel::Blocks(Arc::new(q))),
            other => Err(ModelError::WeightFile {
                path: self.path.clone(),
                message: format!("layer `{key}` is {other:?}; qalign writes Q8_0, Q4K or F32"),
            }),
        }
    }
}

/// Everything [`write`] needs: where the dense tensors come from, and the captured kernels.
pub(crate) struct Contents<'a> {
    /// Checkpoint keys with their shapes, in checkpoint order.
    pub(crate) keys: Vec<(String, Vec<usize>)>,
    /// Reads one checkpoint tensor as f32 (through the load's adaptation).
    pub(crate) read: &'a dyn Fn(&str, &[usize]) -> Result<Tensor>,
    pub(crate) kernels: &'a KernelCapture,
    pub(crate) quant: Quant,
    pub(crate) source: String,
}

/// What [`write`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufSummary {
    pub path: PathBuf,
    /// Linear layers written as blocks or F32.
    pub layers: usize,
    /// Other tensors, written as F32.
    pub dense: usize,
    pub bytes: u64,
}

/// Writes `model.gguf` into `out_dir` atomically (a temporary file renamed into place).
pub(crate) fn write(out_dir: &Path, contents: Contents<'_>) -> Result<GgufSummary> {
    let kernels = contents.kernels.take();
    let mut consumed = BTreeSet::new();
    let mut tensors: Vec<(String, Arc<QTensor>)> = Vec::new();
    for (name, kernel) in &kernels {
        for key in expand_braces(name) {
            consumed.insert(format!("{key}.weight"));
        }
        let q = match kernel {
            StoredKernel::Blocks(q) => q.clone(),
            StoredKernel::Dense(t) => Arc::new(QTensor::quantize(
                &t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?,
                GgmlDType::F32,
            )?),
        };
        tensors.push((format!("{name}.weight"), q));
    }
    let layers = tensors.len();
    let mut dense = 0;
    for (key, shape) in &contents.keys {
        if consumed.contains(key) {
            continue;
        }
        let t = (contents.read)(key, shape)?;
        let t = t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        tensors.push((
            key.clone(),
            Arc::new(QTensor::quantize(&t, GgmlDType::F32)?),
        ));
        dense += 1;
    }
    let path = out_dir.join(GGUF_FILE);
    let layout = Value::String(LAYOUT.into());
    let quant = Value::String(contents.quant.as_str().into());
    let source = Value::String(contents.source);
    let arch = Value::String("qalign-onealign".into());
    let metadata: Vec<(&str, &Value)> = vec![
        ("general.architecture", &arch),
        (KEY_LAYOUT, &layout),
        (KEY_QUANT, &quant),
        (KEY_SOURCE, &source),
    ];
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), &**t)).collect();
    qalign_core::atomic::write_atomic(&path, |file, _| {
        let mut w = BufWriter::with_capacity(1 << 20, file);
        gguf_file::write(&mut w, &metadata, &refs).map_err(std::io::Error::other)?;
        std::io::Write::flush(&mut w)
    })
    .map_err(|source| ModelError::Io {
        path: path.clone(),
        source,
    })?;
    let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    Ok(GgufSummary {
        path,
        layers,
        dense,
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn braces_expand_to_each_part() {
        assert_eq!(
            expand_braces("m.layers.0.self_attn.{k,v}_proj.multiway.1"),
            vec![
                "m.layers.0.self_attn.k_proj.multiway.1",
                "m.layers.0.self_attn.v_proj.multiway.1"
            ]
        );
        assert_eq!(expand_braces("a.b"), vec!["a.b"]);
    }

    #[test]
    fn a_file_that_is_not_gguf_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(GGUF_FILE);
        std::fs::write(&path, b"not a gguf at all").unwrap();
        let err = GgufStore::open(&path).unwrap_err();
        assert!(matches!(err, ModelError::WeightFile { .. }), "{err}");
        assert!(err.to_string().contains("not a readable GGUF"), "{err}");
    }
}
