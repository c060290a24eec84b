//! Writer for PyTorch's `torch.save` zip format (a flat `dict[str, Tensor]`).
//!
//! The official Q-Align/LLaVA code loads a LoRA adapter's `non_lora_trainables.bin`
//! (and PEFT 0.4's `adapter_model.bin`) with `torch.load(path, map_location="cpu")`,
//! so a checkpoint written by the Rust trainer must be a real torch zip-pickle:
//! candle can read that format but cannot write it. This module produces what
//! torch 2.x's `torch.save` writes for a state dict of contiguous CPU tensors:
//!
//! * zip entries, STORED, every record's data 64-byte aligned:
//!   `<archive>/data.pkl`, `<archive>/byteorder` (`little`), `<archive>/data/0..N-1`
//!   (raw little-endian storages, in entry order), `<archive>/version` (`3\n`);
//! * `data.pkl` in pickle protocol 2, one
//!   `torch._utils._rebuild_tensor_v2(persistent_id, 0, size, stride, False, OrderedDict())`
//!   per tensor, where the persistent id is `('storage', torch.<Dtype>Storage, '<i>', 'cpu', numel)`,
//!   byte-identical to what torch's (CPython's) pickler emits for the same tensors.

use std::collections::{HashMap, HashSet};
use std::io::{Seek, Write};
use std::path::Path;

/// Element type of a tensor's storage (maps to `torch.FloatStorage`, `HalfStorage`, `BFloat16Storage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageDtype {
    F32,
    F16,
    BF16,
}

impl StorageDtype {
    const fn elem_size(self) -> usize {
        match self {
            StorageDtype::F32 => 4,
            StorageDtype::F16 | StorageDtype::BF16 => 2,
        }
    }

    const fn storage_class(self) -> &'static str {
        match self {
            StorageDtype::F32 => "FloatStorage",
            StorageDtype::F16 => "HalfStorage",
            StorageDtype::BF16 => "BFloat16Storage",
        }
    }
}

/// One tensor of the state dict.
#[derive(Clone, Copy)]
pub struct TensorEntry<'a> {
    /// State-dict key.
    pub name: &'a str,
    pub dtype: StorageDtype,
    /// Row-major shape; empty for a 0-d (scalar) tensor.
    pub shape: &'a [usize],
    /// Little-endian, row-major contiguous values; `len == numel * elem_size`.
    pub data: &'a [u8],
}

#[derive(Debug, thiserror::Error)]
pub enum PickleWriteError {
    #[error("I/O error while {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid state-dict entry: {0}")]
    BadEntry(String),
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> PickleWriteError {
    let context = context.into();
    move |source| PickleWriteError::Io { context, source }
}

fn zip_err(context: impl Into<String>) -> impl FnOnce(zip::result::ZipError) -> PickleWriteError {
    let context = context.into();
    move |err| PickleWriteError::Io {
        context,
        source: match err {
            zip::result::ZipError::Io(source) => source,
            other => std::io::Error::other(other),
        },
    }
}

/// Alignment of every record's data in the file, as torch's `PyTorchStreamWriter` does.
const RECORD_ALIGNMENT: u16 = 64;

/// Shape facts checked once per entry.
struct Checked {
    numel: usize,
    strides: Vec<usize>,
}

fn check_entry(entry: &TensorEntry<'_>) -> Result<Checked, PickleWriteError> {
    let overflow = || {
        PickleWriteError::BadEntry(format!(
            "tensor {:?}: shape {:?} overflows usize",
            entry.name, entry.shape
        ))
    };
    let numel = entry
        .shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(overflow)?;
    let expected = numel
        .checked_mul(entry.dtype.elem_size())
        .ok_or_else(overflow)?;
    if entry.data.len() != expected {
        return Err(PickleWriteError::BadEntry(format!(
            "tensor {:?}: {} data bytes, but shape {:?} of {:?} needs {} ({} elements x {} bytes)",
            entry.name,
            entry.data.len(),
            entry.shape,
            entry.dtype,
            expected,
            numel,
            entry.dtype.elem_size()
        )));
    }
    if u32::try_from(entry.name.len()).is_err() {
        return Err(PickleWriteError::BadEntry(format!(
            "tensor name of {} bytes is too long for BINUNICODE",
            entry.name.len()
        )));
    }
    // torch's contiguous strides: stride[i] = stride[i+1] * max(size[i+1], 1).
    let mut strides = vec![1usize; entry.shape.len()];
    for i in (0..entry.shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1]
            .checked_mul(entry.shape[i + 1].max(1))
            .ok_or_else(overflow)?;
    }
    Ok(Checked { numel, strides })
}

