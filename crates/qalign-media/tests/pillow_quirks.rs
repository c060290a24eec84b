//! Format corners where Pillow 10.2 (`Image.open(f).convert("RGB")`) differs from a plain
//! decoder, on small files built here byte by byte. Every expected value was computed with
//! Pillow 10.2.0 on the same bytes (the Python builders mirror the ones below).

use std::path::Path;

use qalign_media::image::check_tiff_tags;
use qalign_media::{
    DecodeOptions, MediaError, PreprocessConfig, decode_rgb, load_rgb, preprocess_path,
};
use sha2::Digest;

/// `(width, height, RGB bytes)` of a decoded image, without and with EXIF orientation (which
/// must not matter for the formats tested here, so both are checked equal).
fn decode(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
    let plain = decode_rgb(bytes, &DecodeOptions::default()).unwrap();
    let oriented = decode_rgb(
        bytes,
        &DecodeOptions {
            exif_orientation: true,
        },
    )
    .unwrap();
    assert!(plain == oriented, "EXIF orientation changed the result");
    (plain.width(), plain.height(), plain.into_raw())
}

fn refusal(bytes: &[u8]) -> String {
    match decode_rgb(bytes, &DecodeOptions::default()) {
        Err(err @ MediaError::Unsupported { .. }) => err.to_string(),
        other => panic!("expected an Unsupported error, got {other:?}"),
    }
}

/// A little-endian, single-strip, uncompressed TIFF; `tags` are extra one-SHORT tags.
fn tiff(
    width: u16,
    height: u16,
    bits: &[u16],
    photometric: u16,
    tags: &[(u16, u16)],
    data: &[u8],
) -> Vec<u8> {
    let samples = bits.len() as u16;
    let mut entries: Vec<(u16, u16, Vec<u16>)> = vec![
        (256, 3, vec![width]),
        (257, 3, vec![height]),
        (258, 3, bits.to_vec()),
        (259, 3, vec![1]),
        (262, 3, vec![photometric]),
        (273, 4, vec![]),
        (277, 3, vec![samples]),
        (278, 3, vec![height]),
        (279, 4, vec![]),
    ];
    entries.extend(tags.iter().map(|&(tag, value)| (tag, 3, vec![value])));
    entries.sort_by_key(|e| e.0);
    let bits_at = 8 + 2 + 12 * entries.len() as u32 + 4;
    let data_at = bits_at
        + if samples > 2 {
            2 * u32::from(samples)
        } else {
            0
        };
    let mut out = b"II*\0\x08\0\0\0".to_vec();
    out.extend((entries.len() as u16).to_le_bytes());
    for (tag, kind, values) in &entries {
        out.extend(tag.to_le_bytes());
        out.extend(kind.to_le_bytes());
        match (tag, values.len()) {
            (273 | 279, _) => {
                let value = if *tag == 273 {
                    data_at
                } else {
                    data.len() as u32
                };
                out.extend(1u32.to_le_bytes());
                out.extend(value.to_le_bytes());
            }
            (_, n @ 1..=2) => {
                out.extend((n as u32).to_le_bytes());
                let mut field: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                field.resize(4, 0);
                out.extend(field);
            }
            (_, n) => {
                out.extend((n as u32).to_le_bytes());
                out.extend(bits_at.to_le_bytes());
            }
        }
    }
    out.extend(0u32.to_le_bytes());
    if samples > 2 {
        out.extend(bits.iter().flat_map(|b| b.to_le_bytes()));
    }
    out.extend_from_slice(data);
    out
}

