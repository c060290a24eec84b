//! Checkpoint loading: finds the weight files of a Hugging Face model folder (one or sharded safetensors,
//! one or sharded PyTorch zip pickles), and hands out tensors by key with the shape checked against the
//! configuration and the dtype converted one tensor at a time, so a 16 GB bf16 checkpoint never sits in
//! memory twice. Errors name the key, the expected and found shapes and the file.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::pickle::PthTensors;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::adapt::{Adaptation, LoraBranch};
use crate::error::{ModelError, Result};
use crate::gguf::{GgufStore, StoredKernel};
use crate::model::{LoadObserver, LoadProgress};
use crate::quant::QuantLog;

mod pickle_guard;

const SAFETENSORS_SINGLE: &str = "model.safetensors";
const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";
const PYTORCH_SINGLE: &str = "pytorch_model.bin";
const PYTORCH_INDEX: &str = "pytorch_model.bin.index.json";

/// Which checkpoint layout to read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WeightFormat {
    /// Safetensors when present, else PyTorch `.bin`.
    #[default]
    Auto,
    /// `model.safetensors` or `model.safetensors.index.json` + shards.
    Safetensors,
    /// `pytorch_model.bin` or `pytorch_model.bin.index.json` + shards.
    PytorchBin,
}

/// The weight files of a model folder, in the order they are opened.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointFiles {
    /// [`WeightFormat::Safetensors`] or [`WeightFormat::PytorchBin`], never `Auto`.
    pub format: WeightFormat,
    /// The shard index (`*.index.json`), when the checkpoint is sharded.
    pub index: Option<PathBuf>,
    /// The tensor files.
    pub shards: Vec<PathBuf>,
}

/// A `*.index.json` shard index: which file of a sharded checkpoint holds each tensor. Read once per
/// load; the hub resolver uses the same type to know which shards to fetch.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ShardIndex {
    /// Tensor key → shard file name (a plain file name in the index's folder).
    pub weight_map: HashMap<String, String>,
}

impl ShardIndex {
    /// Reads and checks an index: valid JSON with a non-empty `weight_map` whose values are plain
    /// file names (no folder part, so a hostile index cannot point outside its folder).
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_owned(),
            source,
        })?;
        let index: Self = serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: path.to_owned(),
            source,
        })?;
        let bad = |message: String| ModelError::WeightFile {
            path: path.to_owned(),
            message,
        };
        if index.weight_map.is_empty() {
            return Err(bad("weight_map is empty".to_owned()));
        }
        if let Some(name) = index
            .shard_names()
            .into_iter()
            .find(|n| !is_plain_file_name(n))
        {
            return Err(bad(format!(
                "shard name {name:?} is not a plain file name in the index's folder"
            )));
        }
        Ok(index)
    }

    /// The distinct shard file names, sorted.
    pub fn shard_names(&self) -> Vec<&str> {
        let names: BTreeSet<&str> = self.weight_map.values().map(String::as_str).collect();
        names.into_iter().collect()
    }

    /// The shard files next to the index at `index_path`, each checked to exist.
    fn shard_paths(&self, index_path: &Path) -> Result<Vec<PathBuf>> {
        let dir = index_path.parent().unwrap_or(Path::new("."));
        self.shard_names()
            .into_iter()
            .map(|name| {
                let path = dir.join(name);
                if path.is_file() {
                    Ok(path)
                } else {
                    Err(ModelError::Io {
                        path,
                        source: std::io::Error::new(
                            std::io::ErrorKind::NotFound,
                            format!("shard listed in {} is missing", index_path.display()),
                        ),
                    })
                }
            })
            .collect()
    }
}

/// One normal path component: not empty, no separator, not `.` or `..`.
fn is_plain_file_name(name: &str) -> bool {
    let mut components = Path::new(name).components();
    matches!(
        (components.next(), components.next()),
        (Some(std::path::Component::Normal(n)), None) if n == name
    ) && !name.contains(['/', '\\'])
}

