//! Streams the planned frames out of one `ffmpeg` process. Every frame is decoded in order and
//! written to a pipe as raw rgb24; the reader keeps the ones the plan names and drops the rest,
//! so memory stays at two frame buffers however long the clip, and the process is stopped as
//! soon as the last planned frame has arrived.

use std::io::{ErrorKind, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::thread::JoinHandle;

use image::RgbImage;

use super::probe::{Truncation, VideoInfo};
use super::sampling::SamplingPlan;
use super::tools::FfmpegTools;
use super::{ffmpeg_input_args, last_lines};
use crate::MediaError;
use crate::image::{MAX_PIXELS, too_many_pixels};

/// Bytes of ffmpeg's stderr kept for error messages (the tail; corrupt files can log a lot).
const STDERR_TAIL_BYTES: usize = 16 * 1024;

/// One planned frame.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledFrame {
    /// Source frame index the plan asked for.
    pub source_index: usize,
    /// Index of the decoded frame actually returned. Equal to `source_index` except when the
    /// stream ends before the frame count promised (truncated or mis-indexed files): then the
    /// last decoded frame stands in, as decord does.
    pub decoded_index: usize,
    /// The picture, RGB, at the clip's native size, turned upright per the container's rotation.
    pub image: RgbImage,
}

impl SampledFrame {
    /// True when this frame is a stand-in for a frame the stream did not deliver.
    pub fn is_repeated(&self) -> bool {
        self.decoded_index != self.source_index
    }
}

/// Iterator over the planned frames of one video, in plan order. Yields at most one error, then
/// ends. Dropping it early stops and reaps the `ffmpeg` process.
pub struct FrameReader {
    path: PathBuf,
    info: VideoInfo,
    tool: PathBuf,
    child: Option<Child>,
    stdout: Option<ChildStdout>,
    stderr: Option<JoinHandle<Vec<u8>>>,
    wanted: Vec<usize>,
    next_wanted: usize,
    /// Index the next frame read from the pipe will have.
    next_decoded: usize,
    /// Set when the pipe has ended, to the number of whole frames it delivered.
    delivered: Option<usize>,
    width: u32,
    height: u32,
    /// The last whole frame read.
    current: Vec<u8>,
    /// Scratch for the frame being read, so a partial read never clobbers `current`.
    incoming: Vec<u8>,
    finished: bool,
}

