//! `qalign score --manifest FILE --shard I/N --out FILE`: scoring a large file list as N
//! independent jobs (a Kubernetes Indexed Job, a SLURM array) without Ray. Each job takes a
//! deterministic part of the list and appends JSONL to its own file; a rerun of the same job skips
//! what its file already holds and drops a record that a crash cut off, so retries resume.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// Part `index` of `count` (0-based): the inputs whose position in the full list is `index` mod
/// `count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// This shard's items, in their order.
    pub fn select<T>(&self, items: Vec<T>) -> Vec<T> {
        items
            .into_iter()
            .enumerate()
            .filter(|(i, _)| i % self.count == self.index)
            .map(|(_, item)| item)
            .collect()
    }
}

/// clap parser for `--shard I/N`.
pub fn parse_shard(s: &str) -> Result<Shard, String> {
    let bad = || format!("expected I/N with 0 ≤ I < N (e.g. 0/4), got `{s}`");
    let (i, n) = s.split_once('/').ok_or_else(bad)?;
    let index: usize = i.trim().parse().map_err(|_| bad())?;
    let count: usize = n.trim().parse().map_err(|_| bad())?;
    if count == 0 || index >= count {
        return Err(bad());
    }
    Ok(Shard { index, count })
}

/// The entries of a manifest: one path, directory or glob per line; blank lines and lines
/// starting with `#` are skipped, and so are the spaces, tabs and `\r` around an entry and a
/// UTF-8 byte order mark at the start. Lines are taken as bytes: a file name that is not UTF-8
/// (as `find` lists it) is kept as it is.
pub fn read_manifest(path: &Path) -> Result<Vec<PathBuf>> {
    let (bytes, name) = if crate::stdin::is_stdin(path) {
        (
            crate::stdin::read_list()?,
            "stdin (--manifest -)".to_string(),
        )
    } else {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        (bytes, path.display().to_string())
    };
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    let entries: Vec<PathBuf> = bytes
        .split(|&b| b == b'\n')
        .map(<[u8]>::trim_ascii)
        .filter(|entry| !entry.is_empty() && !entry.starts_with(b"#"))
        // A listed `-` is the file of that name, not stdin.
        .map(|entry| {
            if entry == b"-" {
                PathBuf::from("./-")
            } else {
                path_from_bytes(entry)
            }
        })
        .collect();
    if entries.is_empty() {
        bail!("{name} lists no input");
    }
    Ok(entries)
}

#[cfg(unix)]
fn path_from_bytes(bytes: &[u8]) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    PathBuf::from(std::ffi::OsStr::from_bytes(bytes))
}

#[cfg(not(unix))]
fn path_from_bytes(bytes: &[u8]) -> PathBuf {
    PathBuf::from(String::from_utf8_lossy(bytes).into_owned())
}

/// What a record answers, as far as resuming goes: its task, the custom question if any, and
/// the scale. A rerun that asks something else (another task, question or scale) scores anew,
/// and leaves the records it did not ask for where they are.
pub fn record_kind(task: &str, question: Option<&str>, scale: &str) -> String {
    match question {
        Some(question) => format!("{task} {scale} {question:?}"),
        None => format!("{task} {scale}"),
    }
}

/// A JSONL output file that a rerun resumes.
pub struct ResumableOut {
    path: PathBuf,
    file: File,
    /// Inputs with a record for every kind asked.
    pub done: HashSet<String>,
}

