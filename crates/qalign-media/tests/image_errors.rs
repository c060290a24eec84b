//! Bad image inputs: every one must give a `MediaError` naming the file and the reason, never a
//! panic (libjpeg's fatal errors included).

use std::path::{Path, PathBuf};

use qalign_media::{DecodeOptions, MediaError, PreprocessConfig, decode_rgb, load_rgb};

fn fixture_jpeg() -> Vec<u8> {
    std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/images/boy_colorful.jpg"
    ))
    .unwrap()
}

fn fixture_png() -> Vec<u8> {
    std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/images/synth_landscape_300x200_rgb.png"
    ))
    .unwrap()
}

/// Writes `bytes` to a temporary file and decodes it.
fn load_bytes(name: &str, bytes: &[u8]) -> (PathBuf, Result<image::RgbImage, MediaError>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).unwrap();
    let result = load_rgb(&path, &DecodeOptions::default());
    (path, result)
}

fn expect_decode_error(name: &str, bytes: &[u8], reason: &str) {
    let (path, result) = load_bytes(name, bytes);
    match result {
        Err(err @ MediaError::Decode { .. }) => {
            let text = err.to_string();
            assert!(text.contains(&path.display().to_string()), "{text}");
            assert!(
                text.to_lowercase().contains(reason),
                "{name}: `{text}` lacks `{reason}`"
            );
        }
        other => panic!("{name}: expected a decode error, got {other:?}"),
    }
}

#[test]
fn missing_file_is_an_io_error_naming_it() {
    let err = load_rgb(Path::new("/no/such/dir/img.jpg"), &DecodeOptions::default()).unwrap_err();
    assert!(matches!(err, MediaError::Io { .. }));
    assert!(err.to_string().contains("/no/such/dir/img.jpg"));
}

#[test]
fn directory_is_an_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = load_rgb(dir.path(), &DecodeOptions::default()).unwrap_err();
    assert!(matches!(err, MediaError::Io { .. }), "{err:?}");
}

#[test]
fn empty_file() {
    expect_decode_error("empty.jpg", b"", "empty");
}

#[test]
fn text_file_is_not_an_image() {
    expect_decode_error(
        "notes.jpg",
        b"just some text, not pixels\n",
        "not a recognised image",
    );
}

#[test]
fn truncated_jpeg_is_rejected_like_pillow() {
    let jpeg = fixture_jpeg();
    // Cut inside the entropy-coded data: libjpeg would pad with grey; Pillow raises.
    expect_decode_error("cut.jpg", &jpeg[..jpeg.len() / 2], "truncated");
    // Only the SOI marker and a bit of a header.
    expect_decode_error("header_only.jpg", &jpeg[..20], "jpeg");
}

#[test]
fn corrupt_jpeg_headers_do_not_panic() {
    let jpeg = fixture_jpeg();
    for cut in [3usize, 4, 100, 200, 400, 600] {
        let (_, result) = load_bytes("partial.jpg", &jpeg[..cut.min(jpeg.len())]);
        assert!(
            matches!(result, Err(MediaError::Decode { .. })),
            "cut at {cut}: {result:?}"
        );
    }
    // Garbage after a valid start of image marker.
    let mut garbage = vec![0xFF, 0xD8, 0xFF];
    garbage.extend((0..500u32).map(|i| (i * 37 % 251) as u8));
    let (_, result) = load_bytes("garbage.jpg", &garbage);
    assert!(
        matches!(result, Err(MediaError::Decode { .. })),
        "{result:?}"
    );
}

#[test]
fn jpeg_with_absurd_dimensions_is_refused_before_allocating() {
    let mut jpeg = fixture_jpeg();
    // Patch the SOF0 frame header's height/width to 60000x60000 (3.6 gigapixels; libjpeg itself
    // accepts up to 65500 per side).
    let sof = jpeg
        .windows(2)
        .position(|w| w == [0xFF, 0xC0])
        .expect("baseline SOF0 marker");
    jpeg[sof + 5..sof + 9].copy_from_slice(&[0xEA, 0x60, 0xEA, 0x60]);
    let (_, result) = load_bytes("huge.jpg", &jpeg);
    match result {
        Err(err @ MediaError::Unsupported { .. }) => {
            assert!(err.to_string().contains("exceeds the limit"), "{err}")
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
}

#[test]
fn truncated_and_corrupt_png() {
    let png = fixture_png();
    expect_decode_error("cut.png", &png[..png.len() / 2], "png");
    let mut bad_crc = png.clone();
    bad_crc[40] ^= 0xFF;
    let (_, result) = load_bytes("crc.png", &bad_crc);
    assert!(
        matches!(result, Err(MediaError::Decode { .. })),
        "{result:?}"
    );
}

#[test]
fn png_with_absurd_dimensions_is_refused() {
    let mut png = fixture_png();
    // IHDR width/height start at byte 16; the CRC then mismatches, which must also be an error.
    png[16..24].copy_from_slice(&[0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00]);
    let (_, result) = load_bytes("huge.png", &png);
    assert!(result.is_err(), "{result:?}");
}

#[test]
fn recognised_but_unsupported_format() {
    // A binary PPM: the format is known, but not one of the formats the official data uses.
    let ppm = b"P6\n2 1\n255\n\x00\x00\x00\xff\xff\xff";
    let (_, result) = load_bytes("tiny.ppm", ppm);
    match result {
        Err(err @ MediaError::Unsupported { .. }) => {
            assert!(err.to_string().contains("not supported"), "{err}")
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
}

#[test]
fn in_memory_errors_name_the_source() {
    let err = decode_rgb(b"", &DecodeOptions::default()).unwrap_err();
    assert!(err.to_string().contains("<in-memory image>"), "{err}");
}

#[test]
fn preprocess_path_propagates_decode_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.png");
    std::fs::write(&path, b"\x89PNG\r\n\x1a\nnope").unwrap();
    let err = qalign_media::preprocess_path(
        &path,
        &PreprocessConfig::clip(448),
        &DecodeOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, MediaError::Decode { .. }), "{err:?}");
}
