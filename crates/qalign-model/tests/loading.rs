//! Checkpoint loading: both on-disk formats of the tiny model hold the same tensors and give the same
//! scores; sharded safetensors work; missing keys, wrong shapes and missing shards are errors naming the
//! key, the shapes and the file; absent sin-cos position tables are computed (rounded like the release).

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::*;
use qalign_model::abstractor::{key_position_table, query_position_table};
use qalign_model::loader::ShardIndex;
use qalign_model::{
    CheckpointFiles, LoadOptions, ModelError, OneAlignModel, WeightFormat, WeightStore,
};

fn level_logits_of(model: &OneAlignModel, stem: &str) -> Vec<f32> {
    let ids = i64s(&expected()["images"][image_name(stem)]["tasks"]["quality"]["input_ids"]);
    row(
        &model
            .image_level_logits(&ids, &pixels(stem), &level_ids())
            .unwrap(),
        0,
    )
}

fn load(dir: &Path, format: WeightFormat) -> Result<OneAlignModel, ModelError> {
    OneAlignModel::load(
        dir,
        &LoadOptions {
            format,
            ..LoadOptions::default()
        },
    )
}

/// A temp model folder with the tiny config and the given tensors as `model.safetensors`.
fn temp_model(tensors: &HashMap<String, Tensor>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        tiny_dir().join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    candle_core::safetensors::save(tensors, dir.path().join("model.safetensors")).unwrap();
    dir
}

fn tiny_tensors() -> HashMap<String, Tensor> {
    tensors("tiny-onealign/model.safetensors")
}

#[test]
fn auto_prefers_safetensors_and_finds_the_bin_shards() {
    let auto = CheckpointFiles::discover(&tiny_dir(), WeightFormat::Auto).unwrap();
    assert_eq!(auto.format, WeightFormat::Safetensors);
    assert_eq!(auto.shards, vec![tiny_dir().join("model.safetensors")]);
    assert_eq!(auto.index, None);
    let bin = CheckpointFiles::discover(&tiny_dir(), WeightFormat::PytorchBin).unwrap();
    assert_eq!(bin.format, WeightFormat::PytorchBin);
    assert_eq!(
        bin.index,
        Some(tiny_dir().join("pytorch_model.bin.index.json"))
    );
    let names: Vec<String> = bin
        .shards
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "pytorch_model-00001-of-00003.bin",
            "pytorch_model-00002-of-00003.bin",
            "pytorch_model-00003-of-00003.bin"
        ]
    );
}

