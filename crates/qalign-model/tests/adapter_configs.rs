//! Adapter configs as PEFT ≥ 0.6 writes them: per-module ranks and alphas, rsLoRA, `task_type: null`,
//! regex `target_modules`, named initialisations, and the settings qalign refuses (naming the field)
//! rather than scoring as a plain LoRA. The expected factors are PEFT 0.22's
//! (`LoraLayer.update_layer`: alpha/r, or alpha/√r with `use_rslora`, r and alpha from
//! `get_pattern_key`), checked against PEFT's own `merge_and_unload` when this test was written.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use qalign_model::{Adapter, WeightFormat, WeightStore, Weights};

const Q: &str = "model.layers.0.self_attn.q_proj";
const V1: &str = "model.layers.1.self_attn.v_proj.multiway.1";
const DOWN: &str = "model.layers.1.mlp.down_proj";

/// The `adapter_config.json` PEFT 0.22 wrote for `LoraConfig(r=8, lora_alpha=16, use_rslora=True,
/// rank_pattern={"q_proj": 2}, alpha_pattern={"down_proj": 3}, task_type="CAUSAL_LM")`, verbatim.
const PEFT_022_RSLORA_PATTERNS: &str = r#"{
  "alora_invocation_tokens": null,
  "alpha_pattern": {
    "down_proj": 3
  },
  "arrow_config": null,
  "astra_config": null,
  "auto_mapping": null,
  "base_model_name_or_path": null,
  "bias": "none",
  "corda_config": null,
  "ensure_weight_tying": false,
  "eva_config": null,
  "exclude_modules": null,
  "fan_in_fan_out": false,
  "inference_mode": true,
  "init_lora_weights": true,
  "kasa_config": null,
  "layer_replication": null,
  "layers_pattern": null,
  "layers_to_transform": null,
  "loftq_config": {},
  "lora_alpha": 16,
  "lora_bias": false,
  "lora_dropout": 0.0,
  "lora_ga_config": null,
  "megatron_config": null,
  "megatron_core": "megatron.core",
  "modules_to_save": null,
  "monteclora_config": null,
  "peft_type": "LORA",
  "peft_version": "0.22.0",
  "qalora_group_size": 16,
  "r": 8,
  "rank_pattern": {
    "q_proj": 2
  },
  "revision": null,
  "target_modules": [
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.mlp.gate_proj",
    "model.layers.1.self_attn.v_proj.multiway.1",
    "model.layers.1.mlp.down_proj"
  ],
  "target_parameters": null,
  "task_type": "CAUSAL_LM",
  "trainable_token_indices": null,
  "use_bdlora": null,
  "use_dora": false,
  "use_qalora": false,
  "use_rslora": true,
  "velora_config": null
}"#;

fn tiny_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-onealign")
}

/// Deterministic LoRA matrices A `[r, in]`, B `[out, r]`.
fn pair(r: usize, out_dim: usize, in_dim: usize, seed: f32) -> (Tensor, Tensor) {
    let a: Vec<f32> = (0..r * in_dim)
        .map(|i| ((i as f32 * 0.37 + seed).sin()) * 0.2)
        .collect();
    let b: Vec<f32> = (0..out_dim * r)
        .map(|i| ((i as f32 * 0.53 + seed).cos()) * 0.2)
        .collect();
    (
        Tensor::from_vec(a, (r, in_dim), &Device::Cpu).unwrap(),
        Tensor::from_vec(b, (out_dim, r), &Device::Cpu).unwrap(),
    )
}

/// Writes an adapter folder with `config` and the matrices of `modules` (name, rank, out, in), keys
/// in PEFT's saved layout.
fn write_adapter(dir: &Path, config: &str, modules: &[(&str, usize, usize, usize)]) {
    std::fs::write(dir.join("adapter_config.json"), config).unwrap();
    let mut tensors = std::collections::HashMap::new();
    for (i, (m, r, o, n)) in modules.iter().enumerate() {
        let (a, b) = pair(*r, *o, *n, i as f32);
        tensors.insert(format!("base_model.model.{m}.lora_A.weight"), a);
        tensors.insert(format!("base_model.model.{m}.lora_B.weight"), b);
    }
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors")).unwrap();
}

