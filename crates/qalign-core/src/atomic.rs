//! Writing an output file so that nothing is ever half-written: the bytes go to a temporary
//! file in the destination's folder, are synced, and the file is renamed over the destination
//! in one step. An interrupted or failed write leaves the old file (or none) and no debris.
//! Every command that writes results (syllabus JSON, adapters, checkpoints) goes through here.

use std::fs::File;
use std::io;
use std::path::Path;

/// Writes `path` atomically. `fill` gets the open temporary file and its path (for writers
/// that take a path); when it succeeds the file is synced and renamed into place, with the
/// permissions of an ordinary new file (not the owner-only mode of temporary files).
pub fn write_atomic(
    path: &Path,
    fill: impl FnOnce(&mut File, &Path) -> io::Result<()>,
) -> io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let mut builder = tempfile::Builder::new();
    builder.prefix(".qalign-").suffix(".tmp");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // Filtered by the umask at creation, like any file the user writes.
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    let mut tmp = builder.tempfile_in(dir)?;
    let tmp_path = tmp.path().to_path_buf();
    fill(tmp.as_file_mut(), &tmp_path)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// [`write_atomic`] for bytes already in memory.
pub fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic(path, |file, _| io::Write::write_all(file, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_debris() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.json");
        write_bytes_atomic(&path, b"old").unwrap();
        let err = write_atomic(&path, |file, _| {
            io::Write::write_all(file, b"half")?;
            Err(io::Error::other("disk on fire"))
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "disk on fire");
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file left behind");
        write_bytes_atomic(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_ne!(mode & 0o044, 0, "readable like an ordinary file: {mode:o}");
        }
    }
}
