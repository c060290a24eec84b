//! `qalign info MODEL`: what a checkpoint folder holds (resolved config, parameter counts per
//! part, dtypes on disk, files), read from headers only, so it is instant even for 16 GB.
//! A config.json that does not describe the weights beside it (another architecture, sizes that
//! differ from the tensors) is an error rather than a page of defaults; keys it lacks, which
//! silently take the mPLUG-Owl2 class defaults, are named in a warning.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use qalign_model::hub::{DEFAULT_MODEL, offline_from_env, resolve_model_at};
use qalign_model::summary::{CheckpointSummary, summarize};
use qalign_model::{ModelConfig, Quant, QuantReport, WeightStore};
use serde_json::Value;

use crate::cmd::score::WeightsArg;

#[derive(Copy, Clone, Debug, ValueEnum)]
enum InfoFormat {
    Text,
    Json,
}

#[derive(clap::Args)]
pub struct Args {
    /// Model folder or Hugging Face hub id (default: `$QALIGN_MODEL`, else q-future/one-align).
    #[arg(default_value = DEFAULT_MODEL, env = "QALIGN_MODEL")]
    model: String,
    /// The branch, tag or commit hash of a hub id (default: main).
    #[arg(long, value_name = "REV", value_parser = crate::flags::revision)]
    revision: Option<String>,
    /// Never touch the network (also set by HF_HUB_OFFLINE=1 or TRANSFORMERS_OFFLINE=1).
    #[arg(long)]
    offline: bool,
    /// Which weight files to read when a folder has several layouts.
    #[arg(long, value_enum, default_value = "auto")]
    weights: WeightsArg,
    #[arg(long, value_enum, default_value = "text")]
    format: InfoFormat,
    /// Also show which storage each linear layer would get with `--quant TYPE` (q8_0 or q4k) on
    /// score/bench, worked out from config.json: the layers per kind, and those that fall back to
    /// q8_0 or f32 because their input size does not fit the format's block.
    #[arg(long, value_name = "TYPE")]
    quant: Option<Quant>,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let offline = args.offline || offline_from_env();
    let resolved = resolve_model_at(&args.model, args.revision.as_deref(), offline)?;
    let summary = summarize(&resolved.dir, args.weights.into()).map_err(|e| {
        crate::output::context_naming(e, &resolved.dir, "cannot read the checkpoint", |d| {
            format!("cannot read the checkpoint in {d}")
        })
    })?;
    check_config(&resolved.dir, &summary, args.weights)?;
    let plan = args.quant.map(|q| QuantReport::plan(&summary.config, q));
    let mut w = crate::output::stdout();
    match args.format {
        InfoFormat::Json => {
            let mut value = serde_json::to_value(&summary)?;
            if let (Some(plan), Value::Object(map)) = (&plan, &mut value) {
                map.insert("quant".into(), serde_json::to_value(plan)?);
            }
            writeln!(w, "{}", serde_json::to_string_pretty(&value)?)?
        }
        InfoFormat::Text => {
            let c = &summary.config;
            writeln!(w, "model        {}", summary.dir.display())?;
            if let Some(id) = &resolved.hub_id {
                writeln!(w, "hub id       {id}")?;
            }
            if let Some(revision) = &resolved.revision {
                writeln!(w, "revision     {revision}")?;
            }
            writeln!(
                w,
                "vision       {} px, patch {}, {} layers, width {}, {} heads, MLP {}, LN eps {:e}",
                c.vision.image_size,
                c.vision.patch_size,
                c.vision.num_layers,
                c.vision.hidden_size,
                c.vision.num_heads,
                c.vision.intermediate_size,
                c.vision.layer_norm_eps
            )?;
            writeln!(
                w,
                "abstractor   {} queries (+eos = {} tokens per image), {} layers, width {}, {} heads, MLP {}",
                c.abstractor.num_queries,
                c.abstractor.tokens_per_image(),
                c.abstractor.num_layers,
                c.abstractor.hidden_size,
                c.abstractor.num_heads,
                c.abstractor.intermediate_size
            )?;
            writeln!(
                w,
                "llm          {} layers, hidden {}, {} heads ({} kv), MLP {}, vocab {}, RMSNorm eps {:e}, rope θ {}, context {}",
                c.llm.num_layers,
                c.llm.hidden_size,
                c.llm.num_heads,
                c.llm.num_kv_heads,
                c.llm.intermediate_size,
                c.llm.vocab_size,
                c.llm.rms_norm_eps,
                c.llm.rope_theta,
                c.llm.max_position_embeddings
            )?;
            writeln!(w, "parameters")?;
            for part in &summary.parts {
                writeln!(
                    w,
                    "  {:<11}{:>15}  ({} tensors)",
                    part.part,
                    group(part.parameters),
                    part.tensors
                )?;
            }
            writeln!(
                w,
                "  {:<11}{:>15}",
                "total",
                group(summary.total_parameters())
            )?;
            writeln!(
                w,
                "  {:<11}{:>15}  ({} tensors, fixed sin-cos tables)",
                "buffers",
                group(summary.buffers.parameters),
                summary.buffers.tensors
            )?;
            if summary.ignored > 0 {
                writeln!(
                    w,
                    "  ignored    {} rotary inv_freq tensors (recomputed)",
                    summary.ignored
                )?;
            }
            let dtypes: Vec<String> = summary
                .dtypes
                .iter()
                .map(|(d, n)| format!("{d} ({})", group(*n)))
                .collect();
            writeln!(w, "dtype on disk {}", dtypes.join(", "))?;
            writeln!(w, "weights      {} ", summary.format)?;
            if let Some(index) = &summary.index {
                writeln!(w, "  {}", index.display())?;
            }
            for f in &summary.weight_files {
                writeln!(w, "  {}", f.display())?;
            }
            writeln!(w, "other files  {}", summary.other_files.join(", "))?;
            if let Some(plan) = &plan {
                write_quant_plan(&mut w, plan)?;
            }
        }
    }
    w.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// The storage of each kind of linear layer under `--quant`, then every layer that falls back.
fn write_quant_plan(w: &mut impl Write, plan: &QuantReport) -> Result<()> {
    let format = |f: Option<Quant>| f.map_or("f32", Quant::as_str);
    writeln!(
        w,
        "--quant {}   {} linear layers, {} fall back",
        plan.asked,
        plan.layers.len(),
        plan.fallbacks().count()
    )?;
    for kind in plan.kinds() {
        writeln!(
            w,
            "  {:>4} × {:<5} {}",
            kind.count,
            format(kind.format),
            kind.kind
        )?;
    }
    let fallbacks: Vec<_> = plan.fallbacks().collect();
    if !fallbacks.is_empty() {
        writeln!(
            w,
            "fall back (input size not a multiple of {}):",
            plan.asked.block_size()
        )?;
        for layer in fallbacks {
            writeln!(
                w,
                "  {:<5} {} (in {})",
                format(layer.format),
                layer.name,
                layer.in_dim
            )?;
        }
    }
    Ok(())
}

/// The `model_type` of an mPLUG-Owl2 / OneAlign config.json.
const MODEL_TYPE: &str = "mplug_owl2";

/// Size keys of config.json that transformers always writes; when one is absent the class
/// default (OneAlign's size) is used without a word, so info names them.
const TOP_KEYS: &[&str] = &[
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "rms_norm_eps",
    "visual_config",
];
const VISION_KEYS: &[&str] = &[
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "image_size",
    "patch_size",
    "layer_norm_eps",
];
const ABSTRACTOR_KEYS: &[&str] = &[
    "num_learnable_queries",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "encoder_hidden_size",
    "layer_norm_eps",
];

/// Warns about keys config.json lacks and fails when it names another architecture or sizes
/// that differ from the stored tensors.
fn check_config(dir: &Path, summary: &CheckpointSummary, weights: WeightsArg) -> Result<()> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let raw: Value =
        serde_json::from_str(&text).with_context(|| format!("cannot parse {}", path.display()))?;
    if let Some(kind) = raw.get("model_type").and_then(Value::as_str)
        && kind != MODEL_TYPE
    {
        bail!(
            "{} is for model_type `{kind}`, not `{MODEL_TYPE}` (mPLUG-Owl2 / OneAlign): \
             this folder holds another kind of model",
            path.display()
        );
    }
    let missing = missing_keys(&raw);
    if !missing.is_empty() {
        eprintln!(
            "warning: {} lacks {}: the mPLUG-Owl2 defaults (OneAlign's sizes) are used for them",
            path.display(),
            missing.join(", ")
        );
    }
    if summary.format == "gguf" {
        // Written by `qalign quantize` from this config; loading checks every shape.
        return Ok(());
    }
    let store = WeightStore::open_dir(dir, weights.into())
        .with_context(|| format!("cannot read the weights in {}", dir.display()))?;
    let problems = shape_mismatches(&summary.config, &store);
    if !problems.is_empty() {
        bail!(
            "{} does not describe the weights beside it:\n  {}",
            path.display(),
            problems.join("\n  ")
        );
    }
    Ok(())
}

