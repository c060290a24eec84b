//! Random-weight models (`qalign bench --random-weights`): built from config.json alone, with the
//! checkpoint model's shapes, the usual initialisation, and finite outputs.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use qalign_model::{LoadOptions, OneAlignModel, Weights};

fn tiny_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/tiny-onealign"
    ))
}

/// A folder holding only the tiny model's config.json.
fn config_only() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        tiny_dir().join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    dir
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn random_tensors_follow_the_usual_initialisation() {
    let w = Weights::random(DType::F32, Device::Cpu).pp("layer");
    assert!(w.is_random());
    assert!(!w.contains("weight"));
    assert_eq!(w.stored_dtype("weight"), None);
    assert_eq!(values(&w.get(&[7], "weight").unwrap()), vec![1.0; 7]);
    assert_eq!(values(&w.get(&[7], "bias").unwrap()), vec![0.0; 7]);
    let m = w.get(&[256, 128], "weight").unwrap();
    assert_eq!(m.dims(), &[256, 128]);
    let v = values(&m);
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let std = (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
    // 32768 samples of N(0, 0.02²): the mean is within 5 standard errors, the std within 3%.
    assert!(mean.abs() < 5.0 * 0.02 / n.sqrt(), "mean {mean}");
    assert!((std - 0.02).abs() < 0.02 * 0.03, "std {std}");
    let half = Weights::random(DType::BF16, Device::Cpu)
        .get(&[3, 5], "weight")
        .unwrap();
    assert_eq!(half.dtype(), DType::BF16);
}

#[test]
fn random_model_has_the_checkpoint_shapes_and_finite_outputs() {
    let dir = config_only();
    let opts = LoadOptions::default();
    let random = OneAlignModel::random_init(dir.path(), &opts).unwrap();
    let real = OneAlignModel::load(&tiny_dir(), &opts).unwrap();
    assert!(random.has_random_weights());
    assert!(!real.has_random_weights());
    assert!(random.checkpoint_files().shards.is_empty());
    assert_eq!(random.config(), real.config());

    let pixels = Tensor::randn(0f32, 1f32, (2, 3, 448, 448), &Device::Cpu).unwrap();
    let visual = random.encode_images(&pixels).unwrap();
    assert_eq!(visual.dims(), &[2, 65, 64]);
    assert!(values(&visual).iter().all(|x| x.is_finite()));
    // `USER: <|image|>ASSISTANT:`-like ids: any in-vocabulary text around one placeholder.
    let ids = [1i64, 3148, 1001, 29901, -200, 13, 22933, 9047, 13566, 29901];
    let logits = random
        .image_level_logits(&ids, &pixels, &[15129, 1781, 6534, 6460, 4319])
        .unwrap();
    assert_eq!(logits.dims(), &[2, 5]);
    assert!(values(&logits).iter().all(|x| x.is_finite()));
}

#[test]
fn random_model_errors_name_the_problem() {
    let empty = tempfile::tempdir().unwrap();
    let err = OneAlignModel::random_init(empty.path(), &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("config.json"), "{err}");

    let dir = config_only();
    let opts = LoadOptions {
        dtype: DType::U8,
        ..LoadOptions::default()
    };
    let err = OneAlignModel::random_init(dir.path(), &opts)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not supported"), "{err}");
}
