//! The image pipeline against the official preprocessing fixtures (Pillow 10.2 + libjpeg-turbo
//! 3.0.1 + transformers 4.36): decoded pixels, square layout, the 8-bit resize stage and the final
//! normalised tensor, for every image in `tests/fixtures/images`.

use std::path::{Path, PathBuf};

use qalign_media::image::square_layout;
use qalign_media::{DecodeOptions, PreprocessConfig, expand2square, load_rgb, preprocess_path};
use serde_json::Value;
use sha2::{Digest, Sha256};

fn fixtures() -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures")).to_path_buf()
}

fn manifest() -> Value {
    let text = std::fs::read_to_string(fixtures().join("preprocess/preprocess.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn config() -> PreprocessConfig {
    PreprocessConfig::from_file(&fixtures().join("tiny-onealign/preprocessor_config.json")).unwrap()
}

/// The official `pixel_values` of one image, [3, 448, 448] f32.
fn expected_pixels(file: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(fixtures().join("preprocess").join(file)).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = tensors.tensor("pixel_values").unwrap();
    assert_eq!(view.dtype(), safetensors::Dtype::F32);
    let values = view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    (view.shape().to_vec(), values)
}

fn images() -> Vec<(String, Value)> {
    let manifest = manifest();
    let images = manifest["images"].as_object().unwrap();
    assert_eq!(images.len(), 5);
    images.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn config_matches_the_fixture_manifest() {
    let manifest = manifest();
    let cfg = config();
    let bg: Vec<u64> = manifest["background_color"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(cfg.background().map(u64::from).to_vec(), bg);
    assert_eq!(cfg.background(), [122, 116, 104]);
    assert_eq!(
        cfg.size,
        qalign_media::preprocess::ResizeTarget::ShortestEdge(448)
    );
    assert_eq!((cfg.crop_size.height, cfg.crop_size.width), (448, 448));
    assert_eq!(cfg.resample, qalign_media::ResampleFilter::Bicubic);
}

#[test]
fn decoded_rgb_matches_pillow_checksums() {
    for (name, info) in images() {
        let img = load_rgb(
            &fixtures().join("images").join(&name),
            &DecodeOptions::default(),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let size = info["original_size_wh"].as_array().unwrap();
        assert_eq!(
            (u64::from(img.width()), u64::from(img.height())),
            (size[0].as_u64().unwrap(), size[1].as_u64().unwrap()),
            "{name}"
        );
        let sum: u64 = img.as_raw().iter().map(|&v| u64::from(v)).sum();
        assert_eq!(sum, info["decoded_rgb_sum"].as_u64().unwrap(), "{name} sum");
        assert_eq!(
            hex(&Sha256::digest(img.as_raw())),
            info["decoded_rgb_sha256"].as_str().unwrap(),
            "{name} sha256"
        );
    }
}

#[test]
fn square_layout_matches_manifest() {
    for (name, info) in images() {
        let size = info["original_size_wh"].as_array().unwrap();
        let (w, h) = (
            size[0].as_u64().unwrap() as u32,
            size[1].as_u64().unwrap() as u32,
        );
        let layout = square_layout(w, h);
        let offset = info["paste_offset_xy"].as_array().unwrap();
        assert_eq!(
            u64::from(layout.side),
            info["square_side"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(
            (u64::from(layout.x), u64::from(layout.y)),
            (offset[0].as_u64().unwrap(), offset[1].as_u64().unwrap()),
            "{name}"
        );
    }
}

/// Inverts the normalisation: the byte whose normalised value is exactly `value`.
fn byte_for(cfg: &PreprocessConfig, channel: usize, value: f32) -> Option<u8> {
    let lut = cfg.normalize(&qalign_media::RgbImage::from_fn(256, 1, |x, _| {
        image::Rgb([x as u8; 3])
    }));
    let plane = &lut.data[channel * 256..][..256];
    plane
        .iter()
        .position(|&v| v.to_bits() == value.to_bits())
        .map(|b| b as u8)
}

#[test]
fn eight_bit_stage_is_exact() {
    let cfg = config();
    for (name, info) in images() {
        let (shape, expected) = expected_pixels(info["file"].as_str().unwrap());
        assert_eq!(shape, vec![3, 448, 448], "{name}");
        let img = load_rgb(
            &fixtures().join("images").join(&name),
            &DecodeOptions::default(),
        )
        .unwrap();
        let ours = cfg.resize_and_crop(&expand2square(&img, cfg.background()));
        assert_eq!(ours.dimensions(), (448, 448), "{name}");
        let fused = cfg.pad_resize_and_crop(&img);
        assert!(
            fused == ours,
            "{name}: fused pad+resize differs from pad then resize"
        );
        let plane = 448 * 448;
        let mut mismatches = 0;
        for c in 0..3 {
            // Distinct values per channel are few; invert each once.
            let mut cache = std::collections::HashMap::new();
            for i in 0..plane {
                let value = expected[c * plane + i];
                let byte = *cache
                    .entry(value.to_bits())
                    .or_insert_with(|| byte_for(&cfg, c, value));
                let byte = byte.unwrap_or_else(|| {
                    panic!("{name}: fixture value {value} is not a normalised byte")
                });
                if ours.as_raw()[i * 3 + c] != byte {
                    mismatches += 1;
                }
            }
        }
        assert_eq!(mismatches, 0, "{name}: 8-bit values differing from Pillow");
    }
}

#[test]
fn normalised_tensor_is_bit_identical() {
    let cfg = config();
    for (name, info) in images() {
        let (_, expected) = expected_pixels(info["file"].as_str().unwrap());
        let pixels = preprocess_path(
            &fixtures().join("images").join(&name),
            &cfg,
            &DecodeOptions::default(),
        )
        .unwrap();
        assert_eq!(pixels.shape(), [3, 448, 448]);
        let worst = pixels
            .data
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst <= 1e-6, "{name}: max abs diff {worst}");
        let differing = pixels
            .data
            .iter()
            .zip(&expected)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(differing, 0, "{name}: values not bit-identical");
        let sum: f64 = pixels.data.iter().map(|&v| f64::from(v)).sum();
        let want = info["pixel_values_sum"].as_f64().unwrap();
        assert!(
            (sum - want).abs() <= 1e-9 * want.abs().max(1.0),
            "{name}: sum {sum} vs {want}"
        );
    }
}
