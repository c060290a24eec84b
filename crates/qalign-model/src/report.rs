//! The one JSON shape of a scored item, shared by the CLI (`--format json|jsonl|csv`) and any
//! other front end, so that every output names its scale and carries the full distribution.

use qalign_core::{LevelSet, MediaKind, Scale};
use serde::Serialize;

use crate::batch::Scored;
use crate::scorer::{LevelScores, Query, ScoreWarning};
use crate::video_score::{ClipResult, VideoResult};

/// One scored image or video for one task.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ScoreRecord {
    pub path: String,
    pub task: String,
    /// The question asked, for task `custom` (absent for the official tasks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub question: Option<String>,
    /// `"image"` or `"video"`.
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "image"))]
    pub input: MediaKind,
    pub score: f64,
    /// `"1-5"` or `"0-1"`.
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "1-5"))]
    pub scale: Scale,
    /// The level words, best first: the order of `probs` and `logits`.
    pub levels: Vec<String>,
    pub probs: Vec<f64>,
    pub logits: Vec<f32>,
    /// Standard deviation of the level distribution, in units of `scale`.
    pub std: f64,
    /// Entropy of the level distribution, in nats.
    pub entropy: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frames: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fps: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sampled_indices: Option<Vec<usize>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub windows: Option<Vec<WindowRecord>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_frame: Option<Vec<FrameRecord>>,
    /// What the score should be read with (a truncated video, ...); absent when nothing.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<WarningRecord>,
}

/// A warning in a report: a stable code and the sentence that explains it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WarningRecord {
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub code: &'static str,
    pub message: String,
}

impl From<&ScoreWarning> for WarningRecord {
    fn from(w: &ScoreWarning) -> Self {
        Self {
            code: w.code(),
            message: w.to_string(),
        }
    }
}

/// The score of one window of a long video.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WindowRecord {
    pub start_frame: usize,
    pub end_frame: usize,
    pub frames: usize,
    pub score: f64,
}

/// The score of one sampled frame scored alone (image prompt).
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FrameRecord {
    pub frame: usize,
    pub time_s: f64,
    pub score: f64,
}

impl ScoreRecord {
    /// A record for a scored image.
    pub fn image(
        path: &str,
        task: &str,
        scores: &LevelScores,
        levels: &LevelSet,
        scale: Scale,
    ) -> Self {
        let d = &scores.distribution;
        Self {
            path: path.to_string(),
            task: task.to_string(),
            question: None,
            input: MediaKind::Image,
            score: d.score(scale).value,
            scale,
            levels: levels.words().to_vec(),
            probs: d.probs().to_vec(),
            logits: scores.logits.clone(),
            std: d.std(scale),
            entropy: d.entropy(),
            frames: None,
            fps: None,
            sampled_indices: None,
            windows: None,
            per_frame: None,
            warnings: Vec::new(),
        }
    }

    /// The records of a scored input: one per query, in query order.
    pub fn for_scored(
        path: &str,
        queries: &[Query],
        scored: &Scored,
        levels: &LevelSet,
        scale: Scale,
    ) -> Vec<Self> {
        queries
            .iter()
            .enumerate()
            .map(|(q, query)| {
                let mut record = match scored {
                    Scored::Image(scores) => {
                        Self::image(path, query.name(), &scores[q], levels, scale)
                    }
                    Scored::Video(video) => {
                        Self::video(path, query.name(), q, video, levels, scale)
                    }
                };
                if let Query::Custom { question, .. } = query {
                    record.question = Some(question.clone());
                }
                record
            })
            .collect()
    }

    /// A record for query `q` of a scored video.
    pub fn video(
        path: &str,
        task: &str,
        q: usize,
        video: &VideoResult,
        levels: &LevelSet,
        scale: Scale,
    ) -> Self {
        let clip: &ClipResult = &video.clip;
        let mut record = Self::image(path, task, &clip.scores[q], levels, scale);
        record.input = MediaKind::Video;
        record.warnings = video.warnings.iter().map(WarningRecord::from).collect();
        record.frames = Some(video.sampled_indices.len());
        record.fps = Some(video.info.avg_fps);
        record.sampled_indices = Some(video.sampled_indices.clone());
        if clip.is_windowed() {
            record.windows = Some(
                clip.windows
                    .iter()
                    .map(|w| WindowRecord {
                        start_frame: w.start_frame,
                        end_frame: w.end_frame,
                        frames: w.frames,
                        score: w.scores[q].distribution.score(scale).value,
                    })
                    .collect(),
            );
        }
        if !clip.per_frame.is_empty() {
            record.per_frame = Some(
                clip.per_frame
                    .iter()
                    .map(|f| FrameRecord {
                        frame: f.source_index,
                        time_s: f.time_s,
                        score: f.scores[q].distribution.score(scale).value,
                    })
                    .collect(),
            );
        }
        record
    }
}
