//! The server with a fake backend on a real socket: batching, mixed tasks, per-item errors,
//! panics, a full queue, disconnects, timeouts, auth, loading, limits and graceful shutdown.
//! The fake's level logits come from the first byte of each file, so every answer can be checked
//! against the file it belongs to.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qalign_core::{LevelDistribution, LevelSet, Scale};
use qalign_model::{LevelScores, Query, ScoreError, ScoreOptions, Scored};
use qalign_server::{Backend, EngineConfig, Limits, ServerConfig, ServerError};
use serde_json::Value;
use tokio::sync::oneshot;

/// What the fake saw: per call, the file count and the query names.
type Calls = Arc<Mutex<Vec<(usize, Vec<String>)>>>;

struct Fake {
    levels: LevelSet,
    /// Per call, before any file.
    delay: Duration,
    /// Per file, before its outcome.
    file_delay: Duration,
    calls: Calls,
    /// Files it has scored (or failed), over all calls.
    files_done: Arc<AtomicUsize>,
}

fn logits_of(byte: u8) -> Vec<f32> {
    vec![byte as f32 / 64.0, 0.5, 0.0, -0.5, -1.0]
}

impl Backend for Fake {
    fn score(
        &self,
        paths: &[PathBuf],
        queries: &[Query],
        _options: &ScoreOptions,
        keep_going: &dyn Fn() -> bool,
    ) -> Result<Vec<Result<Scored, ScoreError>>, ScoreError> {
        let names = queries.iter().map(|q| q.name().to_string()).collect();
        self.calls.lock().unwrap().push((paths.len(), names));
        // Every file is read first, as the scorer decodes a batch ahead. The spool files of a
        // client that has left are gone: they read as empty files.
        let contents: Vec<Vec<u8>> = paths
            .iter()
            .map(|path| std::fs::read(path).unwrap_or_default())
            .collect();
        std::thread::sleep(self.delay);
        let mut outcomes = Vec::new();
        for bytes in contents {
            std::thread::sleep(self.file_delay);
            let outcome = match bytes.as_slice() {
                b"panic" => panic!("the fake was told to panic"),
                b"bad" | [] => Err(ScoreError::NoFrames),
                b"nan" => Err(ScoreError::NonFiniteOutput { value: f32::NAN }),
                _ => {
                    let scores = queries
                        .iter()
                        .enumerate()
                        .map(|(q, _)| {
                            let logits = logits_of(bytes[0].wrapping_add(q as u8));
                            LevelScores {
                                distribution: LevelDistribution::from_logits(&logits).unwrap(),
                                logits,
                            }
                        })
                        .collect();
                    Ok(Scored::Image(scores))
                }
            };
            outcomes.push(outcome);
            self.files_done.fetch_add(1, Ordering::SeqCst);
            if !keep_going() {
                break;
            }
        }
        Ok(outcomes)
    }

    fn levels(&self) -> &LevelSet {
        &self.levels
    }
}

/// The 1-5 score the fake gives a file starting with `byte` for query `q`.
fn expected_score(byte: u8, q: u8) -> f64 {
    LevelDistribution::from_logits(&logits_of(byte.wrapping_add(q)))
        .unwrap()
        .score(Scale::OneToFive)
        .value
}

struct Options {
    delay: Duration,
    file_delay: Duration,
    load_delay: Duration,
    fail_load: bool,
    max_batch_size: usize,
    max_wait: Duration,
    max_concurrent: usize,
    timeout: Duration,
    api_key: Option<String>,
    max_body: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            delay: Duration::ZERO,
            file_delay: Duration::ZERO,
            load_delay: Duration::ZERO,
            fail_load: false,
            max_batch_size: 8,
            max_wait: Duration::from_millis(5),
            max_concurrent: 64,
            timeout: Duration::from_secs(30),
            api_key: None,
            max_body: 1 << 20,
        }
    }
}

struct Server {
    url: String,
    calls: Calls,
    files_done: Arc<AtomicUsize>,
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<Result<(), ServerError>>,
}