impl CheckpointFiles {
    /// Looks for a checkpoint of the requested format in `dir`. A shard index wins over a single file.
    pub fn discover(dir: &Path, format: WeightFormat) -> Result<Self> {
        Ok(discover(dir, format)?.0)
    }
}

/// [`CheckpointFiles::discover`], also handing back the parsed shard index so it is read once.
fn discover(dir: &Path, format: WeightFormat) -> Result<(CheckpointFiles, Option<ShardIndex>)> {
    let candidates: &[WeightFormat] = match format {
        WeightFormat::Auto => &[WeightFormat::Safetensors, WeightFormat::PytorchBin],
        WeightFormat::Safetensors => &[WeightFormat::Safetensors],
        WeightFormat::PytorchBin => &[WeightFormat::PytorchBin],
    };
    let mut looked_for = Vec::new();
    for &candidate in candidates {
        let (index_name, single_name) = match candidate {
            WeightFormat::PytorchBin => (PYTORCH_INDEX, PYTORCH_SINGLE),
            _ => (SAFETENSORS_INDEX, SAFETENSORS_SINGLE),
        };
        let index_path = dir.join(index_name);
        if index_path.is_file() {
            let index = ShardIndex::read(&index_path)?;
            let shards = index.shard_paths(&index_path)?;
            let files = CheckpointFiles {
                format: candidate,
                index: Some(index_path),
                shards,
            };
            return Ok((files, Some(index)));
        }
        let single = dir.join(single_name);
        if single.is_file() {
            let files = CheckpointFiles {
                format: candidate,
                index: None,
                shards: vec![single],
            };
            return Ok((files, None));
        }
        looked_for.push(index_name);
        looked_for.push(single_name);
    }
    Err(ModelError::NoWeights {
        dir: dir.to_owned(),
        looked_for: looked_for.join(", "),
    })
}

enum ShardReader {
    Safetensors(MmapedSafetensors),
    Pytorch(PthTensors),
}

struct Shard {
    path: PathBuf,
    reader: ShardReader,
    /// Shape and stored dtype of every tensor in this file.
    entries: HashMap<String, (Vec<usize>, DType)>,
}

impl Shard {
    fn open(path: &Path, format: WeightFormat) -> Result<Self> {
        let bad_file = |err: candle_core::Error| ModelError::WeightFile {
            path: path.to_owned(),
            message: err.to_string(),
        };
        match format {
            WeightFormat::PytorchBin => {
                check_zip_magic(path)?;
                check_pickles(path)?;
                let reader =
                    contain_panics(path, || PthTensors::new(path, None))?.map_err(bad_file)?;
                let entries = reader
                    .tensor_infos()
                    .iter()
                    .map(|(name, info)| (name.clone(), (info.layout.dims().to_vec(), info.dtype)))
                    .collect();
                Ok(Self {
                    path: path.to_owned(),
                    reader: ShardReader::Pytorch(reader),
                    entries,
                })
            }
            _ => {
                // SAFETY: the file is memory-mapped read-only; it must not be truncated or rewritten while
                // the model is being loaded, which is the usual contract of every safetensors loader.
                let reader = unsafe { MmapedSafetensors::new(path) }.map_err(bad_file)?;
                let mut entries = HashMap::new();
                for (name, view) in reader.tensors() {
                    let dtype = DType::try_from(view.dtype()).map_err(bad_file)?;
                    entries.insert(name, (view.shape().to_vec(), dtype));
                }
                Ok(Self {
                    path: path.to_owned(),
                    reader: ShardReader::Safetensors(reader),
                    entries,
                })
            }
        }
    }

