//! Turns image and video files into the exact pixel tensors the official model sees:
//! Pillow-exact image preprocessing and FFmpeg-based 1-fps video frame sampling.

pub mod error;
pub mod video;

pub use error::MediaError;
pub use video::{
    FfmpegTools, FrameReader, MediaKind, SampledFrame, SampledVideo, SamplingOptions, SamplingPlan,
    VideoInfo, VideoWarning, is_video, sniff_kind,
};
