//! Video scoring on top of [`Scorer`]: all sampled frames go into one prompt, as the official
//! video scorer does, but frames stream from the decoder and clips longer than the model's
//! context are scored in windows of consecutive frames whose level probabilities are averaged
//! (weighted by frame count). Memory is bounded by one window, whatever the clip's length.

use std::ops::ControlFlow;
use std::path::Path;

use qalign_media::Pixels;
use qalign_media::video::{self, SamplingOptions, VideoInfo};

use crate::scorer::{
    LevelScores, Query, Result, ScoreError, ScoreWarning, Scorer, balanced_windows,
};

/// How to score a video.
#[derive(Debug, Clone, Default)]
pub struct VideoOptions {
    /// Frame sampling (rate, cap); the default is the official 1 fps.
    pub sampling: SamplingOptions,
    /// At most this many frames per forward pass; the model's context bounds it anyway.
    pub window: Option<usize>,
    /// Also score every sampled frame alone with the image prompt.
    pub per_frame: bool,
}

/// One window of consecutive sampled frames.
#[derive(Debug, Clone)]
pub struct WindowResult {
    /// Source index of the window's first frame.
    pub start_frame: usize,
    /// Source index of the window's last frame (inclusive).
    pub end_frame: usize,
    /// Sampled frames in the window (its weight in the combination).
    pub frames: usize,
    /// One result per query.
    pub scores: Vec<LevelScores>,
}

/// One sampled frame scored alone with the image prompt.
#[derive(Debug, Clone)]
pub struct FrameResult {
    pub source_index: usize,
    /// Seconds from the start (`source_index / fps`).
    pub time_s: f64,
    /// One result per query.
    pub scores: Vec<LevelScores>,
}

/// The result of scoring one clip.
#[derive(Debug, Clone)]
pub struct ClipResult {
    /// One combined result per query.
    pub scores: Vec<LevelScores>,
    /// The windows (one when the clip fits a single pass).
    pub windows: Vec<WindowResult>,
    /// Per-frame results, when asked for.
    pub per_frame: Vec<FrameResult>,
}

impl ClipResult {
    /// Whether the clip needed more than one pass.
    pub fn is_windowed(&self) -> bool {
        self.windows.len() > 1
    }
}

/// A scored video file.
#[derive(Debug, Clone)]
pub struct VideoResult {
    pub info: VideoInfo,
    pub sampled_indices: Vec<usize>,
    /// What the result should be read with (short clip, capped or repeated frames, truncation).
    pub warnings: Vec<ScoreWarning>,
    pub clip: ClipResult,
}

impl Scorer {
    /// Frames per forward pass for these queries and options.
    pub fn window_size(&self, queries: &[Query], window: Option<usize>) -> Result<usize> {
        let mut context_bound = usize::MAX;
        for query in queries {
            context_bound = context_bound.min(self.max_frames_per_pass(query)?);
        }
        if queries.is_empty() {
            context_bound = 1;
        }
        Ok(window.map_or(context_bound, |w| w.clamp(1, context_bound)))
    }

