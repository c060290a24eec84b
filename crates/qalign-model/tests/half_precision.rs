//! f16 / bf16 compute: not covered by the fixtures (made in f32), so this measures the deviation from
//! them and bounds it loosely: half precision must stay a usable approximation of the f32 model
//! (fixtures README: expect about 1e-2 on level logits for fp16). Observed on the tiny model, all five
//! images: f16 level logits ≤ 3.2e-3, score01 ≤ 2.6e-4; bf16 level logits ≤ 1.9e-2, score01 ≤ 2.1e-3.

mod common;

use candle_core::DType;
use common::*;
use qalign_model::WeightFormat;

struct Deviation {
    vision: f32,
    abstractor: f32,
    level_logits: f32,
    score01: f32,
}

fn measure(dtype: DType) -> Deviation {
    let model = load_tiny(WeightFormat::Safetensors, dtype);
    assert_eq!(model.dtype(), dtype);
    let mut dev = Deviation {
        vision: 0.0,
        abstractor: 0.0,
        level_logits: 0.0,
        score01: 0.0,
    };
    for stem in STEMS {
        let want = tensors(&format!("expected/images/{stem}.visual.safetensors"));
        let vision = model.vision_forward(&pixels(stem)).unwrap();
        dev.vision = dev.vision.max(max_abs_diff(
            &flat(&vision),
            &flat(&want["vision_last_hidden_state"]),
        ));
        let visual = model.abstract_visual(&vision).unwrap();
        dev.abstractor = dev.abstractor.max(max_abs_diff(
            &flat(&visual),
            &flat(&want["abstractor_output"]),
        ));
        let exp = &expected()["images"][image_name(stem)]["tasks"]["quality"];
        let merged = model
            .merge_inputs(&[i64s(&exp["input_ids"])], &[visual.squeeze(0).unwrap()])
            .unwrap();
        let logits = row(&model.level_logits(&merged, &level_ids()).unwrap(), 0);
        dev.level_logits = dev
            .level_logits
            .max(max_abs_diff(&logits, &f32s(&exp["level_logits"])));
        let s01 = weighted(&softmax(&logits), &score01_weights());
        dev.score01 = dev
            .score01
            .max((s01 - exp["score01"].as_f64().unwrap() as f32).abs());
    }
    eprintln!(
        "{dtype:?}: vision {:e} abstractor {:e} level logits {:e} score01 {:e}",
        dev.vision, dev.abstractor, dev.level_logits, dev.score01
    );
    dev
}

#[test]
fn f16_stays_close_to_the_f32_fixtures() {
    let d = measure(DType::F16);
    assert!(
        d.level_logits < 0.02 && d.score01 < 2e-3,
        "f16 level logits {:e} score01 {:e}",
        d.level_logits,
        d.score01
    );
}

#[test]
fn bf16_stays_close_to_the_f32_fixtures() {
    let d = measure(DType::BF16);
    assert!(
        d.level_logits < 0.1 && d.score01 < 0.01,
        "bf16 level logits {:e} score01 {:e}",
        d.level_logits,
        d.score01
    );
}
