//! Video input for scoring: which frames the official loader would pick, and those frames'
//! pixels, decoded the way decord (the official loader) decodes them.
//!
//! **Why the `ffmpeg`/`ffprobe` binaries, not a libav binding.** Frames are decoded by running
//! Debian's `ffmpeg` and reading raw RGB frames over a pipe (`-f rawvideo -pix_fmt rgb24`):
//! * no libav headers or pkg-config at build time and no binding pinned to one FFmpeg major
//!   version (the one option that was renamed, `-vsync` → `-fps_mode`, is picked at run time);
//! * a crash or an odd codec in one file ends that one child process and comes back as a
//!   per-file error, so a batch carries on;
//! * the filter chain is decord 0.6.0's own (`transpose` for rotated clips, then `scale` with
//!   decord's bilinear libswscale flags, which converts yuv → rgb24; untagged clips get FFmpeg's
//!   default BT.601 limited range), every frame decoded in order (`passthrough`, no frame-rate
//!   conversion): the frames of `tests/fixtures/video/baby.mp4` are bit-identical to the official
//!   ones, and so are those of the clips listed in `docs/PARITY.md` (10-bit, odd sizes, 4:2:2/4:4:4,
//!   full range, BT.709/BT.2020 tags, RGB codecs, rotation, VFR).
//!
//! The binaries come from `$QALIGN_FFMPEG` / `$QALIGN_FFPROBE` when set, else `PATH`.
//! Frame selection is in [`sampling`]; frame counts and rates follow decord's definitions
//! (see [`VideoInfo`]); decoding streams (see [`FrameReader`]).

mod probe;
mod reader;
pub mod sampling;
mod sniff;
mod tools;

use std::ffi::OsString;
use std::fmt;
use std::path::Path;

use image::RgbImage;

pub use probe::{Truncation, VideoInfo};
pub use reader::{FrameReader, SampledFrame};
pub use sampling::{SamplingOptions, SamplingPlan};
pub use sniff::{MediaKind, is_video, sniff_kind};
pub use tools::{FFMPEG_ENV, FFPROBE_ENV, FfmpegTools};

use crate::MediaError;

/// A clip's planned frames, decoded, with anything the caller should warn about.
#[derive(Debug, Clone)]
pub struct SampledVideo {
    pub info: VideoInfo,
    pub plan: SamplingPlan,
    /// The planned frames in order, one per entry of `plan.indices()`.
    pub frames: Vec<SampledFrame>,
}

impl SampledVideo {
    /// The pictures alone, in order.
    pub fn images(&self) -> impl Iterator<Item = &RgbImage> {
        self.frames.iter().map(|f| &f.image)
    }

    /// Frames decoded before the stream ended, when it ended before a planned frame (the
    /// stand-ins of [`SampledFrame::is_repeated`] then repeat the last of them).
    fn delivered_early(&self) -> Option<usize> {
        self.frames.iter().any(SampledFrame::is_repeated).then(|| {
            self.frames
                .iter()
                .map(|f| f.decoded_index + 1)
                .max()
                .unwrap_or(0)
        })
    }

    /// Whether the file is truncated: what its header promises against what could be read
    /// (see [`FrameReader::truncation`] for what can and cannot be seen).
    pub fn truncation(&self) -> Option<Truncation> {
        self.info
            .truncation_with(self.delivered_early().unwrap_or(self.info.n_frames))
    }

    /// Things that differ from the plain official behaviour, for the caller to report.
    pub fn warnings(&self) -> Vec<VideoWarning> {
        let mut warnings = Vec::new();
        if let Some(truncation) = self.truncation() {
            warnings.push(VideoWarning::Truncated(truncation));
        }
        if self.plan.is_shorter_than_period() {
            warnings.push(VideoWarning::ShorterThanSamplingPeriod {
                n_frames: self.plan.n_frames(),
                avg_fps: self.plan.avg_fps(),
            });
        }
        if self.plan.is_capped() {
            warnings.push(VideoWarning::Capped {
                kept: self.plan.indices().len(),
                available: self.plan.uncapped_count(),
            });
        }
        let repeated = self.frames.iter().filter(|f| f.is_repeated()).count();
        if let Some(delivered) = self.delivered_early() {
            warnings.push(VideoWarning::RepeatedFrames {
                repeated,
                delivered,
                expected: self.info.n_frames,
            });
        }
        warnings
    }
}