    /// Scores a stream of preprocessed frames `(source_index, pixels)` of known count `total`.
    /// Frames are encoded and scored one window at a time. `progress` gets the number of frames
    /// done before each window's forward pass (its frames read) and after it; when it breaks
    /// before the last window is done, scoring stops with [`ScoreError::Cancelled`].
    pub fn score_frame_stream<I>(
        &self,
        frames: I,
        total: usize,
        fps: f64,
        queries: &[Query],
        options: &VideoOptions,
        progress: &mut dyn FnMut(usize) -> ControlFlow<()>,
    ) -> Result<ClipResult>
    where
        I: IntoIterator<Item = Result<(usize, Pixels)>>,
    {
        if total == 0 {
            return Err(ScoreError::NoFrames);
        }
        if queries.is_empty() {
            return Err(ScoreError::Empty { what: "queries" });
        }
        let plan = balanced_windows(total, self.window_size(queries, options.window)?);
        let mut frames = frames.into_iter();
        let mut windows = Vec::with_capacity(plan.len());
        let mut per_frame = Vec::new();
        let mut done = 0;
        for &(_, len) in &plan {
            let mut indices = Vec::with_capacity(len);
            let mut pixels = Vec::with_capacity(len);
            for _ in 0..len {
                let (index, frame) = frames.next().ok_or(ScoreError::ClipEnded {
                    decoded: done + pixels.len(),
                    expected: total,
                })??;
                indices.push(index);
                pixels.push(frame);
            }
            if progress(done).is_break() {
                return Err(ScoreError::Cancelled);
            }
            let refs: Vec<&Pixels> = pixels.iter().collect();
            let visual = self.encode(&refs)?;
            drop(pixels);
            let mut scores = Vec::with_capacity(queries.len());
            for query in queries {
                let mut one = self.score_encoded_clips(std::slice::from_ref(&visual), query)?;
                scores.push(one.remove(0));
            }
            if options.per_frame {
                let per_query = queries
                    .iter()
                    .map(|q| self.score_encoded_images(&visual, q))
                    .collect::<Result<Vec<_>>>()?;
                for (i, &source_index) in indices.iter().enumerate() {
                    per_frame.push(FrameResult {
                        source_index,
                        time_s: if fps > 0.0 {
                            source_index as f64 / fps
                        } else {
                            0.0
                        },
                        scores: per_query.iter().map(|row| row[i].clone()).collect(),
                    });
                }
            }
            windows.push(WindowResult {
                start_frame: indices[0],
                end_frame: indices[len - 1],
                frames: len,
                scores,
            });
            done += len;
            // After the last window the clip is scored: a stop then only ends the caller's run.
            if progress(done).is_break() && done < total {
                return Err(ScoreError::Cancelled);
            }
        }
        let scores = (0..queries.len())
            .map(|q| {
                let parts: Vec<(&LevelScores, f64)> = windows
                    .iter()
                    .map(|w| (&w.scores[q], w.frames as f64))
                    .collect();
                if parts.len() == 1 {
                    Ok(parts[0].0.clone())
                } else {
                    LevelScores::weighted_mean(&parts)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ClipResult {
            scores,
            windows,
            per_frame,
        })
    }

    /// Decodes, samples and scores a video file. Frames stream from FFmpeg and only one window
    /// of them is held at a time. `progress` hears `(frames done, frames planned)` before and
    /// after each window's forward pass; when it breaks before the last window is done, scoring
    /// stops with [`ScoreError::Cancelled`].
    pub fn score_video(
        &self,
        path: &Path,
        queries: &[Query],
        options: &VideoOptions,
        progress: &mut dyn FnMut(usize, usize) -> ControlFlow<()>,
    ) -> Result<VideoResult> {
        let info = video::probe(path)?;
        let plan = video::plan_for(&info, &options.sampling)?;
        let mut warnings = Vec::new();
        if plan.is_shorter_than_period() {
            warnings.push(ScoreWarning::ShortClip {
                frames: info.n_frames,
                fps: info.avg_fps,
            });
        }
        if plan.is_capped() {
            warnings.push(ScoreWarning::FramesCapped {
                sampled: plan.uncapped_count(),
                kept: plan.indices().len(),
            });
        }
        let total = plan.indices().len();
        let mut reader = video::open_frames(&info, &plan)?;
        let mut repeated = 0usize;
        let frames = reader.by_ref().map(|frame| {
            let frame = frame.map_err(ScoreError::from)?;
            if frame.is_repeated() {
                repeated += 1;
            }
            Ok::<_, ScoreError>((frame.source_index, self.preprocess_rgb(&frame.image)))
        });
        let clip =
            self.score_frame_stream(frames, total, info.avg_fps, queries, options, &mut |done| {
                progress(done, total)
            })?;
        // The reader knows the most once the stream is read: the probe's packet count, or
        // fewer frames decoded than packets.
        if let Some(cut) = reader.truncation() {
            warnings.push(ScoreWarning::Truncated {
                expected_frames: cut.expected_frames,
                decoded_frames: cut.decoded_frames,
                scored_frames: total,
            });
        }
        if repeated > 0 {
            warnings.push(ScoreWarning::RepeatedFrames { count: repeated });
        }
        Ok(VideoResult {
            info,
            sampled_indices: plan.indices().to_vec(),
            warnings,
            clip,
        })
    }
}
