//! The words every qalign crate shares: what is rated ([`Task`]), what kind of file it is
//! ([`MediaKind`], decided by content), the five level words, the image marker and its token
//! placeholder, and the file extensions a directory walk picks up.
//!
//! They live here once so that the syllabus, the tokenizer, the decoders, the model and every
//! command agree: a `.y4m` clip is a video to `score`, `syllabus` and `train` alike.

use std::fmt;
use std::io::Read;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The five ITU-R BT.500 absolute-category-rating words Q-Align answers with, best → worst:
/// the order of the level token ids and of every probability vector.
pub const LEVEL_WORDS: [&str; 5] = ["excellent", "good", "fair", "poor", "bad"];

/// The literal marker in prompt text where an image's (or a whole clip's) visual tokens go.
pub const IMAGE_MARKER: &str = "<|image|>";

/// The placeholder id that stands for [`IMAGE_MARKER`] in `input_ids` (official
/// `IMAGE_TOKEN_INDEX`); the model splices the visual tokens in at it.
pub const IMAGE_TOKEN_INDEX: i64 = -200;

/// A name that is not one of the accepted values (a task, a media kind, ...).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} {name:?}: expected one of {expected}")]
pub struct UnknownName {
    /// What was being named ("task", "media kind").
    pub kind: &'static str,
    pub name: String,
    /// The accepted names, comma separated.
    pub expected: &'static str,
}

/// What is rated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    Quality,
    Aesthetics,
}

impl Task {
    /// Every task, in the order `--task all` scores them.
    pub const ALL: [Task; 2] = [Task::Quality, Task::Aesthetics];

    /// The word used in prompts and reports: "quality" or "aesthetics".
    pub fn as_str(self) -> &'static str {
        match self {
            Task::Quality => "quality",
            Task::Aesthetics => "aesthetics",
        }
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Task {
    type Err = UnknownName;

    /// Accepts "quality" and "aesthetics" (also "aesthetic", as pyiqa spells it), any case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "quality" => Ok(Task::Quality),
            "aesthetics" | "aesthetic" => Ok(Task::Aesthetics),
            _ => Err(UnknownName {
                kind: "task",
                name: s.to_string(),
                expected: "quality, aesthetics",
            }),
        }
    }
}

/// Whether an item is a still image or a video. A video is still one image slot in the prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MediaKind {
    Image,
    Video,
}

/// Extensions (lower case) of the still-image formats the decoder reads.
pub const IMAGE_EXTENSIONS: [&str; 9] = [
    "jpg", "jpeg", "jpe", "png", "gif", "bmp", "webp", "tif", "tiff",
];

/// Extensions (lower case) of the video containers FFmpeg reads and [`MediaKind::sniff`] knows.
pub const VIDEO_EXTENSIONS: [&str; 20] = [
    "mp4", "m4v", "mov", "qt", "mkv", "webm", "avi", "flv", "wmv", "asf", "ts", "mts", "m2ts",
    "mpg", "mpeg", "vob", "ogv", "3gp", "3g2", "y4m",
];

/// Extensions of still images held in an ISO-BMFF or other container the decoder cannot read;
/// they are images, not videos, when the content is not recognised.
const OTHER_IMAGE_EXTENSIONS: [&str; 4] = ["heic", "heif", "avif", "ppm"];

/// Bytes [`MediaKind::sniff`] looks at: enough for two MPEG-TS packets (0x47 at 0 and 188) and
/// two M2TS packets (0x47 at 4 and 196).
pub const SNIFF_LEN: usize = 512;

/// Brands of ISO-BMFF files (`ftyp`) that hold still images (HEIF/HEIC/AVIF), not video.
const IMAGE_BRANDS: [&[u8; 4]; 7] = [
    b"heic", b"heix", b"heim", b"heis", b"mif1", b"avif", b"jpeg",
];

/// Top-level QuickTime atoms that may start a `.mov` written without an `ftyp` box.
const QUICKTIME_ATOMS: [&[u8; 4]; 5] = [b"moov", b"mdat", b"wide", b"free", b"skip"];

