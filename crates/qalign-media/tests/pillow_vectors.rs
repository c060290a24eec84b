//! Decoding and resizing against reference vectors made with Pillow 10.2.0 (libjpeg-turbo 3.0.1,
//! libwebp 1.3.2) by `tests/data/make_pillow_vectors.py`: every input's `convert("RGB")` bytes
//! (with and without EXIF orientation) and `resize` results for every convolution filter.

use std::path::{Path, PathBuf};

use qalign_media::resize::resize;
use qalign_media::{DecodeOptions, ResampleFilter, decode_rgb, load_rgb};
use serde_json::Value;
use sha2::{Digest, Sha256};

fn data_dir() -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data")).to_path_buf()
}

fn vectors() -> Value {
    let text = std::fs::read_to_string(data_dir().join("pillow_vectors.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn pair(v: &Value) -> (u32, u32) {
    let a = v.as_array().unwrap();
    (a[0].as_u64().unwrap() as u32, a[1].as_u64().unwrap() as u32)
}

#[test]
fn every_format_decodes_like_pillow_convert_rgb() {
    let vectors = vectors();
    let decode = vectors["decode"].as_object().unwrap();
    assert!(decode.len() >= 20);
    let mut failures = Vec::new();
    for (name, want) in decode {
        let path = data_dir().join("inputs").join(name);
        for (oriented, size_key, sha_key) in [
            (false, "size_wh", "rgb_sha256"),
            (true, "oriented_size_wh", "oriented_rgb_sha256"),
        ] {
            let opts = DecodeOptions {
                exif_orientation: oriented,
            };
            match load_rgb(&path, &opts) {
                Ok(img) => {
                    if img.dimensions() != pair(&want[size_key])
                        || sha256_hex(img.as_raw()) != want[sha_key].as_str().unwrap()
                    {
                        failures.push(format!("{name} (orientation {oriented}): pixels differ"));
                    }
                }
                Err(e) => failures.push(format!("{name}: {e}")),
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn in_memory_decoding_equals_file_decoding() {
    let path = data_dir().join("inputs/q420_61x43.jpg");
    let bytes = std::fs::read(&path).unwrap();
    let opts = DecodeOptions::default();
    assert!(decode_rgb(&bytes, &opts).unwrap() == load_rgb(&path, &opts).unwrap());
}

#[test]
fn every_filter_resizes_like_pillow() {
    let vectors = vectors();
    let resize_vectors = vectors["resize"].as_object().unwrap();
    let mut checked = 0;
    let mut failures = Vec::new();
    for (name, entries) in resize_vectors {
        let img = load_rgb(
            &data_dir().join("inputs").join(name),
            &DecodeOptions::default(),
        )
        .unwrap();
        for entry in entries.as_array().unwrap() {
            let (w, h) = (
                entry["width"].as_u64().unwrap() as u32,
                entry["height"].as_u64().unwrap() as u32,
            );
            let code = entry["filter"].as_u64().unwrap() as u32;
            let filter = ResampleFilter::from_pillow_code(code).unwrap();
            let out = resize(&img, w, h, filter);
            if sha256_hex(out.as_raw()) != entry["sha256"].as_str().unwrap() {
                failures.push(format!("{name} -> {w}x{h} {filter:?}"));
            }
            checked += 1;
        }
    }
    assert!(checked >= 100);
    assert!(failures.is_empty(), "{failures:#?}");
}