fn check_archive_name(archive_name: &str) -> Result<(), PickleWriteError> {
    if archive_name.is_empty()
        || archive_name.contains(['/', '\\', '\0'])
        || archive_name == "."
        || archive_name == ".."
    {
        return Err(PickleWriteError::BadEntry(format!(
            "archive name {archive_name:?} must be a non-empty single path component"
        )));
    }
    Ok(())
}

/// Protocol-2 pickle emitter for exactly the object graph `torch.save(state_dict)` pickles.
///
/// It reproduces CPython's `pickle.Pickler` byte for byte, memo included: every
/// string, non-empty tuple, global and REDUCE result gets a `BINPUT`; objects that
/// torch shares between tensors (the `_rebuild_tensor_v2`, storage-class and
/// `OrderedDict` globals, the `'storage'` and `'cpu'` strings) are `BINGET`s after
/// their first use. (Memo opcodes are optional for every unpickler; matching them
/// makes our `data.pkl` identical to torch's for the same tensors.)
struct Pickler {
    buf: Vec<u8>,
    next_memo: u32,
    /// Memo slots of the objects torch shares between tensors, by a tag.
    shared: HashMap<&'static str, u32>,
}

mod op {
    pub const PROTO: u8 = 0x80;
    pub const EMPTY_DICT: u8 = b'}';
    pub const MARK: u8 = b'(';
    pub const SETITEM: u8 = b's';
    pub const SETITEMS: u8 = b'u';
    pub const STOP: u8 = b'.';
    pub const BINUNICODE: u8 = b'X';
    pub const GLOBAL: u8 = b'c';
    pub const BINPERSID: u8 = b'Q';
    pub const BININT1: u8 = b'K';
    pub const BININT2: u8 = b'M';
    pub const BININT: u8 = b'J';
    pub const LONG1: u8 = 0x8a;
    pub const EMPTY_TUPLE: u8 = b')';
    pub const TUPLE: u8 = b't';
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const NEWFALSE: u8 = 0x89;
    pub const REDUCE: u8 = b'R';
    pub const BINPUT: u8 = b'q';
    pub const LONG_BINPUT: u8 = b'r';
    pub const BINGET: u8 = b'h';
    pub const LONG_BINGET: u8 = b'j';
}

/// CPython's `Pickler._BATCHSIZE` for SETITEMS.
const SETITEMS_BATCH: usize = 1000;

impl Pickler {
    fn new() -> Self {
        Self {
            buf: vec![op::PROTO, 2],
            next_memo: 0,
            shared: HashMap::new(),
        }
    }

    fn op(&mut self, opcode: u8) {
        self.buf.push(opcode);
    }

    /// Memoize the object just written (BINPUT / LONG_BINPUT); returns its slot.
    fn put(&mut self) -> u32 {
        let slot = self.next_memo;
        self.next_memo += 1;
        match u8::try_from(slot) {
            Ok(slot) => self.buf.extend_from_slice(&[op::BINPUT, slot]),
            Err(_) => {
                self.op(op::LONG_BINPUT);
                self.buf.extend_from_slice(&slot.to_le_bytes());
            }
        }
        slot
    }

    fn get(&mut self, slot: u32) {
        match u8::try_from(slot) {
            Ok(slot) => self.buf.extend_from_slice(&[op::BINGET, slot]),
            Err(_) => {
                self.op(op::LONG_BINGET);
                self.buf.extend_from_slice(&slot.to_le_bytes());
            }
        }
    }

    /// Writes a shared object once (via `write`, then BINPUT) and BINGETs it afterwards.
    fn shared(&mut self, tag: &'static str, write: impl FnOnce(&mut Self)) {
        if let Some(&slot) = self.shared.get(tag) {
            self.get(slot);
        } else {
            write(self);
            let slot = self.put();
            self.shared.insert(tag, slot);
        }
    }

    /// A non-negative int, encoded as CPython's pickler does for protocol 2 (ints are not memoized).
    fn int(&mut self, value: usize) {
        let value = value as u64;
        if value <= 0xff {
            self.buf.extend_from_slice(&[op::BININT1, value as u8]);
        } else if value <= 0xffff {
            self.op(op::BININT2);
            self.buf.extend_from_slice(&(value as u16).to_le_bytes());
        } else if value <= i32::MAX as u64 {
            self.op(op::BININT);
            self.buf.extend_from_slice(&(value as i32).to_le_bytes());
        } else {
            // LONG1: minimal little-endian two's complement; a set top bit needs a 0 byte.
            let mut encoded =
                value.to_le_bytes()[..8 - value.leading_zeros() as usize / 8].to_vec();
            if encoded.last().is_some_and(|b| b & 0x80 != 0) {
                encoded.push(0);
            }
            self.buf
                .extend_from_slice(&[op::LONG1, encoded.len() as u8]);
            self.buf.extend_from_slice(&encoded);
        }
    }

