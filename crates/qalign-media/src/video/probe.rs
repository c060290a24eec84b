//! Reads a video's frame count, frame rate, size and orientation with `ffprobe`, using the same
//! definitions as decord so the sampling plan matches the official loader frame for frame.
//!
//! * `n_frames` is decord's `len(vr)`: decord indexes every demuxed packet of the video stream, so
//!   it is the packet count (`ffprobe -count_packets`, a demux pass without decoding, ~15 ms per
//!   100 MB). The header's `nb_frames` is kept for information only: it is missing in Matroska,
//!   WebM and fragmented MP4, and edit lists can make it disagree with the packets.
//! * `avg_fps` is decord's `get_avg_fps()`: the stream's `avg_frame_rate` num/den as an f64
//!   (2997/100 for baby.mp4). When the container gives none (0/0, where decord would return NaN)
//!   the stream's `r_frame_rate` is used instead.
//! * The stream is the first video stream that is not cover art (`attached_pic`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Deserialize;

use super::tools::FfmpegTools;
use super::{ffmpeg_input_args, last_lines, refused_container};
use crate::MediaError;
use crate::image::{MAX_PIXELS, too_many_pixels};
use crate::input;

/// What [`probe`](super::probe) learns about a video file.
#[derive(Debug, Clone, PartialEq)]
pub struct VideoInfo {
    /// The file probed.
    pub path: PathBuf,
    /// Absolute index of the video stream that is decoded.
    pub stream_index: usize,
    /// FFmpeg codec name (`h264`, `vp9`, …).
    pub codec: String,
    /// Container format name as FFmpeg reports it (`mov,mp4,m4a,3gp,3g2,mj2`, `matroska,webm`, …).
    pub format: String,
    /// Width of the delivered frames (after applying the rotation).
    pub width: u32,
    /// Height of the delivered frames (after applying the rotation).
    pub height: u32,
    /// Clockwise rotation applied to the decoded pictures (0, 90, 180 or 270) from the
    /// container's `rotate` tag or display matrix, as decord reads it.
    pub rotation: u32,
    /// Frame count as decord's `len(vr)`: number of demuxed packets of the stream.
    pub n_frames: usize,
    /// Frame count written in the container header (`nb_frames`), when there is one.
    pub header_frames: Option<u64>,
    /// Average frame rate as decord's `get_avg_fps()`.
    pub avg_fps: f64,
    /// The rational the frame rate was read from (numerator, denominator).
    pub frame_rate: (i64, i64),
    /// Duration in seconds (stream duration, else container duration), when known.
    pub duration: Option<f64>,
    /// Duration of the video stream alone, when the container states one (the stream's own
    /// duration, else Matroska's per-track `DURATION` tag); unlike [`VideoInfo::duration`] it
    /// never falls back to the container's, which may cover a longer audio track.
    pub video_duration: Option<f64>,
}

/// A clip that holds fewer frames than its header promises: a file cut short (an interrupted
/// download or copy, a full disk) or still being written. Its frames are sampled from what
/// remains, so callers should warn (see [`VideoInfo::truncation`], [`FrameReader::truncation`]
/// and [`SampledVideo::truncation`]).
///
/// [`FrameReader::truncation`]: super::FrameReader::truncation
/// [`SampledVideo::truncation`]: super::SampledVideo::truncation
#[derive(Debug, Clone, PartialEq)]
pub struct Truncation {
    /// Frames the header promises: its frame count (`nb_frames`), else the video stream's
    /// stated duration × the average frame rate, rounded.
    pub expected_frames: usize,
    /// Frames that could actually be read: the demuxed packets, or, when decoding ran to the
    /// end of the stream and delivered fewer, the frames decoded.
    pub decoded_frames: usize,
    /// Duration the header states for the video, in seconds, when it states one.
    pub expected_duration: Option<f64>,
    /// Seconds of video that could be read: `decoded_frames / avg_fps`.
    pub decoded_duration: f64,
}

