//! A load generator for a running server (`qalign loadtest`): N concurrent clients post M
//! requests of uploaded files and the run reports throughput and latency percentiles, so that
//! serving claims come from a measurement.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

/// The most requests one run may send. Each 200 answer keeps its latency (8 bytes) for the
/// percentiles, so this bounds what a run holds (80 MB).
pub const MAX_REQUESTS: usize = 10_000_000;

/// The longest per-request timeout (a day).
pub const MAX_TIMEOUT: Duration = Duration::from_secs(86_400);

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

/// Latency in milliseconds; percentiles by nearest rank (numpy's `percentile(method="inverted_cdf")`).
#[derive(Debug, Clone, PartialEq, Serialize)]
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
    /// Requests asked for.
    pub requests: usize,
    pub files_per_request: usize,
    pub task: String,
    /// Requests that finished: all of `requests` unless the run was interrupted.
    pub completed: usize,
    /// Stopped early (Ctrl-C): requests in flight were dropped, the figures are of `completed`.
    pub interrupted: bool,
    /// Answers with status 200.
    pub ok: usize,
    /// Finished requests by status code; `"timeout"` for those past the client timeout and
    /// `"error"` for those that got no answer otherwise (connection refused, reset, …).
    pub statuses: BTreeMap<String, usize>,
    /// Why the first request without an answer failed.
    pub first_error: Option<String>,
    /// From the first request sent to the last one finished (or the interruption).
    pub wall_s: f64,
    /// 200 answers per second of `wall_s`.
    pub requests_per_s: f64,
    /// Files scored per second of `wall_s` (200 answers only).
    pub images_per_s: f64,
    /// Of the 200 answers only (`null` when there was none), from sending the request to
    /// reading the whole answer.
    pub latency_ms: Option<Latency>,
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

/// How one request ended.
enum Outcome {
    Answer(u16),
    Timeout(String),
    Failed(String),
}

/// Runs the load and reports; a failed request is counted, not fatal. When `stop` completes
/// first (Ctrl-C), requests in flight are dropped and the report covers those that finished.
pub async fn run(
    config: LoadtestConfig,
    stop: impl Future<Output = ()>,
) -> Result<LoadtestReport, LoadtestError> {
    check_url(&config.url).map_err(LoadtestError::Invalid)?;
    if config.files.is_empty() {
        return Err(LoadtestError::Invalid("no file to upload".into()));
    }
    if config.concurrency == 0 || config.requests == 0 || config.files_per_request == 0 {
        return Err(LoadtestError::Invalid(
            "concurrency, requests and files per request must be at least 1".into(),
        ));
    }
    if config.requests > MAX_REQUESTS {
        return Err(LoadtestError::Invalid(format!(
            "at most {MAX_REQUESTS} requests per run"
        )));
    }
    if config.timeout.is_zero() || config.timeout > MAX_TIMEOUT {
        return Err(LoadtestError::Invalid(format!(
            "the timeout must be above 0 and at most {} s",
            MAX_TIMEOUT.as_secs()
        )));
    }
    // Only the files the run will send are read.
    let used = config
        .files
        .len()
        .min(config.requests.saturating_mul(config.files_per_request));
    let mut files = Vec::with_capacity(used);
    for path in &config.files[..used] {
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
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Outcome, f64)>(1024);
    let started = Instant::now();
    let mut workers = Vec::with_capacity(config.concurrency.min(config.requests));
    for _ in 0..config.concurrency.min(config.requests) {
        let (client, endpoint, next, files, config, tx) = (
            client.clone(),
            endpoint.clone(),
            Arc::clone(&next),
            Arc::clone(&files),
            config.clone(),
            tx.clone(),
        );
        workers.push(tokio::spawn(async move {
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
                // The latency includes reading the whole answer.
                let outcome = match request.send().await {
                    Ok(response) => {
                        let status = response.status().as_u16();
                        match response.bytes().await {
                            Ok(_) => Outcome::Answer(status),
                            Err(e) => failure(&e),
                        }
                    }
                    Err(e) => failure(&e),
                };
                let ms = sent.elapsed().as_secs_f64() * 1e3;
                if tx.send((outcome, ms)).await.is_err() {
                    break;
                }
            }
        }));
    }
    drop(tx);
    let mut tally = Tally::default();
    tokio::pin!(stop);
    let interrupted = loop {
        // Unbiased, so that a flood of instant failures cannot starve the interruption.
        tokio::select! {
            got = rx.recv() => match got {
                Some((outcome, ms)) => tally.add(outcome, ms),
                None => break false,
            },
            _ = &mut stop => break true,
        }
    };
    let wall_s = started.elapsed().as_secs_f64();
    if interrupted {
        for worker in &workers {
            worker.abort();
        }
        while let Ok((outcome, ms)) = rx.try_recv() {
            tally.add(outcome, ms);
        }
    }
    let ok = tally.latencies.len();
    Ok(LoadtestReport {
        url: config.url,
        concurrency: config.concurrency,
        requests: config.requests,
        files_per_request: config.files_per_request,
        task: config.task,
        completed: tally.completed,
        interrupted,
        ok,
        statuses: tally.statuses,
        first_error: tally.first_error,
        wall_s,
        requests_per_s: ok as f64 / wall_s,
        images_per_s: (ok * config.files_per_request) as f64 / wall_s,
        latency_ms: latency(&mut tally.latencies),
    })
}