    /// BINUNICODE without memo; the caller guarantees `s.len() <= u32::MAX`.
    fn raw_unicode(&mut self, s: &str) {
        self.op(op::BINUNICODE);
        self.buf.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(s.as_bytes());
    }

    /// A fresh (unshared) string.
    fn unicode(&mut self, s: &str) {
        self.raw_unicode(s);
        self.put();
    }

    fn raw_global(&mut self, module: &str, name: &str) {
        self.op(op::GLOBAL);
        self.buf.extend_from_slice(module.as_bytes());
        self.buf.push(b'\n');
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(b'\n');
    }

    /// A fresh tuple of ints: `()` is EMPTY_TUPLE (never memoized), 1-3 items TUPLE1-3, else MARK..TUPLE.
    fn int_tuple(&mut self, values: &[usize]) {
        match values.len() {
            0 => self.op(op::EMPTY_TUPLE),
            n @ 1..=3 => {
                for &v in values {
                    self.int(v);
                }
                self.op([op::TUPLE1, op::TUPLE2, op::TUPLE3][n - 1]);
                self.put();
            }
            _ => {
                self.op(op::MARK);
                for &v in values {
                    self.int(v);
                }
                self.op(op::TUPLE);
                self.put();
            }
        }
    }

    /// `name: _rebuild_tensor_v2(('storage', cls, key, 'cpu', numel), 0, shape, strides, False, OrderedDict())`.
    fn tensor_item(&mut self, entry: &TensorEntry<'_>, checked: &Checked, key: &str) {
        self.unicode(entry.name);
        self.shared("rebuild", |p| {
            p.raw_global("torch._utils", "_rebuild_tensor_v2")
        });
        self.op(op::MARK); // the 6-item args tuple
        {
            self.op(op::MARK); // the persistent id tuple
            self.shared("'storage'", |p| p.raw_unicode("storage"));
            let class = entry.dtype.storage_class();
            self.shared(class, |p| p.raw_global("torch", class));
            self.unicode(key);
            self.shared("'cpu'", |p| p.raw_unicode("cpu"));
            self.int(checked.numel);
            self.op(op::TUPLE);
            self.put();
            self.op(op::BINPERSID);
        }
        self.int(0); // storage_offset
        self.int_tuple(entry.shape);
        self.int_tuple(&checked.strides);
        self.op(op::NEWFALSE); // requires_grad
        // backward_hooks = OrderedDict(): GLOBAL, EMPTY_TUPLE, REDUCE.
        self.shared("OrderedDict", |p| {
            p.raw_global("collections", "OrderedDict")
        });
        self.op(op::EMPTY_TUPLE);
        self.op(op::REDUCE);
        self.put();
        self.op(op::TUPLE);
        self.put();
        self.op(op::REDUCE);
        self.put();
    }
}

