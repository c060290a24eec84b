//! Writing an output file so that nothing is ever half-written: the bytes go to a temporary
//! file in the destination's folder, are synced, and the file is renamed over the destination
//! in one step. An interrupted or failed write leaves the old file (or none) and no debris.
//! Every command that writes results (syllabus JSON, adapters, checkpoints) goes through here.
//!
//! A destination that is a symbolic link is written where the link points, so the link stays;
//! one that is a device, FIFO or socket (`/dev/stdout`, `/dev/null`, a named pipe) cannot be
//! replaced by renaming and is written into directly.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

/// How many links [`destination`] follows before giving up (Linux's own limit).
const MAX_LINKS: usize = 40;

/// Writes `path` atomically. `fill` gets the open temporary file and its path (for writers
/// that take a path; such a writer may write that path or replace it with a file of its own);
/// when it succeeds the file is synced and renamed into place, with the permissions of an
/// ordinary new file (not the owner-only mode of temporary files).
///
/// When `path` names a device, FIFO or socket, `fill` gets that file opened for writing and
/// its path instead; such a write cannot be atomic.
pub fn write_atomic(
    path: &Path,
    fill: impl FnOnce(&mut File, &Path) -> io::Result<()>,
) -> io::Result<()> {
    // `metadata` follows links, so `/dev/stdout` counts as the pipe or terminal it names.
    if let Ok(meta) = std::fs::metadata(path)
        && !meta.is_file()
        && !meta.is_dir()
    {
        let mut file = OpenOptions::new().write(true).open(path)?;
        return fill(&mut file, path);
    }
    let dest = destination(path)?;
    let dir = match dest.parent() {
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
    let ordinary = tmp.as_file().metadata()?.permissions();
    fill(tmp.as_file_mut(), &tmp_path)?;
    // A writer that took the path may have put its own file there (candle's safetensors writer
    // renames an owner-only temporary file over it), so the mode is set and the data synced on
    // whatever the path names now, not on the handle.
    let written = OpenOptions::new().write(true).open(&tmp_path)?;
    // Only when it changed: some file systems (FAT) refuse any chmod.
    if written.metadata()?.permissions() != ordinary {
        written.set_permissions(ordinary)?;
    }
    written.sync_all()?;
    tmp.persist(&dest).map_err(|e| e.error)?;
    Ok(())
}

/// [`write_atomic`] for bytes already in memory.
pub fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic(path, |file, _| io::Write::write_all(file, bytes))
}

/// The file a write to `path` replaces: `path` itself, or, when it is a symbolic link, the file
/// the link points to (which may not exist yet), so that renaming over it keeps the link.
fn destination(path: &Path) -> io::Result<PathBuf> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => {}
        _ => return Ok(path.to_owned()),
    }
    if let Ok(target) = path.canonicalize() {
        return Ok(target);
    }
    // A dangling link: follow it by hand to the name that will be created.
    let mut current = path.to_owned();
    for _ in 0..MAX_LINKS {
        match std::fs::symlink_metadata(&current) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let target = std::fs::read_link(&current)?;
                // `join` keeps an absolute target as it is.
                current = match current.parent() {
                    Some(dir) => dir.join(target),
                    None => target,
                };
            }
            _ => return Ok(current),
        }
    }
    Err(io::Error::other(format!(
        "{}: too many levels of symbolic links",
        path.display()
    )))
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

    /// The mode `File::create` gives a new file here (0666 less the umask).
    #[cfg(unix)]
    fn ordinary_mode(dir: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        let probe = dir.join("probe");
        File::create(&probe).unwrap();
        let mode = std::fs::metadata(&probe).unwrap().permissions().mode() & 0o777;
        std::fs::remove_file(probe).unwrap();
        mode
    }

    #[cfg(unix)]
    #[test]
    fn a_writer_that_replaces_the_temporary_path_still_gets_an_ordinary_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        write_atomic(&path, |_, tmp| {
            // What candle's safetensors writer does: its own owner-only file renamed over ours.
            let own = tempfile::NamedTempFile::new_in(tmp.parent().unwrap())?;
            std::io::Write::write_all(&mut own.as_file(), b"tensors")?;
            own.persist(tmp).map_err(|e| e.error)?;
            Ok(())
        })
        .unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"tensors");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, ordinary_mode(dir.path()), "{mode:o}");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file left behind: {names:?}");
    }

    #[cfg(unix)]
    #[test]
    fn a_symbolic_link_is_written_through_and_stays_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("t.json");
        let link = dir.path().join("link.json");
        std::fs::write(&target, b"old").unwrap();
        std::os::unix::fs::symlink("t.json", &link).unwrap();
        write_bytes_atomic(&link, b"new").unwrap();
        assert!(
            std::fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(std::fs::read_link(&link).unwrap(), Path::new("t.json"));
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
        // A failed write through the link leaves the target as it was.
        let err = write_atomic(&link, |_, _| Err(io::Error::other("no"))).unwrap_err();
        assert_eq!(err.to_string(), "no");
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
        // A dangling link (through a second link) creates the file it names.
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let chain = dir.path().join("chain.json");
        std::os::unix::fs::symlink("dangling.json", &chain).unwrap();
        std::os::unix::fs::symlink(sub.join("missing.json"), dir.path().join("dangling.json"))
            .unwrap();
        write_bytes_atomic(&chain, b"created").unwrap();
        assert_eq!(std::fs::read(sub.join("missing.json")).unwrap(), b"created");
        assert!(
            std::fs::symlink_metadata(&chain)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["chain.json", "dangling.json", "link.json", "sub", "t.json"]
        );
        // A loop is an error, not a hang.
        let a = dir.path().join("a");
        std::os::unix::fs::symlink("b", &a).unwrap();
        std::os::unix::fs::symlink("a", dir.path().join("b")).unwrap();
        let err = write_bytes_atomic(&a, b"x").unwrap_err();
        assert!(err.to_string().contains("symbolic links"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn a_device_or_fifo_is_written_into_not_replaced() {
        use std::os::unix::fs::FileTypeExt;
        write_bytes_atomic(Path::new("/dev/null"), b"discarded").unwrap();
        assert!(
            std::fs::metadata("/dev/null")
                .unwrap()
                .file_type()
                .is_char_device()
        );
        // A write the device refuses is an error, and the device stays a device.
        if Path::new("/dev/full").exists() {
            let err = write_bytes_atomic(Path::new("/dev/full"), b"x").unwrap_err();
            assert_eq!(err.raw_os_error(), Some(28), "ENOSPC: {err}");
            assert!(
                std::fs::metadata("/dev/full")
                    .unwrap()
                    .file_type()
                    .is_char_device()
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe");
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(status.success());
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::read(fifo).unwrap())
        };
        write_bytes_atomic(&fifo, b"through the pipe").unwrap();
        assert_eq!(reader.join().unwrap(), b"through the pipe");
        assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file: {names:?}");
    }
}
