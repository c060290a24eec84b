//! The video pixel cap: a 16000x16000 MJPEG clip (256 M pixels, 768 MB per RGB frame) is
//! refused from the size ffprobe reports, before any frame buffer is allocated. One test in its
//! own binary, because it counts this process's heap with a global allocator.

mod video_support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use qalign_media::{MediaError, SamplingOptions, SamplingPlan};
use video_support::{ffmpeg, testsrc_clip, tools_or_skip};

struct PeakCounting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn record_growth(bytes: usize) {
    let live = LIVE.fetch_add(bytes, Ordering::SeqCst) + bytes;
    PEAK.fetch_max(live, Ordering::SeqCst);
}

unsafe impl GlobalAlloc for PeakCounting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record_growth(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() {
            record_growth(new_size - layout.size());
        } else {
            LIVE.fetch_sub(layout.size() - new_size, Ordering::SeqCst);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: PeakCounting = PeakCounting;

/// Heap growth allowed while refusing: far below one 16000² RGB frame (768 MB).
const ALLOWED_GROWTH: usize = 16 * 1024 * 1024;

fn peak_growth_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = LIVE.load(Ordering::SeqCst);
    PEAK.store(before, Ordering::SeqCst);
    let out = f();
    (out, PEAK.load(Ordering::SeqCst) - before)
}

/// A valid baseline grayscale JPEG of `side`x`side`, flat mid-gray, in about side²/32 bytes:
/// one-symbol Huffman tables make every 8x8 block two bits (DC difference 0, end of block).
fn flat_gray_jpeg(side: u16) -> Vec<u8> {
    fn segment(out: &mut Vec<u8>, marker: u8, body: &[u8]) {
        out.extend_from_slice(&[0xFF, marker]);
        out.extend_from_slice(&(body.len() as u16 + 2).to_be_bytes());
        out.extend_from_slice(body);
    }
    let mut out = vec![0xFF, 0xD8];
    let mut dqt = vec![0u8];
    dqt.extend([1u8; 64]);
    segment(&mut out, 0xDB, &dqt);
    let [h0, h1] = side.to_be_bytes();
    segment(&mut out, 0xC0, &[8, h0, h1, h0, h1, 1, 1, 0x11, 0]);
    let one_code_of_length_one = |class: u8| {
        let mut body = vec![class, 1];
        body.extend([0u8; 15]);
        body.push(0);
        body
    };
    segment(&mut out, 0xC4, &one_code_of_length_one(0x00));
    segment(&mut out, 0xC4, &one_code_of_length_one(0x10));
    segment(&mut out, 0xDA, &[1, 1, 0x00, 0, 63, 0]);
    let blocks = (usize::from(side).div_ceil(8)).pow(2);
    let bits = 2 * blocks;
    let mut data = vec![0u8; bits.div_ceil(8)];
    let pad = data.len() * 8 - bits;
    if pad > 0 {
        *data.last_mut().unwrap() |= (1u8 << pad) - 1;
    }
    out.extend_from_slice(&data);
    out.extend_from_slice(&[0xFF, 0xD9]);
    out
}

#[test]
fn huge_mjpeg_is_refused_from_the_probe_before_any_frame_buffer() {
    let Some(tools) = tools_or_skip("huge_mjpeg_is_refused_from_the_probe_before_any_frame_buffer")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();

    // The flat JPEG is valid: at 64x64 FFmpeg decodes it to mid-gray.
    let small = dir.path().join("small.jpg");
    std::fs::write(&small, flat_gray_jpeg(64)).unwrap();
    let gray = ffmpeg(&[
        "-i",
        small.to_str().unwrap(),
        "-f",
        "rawvideo",
        "-pix_fmt",
        "gray",
        "-",
    ]);
    assert_eq!(gray.len(), 64 * 64);
    assert!(gray.iter().all(|&v| v == 128));

    // The same at 16000x16000, stream-copied (not decoded) into an AVI: a one-frame MJPEG clip.
    let frame = dir.path().join("big.mjpeg");
    std::fs::write(&frame, flat_gray_jpeg(16000)).unwrap();
    let clip = dir.path().join("huge_mjpeg.avi");
    ffmpeg(&[
        "-f",
        "mjpeg",
        "-i",
        frame.to_str().unwrap(),
        "-c:v",
        "copy",
        clip.to_str().unwrap(),
    ]);

    let wanted = "video frames too large: 16000x16000 exceeds the limit of 178956970 pixels";
    let (result, grown) = peak_growth_of(|| tools.probe(&clip));
    let err = result.unwrap_err();
    assert!(matches!(err, MediaError::Unsupported { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!("unsupported input {}: {wanted}", clip.display())
    );
    assert!(
        grown < ALLOWED_GROWTH,
        "probe grew the heap by {grown} bytes"
    );
    let (result, grown) = peak_growth_of(|| tools.sample(&clip, &SamplingOptions::OFFICIAL));
    assert!(result.unwrap_err().to_string().ends_with(wanted));
    assert!(
        grown < ALLOWED_GROWTH,
        "sample grew the heap by {grown} bytes"
    );

    // A `VideoInfo` that claims the huge size without the probe (built by hand): the reader
    // refuses it too, before allocating its two frame buffers or starting ffmpeg.
    let small_clip = testsrc_clip(dir.path(), "small.mp4", "64x48", 10, 1.0);
    let mut info = tools.probe(&small_clip).unwrap();
    (info.width, info.height) = (16000, 16000);
    let plan = SamplingPlan::new(info.n_frames, info.avg_fps, &SamplingOptions::OFFICIAL).unwrap();
    let (result, grown) = peak_growth_of(|| tools.open_frames(&info, &plan).map(|_| ()));
    let err = result.unwrap_err();
    assert!(matches!(err, MediaError::Unsupported { .. }), "{err:?}");
    assert!(err.to_string().ends_with(wanted), "{err}");
    assert!(
        grown < ALLOWED_GROWTH,
        "open_frames grew the heap by {grown} bytes"
    );
}
