//! `-` as an input: stdin is copied, bounded, into a temporary file that is scored like any
//! other file (or, with `--manifest -`, read as the list of inputs). A file (rather than bytes in memory) serves images and videos alike, as ffmpeg
//! needs to seek in most containers, and the media limits apply to it unchanged.

use std::io::{self, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use qalign_media::MAX_FILE_BYTES;

/// The argument that names stdin.
pub const STDIN_ARG: &str = "-";

/// Whether `path` is the `-` argument.
pub fn is_stdin(path: &Path) -> bool {
    path.as_os_str() == STDIN_ARG
}

/// Stdin's bytes in a temporary file, removed on drop.
pub struct SpooledStdin {
    file: tempfile::NamedTempFile,
}

impl SpooledStdin {
    /// Copies stdin to a temporary file, refusing a terminal, an empty stream and more than
    /// [`MAX_FILE_BYTES`] (without reading past the limit).
    pub fn read() -> Result<Self> {
        let stdin = io::stdin();
        if stdin.is_terminal() {
            bail!("`-` reads an image or video from stdin, but stdin is a terminal");
        }
        Self::from_reader(stdin.lock(), MAX_FILE_BYTES)
    }

    fn from_reader(reader: impl Read, limit: u64) -> Result<Self> {
        let mut file = tempfile::Builder::new()
            .prefix("qalign-stdin-")
            .tempfile()
            .context("cannot create a temporary file for stdin")?;
        let copied = io::copy(&mut reader.take(limit + 1), file.as_file_mut())
            .context("cannot read stdin")?;
        if copied == 0 {
            bail!("stdin is empty: `-` expects an image or video file on stdin");
        }
        if copied > limit {
            bail!("stdin holds more than {limit} bytes, the limit for one media file");
        }
        file.as_file_mut()
            .flush()
            .context("cannot write stdin to a temporary file")?;
        Ok(Self { file })
    }

    /// Where the bytes are.
    pub fn path(&self) -> &Path {
        self.file.path()
    }
}

/// All of stdin as a list of inputs (`--manifest -`, e.g. `find … | qalign score --manifest -`).
pub fn read_list() -> Result<Vec<u8>> {
    let stdin = io::stdin();
    if stdin.is_terminal() {
        bail!("`--manifest -` reads the list of inputs from stdin, but stdin is a terminal");
    }
    let mut bytes = Vec::new();
    stdin
        .lock()
        .read_to_end(&mut bytes)
        .context("cannot read the list of inputs from stdin")?;
    Ok(bytes)
}

/// Replaces a `-` in `inputs` by the spooled file and returns the spool, which must live while
/// scoring; its [`path`](SpooledStdin::path) tells which input to name `-` again.
pub fn substitute(inputs: &mut [PathBuf]) -> Result<Option<SpooledStdin>> {
    let Some(slot) = inputs.iter_mut().find(|p| is_stdin(p)) else {
        return Ok(None);
    };
    let spooled = SpooledStdin::read()?;
    *slot = spooled.path().to_path_buf();
    Ok(Some(spooled))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spools_bytes_and_refuses_empty_input() {
        let spooled = SpooledStdin::from_reader(&b"\x89PNG..."[..], 64).unwrap();
        assert_eq!(std::fs::read(spooled.path()).unwrap(), b"\x89PNG...");
        let err = SpooledStdin::from_reader(&b""[..], 64).err().unwrap();
        assert!(err.to_string().contains("stdin is empty"), "{err}");
    }

    #[test]
    fn refuses_more_than_the_file_limit_without_reading_it_all() {
        let err = SpooledStdin::from_reader(io::repeat(0), 1000)
            .err()
            .unwrap();
        assert!(err.to_string().contains("more than 1000 bytes"), "{err}");
        assert!(SpooledStdin::from_reader(io::repeat(0).take(1000), 1000).is_ok());
    }
}
