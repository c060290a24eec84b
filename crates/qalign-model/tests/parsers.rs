//! Property tests over hostile checkpoint files: whatever bytes sit in `model.safetensors`,
//! `pytorch_model.bin` (a zip holding a pickle) or a shard index, opening the folder returns a
//! typed error or a store whose every tensor reads back, and never panics. Besides arbitrary bytes,
//! structured mutations of valid files (a byte flipped, the file cut short, a header length or
//! field rewritten) reach past the first sanity checks.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use proptest::prelude::*;
use qalign_model::loader::ShardIndex;
use qalign_model::summary::summarize;
use qalign_model::{ModelError, WeightFormat, WeightStore};

const TINY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/tiny-onealign"
);

/// Opens `dir` and reads every tensor; any error must be one of the typed loading errors.
fn open_and_read_all(dir: &Path, format: WeightFormat) -> Result<usize, ModelError> {
    let store = WeightStore::open_dir(dir, format)?;
    let keys: Vec<String> = store.keys().into_iter().map(str::to_owned).collect();
    for key in &keys {
        let (shape, _) = store.entry(key).expect("listed keys have entries");
        let shape = shape.to_vec();
        store.load(key, &shape, DType::F32, &Device::Cpu)?;
    }
    Ok(keys.len())
}

fn assert_typed(result: Result<usize, ModelError>) -> Result<(), TestCaseError> {
    match result {
        Ok(_) => Ok(()),
        Err(
            ModelError::WeightFile { .. }
            | ModelError::Io { .. }
            | ModelError::Json { .. }
            | ModelError::MissingKey { .. }
            | ModelError::Candle(_),
        ) => Ok(()),
        Err(other) => Err(TestCaseError::fail(format!(
            "unexpected error kind: {other:?}"
        ))),
    }
}

/// A small valid safetensors file: three tensors of different dtypes and ranks.
fn small_safetensors() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| {
        let dev = Device::Cpu;
        let mut tensors = HashMap::new();
        let a = Tensor::arange(0f32, 12., &dev).unwrap();
        tensors.insert("a.weight".to_string(), a.reshape((3, 4)).unwrap());
        let b = Tensor::arange(0f32, 5., &dev).unwrap();
        tensors.insert("b.bias".to_string(), b.to_dtype(DType::BF16).unwrap());
        let c = Tensor::arange(0u32, 8, &dev).unwrap();
        tensors.insert("c.table".to_string(), c.reshape((2, 2, 2)).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        candle_core::safetensors::save(&tensors, &path).unwrap();
        std::fs::read(path).unwrap()
    })
}

/// The `data.pkl` of a real shard of the tiny model (a state-dict pickle of 74 tensors).
fn real_pickle() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| {
        let file =
            std::fs::File::open(Path::new(TINY).join("pytorch_model-00002-of-00003.bin")).unwrap();
        let mut zip = zip::ZipArchive::new(file).unwrap();
        let mut entry = zip
            .by_name("pytorch_model-00002-of-00003/data.pkl")
            .unwrap();
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).unwrap();
        bytes
    })
}

/// A PyTorch zip checkpoint holding `pickle` as `archive/data.pkl` (storages absent: the pickle
/// parser is what is exercised; reading a tensor then fails with a typed error).
fn pytorch_zip(pickle: &[u8]) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    let mut zip = zip::ZipWriter::new(&mut out);
    let options =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", options).unwrap();
    zip.write_all(pickle).unwrap();
    zip.start_file("archive/version", options).unwrap();
    zip.write_all(b"3\n").unwrap();
    zip.finish().unwrap();
    out.into_inner()
}

/// A model folder with the tiny config and one weight file.
struct Folder {
    dir: tempfile::TempDir,
}

impl Folder {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            Path::new(TINY).join("config.json"),
            dir.path().join("config.json"),
        )
        .unwrap();
        Self { dir }
    }

    fn write(&self, name: &str, bytes: &[u8]) -> &Path {
        std::fs::write(self.dir.path().join(name), bytes).unwrap();
        self.dir.path()
    }
}

/// A model folder of this thread (each test runs on its own thread), reused by every case of a
/// property test: `name` is written with `bytes` (other weight files are removed) and its path
/// returned.
fn with_folder(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    thread_local! {
        static FOLDER: Folder = Folder::new();
    }
    FOLDER.with(|folder| {
        for other in [
            "model.safetensors",
            "pytorch_model.bin",
            "model.safetensors.index.json",
        ] {
            if other != name {
                let _ = std::fs::remove_file(folder.dir.path().join(other));
            }
        }
        folder.write(name, bytes).to_path_buf()
    })
}