#[test]
fn tiff_orientation_is_always_applied_like_pillow() {
    // Pillow's TiffImagePlugin.load_end calls ImageOps.exif_transpose, whatever the caller asks.
    let base: Vec<u8> = (0..18).map(|i| i * 5).collect(); // 3x2, pixel p = (15p, 15p+5, 15p+10)
    let expected: [(u32, u32, [u8; 18]); 8] = [
        (
            3,
            2,
            [
                0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55, 60, 65, 70, 75, 80, 85,
            ],
        ),
        (
            3,
            2,
            [
                30, 35, 40, 15, 20, 25, 0, 5, 10, 75, 80, 85, 60, 65, 70, 45, 50, 55,
            ],
        ),
        (
            3,
            2,
            [
                75, 80, 85, 60, 65, 70, 45, 50, 55, 30, 35, 40, 15, 20, 25, 0, 5, 10,
            ],
        ),
        (
            3,
            2,
            [
                45, 50, 55, 60, 65, 70, 75, 80, 85, 0, 5, 10, 15, 20, 25, 30, 35, 40,
            ],
        ),
        (
            2,
            3,
            [
                0, 5, 10, 45, 50, 55, 15, 20, 25, 60, 65, 70, 30, 35, 40, 75, 80, 85,
            ],
        ),
        (
            2,
            3,
            [
                45, 50, 55, 0, 5, 10, 60, 65, 70, 15, 20, 25, 75, 80, 85, 30, 35, 40,
            ],
        ),
        (
            2,
            3,
            [
                75, 80, 85, 30, 35, 40, 60, 65, 70, 15, 20, 25, 45, 50, 55, 0, 5, 10,
            ],
        ),
        (
            2,
            3,
            [
                30, 35, 40, 75, 80, 85, 15, 20, 25, 60, 65, 70, 0, 5, 10, 45, 50, 55,
            ],
        ),
    ];
    for (orientation, (width, height, pixels)) in (1..=8).zip(expected) {
        let file = tiff(3, 2, &[8, 8, 8], 2, &[(274, orientation)], &base);
        assert_eq!(
            decode(&file),
            (width, height, pixels.to_vec()),
            "orientation {orientation}"
        );
    }
}

#[test]
fn tiff_associated_alpha_is_divided_out_like_pillow() {
    // RGBA pixels: (c * 255 / a) truncated and clipped, a = 0 gives black, a = 255 keeps c.
    let rgba = [
        100, 50, 20, 128, 60, 60, 60, 64, 255, 255, 255, 255, 10, 20, 30, 0, 200, 7, 90, 100, 1, 2,
        3, 1,
    ];
    let associated = tiff(6, 1, &[8; 4], 2, &[(338, 1)], &rgba);
    let pillow = [
        199, 99, 39, 239, 239, 239, 255, 255, 255, 0, 0, 0, 255, 17, 229, 255, 255, 255,
    ];
    assert_eq!(decode(&associated), (6, 1, pillow.to_vec()));
    // Unassociated alpha (ExtraSamples = 2) is dropped as stored.
    let unassociated = tiff(6, 1, &[8; 4], 2, &[(338, 2)], &rgba);
    let stored: Vec<u8> = rgba.chunks(4).flat_map(|p| [p[0], p[1], p[2]]).collect();
    assert_eq!(decode(&unassociated), (6, 1, stored));
    // 16-bit samples: Pillow's `RGBa;16L` divides the high bytes.
    let samples: [u16; 12] = [
        0x64FF, 0x3210, 0x1400, 0x8000, 0xFFFF, 0x0101, 0x0202, 0x0100, 0x2233, 0x4455, 0x6677,
        0xFF00,
    ];
    let data: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
    let wide = tiff(3, 1, &[16; 4], 2, &[(338, 1)], &data);
    assert_eq!(
        decode(&wide),
        (3, 1, vec![199, 99, 39, 255, 255, 255, 34, 68, 102])
    );
}

