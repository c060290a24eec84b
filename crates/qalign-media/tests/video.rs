//! Video decoding against the official fixtures (baby.mp4 and decord's frames) and generated clips.

mod video_support;

use std::path::Path;

use qalign_media::video::{self, Truncation, VideoWarning};
use qalign_media::{MediaError, MediaKind, SamplingOptions, SamplingPlan};
use video_support::{ffmpeg, fixtures, reference_frame, testsrc_clip, tools, tools_or_skip};

#[test]
fn baby_mp4_probe_matches_decord() {
    let info = tools().probe(&fixtures().join("video/baby.mp4")).unwrap();
    assert_eq!(info.n_frames, 240);
    assert_eq!(info.header_frames, Some(240));
    assert_eq!(info.frame_rate, (2997, 100));
    assert_eq!(info.avg_fps, 2997.0 / 100.0);
    assert_eq!((info.width, info.height, info.rotation), (960, 540, 0));
    assert_eq!(info.codec, "h264");
    assert!(info.format.contains("mp4"), "{}", info.format);
    let duration = info.duration.unwrap();
    assert!((duration - 8.008008).abs() < 1e-6, "{duration}");
}

#[test]
fn baby_mp4_frames_are_bit_identical_to_decord() {
    let dir = fixtures().join("video");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("frames.json")).unwrap()).unwrap();
    let expected_indices: Vec<usize> = meta["frame_indices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let files: Vec<&str> = meta["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();

    let sampled = tools()
        .sample(&dir.join("baby.mp4"), &SamplingOptions::OFFICIAL)
        .unwrap();
    assert_eq!(sampled.plan.indices(), &expected_indices[..]);
    assert_eq!(expected_indices, [0, 29, 59, 89, 119, 149, 179, 209]);
    assert!(sampled.warnings().is_empty());
    assert_eq!(sampled.frames.len(), files.len());
    for (frame, file) in sampled.frames.iter().zip(&files) {
        let expected = image::open(dir.join("frames").join(file))
            .unwrap()
            .to_rgb8();
        assert_eq!(frame.source_index, frame.decoded_index);
        assert_eq!(frame.image.dimensions(), (960, 540), "{file}");
        assert!(
            frame.image == expected,
            "frame {} differs from {file}",
            frame.source_index
        );
    }
}

#[test]
fn free_functions_use_the_shared_tools() {
    let path = fixtures().join("video/baby.mp4");
    assert!(video::is_video(&path));
    let info = video::probe(&path).unwrap();
    let plan = video::plan_for(&info, &SamplingOptions::new(0.5, Some(2)).unwrap()).unwrap();
    // step 59.94, K = ⌊240 / 59.94⌋ = 4 → candidates 0, 59, 119, 179; N = 2 → positions 1, 3.
    assert_eq!(plan.indices(), &[59, 179]);
    let frames: Vec<_> = video::open_frames(&info, &plan)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let expected = image::open(fixtures().join("video/frames/frame_06_src0179.png"))
        .unwrap()
        .to_rgb8();
    assert_eq!(frames[1].source_index, 179);
    assert!(frames[1].image == expected);
}

#[test]
fn short_clip_gives_first_frame_and_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let clip = testsrc_clip(dir.path(), "short.mp4", "64x48", 10, 0.5);
    let sampled = tools().sample(&clip, &SamplingOptions::OFFICIAL).unwrap();
    assert_eq!(sampled.info.n_frames, 5);
    assert_eq!(sampled.plan.indices(), &[0]);
    assert_eq!(
        sampled.warnings(),
        [VideoWarning::ShorterThanSamplingPeriod {
            n_frames: 5,
            avg_fps: 10.0
        }]
    );
    assert_eq!(
        sampled.frames[0].image.as_raw(),
        &reference_frame(&clip, 0, false)
    );
}

