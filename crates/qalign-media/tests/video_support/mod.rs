//! Helpers shared by the video integration tests: the fixture folder and small clips generated
//! with FFmpeg's test sources at test time (nothing binary is checked in besides the fixtures).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use qalign_media::FfmpegTools;

pub fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures"))
}

pub fn tools() -> &'static FfmpegTools {
    FfmpegTools::shared().expect("these tests need ffmpeg and ffprobe (apt-get install ffmpeg)")
}

/// The shared tools, or `None` (with a note on stderr) when ffmpeg/ffprobe are not installed,
/// for tests that skip themselves then.
pub fn tools_or_skip(test: &str) -> Option<&'static FfmpegTools> {
    match FfmpegTools::shared() {
        Ok(tools) => Some(tools),
        Err(e) => {
            eprintln!("skipping {test}: {e}");
            None
        }
    }
}

/// Runs `ffmpeg -y -loglevel error <args>` and panics with its stderr on failure.
pub fn ffmpeg(args: &[&str]) -> Vec<u8> {
    let out = Command::new(tools().ffmpeg())
        .args(["-nostdin", "-y", "-hide_banner", "-loglevel", "error"])
        .args(args)
        .output()
        .expect("run ffmpeg");
    assert!(
        out.status.success(),
        "ffmpeg {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Encodes `testsrc` (moving pattern, every frame different) as H.264 with B-frames.
pub fn testsrc_clip(dir: &Path, name: &str, size: &str, rate: u32, seconds: f64) -> PathBuf {
    let path = dir.join(name);
    let source = format!("testsrc=size={size}:rate={rate}");
    let duration = seconds.to_string();
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        &source,
        "-t",
        &duration,
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-bf",
        "2",
        "-pix_fmt",
        "yuv420p",
        path.to_str().unwrap(),
    ]);
    path
}

/// Frame `n` (decode order = presentation order after the decoder) picked by FFmpeg's own
/// `select` filter: an independent reference for which picture has which index.
pub fn reference_frame(path: &Path, n: usize, autorotate: bool) -> Vec<u8> {
    let select = format!("select=eq(n\\,{n})");
    let mut args = vec![];
    if !autorotate {
        args.push("-noautorotate");
    }
    args.extend([
        "-i",
        path.to_str().unwrap(),
        "-vf",
        &select,
        "-frames:v",
        "1",
    ]);
    args.extend(["-f", "rawvideo", "-pix_fmt", "rgb24", "-"]);
    ffmpeg(&args)
}