    fn read(&self, key: &str) -> Result<Tensor> {
        let bad_file = |err: candle_core::Error| ModelError::WeightFile {
            path: self.path.clone(),
            message: format!("tensor `{key}`: {err}"),
        };
        match &self.reader {
            ShardReader::Safetensors(st) => st.load(key, &Device::Cpu).map_err(bad_file),
            ShardReader::Pytorch(pth) => {
                if let Some(info) = pth.tensor_infos().get(key)
                    && !info.layout.is_contiguous()
                    && !info.layout.is_fortran_contiguous()
                {
                    return read_strided(&self.path, info).map_err(|message| {
                        ModelError::WeightFile {
                            path: self.path.clone(),
                            message: format!("tensor `{key}`: {message}"),
                        }
                    });
                }
                contain_panics(&self.path, || pth.get(key))?
                    .map_err(bad_file)?
                    .ok_or_else(|| ModelError::MissingKey {
                        key: key.to_owned(),
                        file: self.path.clone(),
                    })
            }
        }
    }
}

/// Reads a tensor that torch saved as a strided view of its storage (`x[:, ::2]`, a permuted
/// tensor), which candle's reader refuses: the span of the storage the view covers is read (it
/// must lie within the stored bytes) and its elements gathered in row-major order, as
/// `torch.load(...).contiguous()` gives them.
fn read_strided(
    path: &Path,
    info: &candle_core::pickle::TensorInfo,
) -> std::result::Result<Tensor, String> {
    use std::io::Read;
    let elem = info.dtype.size_in_bytes();
    let dims = info.layout.dims();
    let strides = info.layout.stride();
    // candle keeps torch's storage offset in bytes.
    let offset = info.layout.start_offset();
    let span = if dims.contains(&0) {
        0
    } else {
        dims.iter()
            .zip(strides)
            .try_fold(1usize, |acc, (&d, &s)| {
                (d - 1).checked_mul(s)?.checked_add(acc)
            })
            .ok_or("the view's strides overflow")?
    };
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| e.to_string())?;
    let entry = zip
        .by_name(&info.path)
        .map_err(|e| format!("{}: {e}", info.path))?;
    let stored = entry.size();
    let needed = span
        .checked_mul(elem)
        .and_then(|n| n.checked_add(offset))
        .filter(|&n| n as u64 <= stored)
        .ok_or_else(|| {
            format!(
                "the view (offset {offset} bytes, shape {dims:?}, strides {strides:?}) reaches past \
                 the {stored} bytes of its storage {}",
                info.path
            )
        })?;
    let mut bytes = vec![0u8; needed - offset];
    let mut reader = entry;
    std::io::copy(
        &mut reader.by_ref().take(offset as u64),
        &mut std::io::sink(),
    )
    .and_then(|_| reader.read_exact(&mut bytes))
    .map_err(|e| format!("{}: {e}", info.path))?;
    let count: usize = dims.iter().product();
    let mut out = Vec::with_capacity(count * elem);
    let mut index = vec![0usize; dims.len()];
    for _ in 0..count {
        let at: usize = index.iter().zip(strides).map(|(i, s)| i * s).sum();
        out.extend_from_slice(&bytes[at * elem..(at + 1) * elem]);
        for axis in (0..dims.len()).rev() {
            index[axis] += 1;
            if index[axis] < dims[axis] {
                break;
            }
            index[axis] = 0;
        }
    }
    Tensor::from_raw_buffer(&out, info.dtype, dims, &Device::Cpu).map_err(|e| e.to_string())
}

/// A PyTorch checkpoint must be a zip archive (torch >= 1.6 writes nothing else by default):
/// tells the legacy format and other files apart by their first bytes, which the zip reader
/// reports alike. A zip cut short is caught by [`check_pickles`], which opens the archive.
fn check_zip_magic(path: &Path) -> Result<()> {
    use std::io::Read;
    let mut head = [0u8; 4];
    let read = std::fs::File::open(path)
        .and_then(|f| f.take(4).read(&mut head))
        .map_err(|source| ModelError::Io {
            path: path.to_owned(),
            source,
        })?;
    let bad = |message: &str| {
        Err(ModelError::WeightFile {
            path: path.to_owned(),
            message: message.to_owned(),
        })
    };
    if read >= 2 && head[0] == 0x80 && head[1] <= 5 {
        return bad(
            "this is PyTorch's legacy (pre-1.6, non-zip) serialization, which is not supported: \
             re-save it with a current torch (`torch.save(torch.load(f), f)`) or convert it to safetensors",
        );
    }
    if read < 4 || head != *b"PK\x03\x04" {
        return bad("not a PyTorch checkpoint: a torch.save file is a zip archive");
    }
    Ok(())
}