/// `pickle.dumps(state_dict, protocol=2)` as torch.save's pickler writes it.
fn build_data_pkl(entries: &[TensorEntry<'_>], checked: &[Checked]) -> Vec<u8> {
    let mut p = Pickler::new();
    p.op(op::EMPTY_DICT);
    p.put();
    let items: Vec<_> = entries.iter().zip(checked).collect();
    // CPython's _batch_setitems: MARK..SETITEMS per 1000 items, a lone item uses SETITEM.
    for (batch_index, batch) in items.chunks(SETITEMS_BATCH).enumerate() {
        let first_index = batch_index * SETITEMS_BATCH;
        if batch.len() > 1 {
            p.op(op::MARK);
        }
        for (i, (entry, checked)) in batch.iter().enumerate() {
            p.tensor_item(entry, checked, &(first_index + i).to_string());
        }
        p.op(if batch.len() > 1 {
            op::SETITEMS
        } else {
            op::SETITEM
        });
    }
    p.op(op::STOP);
    p.buf
}

/// Writes the zip bytes to any writer.
///
/// `archive_name` is the top-level folder inside the zip (`torch.save` uses the
/// file stem, or `archive` for in-memory buffers). Entries are validated first
/// (data length vs. shape, duplicate names), so nothing is written for a bad input.
pub fn write_state_dict<W: std::io::Write + std::io::Seek>(
    out: W,
    archive_name: &str,
    entries: &[TensorEntry],
) -> Result<(), PickleWriteError> {
    check_archive_name(archive_name)?;
    let mut seen = HashSet::with_capacity(entries.len());
    let mut checked = Vec::with_capacity(entries.len());
    for entry in entries {
        if !seen.insert(entry.name) {
            return Err(PickleWriteError::BadEntry(format!(
                "duplicate tensor name {:?}",
                entry.name
            )));
        }
        checked.push(check_entry(entry)?);
    }
    let data_pkl = build_data_pkl(entries, &checked);
    write_zip(out, archive_name, &data_pkl, entries)
}

fn write_zip<W: Write + Seek>(
    out: W,
    archive_name: &str,
    data_pkl: &[u8],
    entries: &[TensorEntry<'_>],
) -> Result<(), PickleWriteError> {
    let mut zip = zip::ZipWriter::new(out);
    let mut record = |name: String, bytes: &[u8]| -> Result<(), PickleWriteError> {
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .last_modified_time(zip::DateTime::default())
            .large_file(bytes.len() as u64 >= zip::ZIP64_BYTES_THR)
            .with_alignment(RECORD_ALIGNMENT);
        zip.start_file(name.as_str(), options)
            .map_err(zip_err(format!("starting zip record {name}")))?;
        zip.write_all(bytes)
            .map_err(io_err(format!("writing zip record {name}")))
    };
    record(format!("{archive_name}/data.pkl"), data_pkl)?;
    record(format!("{archive_name}/byteorder"), b"little")?;
    for (index, entry) in entries.iter().enumerate() {
        record(format!("{archive_name}/data/{index}"), entry.data)?;
    }
    record(format!("{archive_name}/version"), b"3\n")?;
    let mut out = zip
        .finish()
        .map_err(zip_err("writing the zip central directory"))?;
    out.flush().map_err(io_err("flushing the zip output"))
}

/// Convenience: writes to `path` atomically (tempfile in the same directory + persist/rename), archive name = file stem.
///
/// A stem that is empty or not UTF-8 falls back to `archive`, as torch does for buffers.
pub fn save_state_dict(path: &Path, entries: &[TensorEntry]) -> Result<(), PickleWriteError> {
    let archive_name = path
        .file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| check_archive_name(s).is_ok())
        .unwrap_or("archive");
    let mut failure = None;
    qalign_core::atomic::write_atomic(path, |file, _| {
        let mut writer = std::io::BufWriter::new(file);
        if let Err(e) = write_state_dict(&mut writer, archive_name, entries) {
            failure = Some(e);
            return Err(std::io::Error::other("state dict not written"));
        }
        writer.flush()
    })
    .map_err(|source| match failure.take() {
        Some(e) => e,
        None => PickleWriteError::Io {
            context: format!("writing {}", path.display()),
            source,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Cursor, Read};

    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    fn u16_bytes(values: &[u16]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    fn write_to_vec(archive: &str, entries: &[TensorEntry<'_>]) -> Vec<u8> {
        let mut cursor = Cursor::new(Vec::new());
        write_state_dict(&mut cursor, archive, entries).expect("write_state_dict");
        cursor.into_inner()
    }

    fn read_record(zip: &mut zip::ZipArchive<Cursor<&[u8]>>, name: &str) -> Vec<u8> {
        let mut file = zip.by_name(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).unwrap();
        bytes
    }

    /// Exact IEEE half -> single conversion (for comparing candle's F16 -> F32).
    fn f16_to_f32(h: u16) -> f32 {
        let sign = if h & 0x8000 != 0 { -1.0f32 } else { 1.0 };
        let exp = i32::from((h >> 10) & 0x1f);
        let frac = f32::from(h & 0x3ff);
        match exp {
            0 => sign * frac * 2f32.powi(-24),
            0x1f if frac == 0.0 => sign * f32::INFINITY,
            0x1f => f32::NAN,
            _ => sign * (1.0 + frac / 1024.0) * 2f32.powi(exp - 15),
        }
    }

    fn sample_entries<'a>(a: &'a [u8], b: &'a [u8], c: &'a [u8]) -> [TensorEntry<'a>; 3] {
        [
            TensorEntry {
                name: "model.mm_projector.weight",
                dtype: StorageDtype::F32,
                shape: &[2, 3],
                data: a,
            },
            TensorEntry {
                name: "model.scale",
                dtype: StorageDtype::BF16,
                shape: &[],
                data: b,
            },
            TensorEntry {
                name: "model.bias",
                dtype: StorageDtype::F16,
                shape: &[4],
                data: c,
            },
        ]
    }

    #[test]
    fn data_pkl_bytes_and_record_layout() {
        let a = f32_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let b = u16_bytes(&[0x3f80]);
        let c = u16_bytes(&[0x3c00, 0x4000, 0x4200, 0x4400]);
        let entries = sample_entries(&a, &b, &c);
        let bytes = write_to_vec("non_lora_trainables", &entries);
        let mut zip = zip::ZipArchive::new(Cursor::new(bytes.as_slice())).unwrap();

        let names: Vec<String> = zip.file_names().map(|n| n.unwrap().into_owned()).collect();
        assert_eq!(
            names,
            [
                "non_lora_trainables/data.pkl",
                "non_lora_trainables/byteorder",
                "non_lora_trainables/data/0",
                "non_lora_trainables/data/1",
                "non_lora_trainables/data/2",
                "non_lora_trainables/version",
            ]
        );
        // Local headers are in the same order as the central directory.
        let starts: Vec<u64> = (0..zip.len())
            .map(|i| zip.by_index(i).unwrap().header_start())
            .collect();
        assert!(starts.windows(2).all(|w| w[0] < w[1]), "{starts:?}");

        let pkl = read_record(&mut zip, "non_lora_trainables/data.pkl");
        assert!(pkl.starts_with(b"\x80\x02}q\x00("), "{:?}", &pkl[..8]);
        assert!(pkl.ends_with(b"u."));
        assert_eq!(
            read_record(&mut zip, "non_lora_trainables/byteorder"),
            b"little"
        );
        assert_eq!(read_record(&mut zip, "non_lora_trainables/version"), b"3\n");
        assert_eq!(read_record(&mut zip, "non_lora_trainables/data/0"), a);
        assert_eq!(read_record(&mut zip, "non_lora_trainables/data/1"), b);
        assert_eq!(read_record(&mut zip, "non_lora_trainables/data/2"), c);
        for i in 0..zip.len() {
            let file = zip.by_index(i).unwrap();
            assert_eq!(file.compression(), zip::CompressionMethod::Stored);
        }

        // The first two tensors, opcode by opcode, as CPython's protocol-2 pickler writes them.
        let mut expected: Vec<u8> = b"\x80\x02}q\x00(".to_vec();
        expected.extend_from_slice(b"X\x19\x00\x00\x00model.mm_projector.weightq\x01");
        expected.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\nq\x02((");
        expected.extend_from_slice(b"X\x07\x00\x00\x00storageq\x03ctorch\nFloatStorage\nq\x04");
        expected.extend_from_slice(b"X\x01\x00\x00\x000q\x05X\x03\x00\x00\x00cpuq\x06K\x06tq\x07Q");
        expected.extend_from_slice(b"K\x00K\x02K\x03\x86q\x08K\x03K\x01\x86q\x09\x89");
        expected.extend_from_slice(b"ccollections\nOrderedDict\nq\x0a)Rq\x0btq\x0cRq\x0d");
        // The 0-d BF16 tensor: size () and stride () are (unmemoized) EMPTY_TUPLEs;
        // the shared globals and strings come back as BINGETs.
        expected.extend_from_slice(b"X\x0b\x00\x00\x00model.scaleq\x0eh\x02((h\x03");
        expected.extend_from_slice(
            b"ctorch\nBFloat16Storage\nq\x0fX\x01\x00\x00\x001q\x10h\x06K\x01tq\x11Q",
        );
        expected.extend_from_slice(b"K\x00))\x89h\x0a)Rq\x12tq\x13Rq\x14");
        expected.extend_from_slice(b"X\x0a\x00\x00\x00model.biasq\x15h\x02((h\x03");
        expected.extend_from_slice(
            b"ctorch\nHalfStorage\nq\x16X\x01\x00\x00\x002q\x17h\x06K\x04tq\x18Q",
        );
        expected
            .extend_from_slice(b"K\x00K\x04\x85q\x19K\x01\x85q\x1a\x89h\x0a)Rq\x1btq\x1cRq\x1du.");
        assert_eq!(pkl, expected);
    }

    /// `data.pkl` of the reference files written by the real `torch.save` (torch 2.0,
    /// CPython pickler) is reproduced byte for byte from the same tensors.
    #[test]
    fn data_pkl_matches_real_torch_save() {
        let dir = std::env::var_os("QALIGN_LORA_FIXTURE_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../../tests/fixtures/lora/q-align-tiny-lora")
            });
        for file in ["non_lora_trainables.bin", "adapter_model.bin"] {
            let path = dir.join(file);
            if !path.exists() {
                eprintln!("skipping: {} not found", path.display());
                continue;
            }
            let pth = candle_core::pickle::PthTensors::new(&path, None).unwrap();
            // candle's map is unordered; the storage key gives the data.pkl order.
            let mut infos: Vec<_> = pth.tensor_infos().values().collect();
            infos.sort_by_key(|i| i.path.rsplit('/').next().unwrap().parse::<usize>().unwrap());
            let owned: Vec<(String, Vec<usize>, Vec<u8>)> = infos
                .iter()
                .map(|info| {
                    assert_eq!(info.dtype, candle_core::DType::F32);
                    let t = pth.get(&info.name).unwrap().unwrap();
                    let values = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    (info.name.clone(), t.dims().to_vec(), f32_bytes(&values))
                })
                .collect();
            let entries: Vec<TensorEntry<'_>> = owned
                .iter()
                .map(|(name, shape, data)| TensorEntry {
                    name,
                    dtype: StorageDtype::F32,
                    shape,
                    data,
                })
                .collect();
            let archive = file.trim_end_matches(".bin");
            let ours = write_to_vec(archive, &entries);
            let official = std::fs::read(&path).unwrap();
            let mut ours = zip::ZipArchive::new(Cursor::new(ours.as_slice())).unwrap();
            let mut official = zip::ZipArchive::new(Cursor::new(official.as_slice())).unwrap();
            let pkl = format!("{archive}/data.pkl");
            assert!(
                read_record(&mut ours, &pkl) == read_record(&mut official, &pkl),
                "{file}: data.pkl differs from torch.save's"
            );
            for i in 0..entries.len() {
                let record = format!("{archive}/data/{i}");
                assert_eq!(
                    read_record(&mut ours, &record),
                    read_record(&mut official, &record)
                );
            }
            let version = format!("{archive}/version");
            assert_eq!(
                read_record(&mut ours, &version),
                read_record(&mut official, &version)
            );
        }
    }

    #[test]
    fn setitems_batches_like_cpython() {
        let data = f32_bytes(&[1.0]);
        let names: Vec<String> = (0..2001).map(|i| format!("t{i}")).collect();
        let entries: Vec<TensorEntry<'_>> = names
            .iter()
            .map(|name| TensorEntry {
                name,
                dtype: StorageDtype::F32,
                shape: &[1],
                data: &data,
            })
            .collect();
        let pkl = |n: usize| {
            let bytes = write_to_vec("archive", &entries[..n]);
            let mut zip = zip::ZipArchive::new(Cursor::new(bytes.as_slice())).unwrap();
            read_record(&mut zip, "archive/data.pkl")
        };
        // One item: no MARK, SETITEM.
        let one = pkl(1);
        assert!(one.starts_with(b"\x80\x02}q\x00X\x02\x00\x00\x00t0"));
        assert!(one.ends_with(b"Rq\x0ds."));
        // 2001 items: batches of 1000, 1000 and a lone SETITEM; memo slots past 255 use LONG_BINPUT.
        let many = pkl(2001);
        let count = |needle: &[u8]| many.windows(needle.len()).filter(|w| *w == needle).count();
        // SETITEMS, then the next batch's MARK and first key / the lone item's key.
        assert_eq!(count(b"u(X\x05\x00\x00\x00t1000"), 1);
        assert_eq!(count(b"uX\x05\x00\x00\x00t2000"), 1);
        assert!(many.ends_with(b"s."));
        assert!(many.starts_with(b"\x80\x02}q\x00(X"));
        assert_eq!(count(b"X\x05\x00\x00\x00t2000r"), 1);
    }

    #[test]
    fn every_record_is_64_byte_aligned() {
        // Odd names and sizes so that nothing lines up by accident.
        let a = f32_bytes(&[1.5; 7]);
        let b = u16_bytes(&[1; 3]);
        let c = u16_bytes(&[2; 5]);
        let entries = [
            TensorEntry {
                name: "a.weight",
                dtype: StorageDtype::F32,
                shape: &[7],
                data: &a,
            },
            TensorEntry {
                name: "bb",
                dtype: StorageDtype::BF16,
                shape: &[3, 1],
                data: &b,
            },
            TensorEntry {
                name: "c",
                dtype: StorageDtype::F16,
                shape: &[5],
                data: &c,
            },
            TensorEntry {
                name: "empty",
                dtype: StorageDtype::F16,
                shape: &[0],
                data: &[],
            },
        ];
        for archive in ["a", "archive", "non_lora_trainables", "x_y_z_0123456789"] {
            let bytes = write_to_vec(archive, &entries);
            let mut zip = zip::ZipArchive::new(Cursor::new(bytes.as_slice())).unwrap();
            for i in 0..zip.len() {
                let file = zip.by_index(i).unwrap();
                // Data offset from the local header itself: 30 + name length + extra length.
                let start = file.header_start() as usize;
                assert_eq!(&bytes[start..start + 4], b"PK\x03\x04");
                let name_len = u16::from_le_bytes([bytes[start + 26], bytes[start + 27]]) as usize;
                let extra_len = u16::from_le_bytes([bytes[start + 28], bytes[start + 29]]) as usize;
                let data_start = start + 30 + name_len + extra_len;
                let name = file.name().unwrap().into_owned();
                assert_eq!(data_start % 64, 0, "{archive}: {name} at {data_start}");
                let len = file.size() as usize;
                drop(file);
                assert_eq!(
                    &bytes[data_start..data_start + len],
                    read_record(&mut zip, &name)
                );
            }
        }
    }

    #[test]
    fn bad_entries_are_rejected() {
        let four = f32_bytes(&[0.0; 4]);
        let short = TensorEntry {
            name: "w",
            dtype: StorageDtype::F32,
            shape: &[5],
            data: &four,
        };
        let err = write_state_dict(Cursor::new(Vec::new()), "a", &[short]).unwrap_err();
        assert!(
            matches!(&err, PickleWriteError::BadEntry(m) if m.contains("16 data bytes")),
            "{err}"
        );

        // Right byte count for F32 [2], wrong for F16 [2].
        let half = TensorEntry {
            name: "h",
            dtype: StorageDtype::F16,
            shape: &[2],
            data: &four[..8],
        };
        assert!(matches!(
            write_state_dict(Cursor::new(Vec::new()), "a", &[half]),
            Err(PickleWriteError::BadEntry(_))
        ));

        let ok = TensorEntry {
            name: "w",
            dtype: StorageDtype::F32,
            shape: &[2, 2],
            data: &four,
        };
        let err = write_state_dict(Cursor::new(Vec::new()), "a", &[ok, ok]).unwrap_err();
        assert!(
            matches!(&err, PickleWriteError::BadEntry(m) if m.contains("duplicate")),
            "{err}"
        );

        let huge = TensorEntry {
            name: "w",
            dtype: StorageDtype::F32,
            shape: &[usize::MAX, 2],
            data: &four,
        };
        assert!(matches!(
            write_state_dict(Cursor::new(Vec::new()), "a", &[huge]),
            Err(PickleWriteError::BadEntry(_))
        ));

        for archive in ["", "a/b", ".."] {
            assert!(matches!(
                write_state_dict(Cursor::new(Vec::new()), archive, &[ok]),
                Err(PickleWriteError::BadEntry(_))
            ));
        }

        // Nothing reaches the writer when validation fails.
        let mut cursor = Cursor::new(Vec::new());
        let _ = write_state_dict(&mut cursor, "a", &[ok, short]);
        assert!(cursor.get_ref().is_empty());
    }

    #[test]
    fn pickle_int_encodings() {
        let encode = |v: usize| {
            let mut p = Pickler::new();
            p.buf.clear();
            p.int(v);
            p.buf
        };
        assert_eq!(encode(0), b"K\x00");
        assert_eq!(encode(255), b"K\xff");
        assert_eq!(encode(256), b"M\x00\x01");
        assert_eq!(encode(65535), b"M\xff\xff");
        assert_eq!(encode(65536), b"J\x00\x00\x01\x00");
        assert_eq!(encode(i32::MAX as usize), b"J\xff\xff\xff\x7f");
        // Python: pickle.dumps(2**31, 2) -> LONG1 5 bytes 00 00 00 80 00.
        assert_eq!(encode(1 << 31), b"\x8a\x05\x00\x00\x00\x80\x00");
        assert_eq!(encode(1 << 32), b"\x8a\x05\x00\x00\x00\x00\x01");
        assert_eq!(encode(0x7f_ffff_ffff), b"\x8a\x05\xff\xff\xff\xff\x7f");
        #[cfg(target_pointer_width = "64")]
        assert_eq!(
            encode(usize::MAX),
            b"\x8a\x09\xff\xff\xff\xff\xff\xff\xff\xff\x00"
        );
    }

    #[test]
    fn empty_state_dict() {
        let bytes = write_to_vec("archive", &[]);
        let mut zip = zip::ZipArchive::new(Cursor::new(bytes.as_slice())).unwrap();
        // pickle.dumps({}, protocol=2)
        assert_eq!(
            read_record(&mut zip, "archive/data.pkl"),
            b"\x80\x02}q\x00."
        );
        assert_eq!(zip.len(), 3);
    }

    #[test]
    fn round_trip_through_candle_pth_reader() {
        use candle_core::DType;

        // F32 [3, 300]: a dimension > 255 (BININT2), odd values incl. NaN/inf/-0.
        let mut big: Vec<f32> = (0..900).map(|i| (i as f32 - 450.0) * 0.37).collect();
        big[1] = -0.0;
        big[2] = f32::INFINITY;
        big[3] = f32::MIN_POSITIVE / 8.0;
        big[4] = f32::NAN;
        // F16 [70000]: more than 65535 elements (BININT for numel and the size).
        let halves: Vec<u16> = (0..70_000u32)
            .map(|i| {
                let h = (i % 0x7c00) as u16; // finite magnitudes incl. subnormals
                if i % 2 == 1 { h | 0x8000 } else { h }
            })
            .collect();
        // BF16 0-d scalar and BF16 [2, 1, 3] (size-1 dim: torch strides (3, 3, 1)).
        let scalar: u16 = 0xc0b6; // -5.6875
        let bf: Vec<u16> = vec![0x3f80, 0xbf80, 0x4049, 0x0001, 0x7f7f, 0x8000];
        // F32 with a zero-size dimension.
        let empty: Vec<u8> = Vec::new();

        let big_b = f32_bytes(&big);
        let halves_b = u16_bytes(&halves);
        let scalar_b = u16_bytes(&[scalar]);
        let bf_b = u16_bytes(&bf);
        let entries = [
            TensorEntry {
                name: "big",
                dtype: StorageDtype::F32,
                shape: &[3, 300],
                data: &big_b,
            },
            TensorEntry {
                name: "halves",
                dtype: StorageDtype::F16,
                shape: &[70_000],
                data: &halves_b,
            },
            TensorEntry {
                name: "scalar",
                dtype: StorageDtype::BF16,
                shape: &[],
                data: &scalar_b,
            },
            TensorEntry {
                name: "bf",
                dtype: StorageDtype::BF16,
                shape: &[2, 1, 3],
                data: &bf_b,
            },
            TensorEntry {
                name: "empty",
                dtype: StorageDtype::F32,
                shape: &[0, 4],
                data: &empty,
            },
        ];

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("non_lora_trainables.bin");
        save_state_dict(&path, &entries).unwrap();
        // Only the final file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["non_lora_trainables.bin"]);
        if let Some(copy_to) = std::env::var_os("TORCH_PICKLE_SAMPLE_OUT") {
            std::fs::copy(&path, copy_to).unwrap();
        }

        let pth = candle_core::pickle::PthTensors::new(&path, None).unwrap();
        assert_eq!(pth.tensor_infos().len(), entries.len());
        for entry in &entries {
            let info = &pth.tensor_infos()[entry.name];
            assert_eq!(
                info.path,
                format!(
                    "non_lora_trainables/data/{}",
                    entries.iter().position(|e| e.name == entry.name).unwrap()
                )
            );
        }
        let get = |name: &str| pth.get(name).unwrap().unwrap();

        let t = get("big");
        assert_eq!((t.dtype(), t.dims()), (DType::F32, &[3usize, 300][..]));
        let got = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(
            got.iter()
                .zip(&big)
                .all(|(g, e)| g.to_bits() == e.to_bits())
        );

        let t = get("halves");
        assert_eq!((t.dtype(), t.dims()), (DType::F16, &[70_000usize][..]));
        let got = t.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
        assert!(
            got.iter()
                .zip(&halves)
                .all(|(g, &h)| g.to_bits() == f16_to_f32(h).to_bits())
        );

        let t = get("scalar");
        assert_eq!((t.dtype(), t.dims()), (DType::BF16, &[][..]));
        let got = t.to_dtype(DType::F32).unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(got.to_bits(), u32::from(scalar) << 16);
        assert_eq!(got, -5.6875);

        let t = get("bf");
        assert_eq!((t.dtype(), t.dims()), (DType::BF16, &[2usize, 1, 3][..]));
        let got = t
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let want: Vec<u32> = bf.iter().map(|&b| u32::from(b) << 16).collect();
        assert_eq!(got.iter().map(|g| g.to_bits()).collect::<Vec<_>>(), want);

        let t = get("empty");
        assert_eq!((t.dtype(), t.dims()), (DType::F32, &[0usize, 4][..]));
        assert_eq!(t.elem_count(), 0);
    }

    #[test]
    fn save_replaces_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("adapter_model.bin");
        std::fs::write(&path, b"old").unwrap();
        let data = f32_bytes(&[7.0]);
        let entry = TensorEntry {
            name: "x",
            dtype: StorageDtype::F32,
            shape: &[1],
            data: &data,
        };
        save_state_dict(&path, &[entry]).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let mut zip = zip::ZipArchive::new(Cursor::new(bytes.as_slice())).unwrap();
        assert_eq!(read_record(&mut zip, "adapter_model/data/0"), data);
        // A failed save leaves the previous file untouched and no temp file behind.
        let bad = TensorEntry {
            shape: &[2],
            ..entry
        };
        assert!(save_state_dict(&path, &[bad]).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
