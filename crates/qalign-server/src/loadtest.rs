//! A load generator for a running server (`qalign loadtest`): N concurrent clients post M
//! requests of uploaded files and the run reports throughput and latency percentiles, so that
//! serving claims come from a measurement.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

/// What to send.
#[derive(Debug, Clone)]
pub struct LoadtestConfig {
    /// The server's base URL (`http://127.0.0.1:8080`).
    pub url: String,
    /// Clients sending at once.
    pub concurrency: usize,
    /// Requests in all.
    pub requests: usize,
    /// Files to upload, used in turn.
    pub files: Vec<PathBuf>,
    /// Files per request.
    pub files_per_request: usize,
    /// quality, aesthetics or all.
    pub task: String,
    pub api_key: Option<String>,
    pub timeout: Duration,
}

/// Latency percentiles, in milliseconds (nearest rank).
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub mean: f64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

/// The outcome of a run.
#[derive(Debug, Clone, Serialize)]
pub struct LoadtestReport {
    pub url: String,
    pub concurrency: usize,
    pub requests: usize,
    pub files_per_request: usize,
    pub task: String,
    /// Answers with status 200.
    pub ok: usize,
    /// Answers by status code, and `"error"` for requests that got no answer.
    pub statuses: BTreeMap<String, usize>,
    pub wall_s: f64,
    pub requests_per_s: f64,
    /// Files scored per second (200 answers only).
    pub images_per_s: f64,
    /// Of the 200 answers.
    pub latency_ms: Latency,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadtestError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("cannot start the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// Runs the load and reports; a failed request is counted, not fatal.
pub async fn run(config: LoadtestConfig) -> Result<LoadtestReport, LoadtestError> {
    if config.files.is_empty() {
        return Err(LoadtestError::Invalid("no file to upload".into()));
    }
    if config.concurrency == 0 || config.requests == 0 || config.files_per_request == 0 {
        return Err(LoadtestError::Invalid(
            "concurrency, requests and files per request must be at least 1".into(),
        ));
    }
    let mut files = Vec::with_capacity(config.files.len());
    for path in &config.files {
        let bytes = std::fs::read(path).map_err(|source| LoadtestError::Read {
            path: path.clone(),
            source,
        })?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "file".into());
        files.push((name, bytes));
    }
    let files = Arc::new(files);
    let client = reqwest::Client::builder().timeout(config.timeout).build()?;
    let endpoint = format!("{}/v1/score", config.url.trim_end_matches('/'));
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::with_capacity(config.concurrency);
    for _ in 0..config.concurrency.min(config.requests) {
        let (client, endpoint, next, files, config) = (
            client.clone(),
            endpoint.clone(),
            Arc::clone(&next),
            Arc::clone(&files),
            config.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= config.requests {
                    break;
                }
                let mut form = reqwest::multipart::Form::new().text("task", config.task.clone());
                for k in 0..config.files_per_request {
                    let (name, bytes) = &files[(i * config.files_per_request + k) % files.len()];
                    form = form.part(
                        "file",
                        reqwest::multipart::Part::bytes(bytes.clone()).file_name(name.clone()),
                    );
                }
                let mut request = client.post(&endpoint).multipart(form);
                if let Some(key) = &config.api_key {
                    request = request.bearer_auth(key);
                }
                let sent = Instant::now();
                let status = match request.send().await {
                    Ok(response) => {
                        let status = response.status().as_u16();
                        // The latency includes reading the whole answer.
                        match response.bytes().await {
                            Ok(_) => Some(status),
                            Err(_) => None,
                        }
                    }
                    Err(_) => None,
                };
                seen.push((status, sent.elapsed().as_secs_f64() * 1e3));
            }
            seen
        }));
    }
    let mut outcomes = Vec::with_capacity(config.requests);
    for worker in workers {
        outcomes.extend(worker.await.unwrap_or_default());
    }
    let wall_s = started.elapsed().as_secs_f64();
    let mut statuses = BTreeMap::new();
    let mut latencies = Vec::new();
    for (status, ms) in &outcomes {
        let key = status.map_or_else(|| "error".to_string(), |s| s.to_string());
        *statuses.entry(key).or_insert(0) += 1;
        if *status == Some(200) {
            latencies.push(*ms);
        }
    }
    let ok = latencies.len();
    Ok(LoadtestReport {
        url: config.url,
        concurrency: config.concurrency,
        requests: config.requests,
        files_per_request: config.files_per_request,
        task: config.task,
        ok,
        statuses,
        wall_s,
        requests_per_s: outcomes.len() as f64 / wall_s,
        images_per_s: (ok * config.files_per_request) as f64 / wall_s,
        latency_ms: latency(&mut latencies),
    })
}

/// Percentiles by nearest rank over the given samples (zeros when there are none).
pub fn latency(samples: &mut [f64]) -> Latency {
    if samples.is_empty() {
        return Latency {
            mean: 0.0,
            p50: 0.0,
            p95: 0.0,
            p99: 0.0,
            max: 0.0,
        };
    }
    samples.sort_by(f64::total_cmp);
    let rank = |p: f64| {
        let k = ((p / 100.0) * samples.len() as f64).ceil() as usize;
        samples[k.clamp(1, samples.len()) - 1]
    };
    Latency {
        mean: samples.iter().sum::<f64>() / samples.len() as f64,
        p50: rank(50.0),
        p95: rank(95.0),
        p99: rank(99.0),
        max: samples[samples.len() - 1],
    }
}

#[cfg(test)]
mod tests {
    use super::latency;

    #[test]
    fn nearest_rank_percentiles() {
        let mut samples: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        let l = latency(&mut samples);
        assert_eq!((l.p50, l.p95, l.p99, l.max), (50.0, 95.0, 99.0, 100.0));
        assert!((l.mean - 50.5).abs() < 1e-12);
        let one = latency(&mut [7.0]);
        assert_eq!((one.p50, one.p99), (7.0, 7.0));
        assert_eq!(latency(&mut []).max, 0.0);
    }
}
