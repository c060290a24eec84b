//! The training objective against the official trainer (tests/fixtures/training/ and lora/): the loss of
//! the SFT batch, per-sample losses, gradient norms and full gradients with every parameter trainable,
//! and the adapter loading / merged scores of the official LoRA fixture.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, backprop::GradStore};
use common::{fixture, tiny_dir};
use qalign_model::{
    Adaptation, Adapter, LoadOptions, OneAlignModel, Param, Trainable, TrainingSample,
};
use serde_json::Value;

fn json(rel: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(rel)).unwrap()).unwrap()
}

/// The fixture batch, unpadded: (ids, labels, pixels `[1, 3, 448, 448]`) per sample.
fn batch() -> Vec<(Vec<i64>, Vec<i64>, Tensor)> {
    let expected = json("training/expected.json");
    let sft = json("training/sft_batch.json");
    let ids = expected["input_ids"].as_array().unwrap();
    let labels = expected["labels"].as_array().unwrap();
    let masks = expected["attention_mask"].as_array().unwrap();
    (0..3)
        .map(|b| {
            let real = masks[b]
                .as_array()
                .unwrap()
                .iter()
                .filter(|m| m.as_i64() == Some(1))
                .count();
            let take = |v: &Value| -> Vec<i64> {
                v.as_array().unwrap()[..real]
                    .iter()
                    .map(|x| x.as_i64().unwrap())
                    .collect()
            };
            let image = sft[b]["image"].as_str().unwrap();
            let stem = image.rsplit_once('.').unwrap().0;
            let pixels = common::tensors(&format!("preprocess/{stem}.safetensors"))
                .remove("pixel_values")
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            (take(&ids[b]), take(&labels[b]), pixels)
        })
        .collect()
}

fn samples(batch: &[(Vec<i64>, Vec<i64>, Tensor)]) -> Vec<TrainingSample<'_>> {
    batch
        .iter()
        .map(|(ids, labels, pixels)| TrainingSample {
            input_ids: ids,
            labels,
            pixels,
        })
        .collect()
}

fn load(adaptation: Adaptation) -> (OneAlignModel, Arc<Adaptation>) {
    let adaptation = Arc::new(adaptation);
    let opts = LoadOptions {
        adaptation: Some(adaptation.clone()),
        ..LoadOptions::default()
    };
    (OneAlignModel::load(&tiny_dir(), &opts).unwrap(), adaptation)
}

fn l2(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .sqrt()
}

fn grads_by_name(params: &[Param], grads: &GradStore) -> HashMap<String, Tensor> {
    params
        .iter()
        .filter_map(|p| {
            grads
                .get(p.var.as_tensor())
                .map(|g| (p.name.clone(), g.clone()))
        })
        .collect()
}