impl VideoInfo {
    /// What the probe alone shows of a truncated file: fewer packets than the header's frame
    /// count, or, for containers without a count (Matroska, WebM), packets covering less than
    /// the stream's stated duration by more than 2 frames and 2 %. `None` for a complete file.
    pub fn truncation(&self) -> Option<Truncation> {
        self.truncation_with(self.n_frames)
    }

    /// [`VideoInfo::truncation`] when only `decoded` frames turned out to be readable.
    pub(crate) fn truncation_with(&self, decoded: usize) -> Option<Truncation> {
        let decoded = decoded.min(self.n_frames);
        let expected = match self.header_frames {
            Some(count) => usize::try_from(count)
                .unwrap_or(usize::MAX)
                .max(self.n_frames),
            None => {
                let stated = self
                    .video_duration
                    .map(|d| (d * self.avg_fps).round())
                    .filter(|f| f.is_finite() && *f >= 0.0)
                    .map_or(0, |f| f as usize);
                let slack = 2usize.max(stated / 50);
                if stated > self.n_frames + slack {
                    stated
                } else {
                    self.n_frames
                }
            }
        };
        (decoded < expected).then(|| Truncation {
            expected_frames: expected,
            decoded_frames: decoded,
            expected_duration: self.video_duration,
            decoded_duration: decoded as f64 / self.avg_fps,
        })
    }
}

#[derive(Debug, Deserialize)]
struct ProbeOutput {
    #[serde(default)]
    streams: Vec<ProbeStream>,
    #[serde(default)]
    format: Option<ProbeFormat>,
}

#[derive(Debug, Deserialize)]
struct ProbeFormat {
    format_name: Option<String>,
    duration: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ProbeStream {
    index: usize,
    codec_type: Option<String>,
    codec_name: Option<String>,
    codec_tag_string: Option<String>,
    width: Option<u32>,
    height: Option<u32>,
    avg_frame_rate: Option<String>,
    r_frame_rate: Option<String>,
    nb_frames: Option<String>,
    nb_read_packets: Option<String>,
    duration: Option<String>,
    #[serde(default)]
    disposition: BTreeMap<String, i64>,
    #[serde(default)]
    tags: BTreeMap<String, String>,
    #[serde(default)]
    side_data_list: Vec<serde_json::Value>,
}

impl ProbeStream {
    fn is_video(&self) -> bool {
        self.codec_type.as_deref() == Some("video")
    }

    fn is_cover_art(&self) -> bool {
        self.disposition.get("attached_pic").copied().unwrap_or(0) != 0
    }

    fn describe(&self) -> String {
        let kind = self.codec_type.as_deref().unwrap_or("unknown");
        let codec = self.codec_name.as_deref().unwrap_or("unknown codec");
        format!("{kind} ({codec})")
    }

    /// Clockwise degrees: decord reads the `rotate` tag first, then the display matrix, whose
    /// counter-clockwise angle ffprobe prints as `rotation`.
    fn clockwise_rotation(&self) -> f64 {
        let tagged = self
            .tags
            .get("rotate")
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|angle| *angle != 0.0);
        if let Some(angle) = tagged {
            return angle;
        }
        self.side_data_list
            .iter()
            .find_map(|sd| sd.get("rotation").and_then(serde_json::Value::as_f64))
            .map_or(0.0, |ccw| -ccw)
    }
}

