//! Opening media files defensively: only regular files are opened by path (opening a FIFO blocks
//! and a device such as `/dev/zero` never ends), and reads are bounded, so a hostile or mistaken
//! input cannot hang a batch or grow memory without limit. Streams (stdin) go through the
//! reader APIs instead, which apply the same byte limits.

use std::fs::{File, Metadata};
use std::io::{self, Read};
use std::path::Path;

use crate::MediaError;

/// What a path that is not a regular file is, for error messages.
fn describe_special(meta: &Metadata) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let kind = meta.file_type();
        if kind.is_fifo() {
            return "a named pipe (FIFO)";
        }
        if kind.is_char_device() {
            return "a character device";
        }
        if kind.is_block_device() {
            return "a block device";
        }
        if kind.is_socket() {
            return "a socket";
        }
    }
    let _ = meta;
    "not a regular file"
}

/// Size of `path` after checking, without opening it, that it is a regular file (symlinks are
/// followed). A directory is an [`MediaError::Io`] error (as reading it would be); a FIFO, device
/// or socket is [`MediaError::Unsupported`].
pub(crate) fn regular_file_len(path: &Path) -> Result<u64, MediaError> {
    let meta = std::fs::metadata(path).map_err(|source| MediaError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if meta.is_file() {
        return Ok(meta.len());
    }
    if meta.is_dir() {
        return Err(MediaError::Io {
            path: path.to_path_buf(),
            source: io::Error::new(io::ErrorKind::IsADirectory, "is a directory, not a file"),
        });
    }
    Err(MediaError::Unsupported {
        path: path.to_path_buf(),
        message: format!(
            "is {}, not a regular file; streams are read only when asked for explicitly",
            describe_special(&meta)
        ),
    })
}

/// Opens a regular file (see [`regular_file_len`]) and returns it with its size.
pub(crate) fn open_regular(path: &Path) -> Result<(File, u64), MediaError> {
    let len = regular_file_len(path)?;
    let file = File::open(path).map_err(|source| MediaError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok((file, len))
}

/// Reads until `buf` holds `want` bytes or the source ends (interrupted reads are retried).
pub(crate) fn read_up_to(source: &mut impl Read, buf: &mut Vec<u8>, want: usize) -> io::Result<()> {
    if buf.len() < want {
        source.take((want - buf.len()) as u64).read_to_end(buf)?;
    }
    Ok(())
}

/// Appends the rest of `source` to `buf`, reading at most one byte past `limit` in total.
/// Returns false when the source holds more than `limit` bytes (the read is then cut short).
pub(crate) fn read_rest_bounded(
    source: &mut impl Read,
    buf: &mut Vec<u8>,
    limit: u64,
) -> io::Result<bool> {
    let room = (limit + 1).saturating_sub(buf.len() as u64);
    source.take(room).read_to_end(buf)?;
    Ok(buf.len() as u64 <= limit)
}
