//! `qalign train` learns, end to end through the real binary.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};

use common::{fixtures, json_records, qalign, run_expecting, tiny_model};

const SIZE: u32 = 96;
const SIGMA_MAX: f64 = 64.0;

/// One standard normal draw (Box–Muller).
fn gaussian(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn smoothstep(e0: f64, e1: f64, x: f64) -> f64 {
    let t = ((x - e0) / (e1 - e0)).clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

/// A smooth scene (a linear gradient between two colours with a soft-edged disc of a third),
/// its layout and colours drawn from `seed`, plus i.i.d. Gaussian noise of std `sigma` (0-255).
fn make_image(seed: u64, sigma: f64) -> RgbImage {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut colour = || -> [f64; 3] { std::array::from_fn(|_| rng.random_range(40.0..215.0)) };
    let (c0, c1, c2) = (colour(), colour(), colour());
    let angle: f64 = rng.random_range(0.0..std::f64::consts::TAU);
    let (dx, dy) = (angle.cos(), angle.sin());
    let s = f64::from(SIZE);
    let (cx, cy) = (
        rng.random_range(0.25..0.75) * s,
        rng.random_range(0.25..0.75) * s,
    );
    let radius = rng.random_range(0.15..0.35) * s;
    let mut noise = ChaCha8Rng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15);
    RgbImage::from_fn(SIZE, SIZE, |x, y| {
        let (fx, fy) = (f64::from(x) + 0.5, f64::from(y) + 0.5);
        let t = (((fx / s - 0.5) * dx + (fy / s - 0.5) * dy) / std::f64::consts::SQRT_2 + 0.5)
            .clamp(0.0, 1.0);
        let d = ((fx - cx).powi(2) + (fy - cy).powi(2)).sqrt();
        let disc = 1.0 - smoothstep(radius - 2.0, radius + 2.0, d);
        Rgb(std::array::from_fn(|c| {
            let base = c0[c] * (1.0 - t) + c1[c] * t;
            let v = base * (1.0 - disc) + c2[c] * disc + sigma * gaussian(&mut noise);
            v.round().clamp(0.0, 255.0) as u8
        }))
    })
}

/// The MOS of an image with noise `sigma`: 5 for a clean one, 1 at `SIGMA_MAX`.
fn mos(sigma: f64) -> f64 {
    5.0 - 4.0 * sigma / SIGMA_MAX
}

/// Writes `n` images under `root/sub`, noise std uniform in [0, SIGMA_MAX]; returns
/// (relative path, sigma) per image.
fn write_set(root: &Path, sub: &str, n: usize, seed: u64) -> Vec<(String, f64)> {
    std::fs::create_dir_all(root.join(sub)).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let sigma = rng.random_range(0.0..SIGMA_MAX);
            let rel = format!("{sub}/img_{i:03}.png");
            make_image(seed * 1000 + i as u64, sigma)
                .save(root.join(&rel))
                .unwrap();
            (rel, sigma)
        })
        .collect()
}

/// `qalign score` of every image in `dir` (with extra args), keyed by file name.
fn scores(dir: &Path, extra: &[&std::ffi::OsStr]) -> HashMap<String, f64> {
    let mut cmd = qalign();
    cmd.arg("score")
        .arg(dir)
        .args(["--format", "json"])
        .args(extra);
    let r = run_expecting(&mut cmd, 0);
    json_records(&r.stdout)
        .iter()
        .map(|rec| (common::file_name(rec), common::num(&rec["score"])))
        .collect()
}

fn srcc_vs_quality(scores: &HashMap<String, f64>, set: &[(String, f64)]) -> f64 {
    let (pred, truth): (Vec<f64>, Vec<f64>) = set
        .iter()
        .map(|(rel, sigma)| {
            let name = Path::new(rel).file_name().unwrap().to_str().unwrap();
            (scores[name], -sigma)
        })
        .unzip();
    qalign_core::metrics::srcc(&pred, &truth).unwrap()
}

#[test]
fn train_learns_noise_quality() {
    let tmp = tempfile::tempdir().unwrap();
    let root: PathBuf = match std::env::var_os("QALIGN_TL_KEEP") {
        Some(p) => PathBuf::from(p),
        None => tmp.path().to_path_buf(),
    };
    let _ = fixtures();
    let train = write_set(&root, "train", 64, 1);
    let test = write_set(&root, "test", 24, 2);

    let labels: Vec<Value> = train
        .iter()
        .map(|(rel, sigma)| json!({"image": rel, "gt_score": mos(*sigma)}))
        .collect();
    let labels_path = root.join("labels.json");
    std::fs::write(&labels_path, serde_json::to_string(&labels).unwrap()).unwrap();
    let tl: Vec<Value> = test
        .iter()
        .map(|(rel, sigma)| json!({"image": rel, "gt_score": mos(*sigma)}))
        .collect();
    std::fs::write(
        root.join("test_labels.json"),
        serde_json::to_string(&tl).unwrap(),
    )
    .unwrap();
    let sft = root.join("sft.json");
    let mut cmd = qalign();
    cmd.arg("syllabus")
        .arg(&labels_path)
        .args(["--task", "quality", "--input", "image", "--out"])
        .arg(&sft);
    let r = run_expecting(&mut cmd, 0);
    eprintln!("{}{}", r.stdout, r.stderr);

    let model = tiny_model();
    let untrained = scores(&root.join("test"), &["--model".as_ref(), model.as_os_str()]);
    let srcc0 = srcc_vs_quality(&untrained, &test);
    eprintln!("untrained SRCC {srcc0:.4}");
}