const PATTERN_MODULES: [(&str, usize, usize, usize); 3] =
    [(Q, 2, 64, 64), (V1, 8, 64, 64), (DOWN, 8, 64, 172)];

fn edited(base: &str, edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let mut v: serde_json::Value = serde_json::from_str(base).unwrap();
    edit(&mut v);
    v.to_string()
}

fn load_with(
    config: &str,
    modules: &[(&str, usize, usize, usize)],
) -> qalign_model::Result<Adapter> {
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path(), config, modules);
    Adapter::load(dir.path())
}

fn close(got: f64, want: f64) {
    assert!((got - want).abs() < 1e-12, "factor {got}, PEFT's is {want}");
}

#[test]
fn rslora_rank_and_alpha_patterns_give_pefts_factors() {
    let adapter = load_with(PEFT_022_RSLORA_PATTERNS, &PATTERN_MODULES).unwrap();
    // q_proj: r 2 (rank_pattern), alpha 16 → 16/√2; down_proj: r 8, alpha 3 → 3/√8; v_proj: 16/√8.
    close(adapter.scale_of(Q).unwrap(), 11.313708498984761);
    close(adapter.scale_of(DOWN).unwrap(), 1.0606601717798212);
    close(adapter.scale_of(V1).unwrap(), 5.656854249492381);
}

#[test]
fn patterns_without_rslora_use_alpha_over_r() {
    let config = edited(PEFT_022_RSLORA_PATTERNS, |v| v["use_rslora"] = false.into());
    let adapter = load_with(&config, &PATTERN_MODULES).unwrap();
    close(adapter.scale_of(Q).unwrap(), 8.0);
    close(adapter.scale_of(DOWN).unwrap(), 0.375);
    close(adapter.scale_of(V1).unwrap(), 2.0);
}

#[test]
fn merged_weight_is_base_plus_module_factor_times_ba() {
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path(), PEFT_022_RSLORA_PATTERNS, &PATTERN_MODULES);
    let adapter = Adapter::load(dir.path()).unwrap();
    let store = Arc::new(WeightStore::open_dir(&tiny_model(), WeightFormat::Auto).unwrap());
    let plain = Weights::new(store.clone(), DType::F32, Device::Cpu);
    let merged = Weights::new(store, DType::F32, Device::Cpu)
        .with_adaptation(Some(Arc::new(adapter.merged_adaptation())));
    for (i, (m, r, o, n)) in PATTERN_MODULES.iter().enumerate() {
        let key = format!("{m}.weight");
        let w = plain.get_as(&[*o, *n], &key, DType::F32).unwrap();
        let got = merged.get_as(&[*o, *n], &key, DType::F32).unwrap();
        let (a, b) = pair(*r, *o, *n, i as f32);
        let scale = [11.313708498984761, 5.656854249492381, 1.0606601717798212][i];
        let want = (w + (b.matmul(&a).unwrap() * scale).unwrap()).unwrap();
        let err = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(err < 1e-6, "{m}: merged weight off by {err}");
    }
}

#[test]
fn a_rank_pattern_ignored_would_be_refused_not_misread() {
    // Matrices of rank 2 for q_proj without the rank_pattern entry: refused, naming the rank.
    let config = edited(PEFT_022_RSLORA_PATTERNS, |v| {
        v["rank_pattern"] = serde_json::json!({})
    });
    let err = load_with(&config, &PATTERN_MODULES)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("do not have rank 8") && err.contains(Q),
        "{err}"
    );
}