impl ResumableOut {
    /// Opens `path` for appending. An input counts as done when it has a record of each of
    /// `kinds` ([`record_kind`]). Records of an input with only some of them, and a last line cut
    /// off, are dropped from the file (rewritten atomically) so that the input is scored again;
    /// records of other kinds are kept as they are. Only a regular file is read back: a device
    /// or a pipe (`/dev/stdout`) is written to and never resumed.
    pub fn open(path: &Path, kinds: &[String]) -> Result<Self> {
        let mut done = HashSet::new();
        if std::fs::metadata(path).is_ok_and(|m| m.is_file()) {
            let records = read_records(path, kinds)?;
            if records.dropped > 0 {
                eprintln!(
                    "{}: dropping {} record line(s) of inputs scored only in part (an interrupted run, or one that asked fewer tasks); they are scored again",
                    path.display(),
                    records.dropped
                );
                let kept: String = records.kept.into_iter().map(|l| l + "\n").collect();
                qalign_core::atomic::write_bytes_atomic(path, kept.as_bytes())
                    .with_context(|| format!("cannot rewrite {}", path.display()))?;
            }
            done = records.complete;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open {} for writing", path.display()))?;
        Ok(Self {
            path: path.to_owned(),
            file,
            done,
        })
    }

    /// Appends one input's records (JSONL lines) in one write, and flushes them.
    pub fn append(&mut self, lines: &str) -> Result<()> {
        self.file
            .write_all(lines.as_bytes())
            .and_then(|()| self.file.flush())
            .with_context(|| format!("cannot write {}", self.path.display()))
    }
}

/// What an earlier run left in an output file.
struct Records {
    /// Inputs with a record of every kind asked.
    complete: HashSet<String>,
    /// The lines to keep, in order: those of complete inputs and those of other kinds.
    kept: Vec<String>,
    /// Lines that do not count: a cut-off last line, records of inputs scored in part.
    dropped: usize,
}

fn read_records(path: &Path, kinds: &[String]) -> Result<Records> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let text = String::from_utf8_lossy(&bytes);
    let mut seen: HashMap<String, HashSet<&String>> = HashMap::new();
    // Each line with the input it scored when it is of a kind asked.
    let mut lines: Vec<(Option<String>, &str)> = Vec::new();
    let mut dropped = 0;
    let ends_complete = text.ends_with('\n');
    let all: Vec<&str> = text.lines().collect();
    for (n, line) in all.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let last = n + 1 == all.len();
        let record: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(_) if last && !ends_complete => {
                dropped += 1;
                continue;
            }
            Err(e) => bail!(
                "{} line {} is not a qalign record ({e}); give --out a new file or this run's own",
                path.display(),
                n + 1
            ),
        };
        let (Some(input), Some(task)) = (record["path"].as_str(), record["task"].as_str()) else {
            bail!(
                "{} line {} is not a qalign record (no path or task)",
                path.display(),
                n + 1
            );
        };
        let kind = record_kind(
            task,
            record["question"].as_str(),
            record["scale"].as_str().unwrap_or("1-5"),
        );
        let asked = kinds.iter().find(|k| **k == kind);
        if let Some(asked) = asked {
            seen.entry(input.to_owned()).or_default().insert(asked);
        }
        lines.push((asked.map(|_| input.to_owned()), line));
    }
    let complete: HashSet<String> = seen
        .into_iter()
        .filter(|(_, got)| got.len() == kinds.len())
        .map(|(p, _)| p)
        .collect();
    let mut kept = Vec::with_capacity(lines.len());
    for (input, line) in lines {
        match input {
            Some(input) if !complete.contains(&input) => dropped += 1,
            _ => kept.push(line.to_owned()),
        }
    }
    Ok(Records {
        complete,
        kept,
        dropped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_partition_the_list() {
        for count in 1..7 {
            let mut union: Vec<usize> = (0..count)
                .flat_map(|index| Shard { index, count }.select((0..23).collect()))
                .collect();
            union.sort();
            assert_eq!(union, (0..23).collect::<Vec<_>>());
        }
    }

    #[test]
    fn shard_flags_are_checked() {
        assert_eq!(parse_shard("1/4"), Ok(Shard { index: 1, count: 4 }));
        for bad in ["4/4", "1/0", "a/2", "1", "-1/2", ""] {
            assert!(parse_shard(bad).is_err(), "{bad}");
        }
    }

    fn kinds(tasks: &[&str]) -> Vec<String> {
        tasks.iter().map(|t| record_kind(t, None, "1-5")).collect()
    }

    #[test]
    fn a_cut_record_and_incomplete_inputs_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        std::fs::write(
            &path,
            "{\"path\":\"a\",\"task\":\"quality\"}\n{\"path\":\"a\",\"task\":\"aesthetics\"}\n\
             {\"path\":\"b\",\"task\":\"quality\"}\n{\"path\":\"b\",\"ta",
        )
        .unwrap();
        let out = ResumableOut::open(&path, &kinds(&["quality", "aesthetics"])).unwrap();
        assert_eq!(out.done, HashSet::from(["a".to_string()]));
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(text.ends_with('\n'));
        std::fs::write(&path, "not json\n{}\n").unwrap();
        assert!(ResumableOut::open(&path, &kinds(&["quality"])).is_err());
    }

    #[test]
    fn records_of_other_tasks_questions_and_scales_are_kept_and_not_counted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let earlier = [
            r#"{"path":"a","task":"quality","scale":"1-5"}"#,
            r#"{"path":"a","task":"custom","question":"How sharp?","scale":"1-5"}"#,
            r#"{"path":"b","task":"quality","scale":"0-1"}"#,
            r#"{"path":"c","task":"aesthetics","scale":"1-5"}"#,
        ];
        std::fs::write(&path, earlier.join("\n") + "\n").unwrap();
        // Another task: nothing is done, nothing is dropped.
        let out = ResumableOut::open(&path, &kinds(&["aesthetics"])).unwrap();
        assert_eq!(out.done, HashSet::from(["c".to_string()]));
        drop(out);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            earlier.join("\n") + "\n"
        );
        // Another question, or another scale, is not the one answered.
        let noisy = [record_kind("custom", Some("How noisy?"), "1-5")];
        assert!(ResumableOut::open(&path, &noisy).unwrap().done.is_empty());
        let sharp = [record_kind("custom", Some("How sharp?"), "1-5")];
        let out = ResumableOut::open(&path, &sharp).unwrap();
        assert_eq!(out.done, HashSet::from(["a".to_string()]));
        drop(out);
        let on_0_1 = [record_kind("quality", None, "0-1")];
        let out = ResumableOut::open(&path, &on_0_1).unwrap();
        assert_eq!(out.done, HashSet::from(["b".to_string()]));
        drop(out);
        // Quality and aesthetics: a and c hold one each; only those two lines go.
        let out = ResumableOut::open(&path, &kinds(&["quality", "aesthetics"])).unwrap();
        assert!(out.done.is_empty());
        drop(out);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            [earlier[1], earlier[2]].join("\n") + "\n"
        );
    }

    #[cfg(unix)]
    #[test]
    fn a_device_is_written_to_and_never_read_back() {
        let out = ResumableOut::open(Path::new("/dev/null"), &kinds(&["quality"])).unwrap();
        assert!(out.done.is_empty());
        let mut out = out;
        out.append("{}\n").unwrap();
    }
}
