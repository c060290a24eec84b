//! `--quant` through the real binary: `qalign score --quant q8_0` on the tiny fixture model gives
//! scores within 0.03 of the official ones (the tiny model's bound, docs/PARITY.md), and every
//! record is still a well-formed one; an unknown type is a usage error (exit 2) naming the
//! choices, and `qalign info --quant q4k` lists the layers that fall back.

mod common;

use common::*;

#[test]
fn score_with_q8_0_stays_close_to_the_official_scores() {
    let r = run_expecting(
        score()
            .arg(images_dir())
            .args(["--task", "all", "--format", "json", "--quant", "q8_0"]),
        0,
    );
    assert!(
        r.stderr.contains(
            "33 linear layers as q8_0, 4 as f32 (input sizes that do not fit; `qalign info --quant q8_0` lists them)"
        ),
        "{}",
        r.stderr
    );
    let records = json_records(&r.stdout);
    assert_eq!(records.len(), 10, "5 images × 2 tasks");
    let mut max_dev: f64 = 0.0;
    for rec in &records {
        let want = num(&expected_task(&file_name(rec), rec["task"].as_str().unwrap())["score15"]);
        check_record_shape(rec, "image", "1-5");
        let dev = (num(&rec["score"]) - want).abs();
        assert!(dev <= 0.03, "{rec} vs {want}");
        max_dev = max_dev.max(dev);
    }
    eprintln!("qalign score --quant q8_0 on the tiny model: max |Δscore| {max_dev:.5}");
}

#[test]
fn unknown_quant_type_is_a_usage_error() {
    let image = images_dir().join("boy_colorful.jpg");
    let r = run_expecting(score().arg(&image).args(["--quant", "q3"]), 2);
    assert!(r.stderr.contains("--quant"), "{}", r.stderr);
    assert!(
        r.stderr
            .contains("unknown quantisation `q3`: expected q8_0 or q4k"),
        "{}",
        r.stderr
    );
    assert!(r.stdout.is_empty());
    let r = run_expecting(qalign().args(["info", "--quant", "q3"]), 2);
    assert!(r.stderr.contains("expected q8_0 or q4k"), "{}", r.stderr);
}

#[test]
fn quant_with_half_activations_is_refused_clearly() {
    let image = images_dir().join("boy_colorful.jpg");
    // A usage error (exit code 2), found before the model loads.
    let r = run_expecting(
        score()
            .arg(&image)
            .args(["--quant", "q4k", "--dtype", "bf16"]),
        2,
    );
    assert!(
        r.stderr
            .contains("--quant q4k runs with f32 activations: leave out --dtype bf16 or --quant"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("loading model"), "{}", r.stderr);
    assert!(r.stdout.is_empty());
    // Training a quantised model is a usage error too (`bench --train` takes no images).
    let r = run_expecting(
        qalign()
            .arg("bench")
            .arg("--model")
            .arg(tiny_model())
            .args(["--train", "--quant", "q8_0"]),
        2,
    );
    assert!(r.stderr.contains("--quant is for scoring"), "{}", r.stderr);
}

#[test]
fn info_lists_the_layers_that_fall_back() {
    let r = run_expecting(
        qalign()
            .arg("info")
            .arg(tiny_model())
            .args(["--quant", "q4k"]),
        0,
    );
    let out = &r.stdout;
    assert!(out.contains("--quant q4k"), "{out}");
    // 2 ViT layers × 4 + 2 abstractor layers × 7 + visual_fc + 2 LLM layers × 7.
    assert!(out.contains("37 linear layers"), "{out}");
    assert!(
        out.contains("2 × q4k   model.vision_model.encoder.layers.*.mlp.fc2"),
        "{out}"
    );
    assert!(
        out.contains("f32   model.layers.1.mlp.down_proj (in 172)"),
        "{out}"
    );
    assert!(
        out.contains("q8_0  model.layers.0.self_attn.{k,v}_proj.multiway.1 (in 64)"),
        "{out}"
    );
    let r = run_expecting(
        qalign()
            .arg("info")
            .arg(tiny_model())
            .args(["--quant", "q8_0", "--format", "json"]),
        0,
    );
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["quant"]["asked"], "q8_0");
    assert_eq!(v["quant"]["layers"].as_array().unwrap().len(), 37);
}
