//! `qalign score --manifest FILE --shard I/N --out FILE`: scoring a large file list as N
//! independent jobs (a Kubernetes Indexed Job, a SLURM array) without Ray. Each job takes a
//! deterministic part of the list and appends JSONL to its own file; a rerun of the same job skips
//! what its file already holds and drops a record that a crash cut off, so retries resume.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
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
/// starting with `#` are skipped.
pub fn read_manifest(path: &Path) -> Result<Vec<String>> {
    let file = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut entries = Vec::new();
    for (n, line) in BufReader::new(file).lines().enumerate() {
        let line =
            line.with_context(|| format!("cannot read {} (line {})", path.display(), n + 1))?;
        let entry = line.trim();
        if !entry.is_empty() && !entry.starts_with('#') {
            entries.push(entry.to_owned());
        }
    }
    if entries.is_empty() {
        bail!("{} lists no input", path.display());
    }
    Ok(entries)
}

/// A JSONL output file that a rerun resumes.
pub struct ResumableOut {
    path: PathBuf,
    file: File,
    /// Inputs with a record for every task asked.
    pub done: HashSet<String>,
}

impl ResumableOut {
    /// Opens `path` for appending. Records already there count as done when their input has one
    /// for each of `tasks`; an input with only some, or a last line cut off, is dropped from the
    /// file (rewritten atomically) so that it is scored again.
    pub fn open(path: &Path, tasks: &[&str]) -> Result<Self> {
        let mut done = HashSet::new();
        if path.exists() {
            let (complete, lines, dropped) = read_records(path, tasks)?;
            if dropped > 0 {
                eprintln!(
                    "{}: dropping {dropped} incomplete record line(s) (an interrupted run); their inputs are scored again",
                    path.display()
                );
                let kept: String = lines
                    .into_iter()
                    .filter(|(p, _)| complete.contains(p))
                    .map(|(_, l)| l + "\n")
                    .collect();
                qalign_core::atomic::write_bytes_atomic(path, kept.as_bytes())
                    .with_context(|| format!("cannot rewrite {}", path.display()))?;
            }
            done = complete;
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

/// The inputs of `path` with a record for every task, every complete line with its input, and
/// how many lines do not count (a cut-off last line, records of incomplete inputs).
type Records = (HashSet<String>, Vec<(String, String)>, usize);

fn read_records(path: &Path, tasks: &[&str]) -> Result<Records> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let text = String::from_utf8_lossy(&bytes);
    let mut seen: HashMap<String, HashSet<String>> = HashMap::new();
    let mut lines = Vec::new();
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
        seen.entry(input.to_owned())
            .or_default()
            .insert(task.to_owned());
        lines.push((input.to_owned(), (*line).to_owned()));
    }
    let complete: HashSet<String> = seen
        .into_iter()
        .filter(|(_, got)| tasks.iter().all(|t| got.contains(*t)))
        .map(|(p, _)| p)
        .collect();
    dropped += lines.iter().filter(|(p, _)| !complete.contains(p)).count();
    Ok((complete, lines, dropped))
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
        let out = ResumableOut::open(&path, &["quality", "aesthetics"]).unwrap();
        assert_eq!(out.done, HashSet::from(["a".to_string()]));
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(text.ends_with('\n'));
        std::fs::write(&path, "not json\n{}\n").unwrap();
        assert!(ResumableOut::open(&path, &["quality"]).is_err());
    }
}
