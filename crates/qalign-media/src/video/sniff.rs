//! Decides whether a file is an image or a video from its first bytes, so a batch can route each
//! file to the right loader even when the extension is missing or wrong. Unrecognised content
//! falls back to the extension; the decoders still give the final word. The signatures and the
//! extension lists are qalign-core's ([`MediaKind::sniff`]), shared with every command.

use std::io::Read;
use std::path::Path;

pub use qalign_core::vocab::{MediaKind, SNIFF_LEN};

use crate::MediaError;

/// Classifies a file by its magic bytes, then by extension when the content is not recognised;
/// `None` when neither tells (an empty file of unknown extension, say). A file that cannot be
/// opened, and anything that is not a regular file (directory, FIFO, device), is an error.
pub fn sniff_kind(path: &Path) -> Result<Option<MediaKind>, MediaError> {
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
        return Ok(None);
    }
    Ok(MediaKind::sniff(&head).or_else(|| MediaKind::from_extension(path)))
}

/// True when [`sniff_kind`] says video; false for images, unknown and unreadable files.
pub fn is_video(path: &Path) -> bool {
    matches!(sniff_kind(path), Ok(Some(MediaKind::Video)))
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
    fn files_content_beats_extension_and_extension_is_the_fallback() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, bytes: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            p
        };
        let png_named_mp4 = write("a.mp4", &padded(b"\x89PNG\r\n\x1a\n"));
        assert_eq!(sniff_kind(&png_named_mp4).unwrap(), Some(MediaKind::Image));
        assert!(!is_video(&png_named_mp4));
        let mkv_no_ext = write("clip", &padded(b"\x1A\x45\xDF\xA3"));
        assert!(is_video(&mkv_no_ext));
        let text_named_mkv = write("b.MKV", b"not a video");
        assert_eq!(sniff_kind(&text_named_mkv).unwrap(), Some(MediaKind::Video));
        let text_named_jpg = write("c.jpg", b"not an image");
        assert_eq!(sniff_kind(&text_named_jpg).unwrap(), Some(MediaKind::Image));
        let empty = write("d.mp4", b"");
        assert_eq!(sniff_kind(&empty).unwrap(), None);
        let missing = dir.path().join("missing.mp4");
        let err = sniff_kind(&missing).unwrap_err();
        assert!(matches!(err, MediaError::Io { .. }), "{err}");
        assert!(err.to_string().contains("missing.mp4"));
        assert!(!is_video(&missing));
    }
}