fn assert_rel(found: f64, expected: f64, tol: f64, what: &str) {
    let rel = (found - expected).abs() / expected.abs().max(1e-12);
    eprintln!("{what}: rel {rel:.1e}");
    assert!(
        rel <= tol,
        "{what}: {found} vs {expected} (rel {rel:e} > {tol:e})"
    );
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

#[test]
fn full_model_loss_and_gradients_match_the_official_trainer() {
    let expected = json("training/expected.json");
    let (model, adaptation) = load(Adaptation::new(0).with_trainable(Trainable::All));
    let params = adaptation.params();
    let batch = batch();
    let out = model.training_loss(&samples(&batch)).unwrap();
    assert_eq!(
        out.n_targets,
        expected["n_target_tokens"].as_u64().unwrap() as usize
    );
    let loss = out.loss.to_scalar::<f32>().unwrap() as f64;
    let want = expected["loss"].as_f64().unwrap();
    eprintln!("full-model loss: abs {:.1e}", (loss - want).abs());
    assert!((loss - want).abs() <= 1e-5, "loss {loss} vs {want}");

    let grads = grads_by_name(&params, &out.loss.backward().unwrap());
    for (name, norm) in expected["grad_norms_l2"].as_object().unwrap() {
        let g = grads
            .get(name)
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        assert_rel(l2(g), norm.as_f64().unwrap(), 1e-4, name);
    }
    // Every parameter gets a gradient, and the total norm over all of them matches.
    let missing: Vec<&str> = params
        .iter()
        .filter(|p| !grads.contains_key(&p.name))
        .map(|p| p.name.as_str())
        .collect();
    assert!(
        missing.is_empty(),
        "parameters without gradient: {missing:?}"
    );
    let total = grads.values().map(|g| l2(g).powi(2)).sum::<f64>().sqrt();
    assert_rel(
        total,
        expected["total_grad_norm_l2"].as_f64().unwrap(),
        1e-4,
        "total norm",
    );

    let tensors = common::tensors("training/batch.safetensors");
    for name in expected["full_gradients_in_batch_safetensors"]
        .as_array()
        .unwrap()
    {
        let name = name.as_str().unwrap();
        let want = &tensors[&format!("grad/{name}")];
        let got = grads[name].reshape(want.shape()).unwrap();
        let scale = max_abs(want);
        let err = max_abs(&(got - want).unwrap());
        eprintln!("full gradient: {:.1e} of its max", err / max_abs(want));
        assert!(
            err <= 1e-4 * scale,
            "{name}: max abs err {err} vs max {scale}"
        );
    }
}

#[test]
fn per_sample_losses_match_batches_of_one() {
    let expected = json("training/expected.json");
    let (model, _) = load(Adaptation::new(0));
    let batch = batch();
    for (b, want) in expected["per_sample_loss_batch_of_one"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let out = model.training_loss(&samples(&batch[b..b + 1])).unwrap();
        let loss = out.loss.to_scalar::<f32>().unwrap() as f64;
        assert!(
            (loss - want.as_f64().unwrap()).abs() <= 1e-5,
            "sample {b}: {loss} vs {want}"
        );
    }
}

fn lora_adapter() -> Adapter {
    Adapter::load(&fixture("lora/q-align-tiny-lora")).unwrap()
}

#[test]
fn official_adapter_loads_with_its_layout() {
    let expected = json("lora/expected.json");
    let adapter = lora_adapter();
    assert_eq!(adapter.config.r, 8);
    assert_eq!(adapter.config.scale(), 2.0);
    let modules: Vec<&String> = adapter.lora.keys().collect();
    let want: Vec<String> = expected["recipe"]["target_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(modules, want.iter().collect::<Vec<_>>());
    let mut keys: Vec<String> = adapter.non_lora.keys().cloned().collect();
    keys.sort();
    let mut want_keys: Vec<String> = expected["non_lora_trainables_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            k.as_str()
                .unwrap()
                .strip_prefix("base_model.model.")
                .unwrap()
                .to_owned()
        })
        .collect();
    want_keys.sort();
    assert_eq!(keys, want_keys);
}

#[test]
fn merged_adapter_gives_the_official_scores() {
    let expected = json("lora/expected.json");
    let (model, _) = load(lora_adapter().merged_adaptation());
    let prompts = json("tokenizer/qalign_prompts.json");
    let level_ids = [15129u32, 1781, 6534, 6460, 4319];
    for (image, tasks) in expected["scores_with_adapter"].as_object().unwrap() {
        let stem = image.rsplit_once('.').unwrap().0;
        let pixels = common::tensors(&format!("preprocess/{stem}.safetensors"))
            .remove("pixel_values")
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        for (task, want) in tasks.as_object().unwrap() {
            let ids: Vec<i64> = prompts["prompts"][task]["input_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_i64().unwrap())
                .collect();
            let logits = model.image_level_logits(&ids, &pixels, &level_ids).unwrap();
            let logits: Vec<f32> = logits.get(0).unwrap().to_vec1().unwrap();
            for (l, w) in logits.iter().zip(want["level_logits"].as_array().unwrap()) {
                let w = w.as_f64().unwrap();
                assert!(
                    (*l as f64 - w).abs() <= 1e-5,
                    "{image} {task}: logit {l} vs {w}"
                );
            }
        }
    }
}

#[test]
fn two_adamw_steps_from_the_official_adapter_are_reproduced_by_its_gradients() {
    // The gradient part of the LoRA fixture: loss, watched gradient norms and the step-0 gradient, with
    // only the LoRA matrices and the abstractor trainable.
    let expected = json("lora/expected.json");
    let adapter = lora_adapter();
    let scale = adapter.config.scale();
    let adaptation = adapter.lora.iter().fold(
        Adaptation::new(0)
            .with_overrides(adapter.non_lora.clone())
            .with_trainable(Trainable::Prefixes(vec!["model.visual_abstractor.".into()])),
        |a, (m, pair)| {
            a.with_lora_branch(m.clone(), adapter.config.r, scale, 0.0, Some(pair.clone()))
        },
    );
    let (model, adaptation) = load(adaptation);
    let params = adaptation.params();
    assert_eq!(
        params.len(),
        expected["training"]["n_trainable_tensors"]
            .as_u64()
            .unwrap() as usize
    );
    let n: usize = params.iter().map(|p| p.var.elem_count()).sum();
    assert_eq!(
        n,
        expected["recipe"]["n_trainable_params"].as_u64().unwrap() as usize
    );
    let batch = batch();
    let out = model.training_loss(&samples(&batch)).unwrap();
    let step0 = &expected["training"]["steps"][0];
    let loss = out.loss.to_scalar::<f32>().unwrap() as f64;
    assert_rel(loss, step0["loss"].as_f64().unwrap(), 1e-5, "loss");
    let grads = grads_by_name(&params, &out.loss.backward().unwrap());
    let peft = |name: &str| {
        name.replace("base_model.model.", "")
            .replace(".default.", ".")
    };
    for (name, norm) in step0["grad_norms_l2"].as_object().unwrap() {
        assert_rel(l2(&grads[&peft(name)]), norm.as_f64().unwrap(), 1e-4, name);
    }
    let total = grads.values().map(|g| l2(g).powi(2)).sum::<f64>().sqrt();
    assert_rel(
        total,
        step0["total_trainable_grad_norm_l2"].as_f64().unwrap(),
        1e-4,
        "total",
    );
    let tensors = common::tensors("lora/lora_train.safetensors");
    for name in expected["training"]["watched"].as_array().unwrap() {
        let name = name.as_str().unwrap();
        let want = &tensors[&format!("grad_step0/{name}")];
        let got = grads[&peft(name)].reshape(want.shape()).unwrap();
        let err = max_abs(&(got - want).unwrap());
        assert!(err <= 1e-4 * max_abs(want), "{name}: {err}");
        let before = &tensors[&format!("before/{name}")];
        let start = params.iter().find(|p| p.name == peft(name)).unwrap();
        let diff =
            max_abs(&(start.var.as_tensor().reshape(before.shape()).unwrap() - before).unwrap());
        assert!(diff <= 1e-7, "{name} starts {diff} away from the fixture");
    }
    let _ = Device::Cpu;
}
