//! Batched scoring and video: the five images scored in one batch equal the official batch and the
//! single-image runs; video sequences (all frames' tokens at one placeholder) match the official final
//! norm and logits; clips of different lengths in one padded batch each score as when alone; several
//! placeholders in one sample consume blocks in order.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use qalign_model::{IMAGE_TOKEN_INDEX, ModelError};

const HIDDEN_TOL: f32 = 2e-5;
const LOGIT_TOL: f32 = 1e-5;
const PROB_TOL: f32 = 2e-6;
const SCORE01_TOL: f32 = 2e-6;
const SCORE15_TOL: f32 = 8e-6;

#[test]
fn five_images_in_one_batch_match_the_official_batch_and_single_runs() {
    let model = tiny_f32();
    for task in ["quality", "aesthetics"] {
        let batch = &expected()["batch"][task];
        let order: Vec<String> = batch["order"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_owned())
            .collect();
        let stems: Vec<&str> = order
            .iter()
            .map(|n| n.rsplit_once('.').unwrap().0)
            .collect();
        let pixels = Tensor::cat(&stems.iter().map(|s| pixels(s)).collect::<Vec<_>>(), 0).unwrap();
        let ids = i64s(&expected()["images"][&order[0]]["tasks"][task]["input_ids"]);
        let logits = model
            .image_level_logits(&ids, &pixels, &level_ids())
            .unwrap();
        assert_eq!(logits.dims(), &[5, 5]);
        for (i, name) in order.iter().enumerate() {
            let want = &batch["results"][name];
            let got = row(&logits, i);
            let what = format!("batch {task} {name}");
            assert_close_vec(&what, &got, &f32s(&want["level_logits"]), LOGIT_TOL);
            let probs = softmax(&got);
            let s01 = weighted(&probs, &score01_weights());
            let s15 = weighted(&probs, &score15_weights());
            assert!(
                (s01 - want["score01"].as_f64().unwrap() as f32).abs() <= SCORE01_TOL,
                "{what} score01"
            );
            assert!(
                (s15 - want["score15"].as_f64().unwrap() as f32).abs() <= SCORE15_TOL,
                "{what} score15"
            );
            let single = row(
                &model
                    .image_level_logits(&ids, &pixels.narrow(0, i, 1).unwrap(), &level_ids())
                    .unwrap(),
                0,
            );
            let d = assert_close_vec(&format!("{what} vs single"), &got, &single, LOGIT_TOL);
            eprintln!("{what}: batch vs single {d:e}");
        }
    }
}

/// The official abstractor output of a clip `[T, 65, D]` and its expected.json entry.
fn clip(
    key: &str,
) -> (
    Tensor,
    &'static serde_json::Value,
    std::collections::HashMap<String, Tensor>,
) {
    let exp = &expected()["video"][key];
    let t = tensors(exp["tensor_file"].as_str().unwrap());
    (t["abstractor_output"].clone(), exp, t)
}

#[test]
fn video_sequences_match_the_official_outputs() {
    let model = tiny_f32();
    for key in ["video_all_frames", "video_first3_frames"] {
        let (visual, exp, want) = clip(key);
        let frames = exp["n_frames"].as_u64().unwrap() as usize;
        assert_eq!(visual.dims(), &[frames, 65, 64]);
        let ids = i64s(&exp["input_ids"]);
        let merged = model
            .merge_inputs(&[ids], std::slice::from_ref(&visual))
            .unwrap();
        assert_eq!(merged.lengths, vec![27 + 65 * frames]);
        assert_close(
            &format!("{key} inputs_embeds"),
            &merged.inputs_embeds.squeeze(0).unwrap(),
            &want["inputs_embeds"],
            HIDDEN_TOL,
        );
        let want_modality: Vec<i64> = want["modality_indicators"].to_vec1().unwrap();
        let got_modality: Vec<i64> = merged
            .sample_modality(0)
            .unwrap()
            .iter()
            .map(|&m| m as i64)
            .collect();
        assert_eq!(got_modality, want_modality, "{key} modality");
        let hidden = model
            .forward_decoder(&merged, false)
            .unwrap()
            .last_hidden_state;
        let normed = model.final_norm(&hidden).unwrap().squeeze(0).unwrap();
        let d_norm = assert_close(
            &format!("{key} final_norm_output"),
            &normed,
            &want["final_norm_output"],
            HIDDEN_TOL,
        );
        let logits = row(&model.level_logits(&merged, &level_ids()).unwrap(), 0);
        let d_logits = assert_close_vec(
            &format!("{key} level_logits"),
            &logits,
            &f32s(&exp["level_logits"]),
            LOGIT_TOL,
        );
        let probs = softmax(&logits);
        assert_close_vec(
            &format!("{key} level_probs"),
            &probs,
            &f32s(&exp["level_probs"]),
            PROB_TOL,
        );
        let s01 = weighted(&probs, &score01_weights());
        let s15 = weighted(&probs, &score15_weights());
        assert!(
            (s01 - exp["score01"].as_f64().unwrap() as f32).abs() <= SCORE01_TOL,
            "{key} score01"
        );
        assert!(
            (s15 - exp["score15"].as_f64().unwrap() as f32).abs() <= SCORE15_TOL,
            "{key} score15"
        );
        let full = model
            .last_token_logits(&merged)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let order: Vec<u32> = full.arg_sort_last_dim(false).unwrap().to_vec1().unwrap();
        let values: Vec<f32> = full.to_vec1().unwrap();
        for (rank, pair) in exp["top10_last_logits"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            assert_eq!(
                order[rank],
                pair[0].as_u64().unwrap() as u32,
                "{key} top-10 rank {rank}"
            );
            let want = pair[1].as_f64().unwrap() as f32;
            assert!(
                (values[order[rank] as usize] - want).abs() <= LOGIT_TOL,
                "{key} top-10 value {rank}"
            );
        }
        eprintln!("{key}: final norm {d_norm:e} level logits {d_logits:e}");
    }
}