impl MediaKind {
    /// `"image"` or `"video"`, the word used in prompts and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            MediaKind::Image => "image",
            MediaKind::Video => "video",
        }
    }

    /// Classifies the first bytes of a file (pass [`SNIFF_LEN`] when available); `None` when
    /// the content is not a known image or video signature.
    pub fn sniff(head: &[u8]) -> Option<MediaKind> {
        let at =
            |offset: usize, magic: &[u8]| head.get(offset..offset + magic.len()) == Some(magic);
        if at(0, &[0xFF, 0xD8, 0xFF])
            || at(0, b"\x89PNG\r\n\x1a\n")
            || at(0, b"GIF87a")
            || at(0, b"GIF89a")
            || (at(0, b"RIFF") && at(8, b"WEBP"))
            || at(0, b"II*\0")
            || at(0, b"MM\0*")
            || (at(0, b"BM") && head.len() >= 14)
        {
            return Some(MediaKind::Image);
        }
        if at(4, b"ftyp") {
            let image_brand = IMAGE_BRANDS.iter().any(|brand| at(8, *brand));
            return Some(if image_brand {
                MediaKind::Image
            } else {
                MediaKind::Video
            });
        }
        let video = QUICKTIME_ATOMS.iter().any(|atom| at(4, *atom))
            || at(0, &[0x1A, 0x45, 0xDF, 0xA3]) // EBML: Matroska / WebM
            || (at(0, b"RIFF") && at(8, b"AVI "))
            || at(0, b"FLV\x01")
            || at(0, &[0x30, 0x26, 0xB2, 0x75, 0x8E, 0x66, 0xCF, 0x11]) // ASF / WMV
            || at(0, &[0x00, 0x00, 0x01, 0xBA]) // MPEG program stream
            || at(0, b"OggS")
            || at(0, b"YUV4MPEG2 ")
            || (at(0, &[0x47]) && at(188, &[0x47])) // MPEG transport stream
            || (at(4, &[0x47]) && at(196, &[0x47])); // M2TS (4-byte timestamp prefix)
        video.then_some(MediaKind::Video)
    }

    /// The kind an extension (any case) names, `None` for an unknown or missing one.
    pub fn from_extension(path: &Path) -> Option<MediaKind> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        let ext = ext.as_str();
        if VIDEO_EXTENSIONS.contains(&ext) {
            Some(MediaKind::Video)
        } else if IMAGE_EXTENSIONS.contains(&ext) || OTHER_IMAGE_EXTENSIONS.contains(&ext) {
            Some(MediaKind::Image)
        } else {
            None
        }
    }

    /// Content first, extension as the fallback: the kind of the file at `path` when its first
    /// bytes can be read and are recognised, else what its extension names. `None` when
    /// neither tells. Never reads more than [`SNIFF_LEN`] bytes; a file that cannot be opened
    /// (a label file's item not on this machine) is judged by its name.
    pub fn of_file(path: &Path) -> Option<MediaKind> {
        let regular = std::fs::metadata(path).is_ok_and(|m| m.is_file());
        let sniffed = if regular {
            std::fs::File::open(path).ok().and_then(|file| {
                let mut head = Vec::with_capacity(SNIFF_LEN);
                file.take(SNIFF_LEN as u64).read_to_end(&mut head).ok()?;
                MediaKind::sniff(&head)
            })
        } else {
            None
        };
        sniffed.or_else(|| MediaKind::from_extension(path))
    }
}

/// Whether a directory walk or a glob over a folder picks this file up: the image and video
/// extensions above, except `.ts` (more often TypeScript than MPEG-TS). Files named explicitly
/// are taken whatever their extension: their content decides.
pub fn is_media_file_name(path: &Path) -> bool {
    let Some(ext) = path.extension().and_then(|e| e.to_str()) else {
        return false;
    };
    let ext = ext.to_ascii_lowercase();
    ext != "ts" && MediaKind::from_extension(path).is_some()
}

