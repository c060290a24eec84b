//! Interoperability of the model folders qalign writes with the official Python code: `qalign merge`
//! (base + LoRA adapter) and `qalign train --full` (the output and its checkpoint-N folders) must be
//! folders that transformers 4.36.1 (the version the official code pins) loads without missing or
//! unexpected keys, and that the official scorers score as qalign does.
//!
//! CI has no PyTorch, so the official side is pasted: `OFFICIAL` holds what
//! `scripts/interop_official.py` printed for the folders these tests write (same commands and
//! settings), on the CPU in f32 with the official code (Q-Future/Q-Align 14dfdff), transformers 4.36.1
//! and torch 2.11; the loader reported no missing, unexpected or mismatched keys for any of them.
//! `peft_merge` is PEFT 0.22's own `merge_and_unload()` of the fixture adapter (`peft-merge`
//! subcommand). To regenerate, write the folders with the commands below and run the script on them.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{
    TOL_LOGITS, TOL_SCORE15, assert_close, f64s, fixtures, image_names, images_dir, json_records,
    num, qalign, run_expecting, tiny_model,
};
use serde_json::Value;

/// The official scores of the folders written below, and PEFT's merged LoRA targets.
const OFFICIAL: &str = r#"{
 "merge_default": {
  "boy_colorful.jpg": {
   "quality": {"logits": [-1.4632539749145508, 0.3814014196395874, 0.3540187478065491, 1.7334569692611694, 0.32420605421066284], "score15": 2.360592842102051},
   "aesthetics": {"logits": [-1.0397192239761353, 0.06727108359336853, -0.033376291394233704, 0.4701450765132904, 1.596722960472107], "score15": 1.9137685298919678}
  },
  "singapore_flyer.jpg": {
   "quality": {"logits": [1.186741828918457, -0.7977405786514282, -0.09761655330657959, 1.7066868543624878, 1.068388819694519], "score15": 2.6684112548828125},
   "aesthetics": {"logits": [0.05859933793544769, 0.033355534076690674, 0.23777715861797333, -0.6151165962219238, 1.226357102394104], "score15": 2.4251227378845215}
  },
  "synth_landscape_300x200_rgb.png": {
   "quality": {"logits": [-1.106995940208435, 0.4486164450645447, 0.40105411410331726, 0.9197307229042053, 1.0811989307403564], "score15": 2.301701068878174},
   "aesthetics": {"logits": [-0.8464969396591187, 0.4775393605232239, 0.5361189246177673, 0.1536809355020523, 1.6106083393096924], "score15": 2.1223959922790527}
  },
  "synth_portrait_120x333_gray.png": {
   "quality": {"logits": [-0.6500616073608398, -0.11427628993988037, 0.8010514974594116, 0.6259947419166565, 1.465188980102539], "score15": 2.126985549926758},
   "aesthetics": {"logits": [-0.6089808940887451, 0.01111278124153614, 1.1613099575042725, 0.14650800824165344, 1.494571566581726], "score15": 2.2306694984436035}
  },
  "synth_rgba_255x180.png": {
   "quality": {"logits": [-1.062161922454834, 0.45767852663993835, 0.40090322494506836, 1.0675475597381592, 1.1833536624908447], "score15": 2.252875566482544},
   "aesthetics": {"logits": [-0.8961660265922546, 0.5537645220756531, 0.43828466534614563, 0.26293960213661194, 1.5237990617752075], "score15": 2.1735849380493164}
  }
 },
 "full": {
  "boy_colorful.jpg": {
   "quality": {"logits": [-0.5794541239738464, -0.6558855175971985, 0.5854211449623108, 1.205816626548767, 0.6247377991676331], "score15": 2.3274574279785156},
   "aesthetics": {"logits": [-0.8124449849128723, -0.5414013862609863, 0.5800935626029968, 0.9407908320426941, 0.8643078804016113], "score15": 2.2462830543518066}
  },
  "singapore_flyer.jpg": {
   "quality": {"logits": [0.18520145118236542, -0.1572991907596588, 1.3933748006820679, 1.4587581157684326, 0.21523597836494446], "score15": 2.6972975730895996},
   "aesthetics": {"logits": [-0.1275719553232193, -0.22377166152000427, 1.257018804550171, 1.3484379053115845, 0.4608701765537262], "score15": 2.5802712440490723}
  },
  "synth_landscape_300x200_rgb.png": {
   "quality": {"logits": [-0.0742732360959053, -0.6328642964363098, 1.0445570945739746, 0.7299317717552185, 0.9679596424102783], "score15": 2.4503164291381836},
   "aesthetics": {"logits": [-0.5415330529212952, -0.3539980351924896, 0.8608838319778442, 0.6696394085884094, 0.7521911263465881], "score15": 2.4392614364624023}
  },
  "synth_portrait_120x333_gray.png": {
   "quality": {"logits": [0.07984573394060135, -0.7726324200630188, 0.7461116909980774, 1.2652764320373535, 1.2169556617736816], "score15": 2.274698257446289},
   "aesthetics": {"logits": [-0.1661296784877777, -0.6586526036262512, 0.7156651020050049, 1.3075989484786987, 1.1097912788391113], "score15": 2.255173683166504}
  },
  "synth_rgba_255x180.png": {
   "quality": {"logits": [0.012319129891693592, -0.6989708542823792, 1.1477298736572266, 0.7974154353141785, 1.034784197807312], "score15": 2.4505410194396973},
   "aesthetics": {"logits": [-0.48442840576171875, -0.37241339683532715, 0.8965043425559998, 0.7417725920677185, 0.7825563549995422], "score15": 2.433957099914551}
  }
 },
 "full_checkpoint_1": {
  "boy_colorful.jpg": {
   "quality": {"logits": [-0.5460965633392334, -0.6294598579406738, 0.5487848520278931, 1.2075779438018799, 0.6118066310882568], "score15": 2.3349907398223877},
   "aesthetics": {"logits": [-0.7839452624320984, -0.5172425508499146, 0.5444794297218323, 0.9413250684738159, 0.8502371907234192], "score15": 2.2533364295959473}
  },
  "singapore_flyer.jpg": {
   "quality": {"logits": [0.32367387413978577, -0.36194244027137756, 1.3995532989501953, 1.450485110282898, 0.29355478286743164], "score15": 2.702950954437256},
   "aesthetics": {"logits": [-0.056399907916784286, -0.36352893710136414, 1.2721996307373047, 1.3056120872497559, 0.5100224018096924], "score15": 2.580185890197754}
  },
  "synth_landscape_300x200_rgb.png": {
   "quality": {"logits": [-0.044058315455913544, -0.6105695366859436, 1.0098427534103394, 0.7414485216140747, 0.9599602818489075], "score15": 2.456733226776123},
   "aesthetics": {"logits": [-0.5168707966804504, -0.3371449410915375, 0.8272485136985779, 0.6757758259773254, 0.7403908371925354], "score15": 2.4448091983795166}
  },
  "synth_portrait_120x333_gray.png": {
   "quality": {"logits": [0.10764513909816742, -0.7681171894073486, 0.7295029163360596, 1.260239601135254, 1.2174826860427856], "score15": 2.2807843685150146},
   "aesthetics": {"logits": [-0.14610065519809723, -0.6543290019035339, 0.6981406807899475, 1.2996058464050293, 1.1044998168945312], "score15": 2.260341167449951}
  },
  "synth_rgba_255x180.png": {
   "quality": {"logits": [0.04061046987771988, -0.679919958114624, 1.116724967956543, 0.8064022660255432, 1.029416561126709], "score15": 2.4556069374084473},
   "aesthetics": {"logits": [-0.45824363827705383, -0.35791799426078796, 0.8656150698661804, 0.7471303343772888, 0.7701310515403748], "score15": 2.4401392936706543}
  }
 },
 "peft_merge": {
  "model.layers.0.self_attn.q_proj.weight": {"sum": 1.774222195148468, "sum_sq": 130.4797596716562, "row0": [-0.10364922136068344, -0.2223978340625763, -0.042554743587970734, 0.08467886596918106, -0.4238899350166321, 0.1214744821190834, 0.1550014615058899, -0.14915065467357635]},
  "model.layers.0.self_attn.v_proj.multiway.1.weight": {"sum": -14.809905469650403, "sum_sq": 137.38748326162442, "row0": [0.02501964196562767, -0.24764573574066162, 0.2256711721420288, 0.0633499026298523, 0.08879399299621582, 0.18022093176841736, -0.21758268773555756, -0.3237636387348175]},
  "model.layers.1.self_attn.q_proj.weight": {"sum": 1.8799463086761534, "sum_sq": 133.10117070738002, "row0": [-0.006254218518733978, 0.046499863266944885, -0.18518996238708496, 0.18811100721359253, -0.19117861986160278, 0.2710336148738861, -0.24553793668746948, 0.10393330454826355]},
  "model.layers.1.self_attn.v_proj.multiway.1.weight": {"sum": 4.7801143082324415, "sum_sq": 129.80070164659855, "row0": [-0.12539616227149963, 0.08087211102247238, 0.24918918311595917, -0.17532262206077576, 0.22126632928848267, 0.005024908110499382, 0.19443950057029724, -0.022219890728592873]}
 }
}"#;