impl Server {
    async fn start(options: Options) -> Self {
        let calls: Calls = Arc::default();
        let files_done = Arc::new(AtomicUsize::new(0));
        let fake = Fake {
            levels: LevelSet::itu(),
            delay: options.delay,
            file_delay: options.file_delay,
            calls: Arc::clone(&calls),
            files_done: Arc::clone(&files_done),
        };
        let config = ServerConfig {
            engine: EngineConfig {
                max_batch_size: options.max_batch_size,
                max_wait: options.max_wait,
                queue_capacity: options.max_concurrent,
            },
            limits: Limits {
                max_concurrent_requests: options.max_concurrent,
                max_client_batch_size: 4,
                max_body_bytes: options.max_body,
                request_timeout: options.timeout,
            },
            api_key: options.api_key,
            shutdown_grace: Duration::from_secs(10),
            model_info: serde_json::json!({"model": "fake"}),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let (load_delay, fail_load) = (options.load_delay, options.fail_load);
        let load = move || {
            std::thread::sleep(load_delay);
            if fail_load {
                return Err("no weights here".to_string());
            }
            Ok(fake)
        };
        let done = tokio::spawn(qalign_server::run(
            listener,
            config,
            load,
            Arc::new(|_| {}),
            async move {
                let _ = stopped.await;
            },
        ));
        let server = Self {
            url,
            calls,
            files_done,
            stop: Some(stop),
            done,
        };
        if options.load_delay.is_zero() && !options.fail_load {
            server.wait_ready().await;
        }
        server
    }

    async fn wait_ready(&self) {
        for _ in 0..500 {
            if let Ok(r) = reqwest::get(format!("{}/health", self.url)).await
                && r.status() == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the server never became healthy");
    }

    async fn stop(mut self) -> Result<(), ServerError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.done.await.unwrap()
    }

    fn post(&self) -> reqwest::RequestBuilder {
        reqwest::Client::new().post(format!("{}/v1/score", self.url))
    }

    /// Posts one file from another task; its handle gives the answer's status.
    fn post_in_background(&self, name: &'static str, byte: u8) -> tokio::task::JoinHandle<u16> {
        let url = self.url.clone();
        tokio::spawn(async move {
            reqwest::Client::new()
                .post(format!("{url}/v1/score"))
                .multipart(form(&[(name, &[byte])], &[]))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    }

    async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.url))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

fn form(files: &[(&str, &[u8])], fields: &[(&str, &str)]) -> reqwest::multipart::Form {
    let mut form = reqwest::multipart::Form::new();
    for (name, bytes) in files {
        form = form.part(
            "file",
            reqwest::multipart::Part::bytes(bytes.to_vec()).file_name(name.to_string()),
        );
    }
    for (k, v) in fields {
        form = form.text(k.to_string(), v.to_string());
    }
    form
}

async fn send(
    server: &Server,
    files: &[(&str, &[u8])],
    fields: &[(&str, &str)],
) -> (u16, Value, reqwest::header::HeaderMap) {
    let response = server
        .post()
        .multipart(form(files, fields))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (status, response.json().await.unwrap(), headers)
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_batches_and_get_their_own_records() {
    let server = Server::start(Options {
        max_wait: Duration::from_millis(300),
        delay: Duration::from_millis(20),
        ..Options::default()
    })
    .await;
    let mut tasks = Vec::new();
    for i in 0..8u8 {
        let (url, byte) = (server.url.clone(), 10 + i);
        tasks.push(tokio::spawn(async move {
            let form = form(&[(&format!("img-{i}.png"), &[byte, 1, 2])], &[]);
            let r = reqwest::Client::new()
                .post(format!("{url}/v1/score"))
                .multipart(form)
                .send()
                .await
                .unwrap();
            (i, r.status().as_u16(), r.json::<Value>().await.unwrap())
        }));
    }
    for task in tasks {
        let (i, status, body) = task.await.unwrap();
        assert_eq!(status, 200, "{body}");
        let results = body["results"].as_array().unwrap();
        assert_eq!(results.len(), 1);
        assert_eq!(results[0]["path"], format!("img-{i}.png"));
        assert_eq!(results[0]["task"], "quality");
        assert_eq!(results[0]["scale"], "1-5");
        let score = results[0]["score"].as_f64().unwrap();
        assert!(close(score, expected_score(10 + i, 0)), "{score}");
    }
    let calls = server.calls.lock().unwrap().clone();
    assert_eq!(calls.iter().map(|c| c.0).sum::<usize>(), 8);
    assert!(
        calls.iter().any(|c| c.0 > 1),
        "no request shared a batch: {calls:?}"
    );
    assert!(calls.iter().all(|c| c.0 <= 8));
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn different_tasks_ride_in_one_batch() {
    let server = Server::start(Options {
        max_wait: Duration::from_millis(400),
        ..Options::default()
    })
    .await;
    let (a, b) = tokio::join!(
        send(&server, &[("a.png", &[40])], &[("task", "aesthetics")]),
        send(
            &server,
            &[("b.png", &[50])],
            &[("task", "all"), ("scale", "0-1")]
        ),
    );
    assert_eq!((a.0, b.0), (200, 200));
    let calls = server.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].0, 2);
    let a = a.1["results"].as_array().unwrap().clone();
    assert_eq!(a.len(), 1);
    assert_eq!(a[0]["task"], "aesthetics");
    let q = calls[0].1.iter().position(|n| n == "aesthetics").unwrap() as u8;
    assert!(close(
        a[0]["score"].as_f64().unwrap(),
        expected_score(40, q)
    ));
    let b = b.1["results"].as_array().unwrap().clone();
    let tasks: Vec<&str> = b.iter().map(|r| r["task"].as_str().unwrap()).collect();
    assert_eq!(tasks, ["quality", "aesthetics"]);
    assert!(b.iter().all(|r| r["scale"] == "0-1"));
    let s01 = b[0]["score"].as_f64().unwrap();
    let qq = calls[0].1.iter().position(|n| n == "quality").unwrap() as u8;
    assert!(close(s01, (expected_score(50, qq) - 1.0) / 4.0), "{s01}");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_file_gets_422_naming_the_part_and_the_rest_is_scored() {
    let server = Server::start(Options::default()).await;
    let (status, body, _) = send(
        &server,
        &[
            ("good.png", &[7]),
            ("broken.jpg", b"bad"),
            ("empty.png", b""),
        ],
        &[],
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error_type"], "validation");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("part 2 (`broken.jpg`)"), "{error}");
    assert!(error.contains("part 3 (`empty.png`)"), "{error}");
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    assert!(close(
        results[0]["score"].as_f64().unwrap(),
        expected_score(7, 0)
    ));
    assert_eq!(results[1]["path"], "broken.jpg");
    assert!(results[1]["error"].as_str().unwrap().contains("no frames"));
    // A model failure is not the client's fault.
    let (status, body, _) = send(&server, &[("x.png", b"nan")], &[]).await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error_type"], "backend");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_fails_its_batch_and_the_server_keeps_serving() {
    let server = Server::start(Options::default()).await;
    let (status, body, _) = send(&server, &[("p.png", b"panic")], &[]).await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error_type"], "backend");
    assert!(
        body["error"].as_str().unwrap().contains("panicked"),
        "{body}"
    );
    let (status, body, _) = send(&server, &[("ok.png", &[3])], &[]).await;
    assert_eq!(status, 200, "{body}");
    let health = reqwest::get(format!("{}/health", server.url))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_concurrency_limit_gets_503_with_retry_after() {
    let server = Server::start(Options {
        max_concurrent: 1,
        delay: Duration::from_millis(600),
        ..Options::default()
    })
    .await;
    let first = server.post_in_background("a.png", 1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, body, headers) = send(&server, &[("b.png", &[2])], &[]).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error_type"], "overloaded");
    assert_eq!(
        qalign_server::api::retry_after(&headers),
        Some(Duration::from_secs(1))
    );
    assert_eq!(first.await.unwrap(), 200);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_client_left_is_dropped_from_the_batch() {
    let server = Server::start(Options {
        delay: Duration::from_millis(500),
        max_wait: Duration::ZERO,
        ..Options::default()
    })
    .await;
    let busy = server.post_in_background("busy.png", 1);
    tokio::time::sleep(Duration::from_millis(150)).await;
    // Queued behind the busy batch, then given up on by its client.
    let gone = server
        .post()
        .timeout(Duration::from_millis(100))
        .multipart(form(&[("gone.png", &[2])], &[]))
        .send()
        .await;
    assert!(gone.is_err());
    assert_eq!(busy.await.unwrap(), 200);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, _, _) = send(&server, &[("after.png", &[3])], &[]).await;
    assert_eq!(status, 200);
    let calls = server.calls.lock().unwrap().clone();
    assert_eq!(calls.iter().map(|c| c.0).sum::<usize>(), 2, "{calls:?}");
    let metrics = reqwest::get(format!("{}/metrics", server.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("qalign_dropped_jobs_total 1"), "{metrics}");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_request_times_out_with_504() {
    let server = Server::start(Options {
        delay: Duration::from_millis(600),
        timeout: Duration::from_millis(150),
        ..Options::default()
    })
    .await;
    let (status, body, _) = send(&server, &[("slow.png", &[1])], &[]).await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["error_type"], "timeout");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_times_out_mid_upload_is_drained_and_answered_504() {
    let server = Server::start(Options {
        timeout: Duration::from_millis(200),
        max_body: 16 << 20,
        ..Options::default()
    })
    .await;
    // The upload stalls past the limit, then sends far more than the socket buffers hold: had
    // the server stopped reading, the client would meet a reset instead of the answer.
    let upload = [
        &b"--XX\r\ncontent-disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\n"[..],
        &vec![b'x'; 8 << 20],
        b"\r\n--XX--\r\n",
    ]
    .concat();
    let (status, body) = raw_request_pausing(
        &server.url,
        "POST /v1/score HTTP/1.1\r\ncontent-type: multipart/form-data; boundary=XX",
        &upload,
        1000,
        Duration::from_millis(600),
    )
    .await
    .expect("the 504 answer");
    assert_eq!(
        (status, body["error_type"].as_str()),
        (504, Some("timeout")),
        "{body}"
    );
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_key_guards_v1_only() {
    let server = Server::start(Options {
        api_key: Some("s3cret".into()),
        ..Options::default()
    })
    .await;
    let (status, body, headers) = send(&server, &[("a.png", &[1])], &[]).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(headers["www-authenticate"], "Bearer");
    let wrong = server
        .post()
        .bearer_auth("s3cre7")
        .multipart(form(&[("a.png", &[1])], &[]))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let right = server
        .post()
        .bearer_auth("s3cret")
        .multipart(form(&[("a.png", &[1])], &[]))
        .send()
        .await
        .unwrap();
    assert_eq!(right.status(), 200);
    // The scheme is case-insensitive.
    let lower = server
        .post()
        .header("authorization", "bearer s3cret")
        .multipart(form(&[("a.png", &[1])], &[]))
        .send()
        .await
        .unwrap();
    assert_eq!(lower.status(), 200);
    let info: Value = reqwest::get(format!("{}/info", server.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info["limits"]["auth"], true);
    assert_eq!(info["model"]["model"], "fake");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_503_while_loading_and_a_failed_load_stops_the_server() {
    let server = Server::start(Options {
        load_delay: Duration::from_millis(400),
        ..Options::default()
    })
    .await;
    let health = reqwest::get(format!("{}/health", server.url))
        .await
        .unwrap();
    assert_eq!(health.status(), 503);
    let (status, body, headers) = send(&server, &[("a.png", &[1])], &[]).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error_type"], "unhealthy");
    assert!(headers.contains_key("retry-after"));
    server.wait_ready().await;
    server.stop().await.unwrap();

    let failing = Server::start(Options {
        fail_load: true,
        ..Options::default()
    })
    .await;
    match failing.done.await.unwrap() {
        Err(ServerError::Load(message)) => assert!(message.contains("no weights"), "{message}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_4xx() {
    let server = Server::start(Options {
        max_body: 4096,
        ..Options::default()
    })
    .await;
    let big = vec![9u8; 10_000];
    let (status, body, _) = send(&server, &[("big.png", &big)], &[]).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error_type"], "payload_too_large");
    assert_eq!(
        body["error"],
        "the request body is larger than this server's limit of 4096 bytes (--max-body-mb)"
    );
    let (status, body, _) = send(&server, &[("a.png", &[1])], &[("colour", "red")]).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("`colour`"));
    let (status, body, _) = send(&server, &[("a.png", &[1])], &[("task", "beauty")]).await;
    assert_eq!(status, 400, "{body}");
    let (status, body, _) = send(&server, &[("a.png", &[1])], &[("fps", "-1")]).await;
    assert_eq!(status, 400, "{body}");
    let (status, body, _) = send(&server, &[], &[]).await;
    assert_eq!(status, 400, "{body}");
    let five: Vec<(&str, &[u8])> = vec![("a.png", &[1]); 5];
    let (status, body, _) = send(&server, &five, &[]).await;
    assert_eq!(status, 422, "{body}");
    assert!(body["error"].as_str().unwrap().contains("limit is 4"));
    let plain = server.post().body("hello").send().await.unwrap();
    assert_eq!(plain.status(), 415);
    let json = server
        .post()
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(json.status(), 400);
    let missing = reqwest::get(format!("{}/nope", server.url)).await.unwrap();
    assert_eq!(missing.status(), 404);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_bodies_take_base64_with_names_and_report_bad_base64_per_item() {
    use base64::Engine as _;
    let server = Server::start(Options::default()).await;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let long = b64(&[40; 100]);
    let wrapped = format!("{}\n{}\r\n", &long[..76], &long[76..]);
    let body = serde_json::json!({
        "images": [
            b64(&[20, 1]),
            {"name": "named.png", "data": format!("data:image/png;base64,{}", b64(&[30]))},
            "***",
            // As `base64` without -w0 writes it: a line break every 76 characters.
            wrapped,
        ],
        "task": "quality",
    });
    let response = server.post().json(&body).send().await.unwrap();
    assert_eq!(response.status(), 422);
    let body: Value = response.json().await.unwrap();
    let results = body["results"].as_array().unwrap();
    assert_eq!(results[0]["path"], "image-0");
    assert!(close(
        results[0]["score"].as_f64().unwrap(),
        expected_score(20, 0)
    ));
    assert_eq!(results[1]["path"], "named.png");
    assert!(close(
        results[1]["score"].as_f64().unwrap(),
        expected_score(30, 0)
    ));
    assert_eq!(results[2]["path"], "image-2");
    assert!(results[2]["error"].as_str().unwrap().contains("base64"));
    assert_eq!(results[3]["path"], "image-3");
    assert!(close(
        results[3]["score"].as_f64().unwrap(),
        expected_score(40, 0)
    ));
    assert_eq!(results.len(), 4);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_base64_may_be_url_safe_or_unpadded() {
    use base64::Engine as _;
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let server = Server::start(Options::default()).await;
    // 0xfb 0xff 0xbf is `+/+/` in the standard alphabet and `-_-_` in the URL-safe one; two
    // bytes need padding (`+/8=`).
    let (three, two) = ([0xfb, 0xff, 0xbf], [0xfb, 0xff]);
    assert_eq!(URL_SAFE.encode(three), "-_-_");
    assert_eq!(URL_SAFE.encode(two), "-_8=");
    let images = [
        (URL_SAFE.encode(three), Some(0xfb)),
        (URL_SAFE.encode(two), Some(0xfb)),
        (URL_SAFE_NO_PAD.encode(two), Some(0xfb)),
        (STANDARD_NO_PAD.encode(two), Some(0xfb)),
        (STANDARD_NO_PAD.encode([20, 1]), Some(20)),
        (STANDARD.encode([21, 1]), Some(21)),
        (
            format!(
                "data:image/png;base64,{}",
                URL_SAFE_NO_PAD.encode([0xfa; 100])
            ),
            Some(0xfa),
        ),
        // Both alphabets in one payload, a lone sixth bit, too much padding: still refused.
        ("+_8=".to_string(), None),
        ("FAE=A".to_string(), None),
        ("-_8==".to_string(), None),
    ];
    // At most 4 files a request (the harness's --max-client-batch-size).
    for chunk in images.chunks(4) {
        let body = serde_json::json!({
            "images": chunk.iter().map(|(data, _)| data).collect::<Vec<_>>(),
            "task": "quality",
        });
        let response = server.post().json(&body).send().await.unwrap();
        let refused = chunk.iter().any(|(_, byte)| byte.is_none());
        assert_eq!(response.status(), if refused { 422 } else { 200 });
        let body: Value = response.json().await.unwrap();
        let results = body["results"]
            .as_array()
            .unwrap_or_else(|| panic!("{body}"));
        assert_eq!(results.len(), chunk.len());
        for (i, ((data, first_byte), result)) in chunk.iter().zip(results).enumerate() {
            assert_eq!(result["path"], format!("image-{i}"));
            match first_byte {
                Some(byte) => assert!(
                    result["score"]
                        .as_f64()
                        .is_some_and(|s| close(s, expected_score(*byte, 0))),
                    "{data}: {result}"
                ),
                None => assert!(
                    result["error"]
                        .as_str()
                        .is_some_and(|e| e.contains("not valid base64")),
                    "{data}: {result}"
                ),
            }
        }
    }
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_every_accepted_request() {
    let server = Server::start(Options {
        delay: Duration::from_millis(300),
        max_batch_size: 1,
        ..Options::default()
    })
    .await;
    let mut tasks = Vec::new();
    for i in 0..4u8 {
        let url = server.url.clone();
        tasks.push(tokio::spawn(async move {
            reqwest::Client::new()
                .post(format!("{url}/v1/score"))
                .multipart(form(&[("a.png", &[i])], &[]))
                .send()
                .await
                .map(|r| r.status().as_u16())
        }));
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    let url = server.url.clone();
    server.stop().await.unwrap();
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap(), 200);
    }
    // Nothing listens any more.
    assert!(reqwest::get(format!("{url}/health")).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_openapi_describe_the_server() {
    let server = Server::start(Options::default()).await;
    let (status, _, _) = send(&server, &[("a.png", &[1]), ("b.png", &[2])], &[]).await;
    assert_eq!(status, 200);
    let response = reqwest::get(format!("{}/metrics", server.url))
        .await
        .unwrap();
    let openmetrics = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    assert_eq!(response.headers()["content-type"], openmetrics);
    let metrics = response.text().await.unwrap();
    assert!(metrics.ends_with("# EOF\n"), "{metrics}");
    for needle in [
        "qalign_requests_total{status=\"200\"} 1",
        "qalign_images_scored_total 2",
        "qalign_request_duration_seconds_count 1",
        "qalign_batch_size_sum 2.0",
        "qalign_queue_depth 0",
    ] {
        assert!(metrics.contains(needle), "{needle} not in\n{metrics}");
    }
    let doc: Value = reqwest::get(format!("{}/openapi.json", server.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let content = &doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"];
    assert!(content[openmetrics].is_object(), "{content}");
    let post = &doc["paths"]["/v1/score"]["post"];
    assert!(post["requestBody"]["content"]["multipart/form-data"].is_object());
    assert!(post["requestBody"]["content"]["application/json"].is_object());
    for status in ["200", "413", "422", "503"] {
        assert!(post["responses"][status].is_object(), "{status}");
    }
    let record = &doc["components"]["schemas"]["ScoreRecord"]["properties"];
    for key in [
        "path", "task", "input", "score", "scale", "levels", "probs", "std", "entropy",
    ] {
        assert!(record[key].is_object(), "{key}");
    }
    for page in ["/", "/docs"] {
        let r = reqwest::get(format!("{}{page}", server.url)).await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.text().await.unwrap().contains("<html"));
    }
    server.stop().await.unwrap();
}

/// Sends a whole request over a raw socket, as plain clients (Python's urllib) do: the full
/// body first, then the answer. A server that answers without reading the body breaks the pipe.
async fn raw_request(url: &str, head: &str, body: &[u8]) -> std::io::Result<(u16, Value)> {
    raw_request_pausing(url, head, body, 0, Duration::ZERO).await
}

/// [`raw_request`] from a client that stops for `pause` after the first `sent_first` bytes of
/// the body (a slow upload).
async fn raw_request_pausing(
    url: &str,
    head: &str,
    body: &[u8],
    sent_first: usize,
    pause: Duration,
) -> std::io::Result<(u16, Value)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(url.trim_start_matches("http://")).await?;
    let head = format!(
        "{head}\r\nhost: x\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    let (first, rest) = body.split_at(sent_first);
    stream.write_all(first).await?;
    tokio::time::sleep(pause).await;
    stream.write_all(rest).await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, serde_json::from_str(body).unwrap_or(Value::Null)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_errors_read_the_upload_and_answer_json() {
    let server = Server::start(Options {
        max_body: 40 << 20,
        ..Options::default()
    })
    .await;
    let big = vec![b'x'; 70 << 20];
    let (status, body) = raw_request(
        &server.url,
        "POST /v1/score HTTP/1.1\r\ncontent-type: multipart/form-data; boundary=XX",
        &[
            b"--XX\r\ncontent-disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\n",
            &big[..],
        ]
        .concat(),
    )
    .await
    .expect("the 413 answer");
    assert_eq!(
        (status, body["error_type"].as_str()),
        (413, Some("payload_too_large")),
        "{body}"
    );
    let small = &big[..30 << 20];
    let (status, body) = raw_request(
        &server.url,
        "POST /v1/score HTTP/1.1\r\ncontent-type: text/plain",
        small,
    )
    .await
    .expect("the 415 answer");
    assert_eq!(
        (status, body["error_type"].as_str()),
        (415, Some("unsupported_media_type")),
        "{body}"
    );
    let multipart = [
        &b"--XX\r\ncontent-disposition: form-data; name=\"colour\"\r\n\r\nred\r\n"[..],
        b"--XX\r\ncontent-disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\n",
        small,
        b"\r\n--XX--\r\n",
    ]
    .concat();
    let (status, body) = raw_request(
        &server.url,
        "POST /v1/score HTTP/1.1\r\ncontent-type: multipart/form-data; boundary=XX",
        &multipart,
    )
    .await
    .expect("the 400 answer");
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("`colour`"),
        "{body}"
    );
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_files_fail_before_the_files_are_stored() {
    let server = Server::start(Options::default()).await;
    // Five files then an unknown field: the count fails at the fifth file, before the field.
    let five: Vec<(&str, &[u8])> = vec![("a.png", &[1]); 5];
    let (status, body, _) = send(&server, &five, &[("colour", "red")]).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(
        body["error"],
        "more than 4 files in one request; the limit is 4 (--max-client-batch-size)"
    );
    // 100,000 tiny files (0.7 MB of JSON) are counted, not written out one by one.
    let started = std::time::Instant::now();
    let images = vec!["AAAA"; 100_000];
    let response = server
        .post()
        .json(&serde_json::json!({ "images": images }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["error"],
        "100000 files in one request; the limit is 4 (--max-client-batch-size)"
    );
    assert_eq!(body["error_type"], "validation");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(server.files_done.load(Ordering::SeqCst), 0);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_method_gets_405_as_json_with_allow() {
    let server = Server::start(Options::default()).await;
    let client = reqwest::Client::new();
    for (request, allow) in [
        (client.get(format!("{}/v1/score", server.url)), "POST"),
        (
            client.post(format!("{}/health", server.url)).body("x"),
            "GET,HEAD",
        ),
    ] {
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 405);
        assert_eq!(response.headers()["allow"], allow);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error_type"], "method_not_allowed", "{body}");
        assert!(body["error"].as_str().unwrap().contains("not allowed"));
    }
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_request_stops_running_and_counts_as_dropped() {
    let server = Server::start(Options {
        file_delay: Duration::from_millis(600),
        timeout: Duration::from_millis(900),
        ..Options::default()
    })
    .await;
    let four: Vec<(&str, &[u8])> = vec![("a.png", &[1]); 4];
    let (status, body, _) = send(&server, &four, &[]).await;
    assert_eq!(status, 504, "{body}");
    // Left alone, the engine would score all four files by 2.4 s; it stops after the file it is
    // on when the request times out (the second, at 1.2 s). The steps are 300 ms apart or more,
    // so that a loaded 2-core machine keeps their order.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let done = server.files_done.load(Ordering::SeqCst);
    assert!((2..4).contains(&done), "{done} files scored");
    let metrics = server.metrics().await;
    for needle in [
        "qalign_requests_total{status=\"504\"} 1",
        "qalign_images_scored_total 0",
        "qalign_dropped_jobs_total 1",
    ] {
        assert!(metrics.contains(needle), "{needle} not in\n{metrics}");
    }
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_a_running_batch_is_dropped_and_the_rest_answered() {
    let server = Server::start(Options {
        file_delay: Duration::from_millis(600),
        max_wait: Duration::from_millis(900),
        ..Options::default()
    })
    .await;
    let stays = server.post_in_background("stays.png", 5);
    tokio::time::sleep(Duration::from_millis(150)).await;
    // Joins the batch, which starts at 900 ms, and leaves during its first file (900–1500 ms),
    // at 1200 ms: 300 ms from each edge, so that a loaded machine keeps the order.
    let leaves = server
        .post()
        .timeout(Duration::from_millis(1050))
        .multipart(form(&[("a.png", &[6]), ("b.png", &[7])], &[]))
        .send()
        .await;
    assert!(leaves.is_err());
    assert_eq!(stays.await.unwrap(), 200);
    let calls = server.calls.lock().unwrap().clone();
    assert_eq!(
        calls.iter().map(|c| c.0).collect::<Vec<_>>(),
        [3],
        "{calls:?}"
    );
    let metrics = server.metrics().await;
    for needle in [
        "qalign_images_scored_total 1",
        "qalign_dropped_jobs_total 1",
    ] {
        assert!(metrics.contains(needle), "{needle} not in\n{metrics}");
    }
    server.stop().await.unwrap();
}