#[test]
fn long_clip_with_max_frames_picks_bin_centres() {
    let dir = tempfile::tempdir().unwrap();
    let clip = testsrc_clip(dir.path(), "long.mp4", "64x48", 25, 40.0);
    let options = SamplingOptions::new(1.0, Some(5)).unwrap();
    let sampled = tools().sample(&clip, &options).unwrap();
    assert_eq!(sampled.info.n_frames, 1000);
    // K = 40 candidates 0, 25, …, 975; positions ⌊(2j+1)·40/10⌋ = 4, 12, 20, 28, 36.
    assert_eq!(sampled.plan.indices(), &[100, 300, 500, 700, 900]);
    assert_eq!(
        sampled.warnings(),
        [VideoWarning::Capped {
            kept: 5,
            available: 40
        }]
    );
    for frame in &sampled.frames {
        let reference = reference_frame(&clip, frame.source_index, false);
        assert!(
            frame.image.as_raw() == &reference,
            "frame {} is not FFmpeg's frame with that index",
            frame.source_index
        );
    }
}

#[test]
fn webm_without_header_count_uses_packets() {
    let dir = tempfile::tempdir().unwrap();
    let clip = dir.path().join("clip.webm");
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc=size=64x48:rate=12",
        "-t",
        "3",
        "-c:v",
        "libvpx",
        "-b:v",
        "200k",
        clip.to_str().unwrap(),
    ]);
    assert_eq!(
        qalign_media::sniff_kind(&clip).unwrap(),
        Some(MediaKind::Video)
    );
    let info = tools().probe(&clip).unwrap();
    assert_eq!(info.header_frames, None);
    assert_eq!(info.n_frames, 36);
    assert_eq!(info.avg_fps, 12.0);
    assert_eq!(info.codec, "vp8");
    let sampled = tools().sample(&clip, &SamplingOptions::OFFICIAL).unwrap();
    assert_eq!(sampled.plan.indices(), &[0, 12, 24]);
    for frame in &sampled.frames {
        assert!(frame.image.as_raw() == &reference_frame(&clip, frame.source_index, false));
    }
}

/// Writes a 90° clockwise display matrix into the (version 0) `tkhd` box of an MP4.
fn mark_rotated_90(mp4: &[u8]) -> Vec<u8> {
    let mut bytes = mp4.to_vec();
    let tkhd = bytes.windows(4).position(|w| w == b"tkhd").unwrap();
    assert_eq!(bytes[tkhd + 4], 0, "test expects a version-0 tkhd");
    let matrix_at = tkhd + 4 + 4 + 20 + 16;
    let matrix: [i32; 9] = [0, 0x10000, 0, -0x10000, 0, 0, 0, 0, 0x4000_0000];
    for (k, value) in matrix.iter().enumerate() {
        bytes[matrix_at + 4 * k..matrix_at + 4 * k + 4].copy_from_slice(&value.to_be_bytes());
    }
    bytes
}

#[test]
fn rotated_clip_is_delivered_upright_like_ffmpeg_autorotate() {
    let dir = tempfile::tempdir().unwrap();
    let clip = testsrc_clip(dir.path(), "plain.mp4", "64x48", 10, 1.0);
    let rotated = dir.path().join("rotated.mp4");
    std::fs::write(&rotated, mark_rotated_90(&std::fs::read(&clip).unwrap())).unwrap();

    let info = tools().probe(&rotated).unwrap();
    assert_eq!((info.rotation, info.width, info.height), (90, 48, 64));
    let plan = SamplingPlan::new(
        info.n_frames,
        info.avg_fps,
        &SamplingOptions::new(3.0, None).unwrap(),
    )
    .unwrap();
    let frames: Vec<_> = tools()
        .open_frames(&info, &plan)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(plan.indices(), &[0, 3, 6]);
    for frame in &frames {
        assert_eq!(frame.image.dimensions(), (48, 64));
        let upright = reference_frame(&rotated, frame.source_index, true);
        assert!(
            frame.image.as_raw() == &upright,
            "frame {}",
            frame.source_index
        );
    }
}