/// Runs [`pickle_guard::check`] on every `data.pkl` of a PyTorch zip checkpoint, so that candle's
/// unpickler never sees a pickle that would overflow its stack or exhaust memory. A zip archive
/// without its central directory is a file cut short.
fn check_pickles(path: &Path) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|source| ModelError::Io {
        path: path.to_owned(),
        source,
    })?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|_| {
        ModelError::WeightFile {
            path: path.to_owned(),
            message: "the zip archive is incomplete (no central directory at its end): the file \
                      is truncated, perhaps a download that did not finish"
                .to_owned(),
        }
    })?;
    for i in 0..zip.len() {
        let Ok(entry) = zip.by_index(i) else {
            continue;
        };
        let Some(name) = entry
            .name()
            .ok()
            .filter(|n| n.ends_with("data.pkl"))
            .map(|n| n.into_owned())
        else {
            continue;
        };
        pickle_guard::check(&mut std::io::BufReader::new(entry)).map_err(|refusal| {
            ModelError::WeightFile {
                path: path.to_owned(),
                message: format!("refusing the pickle {name}: {refusal}"),
            }
        })?;
    }
    Ok(())
}

/// candle's PyTorch reader can panic on malformed input (for example an arithmetic overflow on a
/// hostile integer opcode); such a panic becomes an error naming the file instead of unwinding
/// through the caller. (The panic hook still prints its message.)
fn contain_panics<T>(path: &Path, f: impl FnOnce() -> T) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|payload| {
        let detail = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_owned());
        ModelError::WeightFile {
            path: path.to_owned(),
            message: format!("the PyTorch pickle reader failed: {detail}"),
        }
    })
}

/// All tensors of a checkpoint, read lazily by key.
pub struct WeightStore {
    files: CheckpointFiles,
    shards: Vec<Shard>,
    /// Which shard holds each key (from the index when there is one).
    key_to_shard: HashMap<String, usize>,
}

impl std::fmt::Debug for WeightStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightStore")
            .field("files", &self.files)
            .field("keys", &self.key_to_shard.len())
            .finish()
    }
}

impl WeightStore {
    /// Opens every shard (reading headers only) and builds the key → shard routing.
    pub fn open(files: CheckpointFiles) -> Result<Self> {
        let index = files.index.as_deref().map(ShardIndex::read).transpose()?;
        Self::open_with_index(files, index)
    }

    /// [`WeightStore::open`] with the index already parsed (`files.index` read into `index`).
    fn open_with_index(files: CheckpointFiles, index: Option<ShardIndex>) -> Result<Self> {
        let shards = files
            .shards
            .iter()
            .map(|path| Shard::open(path, files.format))
            .collect::<Result<Vec<_>>>()?;
        let mut key_to_shard = HashMap::new();
        if let (Some(index_path), Some(parsed)) = (&files.index, index) {
            for (key, file_name) in parsed.weight_map {
                let shard = shards
                    .iter()
                    .position(|s| s.path.file_name().is_some_and(|n| n == file_name.as_str()))
                    .ok_or_else(|| ModelError::WeightFile {
                        path: index_path.clone(),
                        message: format!("key `{key}` points to unknown shard {file_name}"),
                    })?;
                key_to_shard.insert(key, shard);
            }
        }
        for (i, shard) in shards.iter().enumerate() {
            for key in shard.entries.keys() {
                key_to_shard.entry(key.clone()).or_insert(i);
            }
        }
        Ok(Self {
            files,
            shards,
            key_to_shard,
        })
    }