#[test]
fn clips_of_different_lengths_in_one_batch_score_as_when_alone() {
    let model = tiny_f32();
    let (long, long_exp, _) = clip("video_all_frames");
    let (short, short_exp, _) = clip("video_first3_frames");
    let ids = i64s(&long_exp["input_ids"]);
    // Short first, so the padded sample is not the last one either.
    let merged = model
        .merge_inputs(&[ids.clone(), ids.clone()], &[short.clone(), long.clone()])
        .unwrap();
    assert_eq!(merged.lengths, vec![27 + 65 * 3, 27 + 65 * 8]);
    assert_eq!(merged.padded_len(), 27 + 65 * 8);
    let logits = model.level_logits(&merged, &level_ids()).unwrap();
    for (i, (visual, exp)) in [(&short, short_exp), (&long, long_exp)]
        .into_iter()
        .enumerate()
    {
        let batched = row(&logits, i);
        assert_close_vec(
            "batched clip vs official single",
            &batched,
            &f32s(&exp["level_logits"]),
            LOGIT_TOL,
        );
        let alone = model
            .merge_inputs(std::slice::from_ref(&ids), std::slice::from_ref(visual))
            .unwrap();
        let alone = row(&model.level_logits(&alone, &level_ids()).unwrap(), 0);
        let d = assert_close_vec("batched clip vs alone", &batched, &alone, LOGIT_TOL);
        eprintln!("clip {i}: batched vs alone {d:e}");
    }
}

#[test]
fn a_shared_prompt_prefix_computed_once_gives_the_official_logits() {
    let model = tiny_f32();
    let (long, long_exp, _) = clip("video_all_frames");
    let (short, short_exp, _) = clip("video_first3_frames");
    let ids = i64s(&long_exp["input_ids"]);
    let (text, rest) = qalign_model::split_prompt(&ids);
    assert!(!text.is_empty() && rest[0] == IMAGE_TOKEN_INDEX);
    let prefix = model.prompt_prefix(&ids).unwrap().unwrap();
    assert_eq!(prefix.len(), text.len());
    // Padded: the short clip's rows end early, and each clip is read at its own last token.
    let shared = model
        .shared_prompt_level_logits(
            &ids,
            Some(&prefix),
            &[short.clone(), long.clone()],
            &level_ids(),
        )
        .unwrap();
    let full = model
        .merge_inputs(&[ids.clone(), ids.clone()], &[short, long])
        .unwrap();
    let full = model.level_logits(&full, &level_ids()).unwrap();
    for (i, exp) in [short_exp, long_exp].into_iter().enumerate() {
        assert_close_vec(
            "shared prefix vs official",
            &row(&shared, i),
            &f32s(&exp["level_logits"]),
            LOGIT_TOL,
        );
        let d = assert_close_vec(
            "shared prefix vs whole prompt",
            &row(&shared, i),
            &row(&full, i),
            LOGIT_TOL,
        );
        eprintln!("clip {i}: shared prefix vs whole prompt {d:e}");
    }
    // A prefix made for another prompt is refused, not silently misused.
    let other = model.prompt_prefix(&ids[..ids.len() - 1]).unwrap().unwrap();
    let mut shorter = ids.clone();
    shorter.remove(1);
    let block = Tensor::zeros((65, 64), DType::F32, &Device::Cpu).unwrap();
    match model.shared_prompt_level_logits(&shorter, Some(&other), &[block], &level_ids()) {
        Err(ModelError::Input(msg)) => assert!(msg.contains("another prompt"), "{msg}"),
        other => panic!("expected an input error, got {other:?}"),
    }
    assert!(model.prompt_prefix(rest).unwrap().is_none());
}