fn assert_error(
    result: Result<impl std::fmt::Debug, MediaError>,
    path: &Path,
    wanted: &str,
) -> MediaError {
    let err = result.expect_err("bad input must be an error");
    let msg = err.to_string();
    assert!(
        msg.contains(path.to_str().unwrap()),
        "error does not name the file: {msg}"
    );
    assert!(msg.contains(wanted), "expected {wanted:?} in: {msg}");
    err
}

#[test]
fn bad_inputs_are_per_file_errors_and_the_batch_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let good = testsrc_clip(dir.path(), "good.mp4", "64x48", 10, 2.0);
    let good_bytes = std::fs::read(&good).unwrap();

    let empty = dir.path().join("empty.mp4");
    std::fs::write(&empty, b"").unwrap();
    let garbage = dir.path().join("garbage.mp4");
    std::fs::write(
        &garbage,
        (0..5000u32)
            .map(|i| (i * 7919 % 251) as u8)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let truncated = dir.path().join("truncated.mp4");
    std::fs::write(&truncated, &good_bytes[..good_bytes.len() / 2]).unwrap();
    let audio = dir.path().join("audio.m4a");
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=440:duration=1",
        audio.to_str().unwrap(),
    ]);
    let unknown_codec = dir.path().join("unknown_codec.mp4");
    let patched: Vec<u8> = {
        let mut b = good_bytes.clone();
        let stsd_entry = b.windows(4).rposition(|w| w == b"avc1").unwrap();
        b[stsd_entry..stsd_entry + 4].copy_from_slice(b"zzzz");
        b
    };
    std::fs::write(&unknown_codec, patched).unwrap();
    let missing = dir.path().join("missing.mp4");

    let err = assert_error(tools().probe(&empty), &empty, "empty file");
    assert!(matches!(err, MediaError::Decode { .. }));
    let err = assert_error(
        tools().probe(&garbage),
        &garbage,
        "not a readable media file",
    );
    assert!(matches!(err, MediaError::Decode { .. }));
    let err = assert_error(tools().probe(&truncated), &truncated, "moov atom not found");
    assert!(matches!(err, MediaError::Decode { .. }));
    let err = assert_error(
        tools().probe(&audio),
        &audio,
        "no video stream (streams: audio (aac))",
    );
    assert!(matches!(err, MediaError::Unsupported { .. }));
    let err = assert_error(tools().probe(&unknown_codec), &unknown_codec, "\"zzzz\"");
    assert!(matches!(err, MediaError::Unsupported { .. }));
    let err = assert_error(tools().probe(&missing), &missing, "cannot read");
    assert!(matches!(err, MediaError::Io { .. }));
    let err = assert_error(tools().probe(dir.path()), dir.path(), "is a directory");
    assert!(matches!(err, MediaError::Unsupported { .. }));

    // A batch: every file gets its own result, the good one still decodes.
    let batch = [
        &empty,
        &garbage,
        &good,
        &truncated,
        &audio,
        &unknown_codec,
        &missing,
    ];
    let results: Vec<_> = batch
        .iter()
        .map(|p| tools().sample(p, &SamplingOptions::OFFICIAL))
        .collect();
    let ok: Vec<usize> = results
        .iter()
        .enumerate()
        .filter(|(_, r)| r.is_ok())
        .map(|(i, _)| i)
        .collect();
    assert_eq!(ok, [2]);
    assert_eq!(results[2].as_ref().unwrap().frames.len(), 2);
}

#[test]
fn decoder_failure_after_probe_is_a_per_file_error() {
    // The file changes between probing and decoding, so ffmpeg itself fails: the reader turns
    // its exit status and stderr into one error for this file.
    let dir = tempfile::tempdir().unwrap();
    let good = testsrc_clip(dir.path(), "good.mp4", "64x48", 10, 2.0);
    let info = tools().probe(&good).unwrap();
    std::fs::write(&good, b"replaced after probing").unwrap();
    let plan = SamplingPlan::new(info.n_frames, info.avg_fps, &SamplingOptions::OFFICIAL).unwrap();
    let results: Vec<_> = tools().open_frames(&info, &plan).unwrap().collect();
    assert_eq!(results.len(), 1, "the reader stops after its first error");
    let err = assert_error(
        results.into_iter().next().unwrap(),
        &good,
        "ffmpeg could not decode it",
    );
    assert!(matches!(err, MediaError::Decode { .. }));
}

