//! `qalign info MODEL`: what a checkpoint folder holds (resolved config, parameter counts per
//! part, dtypes on disk, files), read from headers only, so it is instant even for 16 GB.

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::ValueEnum;
use qalign_model::hub::{DEFAULT_MODEL, offline_from_env, resolve_model};
use qalign_model::summary::summarize;

use crate::cmd::score::WeightsArg;

#[derive(Copy, Clone, Debug, ValueEnum)]
enum InfoFormat {
    Text,
    Json,
}

#[derive(clap::Args)]
pub struct Args {
    /// Model folder or Hugging Face hub id.
    #[arg(default_value = DEFAULT_MODEL)]
    model: String,
    /// Never touch the network (also set by HF_HUB_OFFLINE=1).
    #[arg(long)]
    offline: bool,
    /// Which weight files to read when a folder has several layouts.
    #[arg(long, value_enum, default_value = "auto")]
    weights: WeightsArg,
    #[arg(long, value_enum, default_value = "text")]
    format: InfoFormat,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let resolved = resolve_model(&args.model, args.offline || offline_from_env())?;
    let summary = summarize(&resolved.dir, args.weights.into())
        .with_context(|| format!("cannot read the checkpoint in {}", resolved.dir.display()))?;
    match args.format {
        InfoFormat::Json => println!("{}", serde_json::to_string_pretty(&summary)?),
        InfoFormat::Text => {
            let c = &summary.config;
            println!("model        {}", summary.dir.display());
            if let Some(id) = &resolved.hub_id {
                println!("hub id       {id}");
            }
            println!(
                "vision       {} px, patch {}, {} layers, width {}, {} heads, MLP {}, LN eps {:e}",
                c.vision.image_size,
                c.vision.patch_size,
                c.vision.num_layers,
                c.vision.hidden_size,
                c.vision.num_heads,
                c.vision.intermediate_size,
                c.vision.layer_norm_eps
            );
            println!(
                "abstractor   {} queries (+eos = {} tokens per image), {} layers, width {}, {} heads, MLP {}",
                c.abstractor.num_queries,
                c.abstractor.tokens_per_image(),
                c.abstractor.num_layers,
                c.abstractor.hidden_size,
                c.abstractor.num_heads,
                c.abstractor.intermediate_size
            );
            println!(
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
            );
            println!("parameters");
            for part in &summary.parts {
                println!(
                    "  {:<11}{:>15}  ({} tensors)",
                    part.part,
                    group(part.parameters),
                    part.tensors
                );
            }
            println!("  {:<11}{:>15}", "total", group(summary.total_parameters()));
            println!(
                "  {:<11}{:>15}  ({} tensors, fixed sin-cos tables)",
                "buffers",
                group(summary.buffers.parameters),
                summary.buffers.tensors
            );
            if summary.ignored > 0 {
                println!(
                    "  ignored    {} rotary inv_freq tensors (recomputed)",
                    summary.ignored
                );
            }
            let dtypes: Vec<String> = summary
                .dtypes
                .iter()
                .map(|(d, n)| format!("{d} ({})", group(*n)))
                .collect();
            println!("dtype on disk {}", dtypes.join(", "));
            println!("weights      {} ", summary.format);
            if let Some(index) = &summary.index {
                println!("  {}", index.display());
            }
            for f in &summary.weight_files {
                println!("  {}", f.display());
            }
            println!("other files  {}", summary.other_files.join(", "));
        }
    }
    Ok(ExitCode::SUCCESS)
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