fn official() -> Value {
    serde_json::from_str(OFFICIAL).unwrap()
}

/// The header of a safetensors file: `__metadata__`, and each tensor's dtype by name.
fn safetensors_header(path: &Path) -> (Option<Value>, HashMap<String, String>) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let meta = header.remove("__metadata__");
    let dtypes = header
        .into_iter()
        .map(|(k, v)| (k, v["dtype"].as_str().unwrap().to_owned()))
        .collect();
    (meta, dtypes)
}

/// What transformers requires of a checkpoint folder, and what the official scorer reads from it:
/// `model.safetensors` with `format: pt` metadata (transformers 4.36 fails on a file without it)
/// holding exactly the base's tensors, in `dtype` or (None) each in the base's dtype; no index file
/// (one unsharded file); the base's config (its `torch_dtype` naming the weights' dtype), tokenizer
/// and preprocessor files.
fn assert_checkpoint_folder(dir: &Path, dtype: Option<&str>) {
    let (meta, dtypes) = safetensors_header(&dir.join("model.safetensors"));
    assert_eq!(
        meta,
        Some(serde_json::json!({"format": "pt"})),
        "{}: the metadata transformers checks",
        dir.display()
    );
    let (_, base) = safetensors_header(&tiny_model().join("model.safetensors"));
    let mut keys: Vec<&String> = dtypes.keys().collect();
    let mut want: Vec<&String> = base.keys().collect();
    keys.sort();
    want.sort();
    assert_eq!(keys, want, "{}: the base's tensors", dir.display());
    for (key, stored) in &dtypes {
        let want = dtype.unwrap_or(&base[key]);
        assert_eq!(stored, want, "{}: dtype of {key}", dir.display());
    }
    // config.json is the base's but for `torch_dtype`, which names the weights' dtype (bf16 for a
    // merge that keeps the base's dtypes: then the file is the base's byte for byte).
    let read =
        |path: &Path| -> Value { serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap() };
    let config = read(&dir.join("config.json"));
    let mut want = read(&tiny_model().join("config.json"));
    want["torch_dtype"] = match dtype {
        Some("F32") => "float32".into(),
        _ => "bfloat16".into(),
    };
    assert_eq!(config, want, "{}: config.json", dir.display());
    if dtype.is_none() {
        assert_eq!(
            std::fs::read(dir.join("config.json")).unwrap(),
            std::fs::read(tiny_model().join("config.json")).unwrap(),
            "{}: config.json as in the base",
            dir.display()
        );
    }
    for name in [
        "generation_config.json",
        "preprocessor_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ] {
        assert_eq!(
            std::fs::read(dir.join(name)).unwrap(),
            std::fs::read(tiny_model().join(name)).unwrap(),
            "{}: {name} as in the base",
            dir.display()
        );
    }
    for index in [
        "model.safetensors.index.json",
        "pytorch_model.bin.index.json",
    ] {
        assert!(!dir.join(index).exists(), "{}: {index}", dir.display());
    }
}