    /// Finds and opens the checkpoint of `dir`.
    pub fn open_dir(dir: &Path, format: WeightFormat) -> Result<Self> {
        let (files, index) = discover(dir, format)?;
        Self::open_with_index(files, index)
    }

    /// The files this store reads.
    pub fn files(&self) -> &CheckpointFiles {
        &self.files
    }

    /// Every key of the checkpoint, sorted.
    pub fn keys(&self) -> Vec<&str> {
        let mut keys: Vec<&str> = self.key_to_shard.keys().map(String::as_str).collect();
        keys.sort_unstable();
        keys
    }

    /// Whether the checkpoint has `key`.
    pub fn contains(&self, key: &str) -> bool {
        self.entry(key).is_some()
    }

    /// Stored shape and dtype of `key`.
    pub fn entry(&self, key: &str) -> Option<(&[usize], DType)> {
        let shard = &self.shards[*self.key_to_shard.get(key)?];
        shard
            .entries
            .get(key)
            .map(|(shape, dtype)| (shape.as_slice(), *dtype))
    }

    /// The file a missing key was expected in: its shard per the index, else the index, else the only file.
    fn file_for(&self, key: &str) -> PathBuf {
        match (self.key_to_shard.get(key), &self.files.index) {
            (Some(&i), _) => self.shards[i].path.clone(),
            (None, Some(index)) => index.clone(),
            (None, None) => self.files.shards[0].clone(),
        }
    }

    /// Reads `key`, checks its shape, and converts it to `dtype` on `device`.
    pub fn load(
        &self,
        key: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let Some((found, _)) = self.entry(key) else {
            return Err(ModelError::MissingKey {
                key: key.to_owned(),
                file: self.file_for(key),
            });
        };
        if found != shape {
            return Err(ModelError::ShapeMismatch {
                key: key.to_owned(),
                expected: shape.to_vec(),
                found: found.to_vec(),
                file: self.file_for(key),
            });
        }
        let shard = &self.shards[self.key_to_shard[key]];
        let tensor = shard.read(key)?;
        // Move first, then convert: the stored (usually 16-bit) form is the smaller one to copy.
        Ok(tensor.to_device(device)?.to_dtype(dtype)?.contiguous()?)
    }
}

/// Where a [`Weights`] view takes its tensors from.
#[derive(Clone, Debug)]
enum WeightSource {
    Checkpoint(Arc<WeightStore>),
    /// A pre-quantised `model.gguf` (`qalign quantize`).
    Gguf(Arc<GgufStore>),
    /// Made up on request with the requested shape (see [`Weights::random`]).
    Random,
}

/// Standard deviation of the random matrices of [`Weights::random`] (the checkpoints' `initializer_range`).
const RANDOM_INIT_STD: f32 = 0.02;

/// A view of a [`WeightStore`] under a key prefix, with the compute dtype and device: each layer's
/// constructor takes one, so each key layout lives in one place (the candle `VarBuilder` pattern, with
/// this crate's errors).
#[derive(Clone, Debug)]
pub struct Weights {
    source: WeightSource,
    prefix: String,
    dtype: DType,
    device: Device,
    adaptation: Option<Arc<Adaptation>>,
    quant: Option<Arc<QuantLog>>,
    progress: Option<Arc<LayerCounter>>,
}

/// Counts the transformer layers a load has finished and tells its observer.
#[derive(Debug)]
pub(crate) struct LayerCounter {
    done: AtomicUsize,
    layers: usize,
    observer: LoadObserver,
}

impl LayerCounter {
    /// A counter over `layers` layers; tells `observer` that none is done yet.
    pub(crate) fn new(observer: LoadObserver, layers: usize) -> Self {
        observer.observe(LoadProgress {
            layers_done: 0,
            layers,
        });
        Self {
            done: AtomicUsize::new(0),
            layers,
            observer,
        }
    }