#[test]
fn both_formats_hold_identical_tensors() {
    let st = WeightStore::open_dir(&tiny_dir(), WeightFormat::Safetensors).unwrap();
    let pt = WeightStore::open_dir(&tiny_dir(), WeightFormat::PytorchBin).unwrap();
    assert_eq!(st.keys(), pt.keys());
    assert_eq!(st.keys().len(), 112);
    let mut bf16 = 0;
    for key in st.keys() {
        let (shape, dtype) = st.entry(key).unwrap();
        let (pt_shape, pt_dtype) = pt.entry(key).unwrap();
        assert_eq!((shape, dtype), (pt_shape, pt_dtype), "{key}");
        if dtype == DType::BF16 {
            bf16 += 1;
        }
        let a = st.load(key, shape, DType::F32, &Device::Cpu).unwrap();
        let b = pt.load(key, shape, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(flat(&a), flat(&b), "{key}");
    }
    assert_eq!(bf16, 108, "parameters are BF16, the 4 position tables F32");
}

#[test]
fn both_formats_give_identical_scores() {
    let st = load(&tiny_dir(), WeightFormat::Safetensors).unwrap();
    let pt = load(&tiny_dir(), WeightFormat::PytorchBin).unwrap();
    assert_eq!(pt.checkpoint_files().format, WeightFormat::PytorchBin);
    assert_eq!(
        level_logits_of(&st, "boy_colorful"),
        level_logits_of(&pt, "boy_colorful")
    );
}

#[test]
fn sharded_safetensors_load() {
    let all = tiny_tensors();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        tiny_dir().join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let mut shards: [HashMap<String, Tensor>; 2] = Default::default();
    let mut weight_map = serde_json::Map::new();
    for (key, t) in &all {
        let shard = usize::from(key.starts_with("model.layers"));
        let name = format!("model-0000{}-of-00002.safetensors", shard + 1);
        weight_map.insert(key.clone(), name.into());
        shards[shard].insert(key.clone(), t.clone());
    }
    for (i, shard) in shards.iter().enumerate() {
        let name = format!("model-0000{}-of-00002.safetensors", i + 1);
        candle_core::safetensors::save(shard, dir.path().join(name)).unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let model = load(dir.path(), WeightFormat::Auto).unwrap();
    assert_eq!(model.checkpoint_files().shards.len(), 2);
    assert_eq!(
        level_logits_of(&model, "singapore_flyer"),
        level_logits_of(tiny_f32(), "singapore_flyer")
    );
}

#[test]
fn a_missing_tensor_is_named_with_its_file() {
    let key = "model.layers.1.self_attn.k_proj.multiway.1.weight";
    let mut t = tiny_tensors();
    t.remove(key);
    let dir = temp_model(&t);
    match load(dir.path(), WeightFormat::Auto) {
        Err(ModelError::MissingKey { key: k, file }) => {
            assert_eq!(k, key);
            assert_eq!(file, dir.path().join("model.safetensors"));
        }
        other => panic!("expected MissingKey, got {other:?}"),
    }
}

#[test]
fn a_misshapen_tensor_reports_both_shapes_and_the_file() {
    let key = "model.visual_abstractor.visual_fc.weight";
    let mut t = tiny_tensors();
    let reshaped = t[key].reshape((32, 128)).unwrap();
    t.insert(key.to_owned(), reshaped);
    let dir = temp_model(&t);
    let err = load(dir.path(), WeightFormat::Auto).unwrap_err();
    let text = err.to_string();
    match err {
        ModelError::ShapeMismatch {
            key: k,
            expected,
            found,
            file,
        } => {
            assert_eq!(k, key);
            assert_eq!(expected, vec![64, 64]);
            assert_eq!(found, vec![32, 128]);
            assert_eq!(file, dir.path().join("model.safetensors"));
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
    assert!(
        text.contains(key) && text.contains("[32, 128]") && text.contains("[64, 64]"),
        "{text}"
    );
}

fn copy_bin_checkpoint(dir: &Path, shards: &[&str]) {
    for name in ["config.json", "pytorch_model.bin.index.json"]
        .iter()
        .chain(shards)
    {
        std::fs::copy(tiny_dir().join(name), dir.join(name)).unwrap();
    }
}

#[test]
fn a_missing_shard_is_named() {
    let dir = tempfile::tempdir().unwrap();
    copy_bin_checkpoint(
        dir.path(),
        &[
            "pytorch_model-00001-of-00003.bin",
            "pytorch_model-00003-of-00003.bin",
        ],
    );
    match load(dir.path(), WeightFormat::Auto) {
        Err(ModelError::Io { path, .. }) => {
            assert_eq!(path, dir.path().join("pytorch_model-00002-of-00003.bin"))
        }
        other => panic!("expected Io error for the missing shard, got {other:?}"),
    }
}

#[test]
fn a_key_missing_from_its_indexed_shard_names_that_shard() {
    let dir = tempfile::tempdir().unwrap();
    let shards = [
        "pytorch_model-00001-of-00003.bin",
        "pytorch_model-00002-of-00003.bin",
        "pytorch_model-00003-of-00003.bin",
    ];
    copy_bin_checkpoint(dir.path(), &shards);
    let index_path = dir.path().join("pytorch_model.bin.index.json");
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    // Point lm_head (stored in shard 3) at shard 1.
    index["weight_map"]["lm_head.weight"] = shards[0].into();
    std::fs::write(&index_path, index.to_string()).unwrap();
    match load(dir.path(), WeightFormat::PytorchBin) {
        Err(ModelError::MissingKey { key, file }) => {
            assert_eq!(key, "lm_head.weight");
            assert_eq!(file, dir.path().join(shards[0]));
        }
        other => panic!("expected MissingKey, got {other:?}"),
    }
}

#[test]
fn a_shard_index_may_only_name_files_beside_it() {
    let dir = tempfile::tempdir().unwrap();
    let shards = [
        "pytorch_model-00001-of-00003.bin",
        "pytorch_model-00002-of-00003.bin",
        "pytorch_model-00003-of-00003.bin",
    ];
    copy_bin_checkpoint(dir.path(), &shards);
    let index_path = dir.path().join("pytorch_model.bin.index.json");
    let original = std::fs::read_to_string(&index_path).unwrap();
    let index = ShardIndex::read(&index_path).unwrap();
    assert_eq!(index.shard_names(), shards);
    for hostile in [
        "../pytorch_model-00001-of-00003.bin",
        "/etc/passwd",
        "sub/pytorch_model-00001-of-00003.bin",
        "..",
        "",
    ] {
        let mut json: serde_json::Value = serde_json::from_str(&original).unwrap();
        json["weight_map"]["lm_head.weight"] = hostile.into();
        std::fs::write(&index_path, json.to_string()).unwrap();
        for err in [
            ShardIndex::read(&index_path).unwrap_err(),
            CheckpointFiles::discover(dir.path(), WeightFormat::Auto).unwrap_err(),
        ] {
            match &err {
                ModelError::WeightFile { path, message } => {
                    assert_eq!(path, &index_path);
                    assert!(message.contains(&format!("{hostile:?}")), "{message}");
                }
                other => panic!("{hostile:?}: expected WeightFile, got {other:?}"),
            }
        }
    }
    std::fs::write(&index_path, r#"{"weight_map": {}}"#).unwrap();
    let err = ShardIndex::read(&index_path).unwrap_err();
    assert!(err.to_string().contains("weight_map is empty"), "{err}");
    std::fs::write(&index_path, r#"{"metadata": {}}"#).unwrap();
    let err = ShardIndex::read(&index_path).unwrap_err();
    assert!(matches!(err, ModelError::Json { .. }), "{err:?}");
}

#[test]
fn a_folder_without_weights_says_what_it_looked_for() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        tiny_dir().join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let err = load(dir.path(), WeightFormat::Auto).unwrap_err();
    assert!(matches!(err, ModelError::NoWeights { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("model.safetensors") && text.contains("pytorch_model.bin"),
        "{text}"
    );
    let err = load(&tiny_dir().join("absent"), WeightFormat::Auto).unwrap_err();
    assert!(matches!(err, ModelError::Io { .. }), "{err:?}");
}

#[test]
fn computed_position_tables_equal_the_stored_ones() {
    let t = tiny_tensors();
    let prefix = "model.visual_abstractor.encoder.layers.0.crossattention.attention";
    let q_stored = flat(&t[&format!("{prefix}.q_pos_embed")]);
    let k_stored = flat(&t[&format!("{prefix}.k_pos_embed")]);
    let q = query_position_table(64, 64);
    let k = key_position_table(32, 64);
    assert_eq!(k.len(), 1025 * 64);
    assert!(k[..64].iter().all(|&x| x == 0.0), "CLS row is zero");
    // Upstream's numpy float32 pow/sin differ from libm's by an ulp here and there; an ulp of ω scaled by
    // positions up to 63 gives up to ~2e-6 (far below the bf16 step the release stores these tables in).
    let dq = max_abs_diff(&q, &q_stored);
    let dk = max_abs_diff(&k, &k_stored);
    assert!(dq <= 4e-6 && dk <= 4e-6, "q {dq:e} k {dk:e}");
}

#[test]
fn absent_position_tables_are_computed_and_rounded_to_the_checkpoint_dtype() {
    let mut t = tiny_tensors();
    t.retain(|k, _| !k.ends_with("_pos_embed"));
    let without = temp_model(&t);
    // The same checkpoint with the computed tables stored in BF16, as the released checkpoint stores them.
    let as_bf16 = |v: Vec<f32>, rows: usize| {
        Tensor::from_vec(v, (rows, 64), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap()
    };
    for layer in 0..2 {
        let prefix =
            format!("model.visual_abstractor.encoder.layers.{layer}.crossattention.attention");
        t.insert(
            format!("{prefix}.q_pos_embed"),
            as_bf16(query_position_table(64, 64), 64),
        );
        t.insert(
            format!("{prefix}.k_pos_embed"),
            as_bf16(key_position_table(32, 64), 1025),
        );
    }
    let stored_bf16 = temp_model(&t);
    let pixels = pixels("synth_landscape_300x200_rgb");
    let computed = load(without.path(), WeightFormat::Auto)
        .unwrap()
        .encode_images(&pixels)
        .unwrap();
    let rounded = load(stored_bf16.path(), WeightFormat::Auto)
        .unwrap()
        .encode_images(&pixels)
        .unwrap();
    assert_eq!(flat(&computed), flat(&rounded));
    // bf16 rounding of the tables moves the output only slightly against the F32-table fixture.
    let want = tensors("expected/images/synth_landscape_300x200_rgb.visual.safetensors");
    let d = max_abs_diff(
        &flat(&computed.squeeze(0).unwrap()),
        &flat(&want["abstractor_output"]),
    );
    assert!(
        d > 0.0 && d < 0.05,
        "deviation from the F32-table fixture: {d:e}"
    );
}

#[test]
fn a_load_reports_each_layer_to_its_observer() {
    use qalign_model::{LoadObserver, LoadProgress};
    use std::sync::{Arc, Mutex};
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    let opts = LoadOptions {
        on_progress: Some(LoadObserver::new(move |p: LoadProgress| {
            sink.lock().unwrap().push(p)
        })),
        ..LoadOptions::default()
    };
    let model = OneAlignModel::load(&tiny_dir(), &opts).unwrap();
    let config = model.config();
    let layers = config.vision.num_layers + config.abstractor.num_layers + config.llm.num_layers;
    assert_eq!(layers, 6);
    let want: Vec<LoadProgress> = (0..=layers)
        .map(|layers_done| LoadProgress {
            layers_done,
            layers,
        })
        .collect();
    assert_eq!(*seen.lock().unwrap(), want);

    // A load that fails part way has told of the layers it finished, and no more.
    let mut tensors = tiny_tensors();
    tensors.remove("model.layers.0.self_attn.q_proj.weight");
    let dir = temp_model(&tensors);
    seen.lock().unwrap().clear();
    assert!(OneAlignModel::load(dir.path(), &opts).is_err());
    let seen = seen.lock().unwrap();
    assert_eq!(seen.first().map(|p| p.layers_done), Some(0));
    assert_eq!(seen.last().map(|p| p.layers_done), Some(4), "{seen:?}");
    drop(seen);

    // The front door passes its observer to the load.
    let last = Arc::new(Mutex::new(None));
    let sink = last.clone();
    qalign_model::Scorer::builder()
        .model(tiny_dir().to_str().unwrap())
        .offline(true)
        .on_load_progress(move |p| *sink.lock().unwrap() = Some(p))
        .build()
        .unwrap();
    assert_eq!(
        *last.lock().unwrap(),
        Some(LoadProgress {
            layers_done: 6,
            layers: 6
        })
    );
}
