//! Turns image and video files into the exact pixel tensors the official model sees:
//! Pillow-exact image preprocessing and FFmpeg-based 1-fps video frame sampling.

pub mod error;
pub mod image;
mod input;
mod jpeg;
pub mod preprocess;
pub mod resize;
mod tiff_tags;
pub mod video;

pub use self::image::{
    DecodeOptions, MAX_FILE_BYTES, MAX_PIXELS, decode_rgb, expand2square, load_rgb, read_rgb,
};
pub use ::image::RgbImage;
pub use error::MediaError;
pub use preprocess::{Pixels, PreprocessConfig, preprocess_path};
pub use resize::{ResampleFilter, resize_bicubic};
pub use video::{
    FfmpegTools, FrameReader, MediaKind, SampledFrame, SampledVideo, SamplingOptions, SamplingPlan,
    VideoInfo, VideoWarning, is_video, sniff_kind,
};