/// Non-fatal deviations while sampling a clip.
#[derive(Debug, Clone, PartialEq)]
pub enum VideoWarning {
    /// The file holds fewer frames than its header promises; the frames were sampled from
    /// what remains.
    Truncated(Truncation),
    /// Shorter than one sampling period: the official loader returns no frame (and the official
    /// scorer crashes); frame 0 is used instead.
    ShorterThanSamplingPeriod { n_frames: usize, avg_fps: f64 },
    /// `max_frames` kept `kept` of the `available` frames the rule gives.
    Capped { kept: usize, available: usize },
    /// The stream delivered fewer frames than its packet count; the last one was repeated.
    RepeatedFrames {
        repeated: usize,
        delivered: usize,
        expected: usize,
    },
}

impl fmt::Display for VideoWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated(t) => {
                write!(
                    f,
                    "file is truncated: the header promises {} frames",
                    t.expected_frames
                )?;
                if let Some(seconds) = t.expected_duration {
                    write!(f, " ({seconds:.3} s)")?;
                }
                write!(
                    f,
                    ", only {} ({:.3} s) can be read; sampled from those",
                    t.decoded_frames, t.decoded_duration
                )
            }
            Self::ShorterThanSamplingPeriod { n_frames, avg_fps } => write!(
                f,
                "clip is shorter than one sampling period ({n_frames} frames at {avg_fps:.3} fps); \
                 using its first frame"
            ),
            Self::Capped { kept, available } => {
                write!(f, "sampled {kept} of {available} frames (max_frames cap)")
            }
            Self::RepeatedFrames {
                repeated,
                delivered,
                expected,
            } => write!(
                f,
                "stream decoded to {delivered} of {expected} frames; repeated the last frame \
                 {repeated} time(s)"
            ),
        }
    }
}

impl FfmpegTools {
    /// Probes a video: stream, size, rotation, frame count and rate (decord's definitions).
    pub fn probe(&self, path: &Path) -> Result<VideoInfo, MediaError> {
        probe::probe_with(self, path)
    }

    /// Starts decoding the planned frames of a probed video.
    pub fn open_frames(
        &self,
        info: &VideoInfo,
        plan: &SamplingPlan,
    ) -> Result<FrameReader, MediaError> {
        FrameReader::open(self, info, plan)
    }

    /// Probes, plans and decodes in one go.
    pub fn sample(
        &self,
        path: &Path,
        options: &SamplingOptions,
    ) -> Result<SampledVideo, MediaError> {
        let info = self.probe(path)?;
        let plan = plan_for(&info, options)?;
        let frames = self
            .open_frames(&info, &plan)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(SampledVideo { info, plan, frames })
    }
}

/// Probes a video with the shared tools ([`FfmpegTools::shared`]).
pub fn probe(path: &Path) -> Result<VideoInfo, MediaError> {
    FfmpegTools::shared()?.probe(path)
}

/// The sampling plan for a probed video.
pub fn plan_for(info: &VideoInfo, options: &SamplingOptions) -> Result<SamplingPlan, MediaError> {
    SamplingPlan::new(info.n_frames, info.avg_fps, options).map_err(|e| MediaError::Decode {
        path: info.path.clone(),
        message: e.to_string(),
    })
}

/// Streams the planned frames of a probed video with the shared tools.
pub fn open_frames(info: &VideoInfo, plan: &SamplingPlan) -> Result<FrameReader, MediaError> {
    FfmpegTools::shared()?.open_frames(info, plan)
}

/// Probes, plans and decodes a video with the shared tools.
pub fn sample_frames(path: &Path, options: &SamplingOptions) -> Result<SampledVideo, MediaError> {
    FfmpegTools::shared()?.sample(path, options)
}

/// FFmpeg's demuxers for single-file video containers, the only ones ffprobe and ffmpeg may
/// pick. Playlists and lists of files (`hls`, `concat`, `dash`, image sequences) are left out:
/// their demuxers open the other files a file names, so an uploaded "video" could make a server
/// read media elsewhere on its disk. FFmpeg matches each of a demuxer's names (`mov` stands for
/// `mov,mp4,m4a,3gp,3g2,mj2`, `matroska` for `matroska,webm`).
const VIDEO_DEMUXERS: &str = "mov,matroska,avi,flv,asf,mpegts,mpeg,mpegvideo,ogg,yuv4mpegpipe,h264,hevc,m4v,nut,mxf,dv,ivf,obu,rm";

/// An FFmpeg input URL that always means "this local file": the `file:` protocol prefix stops
/// names like `a:b.mp4` or `-x.mp4` from being read as a protocol or an option.
fn ffmpeg_input(path: &Path) -> OsString {
    let mut input = OsString::from("file:");
    input.push(path.as_os_str());
    input
}

