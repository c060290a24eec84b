//! `qalign loadtest`: drive a running `qalign serve` with concurrent uploads and print the
//! throughput and latency percentiles as JSON.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use qalign_server::loadtest::{
    LoadtestConfig, LoadtestReport, MAX_REQUESTS, check_url, run as run_load,
};

#[derive(clap::Args)]
pub struct Args {
    /// The server's base URL, e.g. http://127.0.0.1:8080 (requests go to URL/v1/score).
    url: String,
    /// Clients sending at once.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    concurrency: u64,
    /// Requests in all (at most 10 000 000).
    #[arg(long, default_value_t = 256,
          value_parser = clap::value_parser!(u64).range(1..=MAX_REQUESTS as u64))]
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
    /// Per-request client timeout in seconds (at most a day).
    #[arg(long, default_value_t = 300.0, value_parser = crate::flags::seconds)]
    timeout_s: f64,
}

pub fn run(args: Args) -> Result<ExitCode> {
    if let Err(message) = check_url(&args.url) {
        return Ok(crate::cmd::usage_error(&message));
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
    let report = runtime.block_on(async {
        let stop = interruption()?;
        run_load(config, stop).await.context("load test failed")
    })?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    // The report is printed either way; the exit code says whether the figures mean anything.
    Ok(ExitCode::from(verdict(&report)))
}

/// Completes at the first Ctrl-C (SIGINT); the handler is in place, and the default of dying
/// without a report replaced, from the moment this returns.
fn interruption() -> Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut sigint = signal(SignalKind::interrupt()).context("cannot catch Ctrl-C")?;
        Ok(async move {
            if sigint.recv().await.is_none() {
                std::future::pending::<()>().await;
            }
        })
    }
    #[cfg(not(unix))]
    Ok(async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    })
}

/// The exit code of a run, with what went wrong on stderr.
fn verdict(report: &LoadtestReport) -> u8 {
    let statuses = serde_json::to_string(&report.statuses).unwrap_or_default();
    if let Some(error) = &report.first_error {
        eprintln!("first request without an answer: {error}");
    }
    if report.interrupted {
        eprintln!(
            "interrupted after {} of {} requests ({} answered 200; answers by status: {statuses}); \
             the figures are of the 200 answers among those",
            report.completed, report.requests, report.ok
        );
        return crate::cmd::EXIT_INTERRUPTED;
    }
    if report.ok == report.requests {
        return 0;
    }
    if report.ok == 0 {
        eprintln!(
            "error: no request succeeded (answers by status: {statuses}; \"timeout\": past \
             --timeout-s, \"error\": no answer). {}",
            failure_hint(&report.statuses)
        );
        return crate::cmd::EXIT_ERROR;
    }
    eprintln!(
        "warning: {} of {} requests failed (answers by status: {statuses}); the figures are of the others. {}",
        report.requests - report.ok,
        report.requests,
        failure_hint(&report.statuses)
    );
    crate::cmd::EXIT_PARTIAL
}

/// What the commonest failure usually means.
fn failure_hint(statuses: &BTreeMap<String, usize>) -> &'static str {
    let commonest = statuses
        .iter()
        .filter(|(status, _)| status.as_str() != "200")
        .max_by_key(|(_, n)| **n)
        .map(|(status, _)| status.as_str());
    match commonest {
        Some("error") => "Is the server running at that URL?",
        Some("timeout") => {
            "The server answered too slowly: raise --timeout-s or lower --concurrency."
        }
        Some("401") => "The server wants an API key: give --api-key (or QALIGN_API_KEY).",
        Some("404" | "405") => {
            "Nothing answers at URL/v1/score: give the server's base URL (http://HOST:PORT)."
        }
        Some("422") => "The server could not read the files given with --images.",
        Some("503") => "The server was overloaded: lower --concurrency.",
        _ => "See the server's log.",
    }
}
