//! `qalign serve`: the HTTP server. Parses the flags into a validated [`ServerConfig`] and hands
//! it, with a loader for the model, to `qalign-server`; the model loads on the engine thread
//! while the socket already answers `/health` with 503.

use std::net::{IpAddr, SocketAddr};

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use qalign_server::{EngineConfig, Limits, ServerConfig, ServerEvent};

use crate::cmd::bench::load_scorer;
use crate::cmd::score::ModelArgs;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Build the network of --model's config.json with random weights instead of reading a
    /// checkpoint: for load tests only, the scores are meaningless.
    #[arg(long)]
    random_weights: bool,
    /// Address to listen on. Anything but loopback is reachable from other machines: pair it
    /// with --api-key.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port to listen on (0: any free port; the address is printed to stderr).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require `Authorization: Bearer <KEY>` on /v1/*.
    #[arg(long, env = "QALIGN_API_KEY", hide_env_values = true, value_parser = non_empty)]
    api_key: Option<String>,
    /// Files per engine batch (requests are gathered into batches up to this size).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=1024))]
    max_batch_size: u64,
    /// How long a batch waits for more requests before it runs, in milliseconds.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    max_wait_ms: u64,
    /// Scoring requests in flight (uploading, queued or running); the next one gets 503 with
    /// Retry-After.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    max_concurrent_requests: u64,
    /// Files in one request; more get 422.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    max_client_batch_size: u64,
    /// Size of one request body, in MiB; larger gets 413.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=65_536))]
    max_body_mb: u64,
    /// Time from a request's arrival to its answer, upload included; past it, 504.
    #[arg(long, default_value_t = 120.0, value_parser = crate::flags::seconds)]
    request_timeout_s: f64,
    /// After SIGTERM/SIGINT, how long accepted requests may take to finish.
    #[arg(long, default_value_t = 30.0, value_parser = crate::flags::seconds)]
    shutdown_grace_s: f64,
    /// Apply the EXIF orientation tag before scoring (off, as in the official code).
    #[arg(long)]
    exif_orientation: bool,
}

fn non_empty(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        return Err("must not be empty".into());
    }
    Ok(s.to_string())
}

pub fn run(args: Args) -> Result<ExitCode> {
    if let Some(message) = args.model.random_weights_conflict(args.random_weights) {
        return Ok(crate::cmd::usage_error(&message));
    }
    let builder = args.model.builder().exif_orientation(args.exif_orientation);
    let dir = builder.resolve()?;
    let options = builder.scorer_options()?;
    let config_json = std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok());
    let config = ServerConfig {
        engine: EngineConfig {
            max_batch_size: args.max_batch_size as usize,
            max_wait: Duration::from_millis(args.max_wait_ms),
            queue_capacity: args.max_concurrent_requests as usize,
        },
        limits: Limits {
            max_concurrent_requests: args.max_concurrent_requests as usize,
            max_client_batch_size: args.max_client_batch_size as usize,
            max_body_bytes: (args.max_body_mb as usize).saturating_mul(1 << 20),
            request_timeout: Duration::from_secs_f64(args.request_timeout_s),
        },
        api_key: args.api_key.clone(),
        shutdown_grace: Duration::from_secs_f64(args.shutdown_grace_s),
        model_info: serde_json::json!({
            "model": args.model.model,
            "dir": dir.display().to_string(),
            "weights": if args.random_weights { "random" } else { "checkpoint" },
            "device": args.model.device.to_string(),
            "dtype": qalign_model::Dtype::from(args.model.dtype).to_string(),
            "quant": args.model.quant.map(|q| q.to_string()),
            "lora": args.model.lora.as_ref().map(|p| p.display().to_string()),
            "config": config_json,
        }),
    };
    if !args.host.is_loopback() && args.api_key.is_none() {
        eprintln!(
            "warning: listening on {} without --api-key: anyone who can reach this machine can use the server",
            args.host
        );
    }
    eprintln!("loading model from {}", dir.display());
    let random = args.random_weights;
    let mut options = options;
    options.load.on_progress = Some(crate::progress::load_log());
    let load = move || load_scorer(&dir, &options, random).map_err(|e| format!("{e:#}"));
    let events = Arc::new(|event: ServerEvent| match event {
        ServerEvent::Listening(addr) => eprintln!("listening on http://{addr}"),
        ServerEvent::ModelLoaded { seconds } => {
            eprintln!("model loaded in {seconds:.1} s; ready")
        }
        ServerEvent::ShuttingDown => {
            eprintln!("shutting down: finishing accepted requests")
        }
        ServerEvent::Stopped => eprintln!("stopped"),
    });
    qalign_server::serve(SocketAddr::new(args.host, args.port), config, load, events)?;
    Ok(ExitCode::SUCCESS)
}
