//! Expands path arguments (files, directories, globs) into the list of media files to score, in
//! a stable order, so that a run is repeatable and nothing is scored twice. Nothing is dropped
//! without a word: a file named twice is warned about, and a folder or link that cannot be read
//! while searching is reported as an error (the search goes on, and the run ends with exit code 3).

use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result, bail};

/// Duplicates named in the warning before "and N more".
const DUPLICATES_SHOWN: usize = 3;

/// Paths the searches could not read, over the whole run (`main` turns them into exit code 3).
static UNREADABLE: AtomicUsize = AtomicUsize::new(0);

/// How many paths could not be read while expanding the arguments.
pub fn unreadable() -> usize {
    UNREADABLE.load(Ordering::Relaxed)
}

fn report_unreadable(path: Option<&Path>, err: &dyn std::fmt::Display) {
    UNREADABLE.fetch_add(1, Ordering::Relaxed);
    match path {
        Some(p) => eprintln!(
            "{}",
            crate::output::input_error_line(&p.display().to_string(), err)
        ),
        None => eprintln!("error: {err}"),
    }
}

fn is_dangling_link(path: &Path) -> bool {
    path.symlink_metadata()
        .is_ok_and(|m| m.file_type().is_symlink())
        && path.metadata().is_err()
}

/// Whether `path` is the metadata file that macOS writes next to each file on a volume without
/// extended attributes (`._photo.jpg` beside `photo.jpg`, AppleDouble or AppleSingle): it has the
/// name of an image but holds no pixels, so searches pass over it.
fn is_apple_double(path: &Path) -> bool {
    const MAGICS: [[u8; 4]; 2] = [[0x00, 0x05, 0x16, 0x07], [0x00, 0x05, 0x16, 0x00]];
    if !path
        .file_name()
        .is_some_and(|n| n.as_encoded_bytes().starts_with(b"._"))
    {
        return false;
    }
    let mut head = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok_and(|()| MAGICS.contains(&head))
}

/// AppleDouble files passed over by the searches, over the whole run.
static APPLE_DOUBLES: AtomicUsize = AtomicUsize::new(0);

/// Whether a file found by a search is kept, counting the AppleDouble files it passes over.
fn keep_found(path: &Path) -> bool {
    if is_apple_double(path) {
        APPLE_DOUBLES.fetch_add(1, Ordering::Relaxed);
        return false;
    }
    true
}

fn has_glob_chars(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// The media files under `dir`, sorted. Unreadable folders, dangling links with a media name and
/// link loops are reported on stderr; a dangling link with another name would not have been
/// scored anyway and is passed over, and so are macOS AppleDouble files (`._NAME`, counted).
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in walkdir::WalkDir::new(dir).follow_links(true) {
        match entry {
            Ok(e) => {
                if e.file_type().is_file()
                    && qalign_core::is_media_file_name(e.path())
                    && keep_found(e.path())
                {
                    found.push(e.into_path());
                }
            }
            Err(err) if err.loop_ancestor().is_some() => {
                // Everything under a loop is found through its first path: nothing is lost.
                if let Some(p) = err.path() {
                    eprintln!(
                        "warning: {} links back to {} (not followed again)",
                        p.display(),
                        err.loop_ancestor().unwrap_or(p).display()
                    );
                }
            }
            Err(err) => {
                let path = err.path().map(Path::to_path_buf);
                let skip = path
                    .as_deref()
                    .is_some_and(|p| is_dangling_link(p) && !qalign_core::is_media_file_name(p));
                if !skip {
                    let why = match err.io_error() {
                        _ if path.as_deref().is_some_and(is_dangling_link) => {
                            "broken symbolic link".to_string()
                        }
                        Some(io) => format!("cannot read: {io}"),
                        None => err.to_string(),
                    };
                    report_unreadable(path.as_deref(), &why);
                }
            }
        }
    }
    found.sort();
    found
}

/// The files matching a glob pattern, sorted; unreadable folders and dangling links with a media
/// name are reported on stderr. As in a shell, a wildcard does not match a leading dot (`*.jpg`
/// passes over `.hidden.jpg` and `._a.jpg`; `.*.jpg` takes them).
fn glob_files(pattern: &str) -> Result<Vec<PathBuf>> {
    // Not glob's `require_literal_leading_dot`: glob 0.3 then panics on a name that is not UTF-8.
    // The names as written (`Path::components` would drop a `.` that a wildcard matched); glob
    // drops a leading `./` from what it returns, so that is not counted.
    fn names(p: &[u8]) -> Vec<&[u8]> {
        let mut names: Vec<&[u8]> = p.split(|&b| b == b'/').filter(|n| !n.is_empty()).collect();
        if names.first() == Some(&&b"."[..]) {
            names.remove(0);
        }
        names
    }
    let pattern_names = names(pattern.as_bytes());
    let fixed = pattern_names
        .iter()
        .take_while(|n| !std::str::from_utf8(n).is_ok_and(has_glob_chars))
        .count();
    let dots_asked = pattern_names[fixed..].iter().any(|n| n.starts_with(b"."));
    // A wildcard never takes `.` or `..` (glob adds them for a pattern such as `.*`), nor, unless
    // the pattern writes a dot there, a hidden name.
    let hidden = |p: &Path| {
        names(p.as_os_str().as_encoded_bytes())
            .iter()
            .skip(fixed)
            .any(|n| n.starts_with(b".") && (!dots_asked || *n == b"." || *n == b".."))
    };
    let mut found = Vec::new();
    for entry in glob::glob(pattern).with_context(|| format!("bad glob pattern `{pattern}`"))? {
        match entry {
            Ok(p) if hidden(&p) => {}
            Ok(p) if p.is_file() => {
                if keep_found(&p) {
                    found.push(p);
                }
            }
            Ok(p) if is_dangling_link(&p) && qalign_core::is_media_file_name(&p) => {
                report_unreadable(Some(&p), &"broken symbolic link");
            }
            Ok(_) => {}
            Err(err) => {
                report_unreadable(Some(err.path()), &format!("cannot read: {}", err.error()))
            }
        }
    }
    found.sort();
    Ok(found)
}