impl FrameReader {
    pub(crate) fn open(
        tools: &FfmpegTools,
        info: &VideoInfo,
        plan: &SamplingPlan,
    ) -> Result<Self, MediaError> {
        let (width, height) = (info.width, info.height);
        // The probe refuses these already; checked again for a hand-made `VideoInfo`.
        if width == 0 || height == 0 {
            return Err(MediaError::Decode {
                path: info.path.clone(),
                message: format!("video frames have zero size ({width}x{height})"),
            });
        }
        if u64::from(width) * u64::from(height) > MAX_PIXELS {
            return Err(MediaError::Unsupported {
                path: info.path.clone(),
                message: too_many_pixels("video frames", width.into(), height.into()),
            });
        }
        crate::preprocess::check_square_side(&info.path, width, height)?;
        let frame_bytes = width as usize * height as usize * 3;
        let mut command = Command::new(tools.ffmpeg());
        command
            .args([
                "-nostdin",
                "-hide_banner",
                "-loglevel",
                "error",
                "-noautorotate",
            ])
            .args(ffmpeg_input_args(&info.path))
            .arg("-map")
            .arg(format!("0:{}", info.stream_index))
            .arg("-vf")
            .arg(decord_filter(info.rotation, width, height))
            .args([tools.passthrough_flag(), "passthrough"])
            .args(["-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().map_err(|e| MediaError::ToolFailed {
            tool: tools.ffmpeg().to_path_buf(),
            path: info.path.clone(),
            message: format!("cannot run ffmpeg: {e}"),
        })?;
        let stdout = child.stdout.take();
        let stderr = child.stderr.take().map(|mut pipe| {
            std::thread::spawn(move || {
                let mut tail = Vec::new();
                let mut chunk = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    tail.extend_from_slice(&chunk[..n]);
                    if tail.len() > 2 * STDERR_TAIL_BYTES {
                        tail.drain(..tail.len() - STDERR_TAIL_BYTES);
                    }
                }
                tail
            })
        });
        Ok(Self {
            path: info.path.clone(),
            info: info.clone(),
            tool: tools.ffmpeg().to_path_buf(),
            child: Some(child),
            stdout,
            stderr,
            wanted: plan.indices().to_vec(),
            next_wanted: 0,
            next_decoded: 0,
            delivered: None,
            width,
            height,
            current: vec![0; frame_bytes],
            incoming: vec![0; frame_bytes],
            finished: false,
        })
    }

    /// The video file being read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whole frames read from ffmpeg so far (the frames decoded, wanted or not).
    pub fn frames_read(&self) -> usize {
        self.next_decoded
    }

    /// True once ffmpeg's output has ended by itself (before or at the last planned frame).
    pub fn stream_ended(&self) -> bool {
        self.delivered.is_some()
    }

    /// Whether the file is truncated ([`Truncation`]), from what the probe saw and what this
    /// reader has decoded so far: fewer packets than the header promises (known from the
    /// start), or, once the stream has ended ([`FrameReader::stream_ended`]), fewer decoded
    /// frames than packets. The reader stops ffmpeg after the last planned frame, so frames
    /// missing after it are seen only through the probe. Call it after the iterator is done.
    pub fn truncation(&self) -> Option<Truncation> {
        self.info
            .truncation_with(self.delivered.unwrap_or(self.info.n_frames))
    }

    /// Bytes held for decoding (two frames), independent of the clip's length.
    pub fn buffer_bytes(&self) -> usize {
        self.current.capacity() + self.incoming.capacity()
    }

    /// Reads whole frames until `target` is in `current` or the pipe ends.
    fn advance_to(&mut self, target: usize) -> Result<(), MediaError> {
        while self.delivered.is_none() && self.next_decoded <= target {
            let Some(stdout) = self.stdout.as_mut() else {
                self.delivered = Some(self.next_decoded);
                break;
            };
            match read_whole(stdout, &mut self.incoming) {
                Ok(true) => {
                    std::mem::swap(&mut self.current, &mut self.incoming);
                    self.next_decoded += 1;
                }
                Ok(false) => {
                    self.delivered = Some(self.next_decoded);
                    self.reap_after_eof()?;
                }
                Err(e) => {
                    self.stop();
                    return Err(MediaError::ToolFailed {
                        tool: self.tool.clone(),
                        path: self.path.clone(),
                        message: format!("reading decoded frames from ffmpeg failed: {e}"),
                    });
                }
            }
        }
        Ok(())
    }

    /// After the pipe ended by itself: waits for ffmpeg and turns a failure exit into an error.
    fn reap_after_eof(&mut self) -> Result<(), MediaError> {
        self.stdout = None;
        let status = self.child.take().map(|mut child| child.wait());
        let stderr = self.take_stderr();
        match status {
            Some(Ok(status)) if !status.success() => Err(classify_failure(&self.path, &stderr)),
            Some(Err(e)) => Err(MediaError::ToolFailed {
                tool: self.tool.clone(),
                path: self.path.clone(),
                message: format!("waiting for ffmpeg failed: {e}"),
            }),
            _ => Ok(()),
        }
    }

    /// Stops ffmpeg (kill, then wait so no zombie is left) and joins the stderr reader.
    fn stop(&mut self) {
        self.stdout = None;
        if let Some(mut child) = self.child.take() {
            // Fails only if it already exited; wait() reaps it either way.
            let _ = child.kill();
            let _ = child.wait();
        }
        self.take_stderr();
    }

    fn take_stderr(&mut self) -> String {
        self.stderr
            .take()
            .and_then(|handle| handle.join().ok())
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    fn frame_image(&self) -> Result<RgbImage, MediaError> {
        RgbImage::from_raw(self.width, self.height, self.current.clone()).ok_or_else(|| {
            MediaError::Decode {
                path: self.path.clone(),
                message: "decoded frame has the wrong size".into(),
            }
        })
    }

    fn next_frame(&mut self, target: usize) -> Result<SampledFrame, MediaError> {
        self.advance_to(target)?;
        if self.next_decoded == 0 {
            return Err(MediaError::Decode {
                path: self.path.clone(),
                message: "ffmpeg decoded no frames from the video stream".into(),
            });
        }
        let frame = SampledFrame {
            source_index: target,
            decoded_index: self.next_decoded - 1,
            image: self.frame_image()?,
        };
        Ok(frame)
    }
}