/// `qalign score --task all` of `model` on the five fixture images against the official scores of
/// the same folder, within the fixture tolerances.
fn assert_scores_like_the_official_code(model: &Path, official: &Value) {
    let mut cmd = qalign();
    cmd.arg("score")
        .arg("--model")
        .arg(model)
        .args(["--task", "all", "--format", "json"]);
    for name in image_names() {
        cmd.arg(images_dir().join(name));
    }
    let records = json_records(&run_expecting(&mut cmd, 0).stdout);
    assert_eq!(records.len(), 10);
    for r in &records {
        let path = PathBuf::from(r["path"].as_str().unwrap());
        let image = path.file_name().unwrap().to_str().unwrap();
        let task = r["task"].as_str().unwrap();
        let want = &official[image][task];
        let what = format!("{} {image} {task}", model.display());
        for (i, (got, want)) in f64s(&r["logits"])
            .iter()
            .zip(f64s(&want["logits"]))
            .enumerate()
        {
            assert_close(*got, want, TOL_LOGITS, &format!("{what} level logit {i}"));
        }
        assert_close(num(&r["score"]), num(&want["score15"]), TOL_SCORE15, &what);
    }
}

fn merge(out: &Path, extra: &[&str]) {
    let mut cmd = qalign();
    cmd.arg("merge")
        .arg("--model")
        .arg(tiny_model())
        .arg("--lora")
        .arg(fixtures().join("lora/q-align-tiny-lora"))
        .arg("--out")
        .arg(out)
        .args(extra);
    run_expecting(&mut cmd, 0);
}

