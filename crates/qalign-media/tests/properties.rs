//! Property tests on arbitrary bytes for the image front end: decoding never panics (libjpeg's
//! fatal errors included) and returns an image or a typed error, reading from a stream agrees
//! with decoding from memory, and content sniffing is consistent with itself and the decoders.
//! About 4 000 cases in all, a few seconds in a debug build.

use std::io::Cursor;
use std::path::Path;
use std::sync::LazyLock;

use proptest::prelude::*;
use qalign_media::{
    DecodeOptions, MAX_PIXELS, MediaError, MediaKind, RgbImage, decode_rgb, read_rgb, sniff_kind,
};

/// Small real images of every supported format and the odd layouts (CMYK, progressive,
/// restart markers, 16-bit, palette + tRNS, animated GIF, lossless/lossy WebP, TIFF, BMP).
const FIXTURES: [&str; 16] = [
    "cmyk_61x43.jpg",
    "exif6_61x43.jpg",
    "gray_61x43.jpg",
    "progressive_61x43.jpg",
    "restart_61x43.jpg",
    "q420_61x43.jpg",
    "anim_30x20.gif",
    "partial_transparent_30x20.gif",
    "bilevel_40x30.png",
    "gray16_9x7.png",
    "palette_trns_40x30.png",
    "rgba16_9x7.png",
    "lossless_33x21.webp",
    "lossy_alpha_33x21.webp",
    "rgb_33x21.bmp",
    "rgba_33x21.tiff",
];

/// Magic numbers that route bytes to each decoder.
const MAGICS: [&[u8]; 8] = [
    b"\xFF\xD8\xFF",
    b"\x89PNG\r\n\x1a\n",
    b"GIF89a",
    b"GIF87a",
    b"RIFF\x00\x10\x00\x00WEBP",
    b"II*\x00",
    b"MM\x00*",
    b"BM",
];

static FIXTURE_BYTES: LazyLock<Vec<Vec<u8>>> = LazyLock::new(|| {
    let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/inputs"));
    FIXTURES
        .iter()
        .map(|name| std::fs::read(dir.join(name)).unwrap())
        .collect()
});

/// The decoder's contract: a well-formed image within the cap, or a typed error naming the input.
fn check_outcome(result: &Result<RgbImage, MediaError>) -> Result<(), TestCaseError> {
    match result {
        Ok(image) => {
            let (w, h) = image.dimensions();
            prop_assert!(w > 0 && h > 0);
            prop_assert!(u64::from(w) * u64::from(h) <= MAX_PIXELS);
            prop_assert_eq!(image.as_raw().len(), w as usize * h as usize * 3);
        }
        Err(err @ (MediaError::Decode { .. } | MediaError::Unsupported { .. })) => {
            prop_assert!(err.to_string().contains("<in-memory image>"), "{}", err);
        }
        Err(other) => prop_assert!(false, "unexpected error kind: {other:?}"),
    }
    Ok(())
}

/// A fixture with up to 8 bytes overwritten, then cut to at most `keep` bytes.
fn mutated_fixture() -> impl Strategy<Value = Vec<u8>> {
    (
        0..FIXTURES.len(),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        any::<prop::sample::Index>(),
        any::<bool>(),
    )
        .prop_map(|(which, edits, keep, cut)| {
            let mut bytes = FIXTURE_BYTES[which].clone();
            for (at, value) in edits {
                let i = at.index(bytes.len());
                bytes[i] = value;
            }
            if cut {
                bytes.truncate(keep.index(bytes.len() + 1));
            }
            bytes
        })
}

/// Arbitrary bytes, half of them behind a real magic number.
fn magic_or_random() -> impl Strategy<Value = Vec<u8>> {
    (
        proptest::option::of(0..MAGICS.len()),
        prop::collection::vec(any::<u8>(), 0..1024),
    )
        .prop_map(|(magic, tail)| {
            let mut bytes = magic.map_or_else(Vec::new, |m| MAGICS[m].to_vec());
            bytes.extend(tail);
            bytes
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn arbitrary_bytes_decode_to_an_image_or_a_typed_error(bytes in magic_or_random()) {
        check_outcome(&decode_rgb(&bytes, &DecodeOptions::default()))?;
    }

    #[test]
    fn damaged_real_images_decode_to_an_image_or_a_typed_error(
        bytes in mutated_fixture(),
        exif_orientation in any::<bool>(),
    ) {
        check_outcome(&decode_rgb(&bytes, &DecodeOptions { exif_orientation }))?;
    }

    #[test]
    fn sniffing_is_consistent(bytes in magic_or_random(), extra in prop::collection::vec(any::<u8>(), 0..64)) {
        let kind = MediaKind::sniff(&bytes);
        // Only the first 512 bytes count.
        prop_assert_eq!(kind, MediaKind::sniff(&bytes[..bytes.len().min(512)]));
        if bytes.len() >= 512 {
            let mut longer = bytes.clone();
            longer.extend(&extra);
            prop_assert_eq!(kind, MediaKind::sniff(&longer));
        }
        // Whatever decodes as an image is sniffed as one.
        if decode_rgb(&bytes, &DecodeOptions::default()).is_ok() {
            prop_assert_eq!(kind, Some(MediaKind::Image));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn reading_a_stream_agrees_with_decoding_bytes(
        bytes in prop_oneof![mutated_fixture(), magic_or_random()],
    ) {
        let opts = DecodeOptions::default();
        let from_bytes = decode_rgb(&bytes, &opts);
        let from_stream = read_rgb(Cursor::new(&bytes), Path::new("<in-memory image>"), &opts);
        check_outcome(&from_stream)?;
        match (&from_bytes, &from_stream) {
            (Ok(a), Ok(b)) => prop_assert!(a == b, "different pixels"),
            (Err(a), Err(b)) => prop_assert_eq!(a.to_string(), b.to_string()),
            _ => prop_assert!(false, "{from_bytes:?} vs {from_stream:?}"),
        }
    }

    #[test]
    fn sniffing_a_file_matches_sniffing_its_bytes(bytes in magic_or_random()) {
        let dir = tempfile::tempdir().unwrap();
        // No known extension, so the content alone decides.
        let path = dir.path().join("input.bin");
        std::fs::write(&path, &bytes).unwrap();
        prop_assert_eq!(sniff_kind(&path).unwrap(), MediaKind::sniff(&bytes));
    }
}