pub(crate) fn probe_with(tools: &FfmpegTools, path: &Path) -> Result<VideoInfo, MediaError> {
    let decode_error = |message: String| MediaError::Decode {
        path: path.to_path_buf(),
        message,
    };
    check_input_file(path)?;

    let output = Command::new(tools.ffprobe())
        .args([
            "-hide_banner",
            "-loglevel",
            "error",
            "-count_packets",
            "-show_streams",
            "-show_format",
        ])
        .args(["-print_format", "json"])
        .args(ffmpeg_input_args(path))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| MediaError::ToolFailed {
            tool: tools.ffprobe().to_path_buf(),
            path: path.to_path_buf(),
            message: format!("cannot run ffprobe: {e}"),
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        if let Some(message) = refused_container(&stderr) {
            return Err(MediaError::Unsupported {
                path: path.to_path_buf(),
                message,
            });
        }
        return Err(decode_error(format!(
            "not a readable media file (ffprobe: {})",
            last_lines(&stderr, path, 3)
        )));
    }
    let parsed: ProbeOutput = serde_json::from_slice(&output.stdout)
        .map_err(|e| decode_error(format!("unexpected ffprobe output: {e}")))?;
    info_from_probe(path, parsed)
}

fn check_input_file(path: &Path) -> Result<(), MediaError> {
    if path.is_dir() {
        return Err(MediaError::Unsupported {
            path: path.to_path_buf(),
            message: "is a directory, not a video file".into(),
        });
    }
    // FIFOs and devices are refused: ffprobe and ffmpeg would each consume (or wait on) them.
    if input::regular_file_len(path)? == 0 {
        return Err(MediaError::Decode {
            path: path.to_path_buf(),
            message: "empty file".into(),
        });
    }
    Ok(())
}

fn info_from_probe(path: &Path, probe: ProbeOutput) -> Result<VideoInfo, MediaError> {
    let unsupported = |message: String| MediaError::Unsupported {
        path: path.to_path_buf(),
        message,
    };
    let decode_error = |message: String| MediaError::Decode {
        path: path.to_path_buf(),
        message,
    };

    let Some(stream) = probe
        .streams
        .iter()
        .find(|s| s.is_video() && !s.is_cover_art())
    else {
        let found = if probe.streams.is_empty() {
            "no streams at all".to_string()
        } else {
            let kinds: Vec<String> = probe.streams.iter().map(ProbeStream::describe).collect();
            format!("streams: {}", kinds.join(", "))
        };
        return Err(unsupported(format!("no video stream ({found})")));
    };
    let codec = match stream.codec_name.as_deref() {
        Some(name) if !name.is_empty() && name != "none" => name.to_string(),
        _ => {
            let tag = stream.codec_tag_string.as_deref().unwrap_or("?");
            return Err(unsupported(format!(
                "video codec not recognised by FFmpeg (codec tag {tag:?})"
            )));
        }
    };
    let (coded_width, coded_height) = match (stream.width, stream.height) {
        (Some(w), Some(h)) if w > 0 && h > 0 => (w, h),
        _ => {
            return Err(decode_error(format!(
                "{codec} stream {} has no picture size",
                stream.index
            )));
        }
    };
    // Refused here, on the size ffprobe claims, before any frame buffer is allocated.
    if u64::from(coded_width) * u64::from(coded_height) > MAX_PIXELS {
        return Err(unsupported(too_many_pixels(
            "video frames",
            coded_width.into(),
            coded_height.into(),
        )));
    }
    let n_frames = stream
        .nb_read_packets
        .as_deref()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .ok_or_else(|| decode_error(format!("{codec} stream {} has no frames", stream.index)))?;
    let frame_rate = [&stream.avg_frame_rate, &stream.r_frame_rate]
        .into_iter()
        .find_map(|rate| rate.as_deref().and_then(parse_rational))
        .ok_or_else(|| {
            decode_error(format!("{codec} stream {} has no frame rate", stream.index))
        })?;
    let avg_fps = frame_rate.0 as f64 / frame_rate.1 as f64;

    let rotation = normalise_rotation(stream.clockwise_rotation());
    let (width, height) = if rotation % 180 == 90 {
        (coded_height, coded_width)
    } else {
        (coded_width, coded_height)
    };
    // Frames padding to a 1- or 3-pixel square have no official tensor (`DegenerateSquare`).
    crate::preprocess::check_square_side(path, width, height)?;
    let format = probe.format.as_ref();
    let duration = stream
        .duration
        .as_deref()
        .or_else(|| format.and_then(|f| f.duration.as_deref()))
        .and_then(|d| d.parse::<f64>().ok())
        .filter(|d| d.is_finite() && *d >= 0.0);

    let video_duration = stream
        .duration
        .as_deref()
        .and_then(|d| d.parse::<f64>().ok())
        .or_else(|| stream.tags.get("DURATION").and_then(|d| parse_clock(d)))
        .filter(|d| d.is_finite() && *d >= 0.0);

    Ok(VideoInfo {
        path: path.to_path_buf(),
        stream_index: stream.index,
        codec,
        format: format
            .and_then(|f| f.format_name.clone())
            .unwrap_or_default(),
        width,
        height,
        rotation,
        n_frames,
        header_frames: stream.nb_frames.as_deref().and_then(|v| v.parse().ok()),
        avg_fps,
        frame_rate,
        duration,
        video_duration,
    })
}