#[test]
fn merged_folders_load_in_transformers_and_score_as_in_the_official_code() {
    let tmp = tempfile::tempdir().unwrap();
    let official = official();

    // The default keeps each tensor's dtype (bf16 here, so W' is rounded): the official code
    // scores that folder as qalign does.
    let merged = tmp.path().join("merged");
    merge(&merged, &[]);
    assert_checkpoint_folder(&merged, None);
    assert_scores_like_the_official_code(&merged, &official["merge_default"]);

    // --dtype f32 stores the merge exactly: PEFT's merge_and_unload, to the bit here.
    let exact = tmp.path().join("merged-f32");
    merge(&exact, &["--dtype", "f32"]);
    assert_checkpoint_folder(&exact, Some("F32"));
    let tensors =
        candle_core::safetensors::load(exact.join("model.safetensors"), &Device::Cpu).unwrap();
    let peft = official["peft_merge"].as_object().unwrap();
    assert_eq!(peft.len(), 4);
    for (key, want) in peft {
        let t: &Tensor = &tensors[key];
        let values: Vec<f64> = t
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let sum: f64 = values.iter().sum();
        let sum_sq: f64 = values.iter().map(|v| v * v).sum();
        assert_close(sum, num(&want["sum"]), 1e-6, &format!("{key}: sum"));
        assert_close(
            sum_sq,
            num(&want["sum_sq"]),
            1e-6,
            &format!("{key}: sum of squares"),
        );
        let cols = t.dims()[1];
        for (i, w) in f64s(&want["row0"]).iter().enumerate() {
            assert_eq!(values[i] as f32, *w as f32, "{key}[0, {i}] (of {cols})");
        }
    }
}

#[test]
fn full_training_folders_load_in_transformers_and_score_as_in_the_official_code() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("full");
    let mut cmd = qalign();
    cmd.arg("train")
        .arg("--model")
        .arg(tiny_model())
        .arg("--data")
        .arg(fixtures().join("training/sft_batch.json"))
        .arg("--image-folder")
        .arg(images_dir())
        .arg("--output")
        .arg(&out)
        .args([
            "--full",
            "--max-steps",
            "2",
            "--save-steps",
            "1",
            "--batch-size",
            "3",
        ])
        .args([
            "--lr",
            "2e-5",
            "--warmup-ratio",
            "0",
            "--lr-schedule",
            "constant",
        ])
        .args(["--seed", "7"]);
    run_expecting(&mut cmd, 0);
    let official = official();
    let checkpoint = out.join("checkpoint-1");
    // Trained on the CPU: every tensor f32 (the trained ones in the compute dtype, the fixed
    // position tables as stored).
    for (dir, key) in [(&out, "full"), (&checkpoint, "full_checkpoint_1")] {
        assert_checkpoint_folder(dir, Some("F32"));
        assert_scores_like_the_official_code(dir, &official[key]);
    }
    let (meta, _) = safetensors_header(&checkpoint.join("optimizer.safetensors"));
    assert_eq!(meta, Some(serde_json::json!({"format": "pt"})));
}