#[test]
fn tiff_fill_order_2_reverses_bits_like_pillow() {
    // Bilevel, 11 pixels wide (2 bytes per row): each byte is read LSB first.
    let bilevel = [0b1011_0000, 0b0100_0000, 0b0000_0001, 0b1110_0000];
    let file = tiff(11, 2, &[1], 1, &[(266, 2)], &bilevel);
    let row0 = [0, 0, 0, 0, 1, 1, 0, 1, 0, 0, 0];
    let row1 = [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let pillow: Vec<u8> = row0
        .iter()
        .chain(&row1)
        .flat_map(|&bit| [bit * 255; 3])
        .collect();
    assert_eq!(decode(&file), (11, 2, pillow));
    // 8-bit gray (Pillow's `L;R`): every byte bit-reversed.
    let gray = tiff(3, 2, &[8], 1, &[(266, 2)], &[1, 2, 4, 8, 16, 0x0F]);
    let pillow: Vec<u8> = [128, 64, 32, 16, 8, 240]
        .iter()
        .flat_map(|&v| [v; 3])
        .collect();
    assert_eq!(decode(&gray), (3, 2, pillow));
    // Layouts and values Pillow has no mode for are refused (Pillow: "cannot identify").
    let rgba = tiff(1, 1, &[8; 4], 2, &[(266, 2), (338, 2)], &[1, 2, 3, 4]);
    assert!(refusal(&rgba).contains("FillOrder 2"));
    let fill3 = tiff(3, 2, &[8], 1, &[(266, 3)], &[1, 2, 4, 8, 16, 0x0F]);
    assert!(refusal(&fill3).contains("FillOrder 3"));
}

#[test]
fn tiff_tags_are_checked_from_the_ifd_with_decodings_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    };
    let data = [1, 2, 4, 8, 16, 0x0F];
    let refused = |path: &Path| {
        let checked = check_tiff_tags(path).unwrap_err();
        assert!(
            matches!(checked, MediaError::Unsupported { .. }),
            "{checked:?}"
        );
        let decoded = load_rgb(path, &DecodeOptions::default()).unwrap_err();
        assert_eq!(checked.to_string(), decoded.to_string());
        checked.to_string()
    };
    let fill3 = write("fill3.tif", &tiff(3, 2, &[8], 1, &[(266, 3)], &data));
    assert_eq!(
        refused(&fill3),
        format!(
            "unsupported input {}: TIFF FillOrder 3 is not a valid value (1 or 2); Pillow refuses \
             it too",
            fill3.display()
        )
    );
    // FillOrder 2 on RGBA: BitsPerSample (4 values) is read at its offset in the file.
    let rgba = write(
        "rgba.tif",
        &tiff(1, 1, &[8; 4], 2, &[(266, 2), (338, 2)], &[1, 2, 3, 4]),
    );
    assert!(
        refused(&rgba).contains("(this one: photometric 2, 4 samples of 8 bits, compression 1)")
    );
    // Decided from the tags alone: a header of 60000x60000 pixels whose strip is not in the file.
    let huge = write("huge.tif", &tiff(60000, 60000, &[8], 1, &[(266, 3)], &[]));
    assert!(refused(&huge).contains("FillOrder 3"));
    // What decoding accepts passes: FillOrder 1 and 2 (8-bit gray and RGB), no FillOrder, and
    // files that are not TIFFs.
    for (name, bytes) in [
        ("fill1.tif", tiff(3, 2, &[8], 1, &[(266, 1)], &data)),
        ("fill2.tif", tiff(3, 2, &[8], 1, &[(266, 2)], &data)),
        ("rgb2.tif", tiff(1, 2, &[8; 3], 2, &[(266, 2)], &data)),
        ("plain.tif", tiff(3, 2, &[8], 1, &[], &data)),
        ("text.tif", b"not a TIFF at all".to_vec()),
    ] {
        let path = write(name, &bytes);
        assert!(check_tiff_tags(&path).is_ok(), "{name}");
        if name != "text.tif" {
            assert_eq!(
                load_rgb(&path, &DecodeOptions::default())
                    .unwrap()
                    .dimensions(),
                if name == "rgb2.tif" { (1, 2) } else { (3, 2) }
            );
        }
    }
    assert!(matches!(
        check_tiff_tags(&dir.path().join("missing.tif")),
        Err(MediaError::Io { .. })
    ));
}

#[test]
fn gray16_png_with_trns_saturates_like_pillow() {
    // Pillow opens it as mode I (the tRNS key only goes to info) and I -> RGB clips at 255.
    let mut file = Vec::new();
    let mut encoder = png::Encoder::new(&mut file, 4, 1);
    encoder.set_color(png::ColorType::Grayscale);
    encoder.set_depth(png::BitDepth::Sixteen);
    encoder.set_trns(vec![0, 200]);
    let mut writer = encoder.write_header().unwrap();
    let samples: Vec<u8> = [0u16, 200, 300, 40000]
        .iter()
        .flat_map(|v| v.to_be_bytes())
        .collect();
    writer.write_image_data(&samples).unwrap();
    writer.finish().unwrap();
    let pillow: Vec<u8> = [0, 200, 255, 255].iter().flat_map(|&v| [v; 3]).collect();
    assert_eq!(decode(&file), (4, 1, pillow));
}

