//! Measures model loading and prompt encoding time.
//! Run: `cargo run --release -p qalign-tokenizer --example tokenizer_timing [path/to/tokenizer.model]`
//!
//! Reports wall-clock time and, on Linux, the thread's on-CPU time (from
//! /proc/thread-self/schedstat), which stays meaningful on a busy machine.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use qalign_tokenizer::{MediaKind, Task, Tokenizer, scorer_prompt, tokenize_with_image};

/// Nanoseconds this thread has spent on a CPU, if the kernel exposes it.
fn cpu_ns() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    stat.split_whitespace().next()?.parse().ok()
}

/// Runs `f` `runs` times; returns (wall, cpu) time per run.
fn measure<T>(runs: u32, mut f: impl FnMut() -> T) -> (Duration, Option<Duration>) {
    let cpu_start = cpu_ns();
    let start = Instant::now();
    for _ in 0..runs {
        std::hint::black_box(f());
    }
    let wall = start.elapsed() / runs;
    let cpu = cpu_start
        .zip(cpu_ns())
        .map(|(a, b)| Duration::from_nanos((b - a) / u64::from(runs)));
    (wall, cpu)
}

fn report(what: &str, (wall, cpu): (Duration, Option<Duration>)) {
    match cpu {
        Some(cpu) => println!("{what}: {wall:?} wall, {cpu:?} on-CPU per run"),
        None => println!("{what}: {wall:?} wall per run"),
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/assets/llama2-tokenizer.model"
            ))
        });
    let tok = Tokenizer::from_file(&path)?;
    report(
        "load tokenizer.model (20 runs)",
        measure(20, || Tokenizer::from_file(&path)),
    );

    let prompt = scorer_prompt(Task::Quality, MediaKind::Image);
    report(
        &format!(
            "tokenize_with_image, quality scorer prompt ({} ids, 10000 runs)",
            tokenize_with_image(&tok, &prompt).len()
        ),
        measure(10_000, || {
            tokenize_with_image(&tok, std::hint::black_box(&prompt))
        }),
    );

    let text = "The quality of the image is good, and the colours are vivid. ".repeat(1_000);
    report(
        &format!(
            "encode {} chars -> {} ids (5 runs)",
            text.len(),
            tok.encode(&text, true).len()
        ),
        measure(5, || tok.encode(std::hint::black_box(&text), true)),
    );
    Ok(())
}