/// Checks that `url` is a server's base URL (`http://HOST:PORT`, maybe with a path prefix),
/// saying what is wrong if not.
pub fn check_url(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| format!("URL `{url}`: {e}; expected http://HOST:PORT"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("URL `{url}`: expected http://HOST:PORT"));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(format!("URL `{url}`: no host; expected http://HOST:PORT"));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(format!(
            "URL `{url}`: give the server's base URL, without `?` or `#`"
        ));
    }
    if parsed.path().trim_end_matches('/').ends_with("/v1/score") {
        return Err(format!(
            "URL `{url}`: give the server's base URL (http://HOST:PORT); /v1/score is added to it"
        ));
    }
    Ok(())
}

/// A request that got no answer, with the error's causes in words.
fn failure(e: &reqwest::Error) -> Outcome {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    if e.is_timeout() {
        Outcome::Timeout(text)
    } else {
        Outcome::Failed(text)
    }
}

/// The finished requests, counted as they arrive.
#[derive(Default)]
struct Tally {
    completed: usize,
    statuses: BTreeMap<String, usize>,
    first_error: Option<String>,
    /// Of the 200 answers only.
    latencies: Vec<f64>,
}

impl Tally {
    fn add(&mut self, outcome: Outcome, ms: f64) {
        self.completed += 1;
        let key = match outcome {
            Outcome::Answer(status) => {
                if status == 200 {
                    self.latencies.push(ms);
                }
                status.to_string()
            }
            Outcome::Timeout(text) => {
                self.first_error.get_or_insert(text);
                "timeout".into()
            }
            Outcome::Failed(text) => {
                self.first_error.get_or_insert(text);
                "error".into()
            }
        };
        *self.statuses.entry(key).or_insert(0) += 1;
    }
}

/// Mean, nearest-rank percentiles and maximum of the samples; `None` when there are none.
pub fn latency(samples: &mut [f64]) -> Option<Latency> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_by(f64::total_cmp);
    let n = samples.len();
    // The smallest sample with at least p % of the samples at or below it: rank ⌈p·n/100⌉,
    // in integers so that no rounding moves it.
    let rank = |p: usize| samples[(p * n).div_ceil(100).clamp(1, n) - 1];
    Some(Latency {
        mean: samples.iter().sum::<f64>() / n as f64,
        p50: rank(50),
        p95: rank(95),
        p99: rank(99),
        max: samples[n - 1],
    })
}

#[cfg(test)]
mod tests {
    use super::{Latency, latency};

    #[test]
    fn nearest_rank_percentiles() {
        let mut samples: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        let l = latency(&mut samples).unwrap();
        assert_eq!((l.p50, l.p95, l.p99, l.max), (50.0, 95.0, 99.0, 100.0));
        assert!((l.mean - 50.5).abs() < 1e-12);
        let one = latency(&mut [7.0]).unwrap();
        assert_eq!((one.mean, one.p50, one.p99, one.max), (7.0, 7.0, 7.0, 7.0));
        assert_eq!(latency(&mut []), None);
    }

    /// Against numpy 2.4: `np.percentile(x, [50, 95, 99], method="inverted_cdf")`, `x.mean()`,
    /// `x.max()` of `x = [(i * 37) % 101 + 0.25 * (i % 4) for i in range(n)]`.
    #[test]
    fn percentiles_equal_numpy_inverted_cdf() {
        let cases: [(usize, Latency); 4] = [
            (
                2,
                Latency {
                    mean: 18.625,
                    p50: 0.0,
                    p95: 37.25,
                    p99: 37.25,
                    max: 37.25,
                },
            ),
            (
                19,
                Latency {
                    mean: 46.30263157894737,
                    p50: 47.0,
                    p95: 94.0,
                    p99: 94.0,
                    max: 94.0,
                },
            ),
            (
                20,
                Latency {
                    mean: 48.875,
                    p50: 47.0,
                    p95: 94.0,
                    p99: 97.75,
                    max: 97.75,
                },
            ),
            (
                333,
                Latency {
                    mean: 50.22372372372372,
                    p50: 50.25,
                    p95: 95.75,
                    p99: 99.5,
                    max: 100.75,
                },
            ),
        ];
        for (n, expected) in cases {
            let mut x: Vec<f64> = (0..n)
                .map(|i| ((i * 37) % 101) as f64 + 0.25 * (i % 4) as f64)
                .collect();
            let l = latency(&mut x).unwrap();
            assert_eq!(
                (l.p50, l.p95, l.p99, l.max),
                (expected.p50, expected.p95, expected.p99, expected.max),
                "n = {n}"
            );
            assert!((l.mean - expected.mean).abs() < 1e-9, "n = {n}: {l:?}");
        }
    }
}