    fn layer_done(&self) {
        let done = self.done.fetch_add(1, Ordering::Relaxed) + 1;
        self.observer.observe(LoadProgress {
            layers_done: done.min(self.layers),
            layers: self.layers,
        });
    }
}

impl Weights {
    /// The root view (empty prefix).
    pub fn new(store: Arc<WeightStore>, dtype: DType, device: Device) -> Self {
        Self {
            source: WeightSource::Checkpoint(store),
            prefix: String::new(),
            dtype,
            device,
            adaptation: None,
            quant: None,
            progress: None,
        }
    }

    /// The root view of a pre-quantised checkpoint: linear layers take their stored kernels
    /// (`Weights::stored_kernel`), everything else reads as from a checkpoint.
    pub fn gguf(store: Arc<GgufStore>, dtype: DType, device: Device) -> Self {
        Self {
            source: WeightSource::Gguf(store),
            ..Self::random(dtype, device)
        }
    }

    /// The stored weight of linear layer `name` (`[out, in]`), when this view reads a
    /// pre-quantised checkpoint; `None` for ordinary checkpoints and random weights.
    pub(crate) fn stored_kernel(
        &self,
        name: &str,
        out_dim: usize,
        in_dim: usize,
    ) -> Result<Option<StoredKernel>> {
        match &self.source {
            WeightSource::Gguf(store) => {
                Ok(Some(store.kernel(name, out_dim, in_dim, &self.device)?))
            }
            _ => Ok(None),
        }
    }

    /// A root view that reads no file: every tensor is made on request with the shape asked for
    /// (vectors named `weight` are ones, `bias` zeros, everything else N(0, 0.02²) from a generator
    /// seeded by the tensor's key, so the same configuration always gets the same weights). For timing a configuration without its checkpoint; the outputs mean nothing.
    /// Optional keys count as absent, so buffers that can be computed are computed.
    pub fn random(dtype: DType, device: Device) -> Self {
        Self {
            source: WeightSource::Random,
            prefix: String::new(),
            dtype,
            device,
            adaptation: None,
            quant: None,
            progress: None,
        }
    }

    /// This view with every tensor passed through `adaptation` (overrides, merged LoRA, trainability).
    pub fn with_adaptation(self, adaptation: Option<Arc<Adaptation>>) -> Self {
        Self { adaptation, ..self }
    }

    /// This view with the weights of its linear layers quantised as they load ([`crate::nn::Linear`]),
    /// each layer recorded in `log`.
    pub(crate) fn with_quant(self, log: Option<Arc<QuantLog>>) -> Self {
        Self { quant: log, ..self }
    }

    /// This view with each finished transformer layer counted ([`Weights::layer_done`]).
    pub(crate) fn with_progress(self, progress: Option<Arc<LayerCounter>>) -> Self {
        Self { progress, ..self }
    }

    /// Reports one more transformer layer loaded, when the load is observed.
    pub(crate) fn layer_done(&self) {
        if let Some(counter) = &self.progress {
            counter.layer_done();
        }
    }

    /// Where linear layers quantise to and record themselves, when quantising.
    pub(crate) fn quant_log(&self) -> Option<&QuantLog> {
        self.quant.as_deref()
    }

    /// The key prefix of this view (`model.layers.3.mlp`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The training LoRA branch of the module this view points at (its prefix), if it has one.
    pub fn lora_branch(
        &self,
        in_dim: usize,
        out_dim: usize,
    ) -> Result<Option<(LoraBranch, Arc<Adaptation>)>> {
        let Some(adaptation) = &self.adaptation else {
            return Ok(None);
        };
        Ok(adaptation
            .branch(&self.prefix, in_dim, out_dim, self.dtype, &self.device)?
            .map(|branch| (branch, adaptation.clone())))
    }

    /// Whether the model this view loads is being trained (its weights may need gradients).
    pub(crate) fn trains(&self) -> bool {
        self.adaptation.as_ref().is_some_and(|a| a.trains())
    }