fn missing_keys(raw: &Value) -> Vec<String> {
    let mut missing: Vec<String> = TOP_KEYS
        .iter()
        .filter(|k| raw.get(**k).is_none())
        .map(|k| k.to_string())
        .collect();
    if let Some(visual) = raw.get("visual_config") {
        for (part, keys) in [
            ("visual_model", VISION_KEYS),
            ("visual_abstractor", ABSTRACTOR_KEYS),
        ] {
            match visual.get(part) {
                None => missing.push(format!("visual_config.{part}")),
                Some(section) => missing.extend(
                    keys.iter()
                        .filter(|k| section.get(**k).is_none())
                        .map(|k| format!("visual_config.{part}.{k}")),
                ),
            }
        }
    }
    missing
}

/// Each way the stored tensors contradict the config: shapes of one tensor per kind of layer
/// and of the LM head (which scoring needs), and layer counts.
fn shape_mismatches(c: &ModelConfig, store: &WeightStore) -> Vec<String> {
    let (v, a, l) = (&c.vision, &c.abstractor, &c.llm);
    let expected: [(&str, Vec<usize>); 9] = [
        (
            "model.embed_tokens.weight",
            vec![l.vocab_size, l.hidden_size],
        ),
        (
            "model.layers.0.mlp.gate_proj.weight",
            vec![l.intermediate_size, l.hidden_size],
        ),
        (
            "model.layers.0.self_attn.k_proj.multiway.0.weight",
            vec![l.num_kv_heads * l.head_dim, l.hidden_size],
        ),
        (
            "model.vision_model.embeddings.patch_embed.weight",
            vec![v.hidden_size, v.num_channels, v.patch_size, v.patch_size],
        ),
        (
            "model.vision_model.embeddings.position_embedding",
            vec![1, v.num_positions, v.hidden_size],
        ),
        (
            "model.vision_model.encoder.layers.0.mlp.fc1.weight",
            vec![v.intermediate_size, v.hidden_size],
        ),
        (
            "model.visual_abstractor.query_embeds",
            vec![1, a.num_queries, a.hidden_size],
        ),
        (
            "model.visual_abstractor.encoder.layers.0.crossattention.output.mlp.w1.weight",
            vec![a.intermediate_size, a.hidden_size],
        ),
        (
            "model.visual_abstractor.visual_fc.weight",
            vec![a.output_size, a.hidden_size],
        ),
    ];
    let mut problems = Vec::new();
    // Scoring reads the level logits from the LM head; with tied embeddings a missing head is
    // the embedding table (whose shape is checked above).
    let lm_head = "lm_head.weight";
    let head = (!l.tie_word_embeddings || store.entry(lm_head).is_some())
        .then(|| (lm_head, vec![l.vocab_size, l.hidden_size]));
    for (key, shape) in expected.into_iter().chain(head) {
        match store.entry(key) {
            None => problems.push(format!("the weights have no `{key}`")),
            Some((stored, _)) if stored != shape.as_slice() => problems.push(format!(
                "`{key}` is {stored:?} in the weights, {shape:?} by the config"
            )),
            Some(_) => {}
        }
    }
    let keys = store.keys();
    for (prefix, layers, what) in [
        ("model.layers.", l.num_layers, "num_hidden_layers"),
        (
            "model.vision_model.encoder.layers.",
            v.num_layers,
            "visual_model.num_hidden_layers",
        ),
        (
            "model.visual_abstractor.encoder.layers.",
            a.num_layers,
            "visual_abstractor.num_hidden_layers",
        ),
    ] {
        let stored = layer_count(&keys, prefix);
        if stored != layers {
            problems.push(format!(
                "{what} is {layers} but the weights hold {stored} such layers"
            ));
        }
    }
    problems
}

/// Distinct layer numbers N among keys `<prefix>N.…`.
fn layer_count(keys: &[&str], prefix: &str) -> usize {
    keys.iter()
        .filter_map(|k| {
            k.strip_prefix(prefix)?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .collect::<BTreeSet<_>>()
        .len()
}

/// 8197859328 → "8,197,859,328".
fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}