impl Iterator for FrameReader {
    type Item = Result<SampledFrame, MediaError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.finished {
            return None;
        }
        let Some(&target) = self.wanted.get(self.next_wanted) else {
            self.finished = true;
            self.stop();
            return None;
        };
        self.next_wanted += 1;
        let result = self.next_frame(target);
        if result.is_err() || self.next_wanted == self.wanted.len() {
            self.finished = true;
            self.stop();
        }
        Some(result)
    }
}

impl Drop for FrameReader {
    fn drop(&mut self) {
        self.stop();
    }
}

/// decord 0.6.0's filter graph: undo the container's rotation with `transpose` on the decoded
/// pictures, then `scale` to the (rotated) stream size, which also converts to rgb24. The scale
/// is a no-op on size unless the stream changes resolution mid-way, where it holds the output
/// at the probed size as decord does.
///
/// `flags=bilinear`: decord builds its graph with libavfilter's API and sets no `sws_flags`, so
/// its scale runs with the filter's default, bilinear (FFmpeg 4.1, bundled in the decord 0.6.0
/// wheel); the `ffmpeg` command line would otherwise pass `flags=bicubic`. The flags decide the
/// chroma upsampling wherever libswscale cannot take its 8-bit yuv420p/yuv422p → rgb fast path:
/// 10-bit input and 4:2:0 frames of odd height differed from decord by up to 176 levels with
/// bicubic, and are bit-identical with bilinear.
fn decord_filter(clockwise_rotation: u32, width: u32, height: u32) -> String {
    let transpose = match clockwise_rotation {
        90 => "transpose=1,",
        180 => "transpose=1,transpose=1,",
        270 => "transpose=2,",
        _ => "",
    };
    format!("{transpose}scale={width}:{height}:flags=bilinear")
}

/// Fills `buf` with one whole frame. `Ok(false)` at the end of the stream, including a final
/// partial frame (which is discarded).
fn read_whole(source: &mut impl Read, buf: &mut [u8]) -> std::io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        match source.read(&mut buf[filled..]) {
            Ok(0) => return Ok(false),
            Ok(n) => filled += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

fn classify_failure(path: &Path, stderr: &str) -> MediaError {
    let message = format!(
        "ffmpeg could not decode it: {}",
        last_lines(stderr, path, 3)
    );
    let missing_decoder = stderr.contains("Decoder (codec") && stderr.contains("not found")
        || stderr.contains("Unknown decoder")
        || stderr.contains("Decoding requested, but no decoder found");
    if missing_decoder {
        MediaError::Unsupported {
            path: path.to_path_buf(),
            message,
        }
    } else {
        MediaError::Decode {
            path: path.to_path_buf(),
            message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_decoder_is_unsupported_other_failures_are_decode_errors() {
        let path = Path::new("clip.mkv");
        let err = classify_failure(
            path,
            "Decoder (codec none) not found for input stream #0:0\n",
        );
        assert!(matches!(err, MediaError::Unsupported { .. }), "{err}");
        assert!(err.to_string().contains("clip.mkv"));
        let err = classify_failure(path, "moov atom not found\nInvalid data found\n\n");
        assert!(matches!(err, MediaError::Decode { .. }), "{err}");
        assert!(
            err.to_string()
                .ends_with("moov atom not found | Invalid data found"),
            "{err}"
        );
        let err = classify_failure(path, "");
        assert!(err.to_string().ends_with("no diagnostic output"), "{err}");
    }

    #[test]
    fn partial_final_frame_counts_as_end_of_stream() {
        let mut buf = [0u8; 4];
        let mut source: &[u8] = &[1, 2, 3, 4, 5, 6];
        assert!(read_whole(&mut source, &mut buf).unwrap());
        assert_eq!(buf, [1, 2, 3, 4]);
        assert!(!read_whole(&mut source, &mut buf).unwrap());
        assert!(!read_whole(&mut source, &mut buf).unwrap());
    }
}