    /// Whether this view makes up its tensors ([`Weights::random`]).
    pub fn is_random(&self) -> bool {
        matches!(self.source, WeightSource::Random)
    }

    /// A view one level deeper: `pp("layers").pp(3)` reads `<prefix>.layers.3.*`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        Self {
            prefix: self.key(&name.to_string()),
            ..self.clone()
        }
    }

    /// The full key of `name` under this prefix.
    pub fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_owned()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// The compute dtype tensors are converted to by [`Weights::get`].
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device tensors are placed on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether `name` exists under this prefix.
    pub fn contains(&self, name: &str) -> bool {
        if let Some(adaptation) = &self.adaptation
            && adaptation.has_override(&self.key(name))
        {
            return true;
        }
        match &self.source {
            WeightSource::Checkpoint(store) => store.contains(&self.key(name)),
            WeightSource::Gguf(store) => store.contains(&self.key(name)),
            WeightSource::Random => false,
        }
    }

    /// The stored dtype of `name`, when present.
    pub fn stored_dtype(&self, name: &str) -> Option<DType> {
        match &self.source {
            WeightSource::Checkpoint(store) => store.entry(&self.key(name)).map(|(_, dtype)| dtype),
            WeightSource::Gguf(store) => store.contains(&self.key(name)).then_some(DType::F32),
            WeightSource::Random => None,
        }
    }

    /// Reads `name` with the given shape, in the compute dtype.
    pub fn get(&self, shape: &[usize], name: &str) -> Result<Tensor> {
        self.get_as(shape, name, self.dtype)
    }

    /// Reads `name` with the given shape, in `dtype`.
    pub fn get_as(&self, shape: &[usize], name: &str, dtype: DType) -> Result<Tensor> {
        let key = self.key(name);
        let load = || match &self.source {
            WeightSource::Checkpoint(store) => store.load(&key, shape, dtype, &self.device),
            WeightSource::Gguf(store) => store.dense(&key, shape, dtype, &self.device),
            WeightSource::Random => random_tensor(&key, name, shape, dtype, &self.device),
        };
        match &self.adaptation {
            Some(adaptation) => adaptation.adapt(&key, shape, dtype, &self.device, load),
            None => load(),
        }
    }
}

/// The made-up tensor of [`Weights::random`]: the usual initialisation of norms, biases and matrices.
/// Matrices are drawn from a generator seeded by the full key, so every build of a configuration
/// gets the same weights (an f32 and a quantised model can be compared).
fn random_tensor(
    key: &str,
    name: &str,
    shape: &[usize],
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let tensor = match (shape.len(), name) {
        (1, "weight") => Tensor::ones(shape, dtype, device)?,
        (1, "bias") => Tensor::zeros(shape, dtype, device)?,
        _ => {
            let values = seeded_normal(key, shape.iter().product(), RANDOM_INIT_STD);
            Tensor::from_vec(values, shape, &Device::Cpu)?
                .to_device(device)?
                .to_dtype(dtype)?
        }
    };
    Ok(tensor)
}

/// `n` samples of N(0, std²) (Box–Muller), a function of `key` alone: chunks are generated in
/// parallel, each from its own ChaCha8 stream seeded by the key's FNV-1a hash and the chunk index.
fn seeded_normal(key: &str, n: usize, std: f32) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    let seed = key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let mut out = vec![0f32; n];
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(i, chunk)| {
            let stream = seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(stream);
            for pair in chunk.chunks_mut(2) {
                let u1 = 1.0 - rng.random::<f32>();
                let u2 = rng.random::<f32>();
                let r = (-2.0 * u1.ln()).sqrt() * std;
                let (sin, cos) = (std::f32::consts::TAU * u2).sin_cos();
                pair[0] = r * cos;
                if let Some(second) = pair.get_mut(1) {
                    *second = r * sin;
                }
            }
        });
    out
}