/// What makes two spellings one file: the real folder (symlinks resolved) and the name in it. So
/// `a.jpg`, `./a.jpg`, `/abs/a.jpg`, a directory walk that finds it and a glob that reaches it
/// again through a folder link loop count as one file, while a symlink to a file keeps its own
/// name (label files may refer to it). Each folder is resolved once.
#[derive(Default)]
pub struct Identities {
    folders: HashMap<PathBuf, Option<PathBuf>>,
}

impl Identities {
    pub fn of(&mut self, path: &Path) -> PathBuf {
        let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let (Some(parent), Some(name)) = (absolute.parent(), absolute.file_name()) else {
            return absolute;
        };
        let dir = self
            .folders
            .entry(parent.to_path_buf())
            .or_insert_with(|| parent.canonicalize().ok());
        match dir {
            Some(dir) => dir.join(name),
            None => absolute,
        }
    }
}

/// What [`expand_entries`] does with a path that does not exist.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    /// An error: a typo on the command line should not silently score nothing.
    Refuse,
    /// Kept as a file, which then fails alone (skipped, exit code 3): one vanished file in a
    /// manifest of millions should not stop the job, nor shift every later input's shard.
    Keep,
}

/// Expand command-line arguments into files; see [`expand_entries`].
pub fn expand(args: &[String]) -> Result<Vec<PathBuf>> {
    expand_entries(args.iter().map(|arg| (Path::new(arg), Missing::Refuse)))
}

/// Expand entries into files; `-` (stdin) is kept as it is. A glob with no match is an error, a
/// missing file as its [`Missing`] says. A file reached more than once is listed once, with a
/// warning on stderr naming the repeats.
pub fn expand_entries<'a>(
    entries: impl IntoIterator<Item = (&'a Path, Missing)>,
) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    let mut identities = Identities::default();
    let mut duplicates: Vec<PathBuf> = Vec::new();
    // The first spelling is kept.
    let mut push = |p: PathBuf, out: &mut Vec<PathBuf>| {
        if seen.insert(identities.of(&p)) {
            out.push(p);
        } else {
            duplicates.push(p);
        }
    };
    for (path, missing) in entries {
        // A name that is not UTF-8 is taken as it is: it cannot be a glob.
        let glob = path.to_str().filter(|arg| has_glob_chars(arg));
        let arg = path.display();
        if crate::stdin::is_stdin(path) {
            push(path.to_path_buf(), &mut out);
        } else if path.is_dir() {
            let found = walk(path);
            if found.is_empty() {
                bail!("directory {} holds no image or video files", path.display());
            }
            for p in found {
                push(p, &mut out);
            }
        } else if path.exists() {
            push(path.to_path_buf(), &mut out);
        } else if let Some(glob) = glob {
            let found = glob_files(glob)?;
            if found.is_empty() {
                bail!("no file matches `{arg}`");
            }
            for p in found {
                push(p, &mut out);
            }
        } else if missing == Missing::Keep {
            push(path.to_path_buf(), &mut out);
        } else if is_dangling_link(path) {
            bail!("{arg}: broken symbolic link");
        } else {
            bail!("no such file or directory: {arg}");
        }
    }
    if let Some(warning) = duplicates_warning(&duplicates) {
        eprintln!("{warning}");
    }
    match APPLE_DOUBLES.swap(0, Ordering::Relaxed) {
        0 => {}
        n => eprintln!(
            "note: {n} macOS metadata file(s) (`._NAME`, AppleDouble) passed over: they hold no image"
        ),
    }
    Ok(out)
}

/// `warning: 2 inputs named more than once are scored once: a.jpg, ./a.jpg`.
fn duplicates_warning(duplicates: &[PathBuf]) -> Option<String> {
    if duplicates.is_empty() {
        return None;
    }
    let shown: Vec<String> = duplicates
        .iter()
        .take(DUPLICATES_SHOWN)
        .map(|p| p.display().to_string())
        .collect();
    let more = match duplicates.len().saturating_sub(DUPLICATES_SHOWN) {
        0 => String::new(),
        n => format!(" and {n} more"),
    };
    let n = duplicates.len();
    let (noun, verb) = if n == 1 {
        ("input repeats", "is")
    } else {
        ("inputs repeat", "are")
    };
    Some(format!(
        "warning: {n} {noun} a file named before and {verb} skipped (each file is scored once): {}{more}",
        shown.join(", ")
    ))
}
