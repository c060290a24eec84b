//! Times each image-preprocessing stage on one file (decode, pad, resize, normalise), so the
//! cost of the Pillow-exact path can be checked: `cargo run --release --example time_preprocess -- IMG`.

use std::path::PathBuf;
use std::time::Instant;

use qalign_media::{DecodeOptions, PreprocessConfig, expand2square, load_rgb};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = PathBuf::from(args.next().ok_or("usage: time_preprocess IMAGE [RUNS]")?);
    let runs: u32 = args.next().map(|r| r.parse()).transpose()?.unwrap_or(20);
    let config = PreprocessConfig::clip(448);
    let mut totals = [0f64; 4];
    for _ in 0..runs {
        let t0 = Instant::now();
        let img = load_rgb(&path, &DecodeOptions::default())?;
        let t1 = Instant::now();
        let square = expand2square(&img, config.background());
        let t2 = Instant::now();
        let resized = config.pad_resize_and_crop(&img);
        let t3 = Instant::now();
        let pixels = config.normalize(&resized);
        let t4 = Instant::now();
        std::hint::black_box((&pixels, &square));
        for (total, (a, b)) in totals
            .iter_mut()
            .zip([(t0, t1), (t1, t2), (t2, t3), (t3, t4)])
        {
            *total += (b - a).as_secs_f64() * 1e3 / f64::from(runs);
        }
    }
    let [decode, pad, resize, normalize] = totals;
    // The pipeline pads and resizes in one step; the separate padding is timed for reference.
    println!(
        "{}: decode {decode:.2} ms, pad+resize {resize:.2} ms, normalise {normalize:.2} ms, total {:.2} ms (mean of {runs}; a separate expand2square would cost {pad:.2} ms)",
        path.display(),
        decode + resize + normalize
    );
    Ok(())
}
