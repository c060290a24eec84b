//! The one-call path from files to scores, shared by the CLI, a server and the Python package:
//! each path is sniffed, consecutive images are decoded in parallel and scored in batches,
//! videos stream through their windows, and every input gets an outcome of its own, in input
//! order, so that one bad file never takes down the rest.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use qalign_core::{MediaKind, Task};
use qalign_media::Pixels;
use rayon::prelude::*;

use crate::scorer::{LevelScores, Query, Result, ScoreError, ScoreWarning, Scorer};
use crate::video_score::{VideoOptions, VideoResult};

/// How [`Scorer::score_paths_with`] scores.
#[derive(Debug, Clone)]
pub struct ScoreOptions {
    /// Images per forward pass.
    pub batch_size: usize,
    /// Frame sampling and windowing for videos.
    pub video: VideoOptions,
    /// Turn warnings (a truncated video, repeated frames, ...) into errors.
    pub strict: bool,
    /// Decode the next batch of images on another thread while a batch is scored (the
    /// default), so that a GPU never waits for the decoder; on a CPU it fills the cores the
    /// model leaves idle. At most two batches of pixels are then held.
    pub decode_ahead: bool,
}

impl Default for ScoreOptions {
    fn default() -> Self {
        Self {
            batch_size: 8,
            video: VideoOptions::default(),
            strict: false,
            decode_ahead: true,
        }
    }
}

/// A scored input: one [`LevelScores`] per query, plus the video details for a video.
#[derive(Debug, Clone)]
pub enum Scored {
    Image(Vec<LevelScores>),
    Video(Box<VideoResult>),
}

impl Scored {
    pub fn kind(&self) -> MediaKind {
        match self {
            Scored::Image(_) => MediaKind::Image,
            Scored::Video(_) => MediaKind::Video,
        }
    }

    /// One result per query, in the order the queries were given.
    pub fn scores(&self) -> &[LevelScores] {
        match self {
            Scored::Image(scores) => scores,
            Scored::Video(video) => &video.clip.scores,
        }
    }

    /// What the result should be read with (always empty for an image).
    pub fn warnings(&self) -> &[ScoreWarning] {
        match self {
            Scored::Image(_) => &[],
            Scored::Video(video) => &video.warnings,
        }
    }
}

/// What became of one input.
#[derive(Debug)]
pub struct ItemOutcome {
    /// Position of the input in the list given.
    pub index: usize,
    pub path: PathBuf,
    pub result: Result<Scored>,
}

/// Where a run stands, for a progress bar.
#[derive(Debug, Clone, Copy)]
pub struct Progress<'a> {
    /// Inputs finished so far.
    pub done: usize,
    pub total: usize,
    /// The input being worked on.
    pub current: &'a Path,
    /// Frames scored of the current video, and how many are planned.
    pub frames: Option<(usize, usize)>,
}

/// Hears where a run stands; breaking stops the run (see [`Scorer::score_paths_with`]).
pub type ProgressCallback<'a> = dyn FnMut(Progress<'_>) -> ControlFlow<()> + 'a;

impl Scorer {
    /// Scores image and video files for the given tasks with the default options; one outcome
    /// per path, in order. Fails as a whole only when no input could be scored because of the
    /// tasks themselves (none given).
    pub fn score_paths<P: AsRef<Path>>(
        &self,
        paths: &[P],
        tasks: &[Task],
    ) -> Result<Vec<ItemOutcome>> {
        let queries: Vec<Query> = tasks.iter().map(|&t| Query::Task(t)).collect();
        let mut outcomes = Vec::with_capacity(paths.len());
        self.score_paths_with(
            paths,
            &queries,
            &ScoreOptions::default(),
            &mut |item| {
                outcomes.push(item);
                ControlFlow::Continue(())
            },
            None,
        )?;
        Ok(outcomes)
    }

