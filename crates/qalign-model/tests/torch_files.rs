//! PyTorch `.bin` files as torch writes them: views of one storage (offsets, strides, permuted
//! and transposed tensors) read like `torch.load(...).contiguous()`, and files that are not a
//! complete zip checkpoint refused with a reason. Fixture: tests/fixtures/torch-views (make.py).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use qalign_model::{CheckpointFiles, ModelError, WeightFormat, WeightStore};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/torch-views")
        .join(name)
}

fn open(path: PathBuf) -> Result<WeightStore, ModelError> {
    WeightStore::open(CheckpointFiles {
        format: WeightFormat::PytorchBin,
        index: None,
        shards: vec![path],
    })
}

fn values(store: &WeightStore, key: &str, shape: &[usize]) -> Vec<f32> {
    store
        .load(key, shape, DType::F32, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{key}: {e}"))
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn views_of_a_shared_storage_read_at_their_own_offset_and_strides() {
    let store = open(fixture("views.bin")).unwrap();
    let base: Vec<f32> = (0..24).map(|v| v as f32).collect();
    assert_eq!(values(&store, "full", &[4, 6]), base);
    // base[:, ::2]: strides [6, 2], which candle's reader refuses on its own.
    let strided: Vec<f32> = (0..12).map(|v| 2.0 * v as f32).collect();
    assert_eq!(values(&store, "strided", &[4, 3]), strided);
    // arange(24).reshape(2, 3, 4).permute(1, 0, 2): strides [4, 12, 1].
    let permuted = [
        0., 1., 2., 3., 12., 13., 14., 15., 4., 5., 6., 7., 16., 17., 18., 19., 8., 9., 10., 11.,
        20., 21., 22., 23.,
    ];
    assert_eq!(values(&store, "permuted", &[3, 2, 4]), permuted);
    // bf16 arange(10)[3:7].view(2, 2): storage offset 3 elements (6 bytes).
    assert_eq!(store.entry("offset").unwrap().1, DType::BF16);
    assert_eq!(values(&store, "offset", &[2, 2]), [3., 4., 5., 6.]);
    // base.t(): column-major.
    let transposed: Vec<f32> = (0..24).map(|i| ((i % 4) * 6 + i / 4) as f32).collect();
    assert_eq!(values(&store, "transposed", &[6, 4]), transposed);
}

fn refusal(path: PathBuf) -> String {
    match open(path) {
        Err(ModelError::WeightFile { message, .. }) => message,
        Err(other) => panic!("unexpected error {other:?}"),
        Ok(_) => panic!("opened"),
    }
}

#[test]
fn files_that_are_not_a_complete_zip_checkpoint_say_why() {
    let legacy = refusal(fixture("views-legacy.bin"));
    assert!(legacy.contains("legacy (pre-1.6, non-zip)"), "{legacy}");

    let dir = tempfile::tempdir().unwrap();
    let whole = std::fs::read(fixture("views.bin")).unwrap();
    let cut = dir.path().join("pytorch_model.bin");
    std::fs::write(&cut, &whole[..whole.len() / 2]).unwrap();
    let truncated = refusal(cut.clone());
    assert!(truncated.contains("truncated"), "{truncated}");

    std::fs::write(&cut, b"{\"not\": \"a checkpoint\"}").unwrap();
    let other = refusal(cut.clone());
    assert!(other.contains("not a PyTorch checkpoint"), "{other}");

    std::fs::write(&cut, b"").unwrap();
    let empty = refusal(cut);
    assert!(empty.contains("not a PyTorch checkpoint"), "{empty}");
}
