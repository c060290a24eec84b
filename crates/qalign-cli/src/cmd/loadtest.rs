//! `qalign loadtest`: drive a running `qalign serve` with concurrent uploads and print the
//! throughput and latency percentiles as JSON.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use qalign_server::loadtest::{LoadtestConfig, run as run_load};

#[derive(clap::Args)]
pub struct Args {
    /// The server's base URL, e.g. http://127.0.0.1:8080.
    url: String,
    /// Clients sending at once.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    concurrency: u64,
    /// Requests in all.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
    requests: u64,
    /// Image or video files to upload (used in turn), or folders of them.
    #[arg(long, required = true, num_args = 1.., value_name = "PATH")]
    images: Vec<String>,
    /// Files per request.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    files_per_request: u64,
    /// quality, aesthetics or all.
    #[arg(long, default_value = "quality", value_parser = ["quality", "aesthetics", "all"])]
    task: String,
    /// Bearer token, when the server was started with --api-key.
    #[arg(long, env = "QALIGN_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Per-request client timeout.
    #[arg(long, default_value_t = 300.0, value_parser = crate::flags::positive)]
    timeout_s: f64,
}

pub fn run(args: Args) -> Result<ExitCode> {
    if !(args.url.starts_with("http://") || args.url.starts_with("https://")) {
        return Ok(crate::cmd::usage_error(&format!(
            "URL `{}`: expected http://HOST:PORT",
            args.url
        )));
    }
    let files: Vec<PathBuf> = crate::inputs::expand(&args.images)?;
    if files.is_empty() {
        bail!("no file found among --images");
    }
    let config = LoadtestConfig {
        url: args.url,
        concurrency: args.concurrency as usize,
        requests: args.requests as usize,
        files,
        files_per_request: args.files_per_request as usize,
        task: args.task,
        api_key: args.api_key,
        timeout: Duration::from_secs_f64(args.timeout_s),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = runtime
        .block_on(run_load(config))
        .context("load test failed")?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    // The report is printed either way; the exit code says whether the figures mean anything.
    if report.ok == report.requests {
        return Ok(ExitCode::SUCCESS);
    }
    let statuses = serde_json::to_string(&report.statuses)?;
    if report.ok == 0 {
        eprintln!(
            "error: no request succeeded (answers by status: {statuses}; \"error\": no answer). {}",
            failure_hint(&report.statuses)
        );
        return Ok(ExitCode::from(1));
    }
    eprintln!(
        "warning: {} of {} requests failed (answers by status: {statuses}); the figures are of the others",
        report.requests - report.ok,
        report.requests
    );
    Ok(ExitCode::from(3))
}

/// What the commonest failure usually means.
fn failure_hint(statuses: &std::collections::BTreeMap<String, usize>) -> &'static str {
    let commonest = statuses
        .iter()
        .filter(|(status, _)| status.as_str() != "200")
        .max_by_key(|(_, n)| **n)
        .map(|(status, _)| status.as_str());
    match commonest {
        Some("error") => "Is the server running at that URL?",
        Some("401") => "The server wants an API key: give --api-key (or QALIGN_API_KEY).",
        Some("422") => "The server could not read the files given with --images.",
        Some("503") => "The server was overloaded: lower --concurrency.",
        _ => "See the server's log.",
    }
}