#[test]
fn video_level_logits_splices_each_clips_frames_in_order() {
    let model = tiny_f32();
    let ids = i64s(&expected()["video"]["video_all_frames"]["input_ids"]);
    let clip_a = Tensor::cat(&[pixels(STEMS[0]), pixels(STEMS[1])], 0).unwrap();
    let clip_b = pixels(STEMS[2]);
    let got = model
        .video_level_logits(&ids, &[clip_a.clone(), clip_b.clone()], &level_ids())
        .unwrap();
    for (i, clip) in [clip_a, clip_b].iter().enumerate() {
        let tokens = model.encode_images(clip).unwrap();
        let merged = model
            .merge_inputs(std::slice::from_ref(&ids), &[tokens])
            .unwrap();
        let want = row(&model.level_logits(&merged, &level_ids()).unwrap(), 0);
        assert_close_vec(
            "video_level_logits vs manual splice",
            &row(&got, i),
            &want,
            LOGIT_TOL,
        );
    }
}

#[test]
fn placeholders_take_blocks_in_global_order() {
    let model = tiny_f32();
    let block = |v: f32, rows: usize| Tensor::full(v, (rows, 64), &Device::Cpu).unwrap();
    let (a, b, c) = (block(1.0, 65), block(2.0, 65), block(3.0, 130));
    let ids = vec![
        vec![1, IMAGE_TOKEN_INDEX, 450, IMAGE_TOKEN_INDEX, 338],
        vec![IMAGE_TOKEN_INDEX, 29871],
    ];
    let merged = model
        .merge_inputs(&ids, &[a.clone(), b.clone(), c.clone()])
        .unwrap();
    assert_eq!(merged.lengths, vec![1 + 65 + 1 + 65 + 1, 130 + 1]);
    let mut want_mod = vec![0u8];
    want_mod.extend([1; 65]);
    want_mod.push(0);
    want_mod.extend([1; 65]);
    want_mod.push(0);
    assert_eq!(merged.sample_modality(0).unwrap(), want_mod.as_slice());
    let mut want_mod1 = vec![1u8; 130];
    want_mod1.push(0);
    assert_eq!(merged.sample_modality(1).unwrap(), want_mod1.as_slice());
    let e = &merged.inputs_embeds;
    assert_eq!(flat(&e.get(0).unwrap().narrow(0, 1, 65).unwrap()), flat(&a));
    assert_eq!(
        flat(&e.get(0).unwrap().narrow(0, 67, 65).unwrap()),
        flat(&b)
    );
    assert_eq!(
        flat(&e.get(1).unwrap().narrow(0, 0, 130).unwrap()),
        flat(&c)
    );
    // Text rows are the embeddings; padding rows are zero.
    let embed_450 = model
        .merge_inputs(&[vec![450i64]], &[])
        .unwrap()
        .inputs_embeds;
    assert_eq!(flat(&e.get(0).unwrap().get(66).unwrap()), flat(&embed_450));
    let pad = e.get(1).unwrap().narrow(0, 131, 2).unwrap();
    assert!(flat(&pad).iter().all(|&x| x == 0.0));
    assert_eq!(e.dtype(), DType::F32);
}

#[test]
fn bad_inputs_are_errors() {
    let model = tiny_f32();
    let input_error = |r: Result<qalign_model::MergedInputs, ModelError>| match r {
        Err(ModelError::Input(msg)) => msg,
        other => panic!("expected an input error, got {other:?}"),
    };
    let msg = input_error(model.merge_inputs(&[vec![1, IMAGE_TOKEN_INDEX]], &[]));
    assert!(
        msg.contains("1 image placeholders") && msg.contains("0 visual blocks"),
        "{msg}"
    );
    let msg = input_error(model.merge_inputs(&[vec![1, -7]], &[]));
    assert!(msg.contains("-7"), "{msg}");
    let msg = input_error(model.merge_inputs(&[vec![1, 32000]], &[]));
    assert!(msg.contains("32000"), "{msg}");
    let wide = Tensor::zeros((65, 63), DType::F32, &Device::Cpu).unwrap();
    let msg = input_error(model.merge_inputs(&[vec![IMAGE_TOKEN_INDEX]], &[wide]));
    assert!(msg.contains("[65, 63]"), "{msg}");
    let msg = input_error(model.merge_inputs(&[Vec::<i64>::new()], &[]));
    assert!(msg.contains("no tokens"), "{msg}");
    let small = Tensor::zeros((1, 3, 224, 224), DType::F32, &Device::Cpu).unwrap();
    match model.encode_images(&small) {
        Err(ModelError::Input(msg)) => assert!(msg.contains("[1, 3, 224, 224]"), "{msg}"),
        other => panic!("expected an input error, got {other:?}"),
    }
    let merged = model.merge_inputs(&[vec![1i64, 450]], &[]).unwrap();
    assert!(matches!(
        model.level_logits(&merged, &[32000]),
        Err(ModelError::Input(_))
    ));
}