#[test]
fn stream_shorter_than_its_packet_count_repeats_the_last_frame() {
    // A plan made for more frames than the file holds (as when the packet count overstates the
    // decodable frames): the missing frames are stand-ins, flagged, as decord does.
    let dir = tempfile::tempdir().unwrap();
    let clip = testsrc_clip(dir.path(), "clip.mp4", "64x48", 10, 1.0);
    let mut info = tools().probe(&clip).unwrap();
    assert_eq!(info.n_frames, 10);
    info.n_frames = 30;
    let plan = SamplingPlan::new(info.n_frames, info.avg_fps, &SamplingOptions::OFFICIAL).unwrap();
    assert_eq!(plan.indices(), &[0, 10, 20]);
    let frames: Vec<_> = tools()
        .open_frames(&info, &plan)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(frames.len(), 3);
    assert!(!frames[0].is_repeated());
    assert_eq!((frames[1].source_index, frames[1].decoded_index), (10, 9));
    assert_eq!((frames[2].source_index, frames[2].decoded_index), (20, 9));
    assert!(frames[1].image.as_raw() == &reference_frame(&clip, 9, false));
    let sampled = video::SampledVideo { info, plan, frames };
    let truncation = Truncation {
        expected_frames: 30,
        decoded_frames: 10,
        expected_duration: Some(1.0),
        decoded_duration: 1.0,
    };
    assert_eq!(sampled.truncation(), Some(truncation.clone()));
    assert_eq!(
        sampled.warnings(),
        [
            VideoWarning::Truncated(truncation),
            VideoWarning::RepeatedFrames {
                repeated: 2,
                delivered: 10,
                expected: 30
            }
        ]
    );
}

#[test]
fn odd_file_names_are_not_options_or_protocols() {
    let dir = tempfile::tempdir().unwrap();
    let clip = testsrc_clip(dir.path(), "plain.mp4", "64x48", 10, 1.0);
    for name in ["-x.mp4", "http:y.mp4", "a b;c'd.mp4"] {
        let odd = dir.path().join(name);
        std::fs::copy(&clip, &odd).unwrap();
        let info = tools().probe(&odd).unwrap();
        assert_eq!(info.n_frames, 10, "{name}");
        let sampled = tools().sample(&odd, &SamplingOptions::OFFICIAL).unwrap();
        assert_eq!(sampled.frames.len(), 1, "{name}");
    }
}

/// An 8 s, 30 fps clip (240 frames) written with `-movflags +faststart`: the header (`moov`)
/// comes first, so a cut copy still opens and promises all 240 frames.
fn faststart_clip(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("faststart.mp4");
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc=size=64x48:rate=30",
        "-t",
        "8",
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-bf",
        "2",
        "-pix_fmt",
        "yuv420p",
        "-movflags",
        "+faststart",
        path.to_str().unwrap(),
    ]);
    path
}

