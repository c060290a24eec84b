//! Q-Align's pure logic, with no ML dependencies: score↔level conversion (paper Eq. 1–4),
//! correlation metrics, label-file readers, the training syllabus and evaluation.

pub mod atomic;
pub mod dataset;
pub mod eval;
pub mod levels;
pub mod metrics;
pub mod plot;
pub mod syllabus;
pub mod vocab;

pub use dataset::{Columns, Dataset, DatasetError, LabelItem, Prediction};
pub use levels::{
    Level, LevelDistribution, LevelError, LevelSet, Scale, Score, ScoreRange, softmax,
};
pub use metrics::{MetricError, Metrics};
pub use vocab::{
    IMAGE_MARKER, IMAGE_TOKEN_INDEX, LEVEL_WORDS, MediaKind, Task, UnknownName, is_media_file_name,
};
