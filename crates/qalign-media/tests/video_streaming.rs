//! Streaming guarantees of the frame reader: bounded memory on a long clip, early stop, and no
//! ffmpeg process left behind. One test in its own binary, because it counts this process's heap
//! with a global allocator and checks for child processes.

mod video_support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use qalign_media::{SamplingOptions, SamplingPlan};
use video_support::{testsrc_clip, tools};

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

/// Live child processes (any state, zombies included) of this process, from /proc.
#[cfg(target_os = "linux")]
fn child_processes() -> Vec<String> {
    let me = std::process::id().to_string();
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ..."; comm may contain spaces, so split after the last ')'.
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        if fields.get(1) == Some(&me.as_str()) {
            children.push(stat[..close + 1].to_string());
        }
    }
    children
}

#[cfg(not(target_os = "linux"))]
fn child_processes() -> Vec<String> {
    Vec::new()
}

#[test]
fn long_clip_streams_in_bounded_memory_and_leaves_no_process() {
    let dir = tempfile::tempdir().unwrap();
    // 30 s at 25 fps, 320×240: 750 frames, 173 MB of decoded RGB in all.
    let clip = testsrc_clip(dir.path(), "long.mp4", "320x240", 25, 30.0);
    let info = tools().probe(&clip).unwrap();
    assert_eq!(info.n_frames, 750);
    let frame_bytes = 320 * 240 * 3;
    assert!(child_processes().is_empty(), "{:?}", child_processes());

    // Whole clip, official rule: 30 frames spread over all 750, each dropped after a check.
    let plan = SamplingPlan::new(info.n_frames, info.avg_fps, &SamplingOptions::OFFICIAL).unwrap();
    assert_eq!(plan.indices().len(), 30);
    let baseline = LIVE.load(Ordering::SeqCst);
    PEAK.store(baseline, Ordering::SeqCst);
    let mut reader = tools().open_frames(&info, &plan).unwrap();
    assert_eq!(reader.buffer_bytes(), 2 * frame_bytes);
    let mut seen = Vec::new();
    for frame in &mut reader {
        let frame = frame.unwrap();
        assert_eq!(frame.image.dimensions(), (320, 240));
        seen.push(frame.source_index);
    }
    let peak_growth = PEAK.load(Ordering::SeqCst) - baseline;
    assert_eq!(seen, plan.indices());
    // Two reader buffers plus the one frame handed out at a time, plus small change.
    assert!(
        peak_growth < 3 * frame_bytes + 256 * 1024,
        "peak heap growth {peak_growth} B for frames of {frame_bytes} B"
    );
    assert!(
        child_processes().is_empty(),
        "ffmpeg not reaped after the last frame"
    );
    drop(reader);

    // Every frame wanted (rate above the frame rate): all 750 come through in order.
    let every = SamplingOptions::new(25.0, None).unwrap();
    let every_plan = SamplingPlan::new(info.n_frames, info.avg_fps, &every).unwrap();
    let mut reader = tools().open_frames(&info, &every_plan).unwrap();
    let indices: Vec<usize> = (&mut reader).map(|f| f.unwrap().source_index).collect();
    assert_eq!(indices, (0..750).collect::<Vec<_>>());
    assert_eq!(reader.frames_read(), 750);
    drop(reader);

    // Only frame 0 wanted (rate so low the clip is shorter than one period): ffmpeg is stopped
    // and reaped right after it, with one frame read of 750.
    let first_only = SamplingOptions::new(0.01, None).unwrap();
    let first_plan = SamplingPlan::new(info.n_frames, info.avg_fps, &first_only).unwrap();
    assert!(first_plan.is_shorter_than_period());
    let mut reader = tools().open_frames(&info, &first_plan).unwrap();
    let first = reader.next().unwrap().unwrap();
    assert_eq!(first.source_index, 0);
    assert!(
        child_processes().is_empty(),
        "ffmpeg not stopped after the last wanted frame"
    );
    assert_eq!(reader.frames_read(), 1);
    assert!(reader.next().is_none());

    // Dropping a reader mid-way stops and reaps ffmpeg too.
    let mut reader = tools().open_frames(&info, &plan).unwrap();
    reader.next().unwrap().unwrap();
    assert!(
        !child_processes().is_empty(),
        "ffmpeg should still be running mid-way"
    );
    drop(reader);
    assert!(child_processes().is_empty(), "ffmpeg not reaped on drop");
}