    /// Scores files for any queries, handing each outcome to `sink` as soon as it is known (in
    /// input order). `progress`, when given, hears about every finished input (just before
    /// `sink` gets it) and about every video window, before and after its forward pass. Either
    /// callback may stop the run by breaking: the run then ends with `Ok` after the batch of
    /// images in progress, or between two windows of a video, whose outcome is then never
    /// handed over. Fails as a whole only for a bad query (an empty list, or a prompt the
    /// model cannot take), before any file is read.
    pub fn score_paths_with<'a, P: AsRef<Path>>(
        &self,
        paths: &'a [P],
        queries: &[Query],
        options: &ScoreOptions,
        sink: &mut dyn FnMut(ItemOutcome) -> ControlFlow<()>,
        mut progress: Option<&mut ProgressCallback<'_>>,
    ) -> Result<()> {
        if queries.is_empty() {
            return Err(ScoreError::Empty { what: "queries" });
        }
        for query in queries {
            self.prompt_ids(query, MediaKind::Image)?;
            self.prompt_ids(query, MediaKind::Video)?;
        }
        let total = paths.len();
        let mut done = 0usize;
        let mut report = |outcome: ItemOutcome,
                          done: &mut usize,
                          progress: &mut Option<&mut ProgressCallback<'_>>|
         -> ControlFlow<()> {
            *done += 1;
            let heard = match progress.as_deref_mut() {
                Some(progress) => progress(Progress {
                    done: *done,
                    total,
                    current: &outcome.path,
                    frames: None,
                }),
                None => ControlFlow::Continue(()),
            };
            // The finished outcome is handed over even when `progress` asked to stop.
            let taken = sink(outcome);
            if heard.is_break() { heard } else { taken }
        };
        let mut units = Units::new(paths, options.batch_size);
        let decode = |items: &[(usize, &Path)]| -> Vec<Result<Pixels>> {
            items
                .par_iter()
                .map(|(_, path)| self.load_image(path))
                .collect()
        };
        // With `decode_ahead`, the next batch of images decodes on another thread (its images
        // in parallel) while one unit is scored, so that a GPU never waits for the decoder. At
        // most two batches of pixels are held at once.
        std::thread::scope(|scope| {
            let start = |unit: Unit<'a>| match unit {
                Unit::Images(items) if options.decode_ahead => {
                    let ahead = items.clone();
                    let decoding = scope.spawn(move || decode(&ahead));
                    Started::Images(items, Some(decoding))
                }
                Unit::Images(items) => Started::Images(items, None),
                Unit::Video(index, path) => Started::Video(index, path),
            };
            let mut next = units.next().map(start);
            while let Some(current) = next.take() {
                match current {
                    Started::Images(items, decoding) => {
                        let decoded = match decoding {
                            Some(decoding) => decoding
                                .join()
                                .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                            None => decode(&items),
                        };
                        next = units.next().map(start);
                        for outcome in self.score_decoded(&items, decoded, queries) {
                            if report(outcome, &mut done, &mut progress).is_break() {
                                return Ok(());
                            }
                        }
                    }
                    Started::Video(index, path) => {
                        next = units.next().map(start);
                        let mut stopped = false;
                        let mut on_frames = |frames_done: usize, frames_total: usize| {
                            let heard = match progress.as_deref_mut() {
                                Some(progress) => progress(Progress {
                                    done,
                                    total,
                                    current: path,
                                    frames: Some((frames_done, frames_total)),
                                }),
                                None => ControlFlow::Continue(()),
                            };
                            stopped |= heard.is_break();
                            heard
                        };
                        let result = self
                            .score_video(path, queries, &options.video, &mut on_frames)
                            .and_then(|video| match video.warnings.first() {
                                Some(warning) if options.strict => {
                                    Err(ScoreError::Strict(warning.clone()))
                                }
                                _ => Ok(Scored::Video(Box::new(video))),
                            });
                        if matches!(result, Err(ScoreError::Cancelled)) {
                            return Ok(());
                        }
                        let outcome = ItemOutcome {
                            index,
                            path: path.to_path_buf(),
                            result,
                        };
                        if report(outcome, &mut done, &mut progress).is_break() || stopped {
                            return Ok(());
                        }
                    }
                }
            }
            Ok(())
        })
    }

    /// Scores the images of a batch that decoded in one pass. When the pass fails, each image is
    /// retried alone so that every one gets its own outcome.
    fn score_decoded(
        &self,
        items: &[(usize, &Path)],
        decoded: Vec<Result<Pixels>>,
        queries: &[Query],
    ) -> Vec<ItemOutcome> {
        let ready: Vec<&Pixels> = decoded.iter().filter_map(|d| d.as_ref().ok()).collect();
        let ready_count = ready.len();
        let (mut rows, mut batch_error) = match ready_count {
            0 => (None, None),
            _ => match self.score_images(&ready, queries) {
                Ok(rows) => (Some(rows.into_iter()), None),
                Err(e) => (None, Some(e)),
            },
        };
        drop(ready);
        items
            .iter()
            .zip(decoded)
            .map(|(&(index, path), pixels)| {
                let result = pixels.and_then(|pixels| match rows.as_mut() {
                    Some(rows) => rows.next().ok_or(ScoreError::Empty { what: "images" }),
                    None => match batch_error.take() {
                        Some(e) if ready_count == 1 => Err(e),
                        _ => self
                            .score_images(&[&pixels], queries)
                            .map(|mut one| one.remove(0)),
                    },
                });
                ItemOutcome {
                    index,
                    path: path.to_path_buf(),
                    result: result.map(Scored::Image),
                }
            })
            .collect()
    }
}