#[test]
fn faststart_mp4_cut_in_half_reports_its_truncation() {
    let Some(tools) = tools_or_skip("faststart_mp4_cut_in_half_reports_its_truncation") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let whole = faststart_clip(dir.path());
    let bytes = std::fs::read(&whole).unwrap();
    assert_eq!(&bytes[4..8], b"ftyp");
    assert!(
        bytes.windows(4).position(|w| w == b"moov") < bytes.windows(4).position(|w| w == b"mdat"),
        "moov must come before mdat"
    );
    let cut = dir.path().join("cut.mp4");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();

    // The complete file: nothing to report.
    let info = tools.probe(&whole).unwrap();
    assert_eq!((info.header_frames, info.n_frames), (Some(240), 240));
    assert_eq!(info.truncation(), None);
    let sampled = tools.sample(&whole, &SamplingOptions::OFFICIAL).unwrap();
    assert_eq!(sampled.truncation(), None);
    assert!(sampled.warnings().is_empty());

    // The cut file still probes (the header is intact) but holds about half the packets.
    let info = tools.probe(&cut).unwrap();
    assert_eq!(info.header_frames, Some(240));
    assert!(
        (90..150).contains(&info.n_frames),
        "{} packets",
        info.n_frames
    );
    let truncation = info.truncation().expect("a cut file is truncated");
    assert_eq!(truncation.expected_frames, 240);
    assert_eq!(truncation.decoded_frames, info.n_frames);
    assert_eq!(truncation.expected_duration, Some(8.0));
    assert_eq!(truncation.decoded_duration, info.n_frames as f64 / 30.0);

    // The reader reports it once its frames are read, and so does the one-call sampler.
    let plan = video::plan_for(&info, &SamplingOptions::OFFICIAL).unwrap();
    assert_eq!(plan.indices().len(), info.n_frames / 30);
    let mut reader = tools.open_frames(&info, &plan).unwrap();
    let frames: Vec<_> = reader.by_ref().collect::<Result<_, _>>().unwrap();
    assert_eq!(frames.len(), plan.indices().len());
    assert_eq!(reader.truncation().map(|t| t.expected_frames), Some(240));
    let sampled = tools.sample(&cut, &SamplingOptions::OFFICIAL).unwrap();
    assert_eq!(sampled.truncation(), Some(truncation.clone()));
    let warnings = sampled.warnings();
    assert_eq!(warnings, [VideoWarning::Truncated(truncation.clone())]);
    assert_eq!(
        warnings[0].to_string(),
        format!(
            "file is truncated: the header promises 240 frames (8.000 s), only {} ({:.3} s) can \
             be read; sampled from those",
            info.n_frames, truncation.decoded_duration
        )
    );

    // Decoding the whole cut stream: ffmpeg delivers no more frames than there are packets.
    let every_frame = SamplingOptions::new(30.0, None).unwrap();
    let plan = video::plan_for(&info, &every_frame).unwrap();
    let mut reader = tools.open_frames(&info, &plan).unwrap();
    let delivered = reader.by_ref().filter(|f| f.is_ok()).count();
    assert_eq!(delivered, info.n_frames);
    let seen = reader.truncation().unwrap();
    assert_eq!(seen.expected_frames, 240);
    assert!(seen.decoded_frames <= info.n_frames);
}

#[test]
fn webm_cut_in_half_is_truncated_by_its_stated_duration() {
    let Some(tools) = tools_or_skip("webm_cut_in_half_is_truncated_by_its_stated_duration") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let clip = dir.path().join("clip.webm");
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc=size=64x48:rate=12",
        "-t",
        "4",
        "-c:v",
        "libvpx",
        "-b:v",
        "200k",
        clip.to_str().unwrap(),
    ]);
    let info = tools.probe(&clip).unwrap();
    assert_eq!((info.header_frames, info.n_frames), (None, 48));
    assert_eq!(info.truncation(), None, "{:?}", info.video_duration);
    let bytes = std::fs::read(&clip).unwrap();
    let cut = dir.path().join("cut.webm");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let info = tools.probe(&cut).unwrap();
    let truncation = info.truncation().expect("a cut WebM is truncated");
    assert_eq!(truncation.expected_frames, 48);
    assert_eq!(truncation.decoded_frames, info.n_frames);
    assert!(info.n_frames < 40, "{}", info.n_frames);
    let stated = truncation.expected_duration.unwrap();
    assert!((stated - 4.0).abs() < 0.05, "{stated}");
}