impl fmt::Display for MediaKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for MediaKind {
    type Err = UnknownName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "image" => Ok(MediaKind::Image),
            "video" => Ok(MediaKind::Video),
            _ => Err(UnknownName {
                kind: "media kind",
                name: s.to_string(),
                expected: "image, video",
            }),
        }
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
    fn names_parse_and_print() {
        assert_eq!("Quality".parse::<Task>().unwrap(), Task::Quality);
        assert_eq!("aesthetic".parse::<Task>().unwrap(), Task::Aesthetics);
        assert_eq!("video".parse::<MediaKind>().unwrap(), MediaKind::Video);
        let err = "sharpness".parse::<Task>().unwrap_err().to_string();
        assert!(
            err.contains("sharpness") && err.contains("quality"),
            "{err}"
        );
        assert_eq!(Task::Aesthetics.to_string(), "aesthetics");
        assert_eq!(
            serde_json::to_string(&MediaKind::Video).unwrap(),
            "\"video\""
        );
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
            assert_eq!(
                MediaKind::sniff(&padded(head)),
                Some(MediaKind::Image),
                "{head:?}"
            );
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
            padded(b"OggS\0\x02"),
            padded(b"YUV4MPEG2 W64 H48"),
            ts,
            m2ts,
        ] {
            assert_eq!(
                MediaKind::sniff(&head),
                Some(MediaKind::Video),
                "{:?}",
                &head[..12]
            );
        }
    }

    #[test]
    fn unknown_content() {
        assert_eq!(MediaKind::sniff(b""), None);
        assert_eq!(MediaKind::sniff(&padded(b"hello world")), None);
        assert_eq!(MediaKind::sniff(&padded(b"RIFF\0\0\0\0WAVEfmt ")), None);
        // A single 0x47 byte is not a transport stream.
        assert_eq!(MediaKind::sniff(&padded(b"G")), None);
    }

    #[test]
    fn extensions_agree_for_every_command() {
        for name in ["a.MTS", "b.ogv", "c.y4m", "d.mp4", "e.ts"] {
            assert_eq!(
                MediaKind::from_extension(Path::new(name)),
                Some(MediaKind::Video),
                "{name}"
            );
        }
        assert_eq!(
            MediaKind::from_extension(Path::new("x.JPG")),
            Some(MediaKind::Image)
        );
        assert_eq!(MediaKind::from_extension(Path::new("x.txt")), None);
        assert!(is_media_file_name(Path::new("clip.y4m")));
        assert!(is_media_file_name(Path::new("IMG.JPEG")));
        assert!(!is_media_file_name(Path::new("index.ts")));
        assert!(!is_media_file_name(Path::new("notes.txt")));
        assert!(!is_media_file_name(Path::new("Makefile")));
    }

    #[test]
    fn content_beats_the_extension_and_a_missing_file_goes_by_name() {
        let dir = std::env::temp_dir().join(format!("qalign-vocab-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let png_named_mp4 = dir.join("a.mp4");
        std::fs::write(&png_named_mp4, padded(b"\x89PNG\r\n\x1a\n")).unwrap();
        assert_eq!(MediaKind::of_file(&png_named_mp4), Some(MediaKind::Image));
        let mkv_no_ext = dir.join("clip");
        std::fs::write(&mkv_no_ext, padded(b"\x1A\x45\xDF\xA3")).unwrap();
        assert_eq!(MediaKind::of_file(&mkv_no_ext), Some(MediaKind::Video));
        let text_named_mkv = dir.join("b.MKV");
        std::fs::write(&text_named_mkv, b"not a video").unwrap();
        assert_eq!(MediaKind::of_file(&text_named_mkv), Some(MediaKind::Video));
        assert_eq!(
            MediaKind::of_file(&dir.join("elsewhere.ogv")),
            Some(MediaKind::Video)
        );
        assert_eq!(MediaKind::of_file(&dir.join("nothing")), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
