//! Oversized and endless inputs: a 2 GB file that is not an image, a 2 GB file that claims to be
//! one, `/dev/zero` and a FIFO must each be refused quickly, without reading them into memory or
//! blocking. One test in its own binary, because it counts this process's heap with a global
//! allocator (parallel tests would blur the peak).

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use qalign_media::{
    DecodeOptions, FfmpegTools, MAX_FILE_BYTES, MediaError, PreprocessConfig, load_rgb, read_rgb,
    sniff_kind,
};

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

const MEMORY_LIMIT: usize = 500 * 1024 * 1024;
const TIME_LIMIT: Duration = Duration::from_secs(5);
const TWO_GB: u64 = 2 * 1024 * 1024 * 1024;

/// Runs `f`, then checks it stayed under the memory and time limits; returns its result.
fn bounded<T>(what: &str, f: impl FnOnce() -> T) -> T {
    PEAK.store(LIVE.load(Ordering::SeqCst), Ordering::SeqCst);
    let before = LIVE.load(Ordering::SeqCst);
    let start = Instant::now();
    let out = f();
    let elapsed = start.elapsed();
    let grown = PEAK.load(Ordering::SeqCst) - before;
    eprintln!("{what}: peak heap growth {grown} bytes, {elapsed:?}");
    assert!(grown < MEMORY_LIMIT, "{what}: heap grew by {grown} bytes");
    assert!(elapsed < TIME_LIMIT, "{what}: took {elapsed:?}");
    out
}

fn sparse_file(path: &Path, head: &[u8], len: u64) {
    let mut file = std::fs::File::create(path).unwrap();
    file.write_all(head).unwrap();
    file.set_len(len).unwrap();
}

fn assert_names(err: &MediaError, path: &Path, wanted: &str) {
    let text = err.to_string();
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(text.contains(wanted), "expected {wanted:?} in {text}");
}

#[test]
fn oversized_endless_and_special_inputs_are_refused_in_bounded_memory_and_time() {
    let dir = tempfile::tempdir().unwrap();
    let opts = DecodeOptions::default();

    // 2 GB of zeros named like a JPEG: the first bytes are not an image, nothing more is read.
    let zeros = dir.path().join("zeros.jpg");
    sparse_file(&zeros, b"", TWO_GB);
    let err = bounded("2 GB non-image", || load_rgb(&zeros, &opts)).unwrap_err();
    assert!(matches!(err, MediaError::Decode { .. }), "{err:?}");
    assert_names(&err, &zeros, "not a recognised image");
    let err = bounded("2 GB non-image, preprocess", || {
        qalign_media::preprocess_path(&zeros, &PreprocessConfig::clip(448), &opts)
    })
    .unwrap_err();
    assert!(matches!(err, MediaError::Decode { .. }), "{err:?}");
    bounded("2 GB non-image, sniff", || sniff_kind(&zeros)).unwrap();

    // 2 GB that starts like a JPEG: refused from its size, before it is read.
    let claims_jpeg = dir.path().join("big.jpg");
    sparse_file(&claims_jpeg, b"\xFF\xD8\xFF\xE0\0\x10JFIF\0", TWO_GB);
    let err = bounded("2 GB JPEG-looking file", || load_rgb(&claims_jpeg, &opts)).unwrap_err();
    assert!(matches!(err, MediaError::Unsupported { .. }), "{err:?}");
    assert_names(
        &err,
        &claims_jpeg,
        &format!(
            "file too large: {TWO_GB} bytes exceeds the limit of {MAX_FILE_BYTES} bytes for an \
             encoded image"
        ),
    );

    // /dev/zero by path is a device and is refused unopened; read as an explicit stream it is
    // sniffed from its first bytes and refused as not an image.
    let dev_zero = Path::new("/dev/zero");
    if dev_zero.exists() {
        let err = bounded("/dev/zero by path", || load_rgb(dev_zero, &opts)).unwrap_err();
        assert!(matches!(err, MediaError::Unsupported { .. }), "{err:?}");
        assert_names(&err, dev_zero, "is a character device, not a regular file");
        let err = bounded("/dev/zero sniff", || sniff_kind(dev_zero)).unwrap_err();
        assert!(matches!(err, MediaError::Unsupported { .. }), "{err:?}");
        let stream = std::fs::File::open(dev_zero).unwrap();
        let err = bounded("/dev/zero as a stream", || {
            read_rgb(stream, Path::new("-"), &opts)
        })
        .unwrap_err();
        assert!(matches!(err, MediaError::Decode { .. }), "{err:?}");
        assert_names(&err, Path::new("-"), "not a recognised image");
        // The video probe refuses it before starting ffprobe (the tool paths are never used).
        let tools = FfmpegTools::new("/nonexistent/ffmpeg", "/nonexistent/ffprobe");
        let err = tools.probe(dev_zero).unwrap_err();
        assert!(matches!(err, MediaError::Unsupported { .. }), "{err:?}");
    }

    // A FIFO with no writer: opening it would block forever, so it must be refused unopened.
    let fifo = dir.path().join("pipe.png");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .is_ok_and(|s| s.success());
    if !made {
        eprintln!("skipping the FIFO case: mkfifo is not available");
        return;
    }
    let (sender, receiver) = std::sync::mpsc::channel();
    let fifo_in_thread = fifo.clone();
    std::thread::spawn(move || {
        let opts = DecodeOptions::default();
        let loaded = load_rgb(&fifo_in_thread, &opts).map(|_| ());
        let sniffed = sniff_kind(&fifo_in_thread).map(|_| ());
        let tools = FfmpegTools::new("/nonexistent/ffmpeg", "/nonexistent/ffprobe");
        let probed = tools.probe(&fifo_in_thread).map(|_| ());
        let _ = sender.send((loaded, sniffed, probed));
    });
    let (loaded, sniffed, probed) = receiver
        .recv_timeout(TIME_LIMIT)
        .expect("reading a FIFO blocked instead of being refused");
    for result in [loaded, sniffed, probed] {
        let err = result.unwrap_err();
        assert!(matches!(err, MediaError::Unsupported { .. }), "{err:?}");
        assert_names(&err, &fifo, "is a named pipe (FIFO), not a regular file");
    }
}