/// The arguments that open `path` as ffprobe's or ffmpeg's input: the local file only
/// ([`ffmpeg_input`], and no protocol but `file` for anything a demuxer opens), read by one of
/// [`VIDEO_DEMUXERS`].
fn ffmpeg_input_args(path: &Path) -> [OsString; 6] {
    [
        "-protocol_whitelist".into(),
        "file".into(),
        "-format_whitelist".into(),
        VIDEO_DEMUXERS.into(),
        "-i".into(),
        ffmpeg_input(path),
    ]
}

/// What ffprobe's complaint about a demuxer off [`VIDEO_DEMUXERS`] means, or `None` when its
/// stderr holds no such complaint: `[hls @ 0x…] Format not on whitelist '…'`.
fn refused_container(stderr: &str) -> Option<String> {
    let line = stderr
        .lines()
        .find(|line| line.contains("Format not on whitelist"))?;
    let demuxer = line
        .strip_prefix('[')
        .and_then(|rest| rest.split_once(" @ "))
        .map_or("this", |(name, _)| name);
    Some(format!(
        "a {demuxer} file, not a video container qalign reads (playlists and file lists are \
         refused because they name other files; it reads MP4/MOV, MKV/WebM, AVI, FLV, WMV, \
         MPEG-TS/PS, Ogg, Y4M, MXF, NUT, DV, IVF and raw H.264/HEVC/MPEG streams)"
    ))
}

/// The last `n` informative lines of a tool's stderr about `input`, joined with " | " (for error
/// messages). Cleaned of what would repeat or add noise: "Last message repeated N times" lines,
/// lines equal to the one before, the input's own name in front of a line (the error names the
/// file already) and the `@ 0x…` context addresses in `[demuxer @ 0x…]` prefixes.
fn last_lines(text: &str, input: &Path, n: usize) -> String {
    let url = ffmpeg_input(input);
    let url = url.to_string_lossy();
    let plain = input.to_string_lossy();
    let mut lines: Vec<String> = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || is_repeat_notice(line) {
            continue;
        }
        let line = strip_context_address(line);
        let line = [url.as_ref(), plain.as_ref()]
            .iter()
            .find_map(|name| line.strip_prefix(name).and_then(|r| r.strip_prefix(": ")))
            .map_or(line.as_str(), str::trim);
        if line.is_empty() || lines.last().is_some_and(|last| last == line) {
            continue;
        }
        lines.push(line.to_string());
    }
    if lines.is_empty() {
        return "no diagnostic output".into();
    }
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// FFmpeg's "    Last message repeated 3 times" (log de-duplication) lines.
fn is_repeat_notice(line: &str) -> bool {
    line.strip_prefix("Last message repeated ")
        .and_then(|rest| rest.strip_suffix(" times").or(rest.strip_suffix(" time")))
        .is_some_and(|count| !count.is_empty() && count.bytes().all(|b| b.is_ascii_digit()))
}

/// `[h264 @ 0x55d1c2a3f940] msg` → `[h264] msg`.
fn strip_context_address(line: &str) -> String {
    if let (Some(rest), Some(close)) = (line.strip_prefix('['), line.find(']')) {
        let inside = &rest[..close - 1];
        if let Some((name, address)) = inside.rsplit_once(" @ 0x")
            && address.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return format!("[{name}]{}", &line[close + 1..]);
        }
    }
    line.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stderr_is_cleaned_of_repeats_names_and_addresses() {
        let input = Path::new("/tmp/a b/clip.mp4");
        let stderr = "[h264 @ 0x55d1c2a3f940] Invalid NAL unit size (364 > 330).\n\
            [h264 @ 0x55d1c2a3f940] Invalid NAL unit size (364 > 330).\n\
            \x20   Last message repeated 12 times\n\
            [mov,mp4,m4a,3gp,3g2,mj2 @ 0x5585a88791c0] stream 0, offset 0x676c: partial file\n\
            \n\
            file:/tmp/a b/clip.mp4: Invalid data found when processing input\n";
        assert_eq!(
            last_lines(stderr, input, 5),
            "[h264] Invalid NAL unit size (364 > 330). | \
             [mov,mp4,m4a,3gp,3g2,mj2] stream 0, offset 0x676c: partial file | \
             Invalid data found when processing input"
        );
        assert_eq!(
            last_lines(stderr, input, 1),
            "Invalid data found when processing input"
        );
        assert_eq!(
            last_lines("Last message repeated 1 time\n", input, 3),
            "no diagnostic output"
        );
        // Not a repeat notice, not an address: kept as written.
        assert_eq!(
            last_lines("[x @ 0xzz] Last message repeated many times\n", input, 3),
            "[x @ 0xzz] Last message repeated many times"
        );
    }
}