/// A one-row 16-bit BMP (40-byte header; BI_BITFIELDS when `masks` is given).
fn bmp16(pixels: &[u16], masks: Option<[u32; 3]>) -> Vec<u8> {
    let mut data: Vec<u8> = pixels.iter().flat_map(|p| p.to_le_bytes()).collect();
    data.resize(data.len().next_multiple_of(4), 0);
    let compression = if masks.is_some() { 3u32 } else { 0 };
    let mut info = Vec::new();
    for field in [40, pixels.len() as u32, 1] {
        info.extend(field.to_le_bytes());
    }
    info.extend(1u16.to_le_bytes());
    info.extend(16u16.to_le_bytes());
    for field in [compression, data.len() as u32, 0, 0, 0, 0] {
        info.extend(field.to_le_bytes());
    }
    info.extend(masks.iter().flatten().flat_map(|m| m.to_le_bytes()));
    let offset = 14 + info.len() as u32;
    let mut out = b"BM".to_vec();
    out.extend((offset + data.len() as u32).to_le_bytes());
    out.extend(0u32.to_le_bytes());
    out.extend(offset.to_le_bytes());
    out.extend(info);
    out.extend(data);
    out
}

#[test]
fn bmp16_channels_truncate_like_pillow() {
    // Pillow expands 5 bits with v * 255 // 31 and 6 bits with v * 255 // 63.
    let five = [
        0, 8, 16, 24, 32, 41, 49, 57, 65, 74, 82, 90, 98, 106, 115, 123, 131, 139, 148, 156, 164,
        172, 180, 189, 197, 205, 213, 222, 230, 238, 246, 255,
    ];
    let six = [
        0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60, 64, 68, 72, 76, 80, 85, 89,
        93, 97, 101, 105, 109, 113, 117, 121, 125, 129, 133, 137, 141, 145, 149, 153, 157, 161,
        165, 170, 174, 178, 182, 186, 190, 194, 198, 202, 206, 210, 214, 218, 222, 226, 230, 234,
        238, 242, 246, 250, 255,
    ];
    // 5-5-5 (BI_RGB): pixel x has x in every field.
    let rgb555: Vec<u16> = (0..32).map(|x| (x << 10) | (x << 5) | x).collect();
    let pillow: Vec<u8> = five.iter().flat_map(|&v| [v; 3]).collect();
    assert_eq!(decode(&bmp16(&rgb555, None)), (32, 1, pillow));
    // 5-6-5 (BI_BITFIELDS): green x, red and blue x / 2.
    let rgb565: Vec<u16> = (0..64)
        .map(|x| ((x / 2) << 11) | (x << 5) | (x / 2))
        .collect();
    let masks = Some([0xF800, 0x7E0, 0x1F]);
    let pillow: Vec<u8> = (0..64)
        .flat_map(|x| [five[x / 2], six[x], five[x / 2]])
        .collect();
    assert_eq!(decode(&bmp16(&rgb565, masks)), (64, 1, pillow));
    // Other masks: Pillow raises "Unsupported BMP bitfields layout".
    assert!(refusal(&bmp16(&[1, 2], Some([0xF00, 0xF0, 0xF]))).contains("bit masks"));
}

/// A GIF89a of one frame at (0, 0), with optional global and local colour tables (of 2^k
/// entries) and `before` inserted just before the image descriptor. The pixels are LZW-coded
/// as 9-bit literals between a clear and an end code (valid for fewer than 254 pixels).
fn gif(
    width: u16,
    height: u16,
    indices: &[u8],
    global: &[u8],
    local: &[u8],
    before: &[u8],
) -> Vec<u8> {
    let flags = |table: &[u8]| match table.len() / 3 {
        0 => 0,
        n => 0x80 | (n.ilog2() as u8 - 1),
    };
    let mut out = b"GIF89a".to_vec();
    out.extend(width.to_le_bytes());
    out.extend(height.to_le_bytes());
    out.extend([flags(global), 0, 0]);
    out.extend_from_slice(global);
    out.extend_from_slice(before);
    out.push(b',');
    for field in [0, 0, width, height] {
        out.extend(field.to_le_bytes());
    }
    out.push(flags(local));
    out.extend_from_slice(local);
    let codes = std::iter::once(256)
        .chain(indices.iter().map(|&i| u32::from(i)))
        .chain([257]);
    let (mut acc, mut bits, mut lzw) = (0u32, 0, Vec::new());
    for code in codes {
        acc |= code << bits;
        bits += 9;
        while bits >= 8 {
            lzw.push(acc as u8);
            acc >>= 8;
            bits -= 8;
        }
    }
    if bits > 0 {
        lzw.push(acc as u8);
    }
    out.extend([8, lzw.len() as u8]);
    out.extend(lzw);
    out.extend([0, b';']);
    out
}

const COLOURS: [u8; 12] = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120];
const RAMP: [u8; 12] = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3];

fn gray(values: &[u8]) -> Vec<u8> {
    values.iter().flat_map(|&v| [v; 3]).collect()
}

