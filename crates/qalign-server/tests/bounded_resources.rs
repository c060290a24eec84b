//! Clients that go away must cost the server nothing lasting: after many uploads cut off
//! mid-body and many clients that leave while their files are scored, the spool folder is
//! empty, the open file descriptors are back to where they were, and `/metrics` counts the
//! cut-off uploads as the clients' fault (400), not as server failures (500).
//!
//! Its own test binary, with a single test: it points `TMPDIR` (where uploads are spooled) at a
//! folder of its own and counts the process's file descriptors.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use qalign_core::{LevelDistribution, LevelSet};
use qalign_model::{LevelScores, Query, ScoreError, ScoreOptions, Scored};
use qalign_server::{Backend, EngineConfig, Limits, ServerConfig};
use tokio::io::AsyncWriteExt;

/// Scores every file the same after `delay`, so that clients can leave mid-scoring.
struct Slow {
    levels: LevelSet,
    delay: Duration,
}

impl Backend for Slow {
    fn score(
        &self,
        paths: &[PathBuf],
        queries: &[Query],
        _options: &ScoreOptions,
        _keep_going: &dyn Fn() -> bool,
    ) -> Result<Vec<Result<Scored, ScoreError>>, ScoreError> {
        std::thread::sleep(self.delay);
        let logits = vec![1.0, 0.5, 0.0, -0.5, -1.0];
        let scores = || {
            queries
                .iter()
                .map(|_| LevelScores {
                    distribution: LevelDistribution::from_logits(&logits).unwrap(),
                    logits: logits.clone(),
                })
                .collect()
        };
        Ok(paths.iter().map(|_| Ok(Scored::Image(scores()))).collect())
    }

    fn levels(&self) -> &LevelSet {
        &self.levels
    }
}

/// Entries of a folder (spooled uploads are folders `qalign-upload-*` holding the files).
fn entries(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[cfg(target_os = "linux")]
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[cfg(not(target_os = "linux"))]
fn open_fds() -> usize {
    0
}

/// The value of the metric line that starts with `name` (0 when absent).
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0)
}

const BOUNDARY: &str = "XBOUNDARYX";

/// A multipart upload of one file of `size` bytes, announced whole but cut off after `sent`
/// bytes of its body: the connection is closed (or reset, with `reset`).
async fn cut_off_upload(addr: &str, size: usize, sent: usize, reset: bool) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let part = format!(
        "--{BOUNDARY}\r\ncontent-disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\n"
    );
    let end = format!("\r\n--{BOUNDARY}--\r\n");
    let head = format!(
        "POST /v1/score HTTP/1.1\r\nhost: x\r\ncontent-type: multipart/form-data; boundary={BOUNDARY}\r\ncontent-length: {}\r\n\r\n",
        part.len() + size + end.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(part.as_bytes()).await.unwrap();
    stream.write_all(&vec![7u8; sent]).await.unwrap();
    stream.flush().await.unwrap();
    // Let the server spool what came, then go.
    tokio::time::sleep(Duration::from_millis(20)).await;
    if reset {
        stream.set_zero_linger().unwrap();
    }
    drop(stream);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_leave_leave_no_files_no_descriptors_and_no_5xx() {
    let spool = tempfile::tempdir().unwrap();
    // SAFETY: the only test of this binary sets it before any thread that reads it starts.
    unsafe { std::env::set_var("TMPDIR", spool.path()) };
    assert_eq!(std::env::temp_dir(), spool.path());

    let config = ServerConfig {
        engine: EngineConfig {
            max_batch_size: 4,
            max_wait: Duration::from_millis(5),
            queue_capacity: 64,
        },
        limits: Limits {
            max_concurrent_requests: 64,
            max_client_batch_size: 4,
            max_body_bytes: 4 << 20,
            request_timeout: Duration::from_secs(30),
        },
        api_key: None,
        shutdown_grace: Duration::from_secs(10),
        model_info: serde_json::json!({"model": "slow"}),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let url = format!("http://{addr}");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let backend = Slow {
        levels: LevelSet::itu(),
        delay: Duration::from_millis(300),
    };
    let done = tokio::spawn(qalign_server::run(
        listener,
        config,
        move || Ok(backend),
        Arc::new(|_| {}),
        async move {
            let _ = stopped.await;
        },
    ));
    let client = reqwest::Client::new();
    for _ in 0..500 {
        if let Ok(r) = client.get(format!("{url}/health")).send().await
            && r.status() == 200
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // One request end to end first, so that the baseline holds what stays open anyway.
    let one = || {
        reqwest::multipart::Form::new().part(
            "file",
            reqwest::multipart::Part::bytes(vec![1u8; 100]).file_name("a.png"),
        )
    };
    let response = client
        .post(format!("{url}/v1/score"))
        .multipart(one())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    drop(client);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let fds_before = open_fds();

    // Uploads cut off mid-body, closed and reset, some of them many chunks in.
    const CUT: u64 = 40;
    for i in 0..CUT as usize {
        cut_off_upload(&addr, 1 << 20, 1000 + i * 5000, i % 2 == 1).await;
    }
    // Clients that leave once their upload is in, while their file is scored.
    const LEFT: u64 = 12;
    for _ in 0..LEFT {
        let client = reqwest::Client::new();
        let leaves = client
            .post(format!("{url}/v1/score"))
            .timeout(Duration::from_millis(100))
            .multipart(one())
            .send()
            .await;
        assert!(leaves.is_err());
    }
    // The engine drops or finishes what it holds (300 ms a batch); the server answers the
    // cut-off uploads once their connections fail.
    let client = reqwest::Client::new();
    let mut metrics = String::new();
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        metrics = client
            .get(format!("{url}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let settled = metric(&metrics, "qalign_requests_total{status=\"400\"}") == CUT
            && metric(&metrics, "qalign_dropped_jobs_total") == LEFT;
        if settled && entries(spool.path()).is_empty() {
            break;
        }
    }
    assert_eq!(
        metric(&metrics, "qalign_requests_total{status=\"400\"}"),
        CUT,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "qalign_requests_total{status=\"500\"}"),
        0,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "qalign_requests_total{status=\"200\"}"),
        1,
        "{metrics}"
    );
    assert_eq!(metric(&metrics, "qalign_dropped_jobs_total"), LEFT);
    assert_eq!(metric(&metrics, "qalign_images_scored_total"), 1);
    assert_eq!(entries(spool.path()), Vec::<String>::new());
    drop(client);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let fds_after = open_fds();
    // A little slack for the runtime's own descriptors; a leak would be one per request.
    assert!(
        fds_after <= fds_before + 2,
        "{fds_before} descriptors before, {fds_after} after"
    );

    let _ = stop.send(());
    done.await.unwrap().unwrap();
    assert_eq!(entries(spool.path()), Vec::<String>::new());
}
