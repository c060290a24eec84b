//! Decides whether a file is an image or a video from its first bytes, so a batch can route each
//! file to the right loader even when the extension is missing or wrong. Unrecognised content
//! falls back to the extension; the decoders still give the final word.

use std::io::Read;
use std::path::Path;

use crate::MediaError;

/// Broad kind of a media file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MediaKind {
    Image,
    Video,
    Unknown,
}

/// Bytes read from the start of a file: enough for two MPEG-TS packets (0x47 at 0 and 188) and
/// two M2TS packets (0x47 at 4 and 196).
const SNIFF_LEN: usize = 512;

/// Brands of ISO-BMFF files (`ftyp`) that hold still images (HEIF/HEIC/AVIF), not video.
const IMAGE_BRANDS: [&[u8; 4]; 7] = [
    b"heic", b"heix", b"heim", b"heis", b"mif1", b"avif", b"jpeg",
];

/// Top-level QuickTime atoms that may start a `.mov` written without an `ftyp` box.
const QUICKTIME_ATOMS: [&[u8; 4]; 5] = [b"moov", b"mdat", b"wide", b"free", b"skip"];

const VIDEO_EXTENSIONS: [&str; 20] = [
    "mp4", "m4v", "mov", "qt", "mkv", "webm", "avi", "flv", "wmv", "asf", "ts", "mts", "m2ts",
    "mpg", "mpeg", "vob", "ogv", "3gp", "3g2", "y4m",
];
const IMAGE_EXTENSIONS: [&str; 13] = [
    "jpg", "jpeg", "jpe", "png", "gif", "bmp", "webp", "tif", "tiff", "heic", "heif", "avif", "ppm",
];

/// Classifies a file by its magic bytes, then by extension when the content is not recognised.
/// An empty file is [`MediaKind::Unknown`]; a file that cannot be opened, and anything that is
/// not a regular file (directory, FIFO, device), is an error.
pub fn sniff_kind(path: &Path) -> Result<MediaKind, MediaError> {
    let io_error = |source| MediaError::Io {
        path: path.to_path_buf(),
        source,
    };
    // Not File::open directly: opening a FIFO would block until a writer appears.
    let (file, _) = crate::input::open_regular(path)?;
    let mut head = Vec::with_capacity(SNIFF_LEN);
    file.take(SNIFF_LEN as u64)
        .read_to_end(&mut head)
        .map_err(io_error)?;
    if head.is_empty() {
        return Ok(MediaKind::Unknown);
    }
    match sniff_bytes(&head) {
        MediaKind::Unknown => Ok(kind_from_extension(path)),
        known => Ok(known),
    }
}

/// True when [`sniff_kind`] says video; false for images, unknown and unreadable files.
pub fn is_video(path: &Path) -> bool {
    matches!(sniff_kind(path), Ok(MediaKind::Video))
}

/// Classifies the first bytes of a file (pass at least 512 when available).
pub fn sniff_bytes(head: &[u8]) -> MediaKind {
    let at = |offset: usize, magic: &[u8]| head.get(offset..offset + magic.len()) == Some(magic);

    // Images.
    if at(0, &[0xFF, 0xD8, 0xFF])
        || at(0, b"\x89PNG\r\n\x1a\n")
        || at(0, b"GIF87a")
        || at(0, b"GIF89a")
        || (at(0, b"RIFF") && at(8, b"WEBP"))
        || at(0, b"II*\0")
        || at(0, b"MM\0*")
        || (at(0, b"BM") && head.len() >= 14)
    {
        return MediaKind::Image;
    }
    if at(4, b"ftyp") {
        let brand_is = |brand: &[u8; 4]| at(8, brand);
        return if IMAGE_BRANDS.iter().any(|b| brand_is(b)) {
            MediaKind::Image
        } else {
            MediaKind::Video
        };
    }

    // Videos.
    if QUICKTIME_ATOMS.iter().any(|atom| at(4, *atom))
        || at(0, &[0x1A, 0x45, 0xDF, 0xA3]) // EBML: Matroska / WebM
        || (at(0, b"RIFF") && at(8, b"AVI "))
        || at(0, b"FLV\x01")
        || at(0, &[0x30, 0x26, 0xB2, 0x75, 0x8E, 0x66, 0xCF, 0x11]) // ASF / WMV
        || at(0, &[0x00, 0x00, 0x01, 0xBA]) // MPEG program stream
        || at(0, b"YUV4MPEG2 ")
        || (at(0, &[0x47]) && at(188, &[0x47])) // MPEG transport stream
        || (at(4, &[0x47]) && at(196, &[0x47]))
    // M2TS (4-byte timestamp prefix)
    {
        return MediaKind::Video;
    }
    MediaKind::Unknown
}

