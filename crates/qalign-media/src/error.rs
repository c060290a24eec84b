//! One error type for every media failure, so callers (CLI, scorer) can report
//! which file broke and why without caring whether it was an image or a video.

use std::path::{Path, PathBuf};

/// Errors from decoding or preprocessing media files. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    /// The file could not be read (missing, permission denied, ...).
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file was read but its contents are malformed, truncated or not media at all.
    #[error("cannot decode {}: {message}", path.display())]
    Decode { path: PathBuf, message: String },
    /// The file (or a configuration) is valid but uses something this crate does not support.
    #[error("unsupported input {}: {message}", path.display())]
    Unsupported { path: PathBuf, message: String },
    /// An image (or video frame) whose `expand2square` square is 1 or 3 pixels wide. The official
    /// preprocessing has no right answer for it: transformers' `CLIPImageProcessor` takes the
    /// (side, side, 3) array for channels-first, so it fails on side 1 ("mean must have 1
    /// elements") and reads a 3×3 image's rows as colour channels.
    #[error(
        "unsupported input {}: a {width}x{height} image pads to a {side}x{side} square, which the \
         official Q-Align preprocessing fails on (1x1) or misreads as channels-first (3x3), so \
         there is no reference result to match",
        path.display()
    )]
    DegenerateSquare {
        path: PathBuf,
        width: u32,
        height: u32,
        side: u32,
    },
    /// An external program this crate drives (ffmpeg, ffprobe) is not installed or not found.
    #[error("{tool} not found: install Debian's ffmpeg package or set {env_var} ({searched})")]
    ToolNotFound {
        tool: &'static str,
        env_var: &'static str,
        searched: String,
    },
    /// An external program could not be run on a file (spawn or pipe failure, not a bad input).
    #[error("{} failed on {}: {message}", tool.display(), path.display())]
    ToolFailed {
        tool: PathBuf,
        path: PathBuf,
        message: String,
    },
    /// A caller-supplied setting is out of range (named as the option or argument).
    #[error("invalid {name}: {message}")]
    InvalidArgument { name: String, message: String },
}

impl MediaError {
    /// The file the error is about, when there is one: for callers that print the file name
    /// themselves and do not want it twice (the `Display` text already names it).
    pub fn path(&self) -> Option<&Path> {
        match self {
            Self::Io { path, .. }
            | Self::Decode { path, .. }
            | Self::Unsupported { path, .. }
            | Self::DegenerateSquare { path, .. }
            | Self::ToolFailed { path, .. } => Some(path),
            Self::ToolNotFound { .. } | Self::InvalidArgument { .. } => None,
        }
    }
}
