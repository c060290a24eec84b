//! Fixture access shared by the integration tests: paths into the repo copy of the fixtures, the tiny
//! model loaded once per test binary, expected.json, and tensor comparison helpers.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use qalign_model::{LoadOptions, OneAlignModel, WeightFormat};
use serde_json::Value;

pub const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");

pub const STEMS: [&str; 5] = [
    "singapore_flyer",
    "boy_colorful",
    "synth_landscape_300x200_rgb",
    "synth_portrait_120x333_gray",
    "synth_rgba_255x180",
];

pub fn fixture(rel: &str) -> PathBuf {
    Path::new(FIXTURES).join(rel)
}

pub fn tiny_dir() -> PathBuf {
    fixture("tiny-onealign")
}

pub fn load_tiny(format: WeightFormat, dtype: DType) -> OneAlignModel {
    let opts = LoadOptions {
        device: Device::Cpu,
        dtype,
        format,
        ..LoadOptions::default()
    };
    OneAlignModel::load(&tiny_dir(), &opts).expect("tiny model loads")
}

/// The tiny model in f32 from safetensors, loaded once per test binary.
pub fn tiny_f32() -> &'static OneAlignModel {
    static MODEL: OnceLock<OneAlignModel> = OnceLock::new();
    MODEL.get_or_init(|| load_tiny(WeightFormat::Safetensors, DType::F32))
}

pub fn expected() -> &'static Value {
    static EXPECTED: OnceLock<Value> = OnceLock::new();
    EXPECTED.get_or_init(|| {
        let text = std::fs::read_to_string(fixture("expected/expected.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    })
}

pub fn tensors(rel: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(rel), &Device::Cpu).unwrap()
}

/// The fixture's image name for a stem (`.jpg` for the photos, `.png` for the synthetic ones).
pub fn image_name(stem: &str) -> String {
    let e = expected();
    e["images"]
        .as_object()
        .unwrap()
        .keys()
        .find(|k| k.rsplit_once('.').unwrap().0 == stem)
        .unwrap()
        .clone()
}

/// `[1, 3, 448, 448]` pixels of the official preprocessing of an image.
pub fn pixels(stem: &str) -> Tensor {
    let t = tensors(&format!("preprocess/{stem}.safetensors"));
    t["pixel_values"].unsqueeze(0).unwrap()
}

pub fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

pub fn i64s(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

pub fn level_ids() -> Vec<u32> {
    expected()["level_token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Asserts equal shapes and max |a − b| ≤ tol; returns the observed deviation.
#[track_caller]
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f32) -> f32 {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let d = max_abs_diff(&flat(got), &flat(want));
    assert!(d <= tol, "{what}: max abs diff {d:e} > {tol:e}");
    d
}

#[track_caller]
pub fn assert_close_vec(what: &str, got: &[f32], want: &[f32], tol: f32) -> f32 {
    let d = max_abs_diff(got, want);
    assert!(
        d <= tol,
        "{what}: max abs diff {d:e} > {tol:e} (got {got:?}, want {want:?})"
    );
    d
}

/// Softmax in f64 over a row of logits.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let exps: Vec<f64> = logits.iter().map(|&z| (z as f64 - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|e| (e / sum) as f32).collect()
}

pub fn weighted(probs: &[f32], weights: &[f32]) -> f32 {
    probs
        .iter()
        .zip(weights)
        .map(|(p, w)| (*p as f64) * (*w as f64))
        .sum::<f64>() as f32
}

pub fn score01_weights() -> Vec<f32> {
    f32s(&expected()["score01_weights"])
}

pub fn score15_weights() -> Vec<f32> {
    f32s(&expected()["score15_weights"])
}

/// Row `i` of a 2-D f32 tensor.
pub fn row(t: &Tensor, i: usize) -> Vec<f32> {
    t.get(i)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap()
}
