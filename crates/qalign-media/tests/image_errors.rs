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

/// A valid PNG bomb: 16384x16384 (268 M pixels, above the cap), 1-bit grayscale, all black,
/// written row by row by the `png` encoder (correct CRCs, complete zlib stream) into ~40 KB.
fn png_bomb() -> Vec<u8> {
    use std::io::Write;
    const SIDE: u32 = 16384;
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, SIDE, SIDE);
    encoder.set_color(png::ColorType::Grayscale);
    encoder.set_depth(png::BitDepth::One);
    encoder.set_compression(png::Compression::High);
    let mut writer = encoder.write_header().unwrap();
    let mut stream = writer.stream_writer().unwrap();
    let row = vec![0u8; SIDE as usize / 8];
    for _ in 0..SIDE {
        stream.write_all(&row).unwrap();
    }
    stream.finish().unwrap();
    writer.finish().unwrap();
    out
}

#[test]
fn valid_png_bomb_is_refused_by_the_pixel_limit() {
    let bomb = png_bomb();
    assert!(bomb.len() < 200_000, "bomb is {} bytes", bomb.len());
    // The file is valid: the reference decoder reads every row without a CRC or zlib error.
    let mut decoder = png::Decoder::new(std::io::Cursor::new(&bomb));
    decoder.set_limits(png::Limits { bytes: usize::MAX });
    let mut reader = decoder.read_info().unwrap();
    let mut rows = vec![0u8; reader.output_buffer_size().unwrap()];
    let frame = reader.next_frame(&mut rows).unwrap();
    assert_eq!((frame.width, frame.height), (16384, 16384));
    assert!(rows.iter().all(|&b| b == 0));
    reader.finish().unwrap();
    drop(rows);

    let (path, result) = load_bytes("bomb.png", &bomb);
    match result {
        Err(err @ MediaError::Unsupported { .. }) => assert_eq!(
            err.to_string(),
            format!(
                "unsupported input {}: image too large: 16384x16384 exceeds the limit of \
                 178956970 pixels",
                path.display()
            )
        ),
        other => panic!("expected the pixel-limit error, got {other:?}"),
    }
    let err = decode_rgb(&bomb, &DecodeOptions::default()).unwrap_err();
    assert!(
        err.to_string()
            .ends_with("image too large: 16384x16384 exceeds the limit of 178956970 pixels"),
        "{err}"
    );
}

/// A GIF whose logical screen is `width`x`height` with one `frame_w`x`frame_h` all-zero frame.
fn gif_with(width: u16, height: u16, frame_w: u16, frame_h: u16) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut encoder =
            gif::Encoder::new(&mut out, width, height, &[0, 0, 0, 255, 255, 255]).unwrap();
        let pixels = vec![0u8; usize::from(frame_w) * usize::from(frame_h)];
        let frame = gif::Frame {
            width: frame_w,
            height: frame_h,
            buffer: std::borrow::Cow::Owned(pixels),
            ..Default::default()
        };
        encoder.write_frame(&frame).unwrap();
    }
    out
}

#[test]
fn gif_over_the_pixel_limit_says_too_large_not_out_of_memory() {
    // A 20000x20000 screen (400 M pixels) holding a 1x1 frame: valid, tiny, over the cap.
    let (path, result) = load_bytes("huge.gif", &gif_with(20000, 20000, 1, 1));
    let err = result.unwrap_err();
    assert!(matches!(err, MediaError::Unsupported { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "unsupported input {}: image too large: 20000x20000 exceeds the limit of 178956970 pixels",
            path.display()
        )
    );
    // A 1x1 screen whose frame descriptor claims 65535x65535: refused from that header,
    // before the decoder allocates 4 GB for the frame.
    let mut claims_huge_frame =
        b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff".to_vec();
    claims_huge_frame.extend_from_slice(b"\x2c\x00\x00\x00\x00\xff\xff\xff\xff\x00");
    claims_huge_frame.extend_from_slice(b"\x02\x02\x4c\x01\x00\x3b");
    let (_, result) = load_bytes("frame.gif", &claims_huge_frame);
    let err = result.unwrap_err();
    assert!(
        err.to_string()
            .contains("image too large: 65535x65535 exceeds the limit"),
        "{err}"
    );
}

#[test]
fn gif_above_the_gif_crates_default_budget_but_under_the_cap_decodes() {
    // 7072x7072 = 50.01 M pixels: over the `gif` crate's default 50 MB frame budget (which gave
    // "Out of Memory"), well under the pixel cap, so it must decode like any allowed image.
    let (_, result) = load_bytes("large.gif", &gif_with(7072, 7072, 7072, 7072));
    let image = result.unwrap();
    assert_eq!(image.dimensions(), (7072, 7072));
    assert!(image.as_raw().iter().all(|&b| b == 0));
}

#[test]
fn endless_stream_that_looks_like_an_image_is_cut_at_the_byte_limit() {
    // Reads (and holds) MAX_FILE_BYTES: about a second in release builds, several in debug ones.
    use std::io::Read;
    let stream = (&b"\x89PNG\r\n\x1a\n"[..]).chain(std::io::repeat(0));
    let err =
        qalign_media::read_rgb(stream, Path::new("-"), &DecodeOptions::default()).unwrap_err();
    assert!(matches!(err, MediaError::Unsupported { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "unsupported input -: file too large: the stream exceeds the limit of {} bytes for \
             an encoded image",
            qalign_media::MAX_FILE_BYTES
        )
    );
}

#[test]
fn errors_name_the_file_exactly_once() {
    let jpeg = fixture_jpeg();
    let cases: [(&str, &[u8]); 5] = [
        ("empty.jpg", b""),
        ("text.png", b"plain text"),
        ("cut.jpg", &jpeg[..jpeg.len() / 2]),
        ("tiny.ppm", b"P6\n2 1\n255\n\x00\x00\x00\xff\xff\xff"),
        ("bad.gif", b"GIF89a\x01\x00\x01\x00\x00\x00"),
    ];
    for (name, bytes) in cases {
        let (path, result) = load_bytes(name, bytes);
        let err = result.unwrap_err();
        assert_eq!(err.path(), Some(path.as_path()));
        let text = err.to_string();
        let shown = path.display().to_string();
        assert_eq!(text.matches(&shown).count(), 1, "{text}");
        assert_eq!(text.matches(name).count(), 1, "{text}");
    }
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
fn heic_is_named_as_unsupported_not_as_corrupt() {
    // The `ftyp` box of an iPhone photo (brand heic, compatible mif1), then box data.
    let mut heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic".to_vec();
    heic.extend_from_slice(&[0x5a; 600]);
    let (_, result) = load_bytes("IMG_0001.HEIC", &heic);
    match result {
        Err(err @ MediaError::Unsupported { .. }) => {
            let text = err.to_string();
            assert!(
                text.contains("HEIF/HEIC images are not supported"),
                "{text}"
            );
            assert!(text.contains("IMG_0001.HEIC"), "{text}");
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
    // AVIF keeps the `image` crate's own name for it.
    let mut avif = b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf".to_vec();
    avif.extend_from_slice(&[0x5a; 600]);
    let (_, result) = load_bytes("a.avif", &avif);
    let err = result.unwrap_err();
    assert!(
        err.to_string().contains("Avif images are not supported"),
        "{err}"
    );
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