#[test]
fn decoder_errors_are_cleaned_of_ffmpeg_noise() {
    let Some(tools) = tools_or_skip("decoder_errors_are_cleaned_of_ffmpeg_noise") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.mp4");
    std::fs::write(&garbage, [0x5Au8; 4000]).unwrap();
    let err = tools.probe(&garbage).unwrap_err();
    let text = err.to_string();
    // ffprobe says "file:<path>: Invalid data found ..."; the error names the file once.
    assert_eq!(text.matches(garbage.to_str().unwrap()).count(), 1, "{text}");
    assert!(!text.contains("Last message repeated"), "{text}");
    assert!(!text.contains(" @ 0x"), "{text}");
    assert_eq!(
        text,
        format!(
            "cannot decode {}: not a readable media file (ffprobe: [mov,mp4,m4a,3gp,3g2,mj2] \
             moov atom not found | Invalid data found when processing input)",
            garbage.display()
        )
    );
}

/// A playlist or file list named like a video must not make FFmpeg open the files it names: an
/// uploaded `clip.mp4` could otherwise read any media file on a server's disk.
#[test]
fn playlists_and_file_lists_are_refused_not_followed() {
    let dir = tempfile::tempdir().unwrap();
    let secret = testsrc_clip(dir.path(), "secret.ts", "64x48", 5, 2.0);
    let secret = secret.to_str().unwrap();
    let lists = [
        (
            "hls",
            format!(
                "#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXT-X-MEDIA-SEQUENCE:0\n#EXTINF:2.0,\n{secret}\n#EXT-X-ENDLIST\n"
            ),
        ),
        ("concat", format!("ffconcat version 1.0\nfile '{secret}'\n")),
    ];
    for (demuxer, text) in lists {
        let upload = dir.path().join(format!("{demuxer}.mp4"));
        std::fs::write(&upload, text).unwrap();
        let err = tools().probe(&upload).unwrap_err();
        assert!(matches!(err, MediaError::Unsupported { .. }), "{err}");
        let message = err.to_string();
        assert!(
            message.contains(&format!("a {demuxer} file"))
                && message.contains("playlists and file lists are refused"),
            "{message}"
        );
        assert!(!message.contains(secret), "{message}");
        assert!(tools().sample(&upload, &SamplingOptions::OFFICIAL).is_err());
    }
    // The whitelist keeps the containers qalign reads.
    for (name, codec) in [
        ("c.mkv", "libx264"),
        ("c.avi", "mjpeg"),
        ("c.mpg", "mpeg2video"),
    ] {
        let clip = dir.path().join(name);
        ffmpeg(&[
            "-f",
            "lavfi",
            "-i",
            "testsrc=size=64x48:rate=5",
            "-t",
            "1",
            "-c:v",
            codec,
            clip.to_str().unwrap(),
        ]);
        let sampled = tools().sample(&clip, &SamplingOptions::OFFICIAL).unwrap();
        assert_eq!(sampled.frames.len(), 1, "{name}");
    }
}

/// Encodes 2 s of `testsrc2` losslessly (FFV1 in Matroska) in `pix_fmt`, so the decoded pictures
/// are exactly what FFmpeg's test source drew, whatever decoder reads them.
fn lossless_testsrc2(dir: &Path, name: &str, source: &str, pix_fmt: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        source,
        "-c:v",
        "ffv1",
        "-pix_fmt",
        pix_fmt,
        path.to_str().unwrap(),
    ]);
    path
}