#[test]
fn pattern_keys_match_as_pefts_get_pattern_key() {
    // `(.*\.)?(key)$`: a whole trailing name, not any suffix of the last component.
    let config = edited(PEFT_022_RSLORA_PATTERNS, |v| {
        v["use_rslora"] = false.into();
        v["rank_pattern"] = serde_json::json!({"proj": 2});
        v["alpha_pattern"] = serde_json::json!({"layers.1.self_attn.v_proj.multiway.1": 4});
    });
    let modules = [(Q, 8, 64, 64), (V1, 8, 64, 64)];
    let adapter = load_with(&config, &modules).unwrap();
    close(adapter.scale_of(Q).unwrap(), 2.0);
    close(adapter.scale_of(V1).unwrap(), 0.5);
    let regex = edited(PEFT_022_RSLORA_PATTERNS, |v| {
        v["rank_pattern"] = serde_json::json!({".*q_proj": 2})
    });
    let err = load_with(&regex, &PATTERN_MODULES).unwrap_err().to_string();
    assert!(
        err.contains("rank_pattern") && err.contains(".*q_proj"),
        "{err}"
    );
}

#[test]
fn configs_peft_writes_without_a_task_type_or_with_a_regex_target_load() {
    let config = edited(PEFT_022_RSLORA_PATTERNS, |v| {
        v["task_type"] = serde_json::Value::Null;
        v["target_modules"] = r".*layers\.1\.self_attn\.(q_proj|o_proj)".into();
        v["init_lora_weights"] = "gaussian".into();
        v["fan_in_fan_out"] = true.into(); // PEFT resets it to false for nn.Linear
    });
    let adapter = load_with(&config, &PATTERN_MODULES).unwrap();
    assert_eq!(adapter.config.task_type, None);
    close(adapter.scale_of(V1).unwrap(), 5.656854249492381);
}

#[test]
fn settings_that_change_the_numbers_are_refused_by_name() {
    let cases: [(&str, serde_json::Value, &str); 9] = [
        ("use_dora", true.into(), "use_dora"),
        ("lora_bias", true.into(), "lora_bias"),
        ("bias", "all".into(), "bias = \"all\""),
        ("bias", "lora_only".into(), "bias = \"lora_only\""),
        (
            "modules_to_save",
            serde_json::json!(["model.visual_abstractor.visual_fc"]),
            "modules_to_save",
        ),
        (
            "init_lora_weights",
            "pissa".into(),
            "init_lora_weights = \"pissa\"",
        ),
        (
            "init_lora_weights",
            "olora".into(),
            "init_lora_weights = \"olora\"",
        ),
        (
            "layer_replication",
            serde_json::json!([[0, 2]]),
            "layer_replication",
        ),
        (
            "some_future_variant",
            serde_json::json!({"k": 1}),
            "some_future_variant",
        ),
    ];
    for (field, value, needle) in cases {
        let config = edited(PEFT_022_RSLORA_PATTERNS, |v| v[field] = value.clone());
        let err = load_with(&config, &PATTERN_MODULES)
            .expect_err(field)
            .to_string();
        assert!(err.contains(needle), "{field}: {err}");
    }
}

#[test]
fn pattern_fields_are_written_back_only_when_set() {
    // PEFT 0.4 (the official pin) refuses config fields it does not know.
    let plain = qalign_model::AdapterConfig::new(None, 8, 16.0, 0.05, vec![Q.into()]);
    let text = serde_json::to_string(&plain).unwrap();
    for field in [
        "rank_pattern",
        "alpha_pattern",
        "use_rslora",
        "peft_version",
    ] {
        assert!(!text.contains(field), "{text}");
    }
    let adapter = load_with(PEFT_022_RSLORA_PATTERNS, &PATTERN_MODULES).unwrap();
    let back: serde_json::Value = serde_json::to_value(&adapter.config).unwrap();
    assert_eq!(back["rank_pattern"], serde_json::json!({"q_proj": 2}));
    assert_eq!(back["alpha_pattern"], serde_json::json!({"down_proj": 3.0}));
    assert_eq!(back["use_rslora"], serde_json::json!(true));
}