fn kind_from_extension(path: &Path) -> MediaKind {
    let Some(ext) = path.extension().and_then(|e| e.to_str()) else {
        return MediaKind::Unknown;
    };
    let ext = ext.to_ascii_lowercase();
    if VIDEO_EXTENSIONS.contains(&ext.as_str()) {
        MediaKind::Video
    } else if IMAGE_EXTENSIONS.contains(&ext.as_str()) {
        MediaKind::Image
    } else {
        MediaKind::Unknown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn padded(prefix: &[u8]) -> Vec<u8> {
        let mut v = prefix.to_vec();
        v.resize(SNIFF_LEN, 0x11);
        v
    }

    #[test]
    fn image_signatures() {
        for head in [
            &b"\xFF\xD8\xFF\xE0\0\x10JFIF"[..],
            b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR",
            b"GIF89a\x01\0",
            b"GIF87a\x01\0",
            b"RIFF\x24\0\0\0WEBPVP8 ",
            b"II*\0\x08\0\0\0",
            b"MM\0*\0\0\0\x08",
            b"BM\x36\0\0\0\0\0\0\0\x36\0\0\0\x28\0",
            b"\0\0\0\x18ftypheic\0\0\0\0mif1heic",
            b"\0\0\0\x1cftypavif\0\0\0\0avifmif1",
        ] {
            assert_eq!(sniff_bytes(&padded(head)), MediaKind::Image, "{head:?}");
        }
    }

    #[test]
    fn video_signatures() {
        let mut ts = vec![0u8; SNIFF_LEN];
        ts[0] = 0x47;
        ts[188] = 0x47;
        let mut m2ts = vec![0u8; SNIFF_LEN];
        m2ts[4] = 0x47;
        m2ts[196] = 0x47;
        for head in [
            padded(b"\0\0\0\x20ftypisom\0\0\x02\0isomiso2avc1mp41"),
            padded(b"\0\0\0\x14ftypqt  \0\0\0\0qt  "),
            padded(b"\0\0\0\x08wide\0\0\x0a\x0dmdat"),
            padded(b"\x1A\x45\xDF\xA3\x9f\x42\x86\x81\x01"),
            padded(b"RIFF\x24\0\0\0AVI LIST"),
            padded(b"FLV\x01\x05"),
            padded(&[0x30, 0x26, 0xB2, 0x75, 0x8E, 0x66, 0xCF, 0x11, 0xA6]),
            padded(&[0x00, 0x00, 0x01, 0xBA, 0x44]),
            padded(b"YUV4MPEG2 W64 H48"),
            ts,
            m2ts,
        ] {
            assert_eq!(sniff_bytes(&head), MediaKind::Video, "{:?}", &head[..12]);
        }
    }

    #[test]
    fn unknown_content() {
        assert_eq!(sniff_bytes(b""), MediaKind::Unknown);
        assert_eq!(sniff_bytes(&padded(b"hello world")), MediaKind::Unknown);
        assert_eq!(
            sniff_bytes(&padded(b"RIFF\0\0\0\0WAVEfmt ")),
            MediaKind::Unknown
        );
        // A single 0x47 byte is not a transport stream.
        assert_eq!(sniff_bytes(&padded(b"G")), MediaKind::Unknown);
    }

    #[test]
    fn files_content_beats_extension_and_extension_is_the_fallback() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, bytes: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            p
        };
        let png_named_mp4 = write("a.mp4", &padded(b"\x89PNG\r\n\x1a\n"));
        assert_eq!(sniff_kind(&png_named_mp4).unwrap(), MediaKind::Image);
        assert!(!is_video(&png_named_mp4));
        let mkv_no_ext = write("clip", &padded(b"\x1A\x45\xDF\xA3"));
        assert!(is_video(&mkv_no_ext));
        let text_named_mkv = write("b.MKV", b"not a video");
        assert_eq!(sniff_kind(&text_named_mkv).unwrap(), MediaKind::Video);
        let text_named_jpg = write("c.jpg", b"not an image");
        assert_eq!(sniff_kind(&text_named_jpg).unwrap(), MediaKind::Image);
        let empty = write("d.mp4", b"");
        assert_eq!(sniff_kind(&empty).unwrap(), MediaKind::Unknown);
        let missing = dir.path().join("missing.mp4");
        let err = sniff_kind(&missing).unwrap_err();
        assert!(matches!(err, MediaError::Io { .. }), "{err}");
        assert!(err.to_string().contains("missing.mp4"));
        assert!(!is_video(&missing));
    }
}