fn sha256_hex(frames: &[qalign_media::video::SampledFrame]) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for frame in frames {
        hasher.update(frame.image.as_raw());
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// decord 0.6.0 converts with libswscale's bilinear flags (its FFmpeg 4.1 scale filter default),
/// where the `ffmpeg` command line uses bicubic. That decides the chroma upsampling of 10-bit
/// frames and of 4:2:0 frames of odd height (no 8-bit fast path): with bicubic these clips
/// differed from decord by up to 173 levels. Expected values: `VideoReader(p).get_batch(indices)`
/// with decord 0.6.0 on the same files (generated by FFmpeg 5.1).
#[test]
fn ten_bit_and_odd_height_frames_match_decord() {
    let Some(tools) = tools_or_skip("ten_bit_and_odd_height_frames_match_decord") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // (file, lavfi source, pix_fmt, size, sha256 of decord's frames, [(x, y, rgb of last frame)])
    type Case<'a> = (
        &'a str,
        &'a str,
        &'a str,
        (u32, u32),
        &'a str,
        [(u32, u32, [u8; 3]); 3],
    );
    let cases: [Case; 2] = [
        (
            "p10.mkv",
            "testsrc2=s=96x64:r=5:d=2",
            "yuv420p10le",
            (96, 64),
            "b910360dd96fd87664ad522f684efc646d9e54ddfd908d3154be7d1d650bcec8",
            // (82, 63) is [0, 255, 255] with bicubic.
            [
                (0, 0, [252, 0, 0]),
                (48, 32, [0, 0, 62]),
                (82, 63, [173, 172, 221]),
            ],
        ),
        (
            "odd.mkv",
            "testsrc2=s=65x49:r=5:d=2,format=rgb24",
            "yuv420p",
            (65, 49),
            "039c38ab8872f66c1094e911455c7a910bf76c1c9a8be44ada9b9d1f07d91d0d",
            // (35, 8) is [254, 128, 6] with bicubic.
            [
                (0, 0, [254, 0, 0]),
                (32, 24, [56, 56, 56]),
                (35, 8, [210, 134, 84]),
            ],
        ),
    ];
    for (name, source, pix_fmt, size, sha, pixels) in cases {
        let clip = lossless_testsrc2(dir.path(), name, source, pix_fmt);
        let sampled = tools.sample(&clip, &SamplingOptions::OFFICIAL).unwrap();
        assert_eq!((sampled.info.n_frames, sampled.info.avg_fps), (10, 5.0));
        assert_eq!(sampled.plan.indices(), &[0, 5], "{name}");
        let last = &sampled.frames[1].image;
        assert_eq!(last.dimensions(), size, "{name}");
        for (x, y, rgb) in pixels {
            assert_eq!(last.get_pixel(x, y).0, rgb, "{name} at ({x}, {y})");
        }
        assert_eq!(sha256_hex(&sampled.frames), sha, "{name}");
    }
}

/// The official rule on a clip slower than 1 fps repeats frames: decord 0.6.0 reports 5 frames
/// at 0.5 fps, so K = int(5 / 0.5) = 10 and the indices are int(0.5·i).
#[test]
fn clip_slower_than_1_fps_repeats_frames_like_decord() {
    let Some(tools) = tools_or_skip("clip_slower_than_1_fps_repeats_frames_like_decord") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let clip = lossless_testsrc2(
        dir.path(),
        "half.mkv",
        "testsrc2=s=64x48:r=1/2:d=10",
        "yuv420p",
    );
    let sampled = tools.sample(&clip, &SamplingOptions::OFFICIAL).unwrap();
    assert_eq!((sampled.info.n_frames, sampled.info.avg_fps), (5, 0.5));
    assert_eq!(sampled.plan.indices(), &[0, 0, 1, 1, 2, 2, 3, 3, 4, 4]);
    assert!(sampled.warnings().is_empty(), "{:?}", sampled.warnings());
    for pair in sampled.frames.chunks(2) {
        assert_eq!(pair[0].decoded_index, pair[1].decoded_index);
        assert!(!pair[1].is_repeated());
        assert!(pair[0].image == pair[1].image);
    }
    assert_eq!(
        sampled.frames[9].image.get_pixel(32, 24).0,
        [0, 0, 62],
        "decord's frame 4 at (32, 24)"
    );
    assert_eq!(
        sha256_hex(&sampled.frames),
        "ecd94287473e632dbd3d39dbc1cdf5c3aac03bfb5ab0908ca518cd597b3095b8"
    );
}