/// What the inputs are scored as, in input order: runs of up to a batch of images (cut short by a
/// video) and single videos.
enum Unit<'a> {
    Images(Vec<(usize, &'a Path)>),
    Video(usize, &'a Path),
}

/// A unit whose images, if any, may be decoding already.
enum Started<'a, 'scope> {
    Images(
        Vec<(usize, &'a Path)>,
        Option<std::thread::ScopedJoinHandle<'scope, Vec<Result<Pixels>>>>,
    ),
    Video(usize, &'a Path),
}

/// Splits the inputs into [`Unit`]s as they are reached, sniffing each file only then (so a long
/// list starts at once). Anything that does not sniff as a video is an image, whose decoding
/// then reports what is wrong with it.
struct Units<'a, P> {
    paths: std::iter::Enumerate<std::slice::Iter<'a, P>>,
    batch_size: usize,
    /// A video met while a batch of images was being gathered.
    held: Option<(usize, &'a Path)>,
}

impl<'a, P: AsRef<Path>> Units<'a, P> {
    fn new(paths: &'a [P], batch_size: usize) -> Self {
        Self {
            paths: paths.iter().enumerate(),
            batch_size: batch_size.max(1),
            held: None,
        }
    }
}

impl<'a, P: AsRef<Path>> Iterator for Units<'a, P> {
    type Item = Unit<'a>;

    fn next(&mut self) -> Option<Unit<'a>> {
        if let Some((index, path)) = self.held.take() {
            return Some(Unit::Video(index, path));
        }
        // Not `batch_size` itself: a huge one (from Python, say) would overflow the allocation.
        let mut images = Vec::with_capacity(self.batch_size.min(self.paths.len()));
        for (index, path) in self.paths.by_ref() {
            let path = path.as_ref();
            if qalign_media::is_video(path) {
                if images.is_empty() {
                    return Some(Unit::Video(index, path));
                }
                self.held = Some((index, path));
                break;
            }
            images.push((index, path));
            if images.len() == self.batch_size {
                break;
            }
        }
        (!images.is_empty()).then_some(Unit::Images(images))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The units of `kinds` ('i' image, 'v' video) at `batch_size`, as index lists ('v' first
    /// for a video).
    fn units(kinds: &str, batch_size: usize) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let paths: Vec<PathBuf> = kinds
            .chars()
            .enumerate()
            .map(|(i, kind)| {
                let path = dir.path().join(match kind {
                    'v' => format!("{i}.mp4"),
                    _ => format!("{i}.jpg"),
                });
                std::fs::write(&path, b"not decoded here").unwrap();
                path
            })
            .collect();
        Units::new(&paths, batch_size)
            .map(|unit| match unit {
                Unit::Images(items) => items.iter().map(|(i, _)| i.to_string()).collect(),
                Unit::Video(i, _) => format!("v{i}"),
            })
            .collect()
    }

    #[test]
    fn units_fill_batches_in_order_and_a_video_cuts_a_batch_short() {
        assert_eq!(units("iiiviivv", 2), ["01", "2", "v3", "45", "v6", "v7"]);
        assert_eq!(units("iiiii", 8), ["01234"]);
        assert_eq!(units("iii", 0), ["0", "1", "2"]);
        assert_eq!(units("vi", 4), ["v0", "1"]);
        assert!(units("", 4).is_empty());
    }
}
