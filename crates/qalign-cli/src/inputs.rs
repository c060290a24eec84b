//! Expands the `score` command's path arguments (files, directories, globs) into the list of
//! media files to score, in a stable order, so that a run is repeatable and nothing is scored twice.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

fn has_glob_chars(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// Expand arguments into files. A missing file or a glob with no match is an error: a typo
/// should not silently score nothing. A file reached more than once is listed once.
pub fn expand(args: &[String]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    // Keyed by the absolute path (`.` components dropped, symlinks not resolved), so `a.jpg`,
    // `./a.jpg`, `/abs/a.jpg` and a directory walk that finds it count as one file, while a
    // symlink keeps its own name (label files may refer to it). The first spelling is kept.
    let mut push = |p: PathBuf, out: &mut Vec<PathBuf>| {
        let key = std::path::absolute(&p).unwrap_or_else(|_| p.clone());
        if seen.insert(key) {
            out.push(p);
        }
    };
    for arg in args {
        let path = Path::new(arg);
        if path.is_dir() {
            let mut found: Vec<PathBuf> = walkdir::WalkDir::new(path)
                .follow_links(true)
                .into_iter()
                .filter_map(|e| e.ok())
                .filter(|e| e.file_type().is_file() && qalign_core::is_media_file_name(e.path()))
                .map(|e| e.into_path())
                .collect();
            found.sort();
            if found.is_empty() {
                bail!("directory {} holds no image or video files", path.display());
            }
            for p in found {
                push(p, &mut out);
            }
        } else if path.exists() {
            push(path.to_path_buf(), &mut out);
        } else if has_glob_chars(arg) {
            let mut found: Vec<PathBuf> = glob::glob(arg)
                .with_context(|| format!("bad glob pattern `{arg}`"))?
                .filter_map(|e| e.ok())
                .filter(|p| p.is_file())
                .collect();
            found.sort();
            if found.is_empty() {
                bail!("no file matches `{arg}`");
            }
            for p in found {
                push(p, &mut out);
            }
        } else {
            bail!("no such file or directory: {arg}");
        }
    }
    Ok(out)
}
