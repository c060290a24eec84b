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
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom};
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
        // candle's reader divides by the declared alignment unchecked: a 0 would panic.
        if declared_alignment(&mut reader, len) == Some(0) {
            return Err(bad(
                "not a readable GGUF file: its `general.alignment` is 0".into(),
            ));
        }
        reader
            .seek(SeekFrom::Start(0))
            .map_err(|source| ModelError::Io {
                path: path.to_owned(),
                source,
            })?;
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
            // The dimensions are the file's: their product may overflow.
            let elems = info
                .shape
                .dims()
                .iter()
                .try_fold(1u64, |n, &d| n.checked_mul(d as u64));
            let block = info.ggml_dtype.block_size().max(1) as u64;
            let end = elems
                .filter(|elems| elems.is_multiple_of(block))
                .and_then(|elems| (elems / block).checked_mul(info.ggml_dtype.type_size() as u64))
                .and_then(|bytes| {
                    content
                        .tensor_data_offset
                        .checked_add(info.offset)?
                        .checked_add(bytes)
                });
            if end.is_none_or(|end| end > len) {
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

/// The `general.alignment` of a GGUF header, if it declares an integer one, found by walking the
/// metadata without allocating (every length is checked against the file's `len`). `None` also
/// for a header too broken to walk: candle's reader then says what is wrong with it.
fn declared_alignment<R: Read + Seek>(r: &mut R, len: u64) -> Option<u64> {
    fn u32_of<R: Read>(r: &mut R) -> Option<u32> {
        let mut b = [0u8; 4];
        r.read_exact(&mut b).ok()?;
        Some(u32::from_le_bytes(b))
    }
    fn u64_of<R: Read>(r: &mut R) -> Option<u64> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b).ok()?;
        Some(u64::from_le_bytes(b))
    }
    /// A count or string length: u32 in GGUF v1, u64 since.
    fn length<R: Read>(r: &mut R, v1: bool) -> Option<u64> {
        if v1 {
            u32_of(r).map(u64::from)
        } else {
            u64_of(r)
        }
    }
    /// Skips `n` bytes, refusing to pass the end of the file.
    fn skip<R: Read + Seek>(r: &mut R, n: u64, len: u64) -> Option<()> {
        let at = r.stream_position().ok()?;
        (at.checked_add(n)? <= len).then_some(())?;
        r.seek(SeekFrom::Current(i64::try_from(n).ok()?)).ok()?;
        Some(())
    }
    /// The byte size of a scalar value type (GGUF's numbering), `None` for strings and arrays.
    fn scalar_size(t: u32) -> Option<u64> {
        match t {
            0 | 1 | 7 => Some(1),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        }
    }
    fn skip_value<R: Read + Seek>(
        r: &mut R,
        t: u32,
        v1: bool,
        len: u64,
        depth: usize,
    ) -> Option<()> {
        if let Some(size) = scalar_size(t) {
            return skip(r, size, len);
        }
        match t {
            8 => {
                let n = length(r, v1)?;
                skip(r, n, len)
            }
            9 if depth <= 64 => {
                let (inner, n) = (u32_of(r)?, length(r, v1)?);
                match scalar_size(inner) {
                    Some(size) => skip(r, n.checked_mul(size)?, len),
                    None => {
                        // Each element takes at least a byte: a count past the file is corrupt.
                        (n <= len).then_some(())?;
                        (0..n).try_for_each(|_| skip_value(r, inner, v1, len, depth + 1))
                    }
                }
            }
            _ => None,
        }
    }
    let mut magic = [0u8; 4];
    r.read_exact(&mut magic).ok()?;
    let v1 = u32_of(r)? == 1;
    let _tensors = length(r, v1)?;
    let kvs = length(r, v1)?;
    (kvs <= len).then_some(())?;
    // As candle reads it: the last entry of that key wins, and keys lose trailing NULs.
    let mut alignment = None;
    for _ in 0..kvs {
        let key_len = length(r, v1)?;
        let mut key = [0u8; 64];
        let is_alignment = if key_len <= key.len() as u64 {
            let key = &mut key[..key_len as usize];
            r.read_exact(key).ok()?;
            let end = key.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
            &key[..end] == b"general.alignment"
        } else {
            skip(r, key_len, len)?;
            false
        };
        let t = u32_of(r)?;
        if is_alignment {
            alignment = None;
            if matches!(t, 0..=5) {
                let mut b = [0u8; 4];
                r.read_exact(&mut b[..scalar_size(t)? as usize]).ok()?;
                alignment = Some(u64::from(u32::from_le_bytes(b)));
                continue;
            }
        }
        skip_value(r, t, v1, len, 0)?;
    }
    alignment
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

    /// A GGUF v3 header: `kvs` metadata entries (already encoded), then `tensors` tensor infos.
    fn header(kvs: &[Vec<u8>], tensors: &[Vec<u8>]) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend((tensors.len() as u64).to_le_bytes());
        b.extend((kvs.len() as u64).to_le_bytes());
        b.extend(kvs.concat());
        b.extend(tensors.concat());
        b
    }

    fn string(s: &[u8]) -> Vec<u8> {
        let mut b = (s.len() as u64).to_le_bytes().to_vec();
        b.extend(s);
        b
    }

    fn kv_string(key: &[u8], value: &str) -> Vec<u8> {
        let mut b = string(key);
        b.extend(8u32.to_le_bytes());
        b.extend(string(value.as_bytes()));
        b
    }

    fn kv_u32(key: &[u8], value: u32) -> Vec<u8> {
        let mut b = string(key);
        b.extend(4u32.to_le_bytes());
        b.extend(value.to_le_bytes());
        b
    }

    /// The metadata every qalign GGUF carries.
    fn qalign_kvs() -> Vec<Vec<u8>> {
        vec![
            kv_string(KEY_LAYOUT.as_bytes(), LAYOUT),
            kv_string(KEY_QUANT.as_bytes(), "q4k"),
        ]
    }

    fn open_bytes(bytes: &[u8]) -> Result<GgufStore> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(GGUF_FILE);
        std::fs::write(&path, bytes).unwrap();
        GgufStore::open(&path)
    }

    #[test]
    fn a_zero_alignment_is_a_clear_error_not_a_panic() {
        // candle's reader divides by it; it used to panic ("attempt to divide by zero").
        let zero = |key: &[u8]| {
            let mut kvs = qalign_kvs();
            kvs.push(kv_u32(key, 0));
            header(&kvs, &[])
        };
        for bytes in [
            zero(b"general.alignment"),
            // candle drops a key's trailing NULs, and the last of two entries wins.
            zero(b"general.alignment\0"),
            header(
                &[
                    kv_u32(b"general.alignment", 32),
                    kv_string(b"other", "x"),
                    kv_u32(b"general.alignment", 0),
                ],
                &[],
            ),
        ] {
            let err = open_bytes(&bytes).unwrap_err();
            assert!(
                err.to_string().contains("`general.alignment` is 0"),
                "{err}"
            );
        }
        // A usable alignment, or a later entry that replaces the 0, reads as before.
        let mut kvs = qalign_kvs();
        kvs.push(kv_u32(b"general.alignment", 0));
        kvs.push(kv_u32(b"general.alignment", 64));
        let store = open_bytes(&header(&kvs, &[])).unwrap();
        assert_eq!((store.quant(), store.keys().len()), (Quant::Q4K, 0));
    }

    #[test]
    fn dimensions_whose_product_overflows_are_a_clear_error() {
        let mut info = string(b"x.weight");
        info.extend(3u32.to_le_bytes());
        for _ in 0..3 {
            info.extend((1u64 << 32).to_le_bytes());
        }
        info.extend(0u32.to_le_bytes()); // F32
        info.extend(0u64.to_le_bytes());
        let mut bytes = header(&qalign_kvs(), &[info]);
        bytes.resize(bytes.len() + 64, 0);
        let err = open_bytes(&bytes).unwrap_err();
        assert!(matches!(err, ModelError::WeightFile { .. }), "{err}");
        assert!(err.to_string().contains("tensor `x.weight`"), "{err}");
        assert!(err.to_string().contains("truncated or corrupt"), "{err}");
    }

    #[test]
    fn huge_declared_counts_and_lengths_are_refused_without_allocating() {
        let mut bytes = b"GGUF".to_vec();
        bytes.extend(3u32.to_le_bytes());
        bytes.extend((1u64 << 60).to_le_bytes());
        bytes.extend(2u64.to_le_bytes());
        bytes.extend(qalign_kvs().concat());
        let err = open_bytes(&bytes).unwrap_err();
        assert!(err.to_string().contains("not a readable GGUF"), "{err}");
        // A metadata string that claims 2^62 bytes.
        let mut bytes = header(&[], &[]);
        bytes[16..24].copy_from_slice(&1u64.to_le_bytes());
        bytes.extend(string(b"k"));
        bytes.extend(8u32.to_le_bytes());
        bytes.extend((1u64 << 62).to_le_bytes());
        bytes.extend(b"abc");
        let err = open_bytes(&bytes).unwrap_err();
        assert!(err.to_string().contains("not a readable GGUF"), "{err}");
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