/// Parses Matroska's `HH:MM:SS.fraction` duration tag into seconds.
fn parse_clock(text: &str) -> Option<f64> {
    let mut parts = text.trim().split(':');
    let (h, m, sec) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let hours: u64 = h.parse().ok()?;
    let minutes: u64 = m.parse().ok()?;
    let seconds: f64 = sec.parse().ok()?;
    Some((hours * 3600 + minutes * 60) as f64 + seconds)
}

/// Parses "num/den" with both parts positive (ffprobe writes "0/0" for unknown).
fn parse_rational(text: &str) -> Option<(i64, i64)> {
    let (num, den) = text.split_once('/')?;
    let num: i64 = num.trim().parse().ok()?;
    let den: i64 = den.trim().parse().ok()?;
    (num > 0 && den > 0).then_some((num, den))
}

/// decord: the angle modulo 360 into [0, 360), truncated to an integer; only exact quarter
/// turns rotate, anything else is left as decoded.
fn normalise_rotation(clockwise: f64) -> u32 {
    match clockwise.rem_euclid(360.0) as u32 {
        quarter @ (90 | 180 | 270) => quarter,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<VideoInfo, MediaError> {
        info_from_probe(Path::new("clip.mp4"), serde_json::from_str(json).unwrap())
    }

    const BABY_LIKE: &str = r#"{"streams":[
        {"index":0,"codec_name":"h264","codec_type":"video","width":960,"height":540,
         "r_frame_rate":"2997/100","avg_frame_rate":"2997/100","duration":"8.008008",
         "nb_frames":"240","nb_read_packets":"240","disposition":{"default":1,"attached_pic":0}},
        {"index":1,"codec_name":"aac","codec_type":"audio","nb_read_packets":"376"}],
        "format":{"format_name":"mov,mp4,m4a,3gp,3g2,mj2","duration":"8.024000"}}"#;

    #[test]
    fn reads_decord_quantities() {
        let info = parse(BABY_LIKE).unwrap();
        assert_eq!(info.n_frames, 240);
        assert_eq!(info.avg_fps, 29.97);
        assert_eq!(info.frame_rate, (2997, 100));
        assert_eq!((info.width, info.height, info.rotation), (960, 540, 0));
        assert_eq!(info.codec, "h264");
        assert_eq!(info.duration, Some(8.008008));
        assert_eq!(info.header_frames, Some(240));
        assert_eq!(info.stream_index, 0);
    }

    #[test]
    fn packet_count_wins_over_header_and_rate_falls_back() {
        let json = r#"{"streams":[
            {"index":0,"codec_name":"mjpeg","codec_type":"video","width":8,"height":8,
             "disposition":{"attached_pic":1},"nb_read_packets":"1","avg_frame_rate":"0/0"},
            {"index":2,"codec_name":"vp9","codec_type":"video","width":64,"height":48,
             "avg_frame_rate":"0/0","r_frame_rate":"30000/1001","nb_read_packets":"31",
             "nb_frames":"30"}],
            "format":{"format_name":"matroska,webm","duration":"1.05"}}"#;
        let info = parse(json).unwrap();
        assert_eq!(info.stream_index, 2, "cover art is skipped");
        assert_eq!(info.n_frames, 31);
        assert_eq!(info.avg_fps, 30000.0 / 1001.0);
        assert_eq!(info.duration, Some(1.05));
    }

    #[test]
    fn rotation_from_display_matrix_and_tag() {
        let rotated = |extra: &str| {
            parse(&format!(
                r#"{{"streams":[{{"index":0,"codec_name":"h264","codec_type":"video","width":64,
                   "height":48,"avg_frame_rate":"10/1","nb_read_packets":"10"{extra}}}]}}"#
            ))
            .unwrap()
        };
        let info =
            rotated(r#","side_data_list":[{"side_data_type":"Display Matrix","rotation":-90}]"#);
        assert_eq!((info.rotation, info.width, info.height), (90, 48, 64));
        let info = rotated(r#","side_data_list":[{"rotation":90}]"#);
        assert_eq!(info.rotation, 270);
        let info = rotated(r#","side_data_list":[{"rotation":180}]"#);
        assert_eq!((info.rotation, info.width), (180, 64));
        let info = rotated(r#","tags":{"rotate":"90"}"#);
        assert_eq!(info.rotation, 90);
        let info = rotated(r#","side_data_list":[{"rotation":-45}]"#);
        assert_eq!(info.rotation, 0);
        let info = rotated(r#","side_data_list":[{"rotation":-89.5}]"#);
        assert_eq!(info.rotation, 0, "89.5 truncates to 89 as in decord");
        let info = rotated(r#","side_data_list":[{"rotation":89.5}]"#);
        assert_eq!(info.rotation, 270, "-89.5 wraps to 270.5, truncated to 270");
    }

    #[test]
    fn frames_padding_to_a_1_or_3_pixel_square_are_refused() {
        let err = parse(
            r#"{"streams":[{"index":0,"codec_name":"h264","codec_type":"video","width":3,
                "height":2,"avg_frame_rate":"1/1","nb_read_packets":"3"}]}"#,
        )
        .unwrap_err();
        assert!(
            matches!(err, MediaError::DegenerateSquare { side: 3, .. }),
            "{err}"
        );
    }

    #[test]
    fn missing_pieces_are_clear_errors() {
        let err = parse(r#"{"streams":[{"index":0,"codec_name":"aac","codec_type":"audio"}]}"#)
            .unwrap_err();
        assert!(matches!(err, MediaError::Unsupported { .. }));
        assert!(
            err.to_string()
                .contains("no video stream (streams: audio (aac))"),
            "{err}"
        );
        let err = parse(r#"{"streams":[]}"#).unwrap_err();
        assert!(err.to_string().contains("no streams at all"), "{err}");
        let err = parse(
            r#"{"streams":[{"index":0,"codec_type":"video","codec_tag_string":"zzzz","width":4,
                "height":4,"avg_frame_rate":"1/1","nb_read_packets":"3"}]}"#,
        )
        .unwrap_err();
        assert!(matches!(err, MediaError::Unsupported { .. }));
        assert!(err.to_string().contains("\"zzzz\""), "{err}");
        let err = parse(
            r#"{"streams":[{"index":0,"codec_name":"h264","codec_type":"video","width":4,
                "height":4,"avg_frame_rate":"1/1","nb_read_packets":"0"}]}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("has no frames"), "{err}");
        let err = parse(
            r#"{"streams":[{"index":0,"codec_name":"h264","codec_type":"video","width":4,
                "height":4,"avg_frame_rate":"0/0","r_frame_rate":"0/0","nb_read_packets":"5"}]}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("no frame rate"), "{err}");
    }

    #[test]
    fn rationals() {
        assert_eq!(parse_rational("30000/1001"), Some((30000, 1001)));
        assert_eq!(parse_rational("0/0"), None);
        assert_eq!(parse_rational("25"), None);
        assert_eq!(parse_rational("-1/2"), None);
    }
}
