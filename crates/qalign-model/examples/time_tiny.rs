//! Times loading a model folder and scoring one preprocessed image with the quality prompt.
//! Usage: `cargo run --release -p qalign-model --example time_tiny -- [model_dir] [pixels.safetensors] [f32|f16|bf16]`
//! (defaults: the tiny fixture model and `singapore_flyer`'s official pixels, f32).

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device};
use qalign_model::{LoadOptions, OneAlignModel};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");
/// `USER: How would you rate the quality of this image?\n<|image|>\nASSISTANT: The quality of the image is`
const QUALITY_PROMPT: [i64; 28] = [
    1, 3148, 1001, 29901, 1128, 723, 366, 6554, 278, 11029, 310, 445, 1967, 29973, 13, -200, 29871,
    13, 22933, 9047, 13566, 29901, 450, 11029, 310, 278, 1967, 338,
];
const LEVEL_IDS: [u32; 5] = [15129, 1781, 6534, 6460, 4319];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).filter(|a| !a.is_empty());
    let dir = arg(0)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(FIXTURES).join("tiny-onealign"));
    let pixels_path = arg(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(FIXTURES).join("preprocess/singapore_flyer.safetensors"));
    let dtype = match arg(2).map(String::as_str) {
        Some("f16") => DType::F16,
        Some("bf16") => DType::BF16,
        _ => DType::F32,
    };
    let opts = LoadOptions {
        device: Device::Cpu,
        dtype,
        ..LoadOptions::default()
    };

    let start = Instant::now();
    let model = OneAlignModel::load(&dir, &opts)?;
    let load = start.elapsed();
    let pixels =
        candle_core::safetensors::load(&pixels_path, &Device::Cpu)?["pixel_values"].unsqueeze(0)?;
    for run in 0..3 {
        let start = Instant::now();
        let logits = model.image_level_logits(&QUALITY_PROMPT, &pixels, &LEVEL_IDS)?;
        let elapsed = start.elapsed();
        let logits: Vec<f32> = logits.get(0)?.to_vec1()?;
        println!(
            "score run {run}: {:.1} ms, level logits {logits:?}",
            elapsed.as_secs_f64() * 1e3
        );
    }
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let vision = model.vision_forward(&pixels)?;
    let vision_ms = ms(t);
    let t = Instant::now();
    let visual = model.abstract_visual(&vision)?;
    let abstractor_ms = ms(t);
    let t = Instant::now();
    let merged = model.merge_inputs(&[QUALITY_PROMPT], &[visual.get(0)?])?;
    model.level_logits(&merged, &LEVEL_IDS)?;
    let llm_ms = ms(t);
    println!(
        "stages: vision {vision_ms:.1} ms, abstractor {abstractor_ms:.1} ms, splice + LLM {llm_ms:.1} ms"
    );
    println!("load: {:.1} ms ({dtype:?})", load.as_secs_f64() * 1e3);
    Ok(())
}