/// A mutation of a valid file.
#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, mask: u8 },
    Truncate { to: usize },
    Overwrite { at: usize, bytes: Vec<u8> },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(at, mask)| Mutation::Flip { at, mask }),
        any::<usize>().prop_map(|to| Mutation::Truncate { to }),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..9))
            .prop_map(|(at, bytes)| Mutation::Overwrite { at, bytes }),
    ]
}

fn apply(valid: &[u8], m: &Mutation, focus: usize) -> Vec<u8> {
    // Most mutations land in the first `focus` bytes (header, pickle opcodes), where parsing happens.
    let mut bytes = valid.to_vec();
    let within = |at: usize| at % focus.min(bytes.len()).max(1);
    match m {
        Mutation::Flip { at, mask } => {
            let i = within(*at);
            bytes[i] ^= mask;
        }
        Mutation::Truncate { to } => bytes.truncate(to % valid.len()),
        Mutation::Overwrite { at, bytes: new } => {
            let i = within(*at);
            for (k, b) in new.iter().enumerate() {
                if let Some(slot) = bytes.get_mut(i + k) {
                    *slot = *b;
                }
            }
        }
    }
    bytes
}

/// Safetensors header JSON built from parts, some of them nonsense.
fn header_json() -> impl Strategy<Value = String> {
    let dtype = prop::sample::select(vec![
        "F32", "BF16", "F16", "U8", "I64", "F64", "BOOL", "F8_E4M3", "XYZ", "",
    ]);
    let dim = prop_oneof![0usize..6, Just(usize::MAX), Just(1 << 40)];
    let shape = prop::collection::vec(dim, 0..4);
    let offset = prop_oneof![0u64..64, Just(u64::MAX), Just(1 << 62)];
    let entry = (dtype, shape, offset.clone(), offset);
    prop::collection::vec(("[a-z.]{0,8}", entry), 0..4).prop_map(|entries| {
        let map: serde_json::Map<String, serde_json::Value> = entries
            .into_iter()
            .map(|(name, (dtype, shape, start, end))| {
                let value = serde_json::json!({
                    "dtype": dtype, "shape": shape, "data_offsets": [start, end]
                });
                (name, value)
            })
            .collect();
        serde_json::Value::Object(map).to_string()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_as_safetensors(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let dir = &with_folder("model.safetensors", &bytes);
        assert_typed(open_and_read_all(dir, WeightFormat::Safetensors))?;
    }

    #[test]
    fn safetensors_with_a_length_prefix_and_arbitrary_header(
        len_delta in -3i64..3,
        huge_len in prop::option::weighted(0.1, any::<u64>()),
        header in prop_oneof![header_json(), "\\PC{0,40}"],
        data in prop::collection::vec(any::<u8>(), 0..96),
    ) {
        let mut bytes = Vec::new();
        let len = huge_len.unwrap_or((header.len() as i64 + len_delta).max(0) as u64);
        bytes.extend(len.to_le_bytes());
        bytes.extend(header.as_bytes());
        bytes.extend(data);
        let dir = &with_folder("model.safetensors", &bytes);
        assert_typed(open_and_read_all(dir, WeightFormat::Safetensors))?;
    }

    #[test]
    fn mutated_valid_safetensors(m in mutation()) {
        let valid = small_safetensors();
        let header_end = 8 + u64::from_le_bytes(valid[..8].try_into().unwrap()) as usize;
        let dir = &with_folder("model.safetensors", &apply(valid, &m, header_end));
        assert_typed(open_and_read_all(dir, WeightFormat::Safetensors))?;
        // The summary (`qalign info`) reads the same headers.
        prop_assert!(summarize(dir, WeightFormat::Safetensors).is_ok()
            || open_and_read_all(dir, WeightFormat::Safetensors).is_err());
    }

    #[test]
    fn arbitrary_bytes_as_pytorch_bin(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let dir = &with_folder("pytorch_model.bin", &bytes);
        assert_typed(open_and_read_all(dir, WeightFormat::PytorchBin))?;
    }

    #[test]
    fn arbitrary_pickle_in_a_valid_zip(pickle in prop::collection::vec(any::<u8>(), 0..256)) {
        let dir = &with_folder("pytorch_model.bin", &pytorch_zip(&pickle));
        assert_typed(open_and_read_all(dir, WeightFormat::PytorchBin))?;
    }

    #[test]
    fn arbitrary_bytes_as_shard_index(
        text in prop_oneof![
            "\\PC{0,64}",
            "\\{\"weight_map\": \\{(\"[a-z./]{0,6}\": \"[a-z./]{0,12}\",? ?){0,3}\\}\\}",
        ],
    ) {
        let dir = &with_folder("model.safetensors.index.json", text.as_bytes());
        let _ = ShardIndex::read(&dir.join("model.safetensors.index.json"));
        assert_typed(open_and_read_all(dir, WeightFormat::Safetensors))?;
    }
}

proptest! {
    // Each case writes a zip of the 15 KB pickle; fewer cases keep this under a few seconds.
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn mutated_real_pickle(m in mutation()) {
        let pickle = apply(real_pickle(), &m, real_pickle().len());
        let dir = &with_folder("pytorch_model.bin", &pytorch_zip(&pickle));
        assert_typed(open_and_read_all(dir, WeightFormat::PytorchBin))?;
    }

    #[test]
    fn mutated_pytorch_zip(m in mutation()) {
        let valid = pytorch_zip(real_pickle());
        let dir = &with_folder("pytorch_model.bin", &apply(&valid, &m, valid.len()));
        assert_typed(open_and_read_all(dir, WeightFormat::PytorchBin))?;
    }
}

#[test]
fn the_unmutated_files_are_valid() {
    let folder = Folder::new();
    let dir = folder.write("model.safetensors", small_safetensors());
    assert_eq!(
        open_and_read_all(dir, WeightFormat::Safetensors).unwrap(),
        3
    );

    let folder = Folder::new();
    let dir = folder.write("pytorch_model.bin", &pytorch_zip(real_pickle()));
    let store = WeightStore::open_dir(dir, WeightFormat::PytorchBin).unwrap();
    assert_eq!(store.keys().len(), 110);
    // The storages are not in this zip: reading a tensor is a typed error naming the file.
    let key = store.keys()[0].to_owned();
    let shape = store.entry(&key).unwrap().0.to_vec();
    let err = store
        .load(&key, &shape, DType::F32, &Device::Cpu)
        .unwrap_err();
    assert!(
        matches!(&err, ModelError::WeightFile { message, .. } if message.contains(&key)),
        "{err:?}"
    );
}

#[test]
fn a_huge_header_length_is_refused_without_allocating_it() {
    let mut bytes = (u64::MAX / 2).to_le_bytes().to_vec();
    bytes.extend(b"{}");
    let folder = Folder::new();
    let dir = folder.write("model.safetensors", &bytes);
    let err = WeightStore::open_dir(dir, WeightFormat::Safetensors).unwrap_err();
    assert!(matches!(err, ModelError::WeightFile { .. }), "{err:?}");
}

#[test]
fn hostile_pickles_are_refused_before_candle_parses_them() {
    // 100 000 nested 1-tuples: candle's recursive reader overflowed the stack (an abort).
    let mut deep = b"\x80\x02N".to_vec();
    deep.extend(std::iter::repeat_n(0x85u8, 100_000));
    deep.push(b'.');
    // A memoised object copied into itself 64 times: 2^64 objects.
    let mut doubling = b"\x80\x02)".to_vec();
    for _ in 0..64 {
        doubling.extend(b"q\x00h\x00\x86");
    }
    doubling.push(b'.');
    // LONG1 of 9 bytes: candle's decoder overflowed a shift (a panic).
    let long = b"\x80\x02\x8a\x09123456789.".to_vec();
    for (pickle, why) in [
        (deep, "deeper than"),
        (doubling, "objects"),
        (long, "LONG1"),
    ] {
        let folder = Folder::new();
        let dir = folder.write("pytorch_model.bin", &pytorch_zip(&pickle));
        match WeightStore::open_dir(dir, WeightFormat::PytorchBin) {
            Err(ModelError::WeightFile { path, message }) => {
                assert_eq!(path, dir.join("pytorch_model.bin"));
                assert!(message.contains(why), "{message}");
            }
            other => panic!("expected WeightFile ({why}), got {other:?}"),
        }
    }
}
