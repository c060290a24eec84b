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
}

impl Default for ScoreOptions {
    fn default() -> Self {
        Self {
            batch_size: 8,
            video: VideoOptions::default(),
            strict: false,
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
    /// input order); `sink` may stop the run early. `progress`, when given, hears about every
    /// finished input and every scored video window. Fails as a whole only for a bad query (an
    /// empty list, or a prompt the model cannot take), before any file is read.
    pub fn score_paths_with<P: AsRef<Path>>(
        &self,
        paths: &[P],
        queries: &[Query],
        options: &ScoreOptions,
        sink: &mut dyn FnMut(ItemOutcome) -> ControlFlow<()>,
        mut progress: Option<&mut dyn FnMut(Progress<'_>)>,
    ) -> Result<()> {
        if queries.is_empty() {
            return Err(ScoreError::Empty { what: "queries" });
        }
        for query in queries {
            self.prompt_ids(query, MediaKind::Image)?;
            self.prompt_ids(query, MediaKind::Video)?;
        }
        let batch_size = options.batch_size.max(1);
        let total = paths.len();
        let mut done = 0usize;
        let mut pending: Vec<(usize, &Path)> = Vec::with_capacity(batch_size);
        let mut report = |outcome: ItemOutcome,
                          done: &mut usize,
                          progress: &mut Option<&mut dyn FnMut(Progress<'_>)>|
         -> ControlFlow<()> {
            *done += 1;
            if let Some(progress) = progress.as_deref_mut() {
                progress(Progress {
                    done: *done,
                    total,
                    current: &outcome.path,
                    frames: None,
                });
            }
            sink(outcome)
        };
        for (index, path) in paths.iter().enumerate() {
            let path = path.as_ref();
            let kind = qalign_media::sniff_kind(path);
            if !matches!(kind, Ok(Some(MediaKind::Video))) {
                pending.push((index, path));
                if pending.len() >= batch_size {
                    for outcome in self.score_image_batch(&pending, queries) {
                        if report(outcome, &mut done, &mut progress).is_break() {
                            return Ok(());
                        }
                    }
                    pending.clear();
                }
                continue;
            }
            for outcome in self.score_image_batch(&pending, queries) {
                if report(outcome, &mut done, &mut progress).is_break() {
                    return Ok(());
                }
            }
            pending.clear();
            let mut on_frames = |frames_done: usize, frames_total: usize| {
                if let Some(progress) = progress.as_deref_mut() {
                    progress(Progress {
                        done,
                        total,
                        current: path,
                        frames: Some((frames_done, frames_total)),
                    });
                }
            };
            let result = self
                .score_video(path, queries, &options.video, &mut on_frames)
                .and_then(|video| match video.warnings.first() {
                    Some(warning) if options.strict => Err(ScoreError::Strict(warning.clone())),
                    _ => Ok(Scored::Video(Box::new(video))),
                });
            let outcome = ItemOutcome {
                index,
                path: path.to_path_buf(),
                result,
            };
            if report(outcome, &mut done, &mut progress).is_break() {
                return Ok(());
            }
        }
        for outcome in self.score_image_batch(&pending, queries) {
            if report(outcome, &mut done, &mut progress).is_break() {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Decodes a batch of images in parallel and scores those that decoded in one pass. When
    /// the pass fails, each image is retried alone so that every one gets its own outcome.
    fn score_image_batch(&self, items: &[(usize, &Path)], queries: &[Query]) -> Vec<ItemOutcome> {
        let decoded: Vec<Result<Pixels>> = items
            .par_iter()
            .map(|(_, path)| self.load_image(path))
            .collect();
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
