//! Config parsing: the tiny model's config.json, the upstream class defaults when keys or the whole
//! visual_config are absent, and clear errors for configurations the network cannot be built from.

mod common;

use qalign_model::ModelError;
use qalign_model::config::{ModelConfig, MplugOwl2Config, RopeScaling};

fn resolve(json: &str) -> Result<ModelConfig, ModelError> {
    ModelConfig::resolve(&MplugOwl2Config::from_json_str(json).unwrap())
}

#[test]
fn tiny_config_resolves_to_its_dimensions() {
    let cfg = ModelConfig::from_file(&common::tiny_dir().join("config.json")).unwrap();
    let v = &cfg.vision;
    assert_eq!(
        (
            v.hidden_size,
            v.intermediate_size,
            v.num_layers,
            v.num_heads,
            v.head_dim
        ),
        (64, 256, 2, 4, 16)
    );
    assert_eq!(
        (
            v.image_size,
            v.patch_size,
            v.grid_size,
            v.num_positions,
            v.num_channels
        ),
        (448, 14, 32, 1025, 3)
    );
    assert_eq!(v.layer_norm_eps, 1e-6);
    let a = &cfg.abstractor;
    assert_eq!(
        (
            a.hidden_size,
            a.intermediate_size,
            a.num_layers,
            a.num_heads,
            a.head_dim,
            a.num_queries
        ),
        (64, 176, 2, 4, 16, 64)
    );
    assert_eq!(
        (
            a.grid_size,
            a.encoder_hidden_size,
            a.output_size,
            a.tokens_per_image()
        ),
        (32, 64, 64, 65)
    );
    assert_eq!(
        (a.attention_layer_norm_eps, a.ffn_layer_norm_eps),
        (1e-5, 1e-6)
    );
    let l = &cfg.llm;
    assert_eq!(
        (
            l.vocab_size,
            l.hidden_size,
            l.intermediate_size,
            l.num_layers,
            l.num_heads,
            l.num_kv_heads,
            l.head_dim
        ),
        (32000, 64, 172, 2, 4, 4, 16)
    );
    assert_eq!(
        (l.rms_norm_eps, l.rope_theta, l.max_position_embeddings),
        (1e-5, 10000.0, 4096)
    );
    assert_eq!(l.rope_scaling, RopeScaling::None);
    assert!(!l.tie_word_embeddings);
}

#[test]
fn empty_config_takes_the_official_class_defaults() {
    let cfg = resolve("{}").unwrap();
    let v = &cfg.vision;
    assert_eq!(
        (
            v.hidden_size,
            v.intermediate_size,
            v.num_layers,
            v.num_heads,
            v.image_size,
            v.patch_size
        ),
        (1024, 4096, 24, 16, 448, 14)
    );
    assert_eq!((v.num_positions, v.layer_norm_eps), (1025, 1e-6));
    let a = &cfg.abstractor;
    assert_eq!(
        (
            a.num_queries,
            a.hidden_size,
            a.num_layers,
            a.num_heads,
            a.intermediate_size,
            a.grid_size
        ),
        (64, 1024, 6, 16, 2816, 32)
    );
    assert_eq!((a.ffn_layer_norm_eps, a.output_size), (1e-6, 4096));
    let l = &cfg.llm;
    assert_eq!(
        (
            l.vocab_size,
            l.hidden_size,
            l.intermediate_size,
            l.num_layers,
            l.num_heads,
            l.num_kv_heads
        ),
        (32000, 4096, 11008, 32, 32, 32)
    );
    assert_eq!(
        (
            l.head_dim,
            l.rms_norm_eps,
            l.rope_theta,
            l.max_position_embeddings
        ),
        (128, 1e-6, 10000.0, 2048)
    );
}

#[test]
fn nulls_and_unknown_keys() {
    let cfg = resolve(
        r#"{"num_key_value_heads": null, "rope_scaling": null, "some_future_key": [1, 2],
            "visual_config": {"visual_abstractor": {"grid_size": null, "return_dict": true}, "visual_model": {}}}"#,
    )
    .unwrap();
    assert_eq!(cfg.llm.num_kv_heads, 32);
    assert_eq!(cfg.abstractor.grid_size, 32);
    assert_eq!(cfg.llm.rope_scaling, RopeScaling::None);
}

#[test]
fn grouped_query_heads_and_linear_rope_scaling() {
    let cfg =
        resolve(r#"{"num_key_value_heads": 8, "rope_scaling": {"type": "linear", "factor": 2.0}}"#)
            .unwrap();
    assert_eq!(cfg.llm.num_kv_heads, 8);
    assert_eq!(cfg.llm.rope_scaling, RopeScaling::Linear { factor: 2.0 });
}

fn config_error(json: &str) -> String {
    match resolve(json) {
        Err(e @ ModelError::Config { .. }) => e.to_string(),
        other => panic!("expected a config error for {json}, got {other:?}"),
    }
}

#[test]
fn unsupported_configs_are_rejected_with_the_reason() {
    assert!(
        config_error(r#"{"rope_scaling": {"type": "dynamic", "factor": 2.0}}"#)
            .contains("rope_scaling")
    );
    assert!(config_error(r#"{"hidden_size": 100}"#).contains("32 attention heads"));
    assert!(config_error(r#"{"num_key_value_heads": 5}"#).contains("num_key_value_heads"));
    assert!(config_error(r#"{"hidden_act": "gelu"}"#).contains("gelu"));
    assert!(
        config_error(r#"{"visual_config": {"visual_model": {"image_size": 450}}}"#)
            .contains("patch_size")
    );
    assert!(
        config_error(r#"{"visual_config": {"visual_model": {"image_size": 224}}}"#)
            .contains("grid_size")
    );
    assert!(
        config_error(r#"{"visual_config": {"visual_abstractor": {"encoder_hidden_size": 768}}}"#)
            .contains("encoder_hidden_size")
    );
}

#[test]
fn config_file_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(&path, r#"{"hidden_size": "big"}"#).unwrap();
    let err = ModelConfig::from_file(&path).unwrap_err();
    assert!(matches!(err, ModelError::Json { .. }), "{err:?}");
    assert!(err.to_string().contains("config.json"));
    std::fs::write(&path, r#"{"hidden_size": 100}"#).unwrap();
    let err = ModelConfig::from_file(&path).unwrap_err();
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
    let err = ModelConfig::from_file(&dir.path().join("absent.json")).unwrap_err();
    assert!(matches!(err, ModelError::Io { .. }), "{err:?}");
}