#[test]
fn gif_without_a_colour_table_is_its_indices_like_pillow() {
    // No table at all: Pillow opens mode L, pixel = index.
    let indices = [0, 50, 100, 255, 1, 2, 3, 4];
    let file = gif(4, 2, &indices, &[], &[], &[]);
    assert_eq!(decode(&file), (4, 2, gray(&indices)));
    // A gray-ramp global table is dropped the same way: indices beyond it are not black.
    let file = gif(2, 2, &[0, 3, 7, 200], &RAMP, &[], &[]);
    assert_eq!(decode(&file), (2, 2, gray(&[0, 3, 7, 200])));
    // A gray-ramp local table is dropped and the frame takes the global colours.
    let file = gif(3, 2, &[0, 1, 2, 3, 4, 200], &COLOURS, &RAMP, &[]);
    let mut pillow = COLOURS.to_vec();
    pillow.extend([0; 6]);
    assert_eq!(decode(&file), (3, 2, pillow));
}

#[test]
fn gif_stray_bytes_and_unknown_extensions_are_skipped_like_pillow() {
    // Stray 0x00 and 0x07, an unknown extension 0x99, a comment, then the image.
    let before = b"\x00\x07\x21\x99\x02ab\x00\x21\xfe\x01c\x00";
    let file = gif(2, 2, &[0, 1, 2, 3], &COLOURS, &[], before);
    assert_eq!(decode(&file), (2, 2, COLOURS.to_vec()));
    // Without a table as well.
    let file = gif(2, 2, &[9, 8, 7, 6], &[], &[], b"\x05");
    assert_eq!(decode(&file), (2, 2, gray(&[9, 8, 7, 6])));
}

#[test]
fn arithmetic_coded_jpeg_decodes_like_pillow() {
    // tests/data/arith_16x8.jpg: `cjpeg -arithmetic -quality 90` of a 16x8 gradient (4:2:0).
    let path = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/arith_16x8.jpg"
    ));
    let (width, height, rgb) = decode(&std::fs::read(path).unwrap());
    assert_eq!((width, height), (16, 8));
    let pixel = |x: usize, y: usize| rgb[(y * 16 + x) * 3..][..3].to_vec();
    assert_eq!(pixel(0, 0), [2, 2, 0]);
    assert_eq!(pixel(15, 0), [225, 2, 33]);
    assert_eq!(pixel(0, 7), [5, 217, 19]);
    assert_eq!(pixel(15, 7), [227, 205, 145]);
    assert_eq!(pixel(9, 4), [148, 120, 169]);
    let digest: String = sha2::Sha256::digest(&rgb)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        digest,
        "2550ba4b845b13a6e9cd2dd7f178ad39ef1d361d88427fad1a2a07cdea58bcc6"
    );
}

#[test]
fn squares_of_side_1_or_3_are_refused_by_preprocessing() {
    // The official CLIPImageProcessor fails on a 1x1 square ("mean must have 1 elements") and
    // reads a (3, 3, 3) array as channels-first; side 2 and 4 are fine.
    let dir = tempfile::tempdir().unwrap();
    let config = PreprocessConfig::clip(8);
    let run = |width: u32, height: u32| {
        let path = dir.path().join(format!("{width}x{height}.png"));
        image::RgbImage::from_pixel(width, height, image::Rgb([9, 99, 199]))
            .save(&path)
            .unwrap();
        (
            path.clone(),
            preprocess_path(&path, &config, &DecodeOptions::default()),
        )
    };
    for (width, height, side) in [
        (1, 1, 1),
        (3, 3, 3),
        (3, 1, 3),
        (1, 3, 3),
        (3, 2, 3),
        (2, 3, 3),
    ] {
        match run(width, height) {
            (path, Err(err @ MediaError::DegenerateSquare { .. })) => {
                assert_eq!(err.path(), Some(path.as_path()));
                let text = err.to_string();
                assert!(
                    text.contains(&format!("{width}x{height} image pads to a {side}x{side}"))
                        && text.contains("official"),
                    "{text}"
                );
            }
            (_, other) => panic!("{width}x{height}: expected DegenerateSquare, got {other:?}"),
        }
    }
    for (width, height) in [(2, 2), (2, 1), (4, 1), (1, 4), (4, 3)] {
        let (_, result) = run(width, height);
        assert_eq!(result.unwrap().shape(), [3, 8, 8], "{width}x{height}");
    }
}
