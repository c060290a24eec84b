//! `qalign serve` as a user runs it: the real binary on a free loopback port with the tiny
//! fixture model. Its answers equal `qalign score` for the same files; 64 concurrent requests
//! with garbage mixed in give exact answers or 4xx, never 5xx; a full server says 503; SIGTERM
//! under load answers every accepted request and exits cleanly; `qalign loadtest` reports.

mod common;
mod serve_common;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use serve_common::ServeProcess;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn image_paths() -> Vec<std::path::PathBuf> {
    common::image_names()
        .iter()
        .map(|n| common::images_dir().join(n))
        .collect()
}

/// `qalign score --format json` of the given files, keyed by (file name, task).
fn cli_records(paths: &[std::path::PathBuf], extra: &[&str]) -> BTreeMap<(String, String), Value> {
    let mut cmd = common::score();
    cmd.args(["--format", "json"]).args(extra).args(paths);
    let run = common::run_expecting(&mut cmd, 0);
    common::json_records(&run.stdout)
        .into_iter()
        .map(|r| {
            (
                (
                    common::file_name(&r),
                    r["task"].as_str().unwrap().to_string(),
                ),
                r,
            )
        })
        .collect()
}

fn form(files: &[(String, Vec<u8>)], fields: &[(&str, &str)]) -> reqwest::multipart::Form {
    let mut form = reqwest::multipart::Form::new();
    for (name, bytes) in files {
        form = form.part(
            "file",
            reqwest::multipart::Part::bytes(bytes.clone()).file_name(name.clone()),
        );
    }
    for (k, v) in fields {
        form = form.text(k.to_string(), v.to_string());
    }
    form
}

async fn post(url: &str, files: &[(String, Vec<u8>)], fields: &[(&str, &str)]) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("{url}/v1/score"))
        .multipart(form(files, fields))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

fn read(path: &std::path::Path) -> (String, Vec<u8>) {
    (
        path.file_name().unwrap().to_string_lossy().into_owned(),
        std::fs::read(path).unwrap(),
    )
}

/// Server records equal the CLI's: every field, path = the uploaded name.
fn assert_same(server: &Value, cli: &Value) {
    let (s, c) = (server.as_object().unwrap(), cli.as_object().unwrap());
    let keys = |m: &serde_json::Map<String, Value>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(s), keys(c));
    for (key, value) in c {
        if key == "path" {
            assert_eq!(s[key], common::file_name(cli).as_str());
        } else {
            assert_eq!(&s[key], value, "{key} of {}", s["path"]);
        }
    }
}

#[test]
fn answers_equal_qalign_score_for_images_and_video() {
    let server = ServeProcess::start(&["--max-wait-ms", "20"]);
    // The load is logged by tenths of its layers (the tiny model has 6), before "ready" (which
    // the thread reading stderr may take a moment to see).
    let ready = std::time::Instant::now();
    while !server.stderr.lock().unwrap().contains("; ready")
        && ready.elapsed() < std::time::Duration::from_secs(10)
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let log = server.stderr.lock().unwrap().clone();
    let loading: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("loading model: "))
        .collect();
    assert_eq!(
        loading,
        [1, 2, 3, 4, 5, 6].map(|n| format!("loading model: {n}/6 layers")),
        "{log}"
    );
    let images = image_paths();
    let video = common::fixtures().join("video/baby.mp4");
    let cli = cli_records(&images, &["--task", "all", "--scale", "0-1"]);
    let cli_video = cli_records(std::slice::from_ref(&video), &[]);
    let rt = runtime();
    let files: Vec<_> = images.iter().map(|p| read(p)).collect();
    let (status, body) = rt.block_on(post(
        &server.url,
        &files,
        &[("task", "all"), ("scale", "0-1")],
    ));
    assert_eq!(status, 200, "{body}");
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 2 * images.len());
    for record in results {
        let key = (
            record["path"].as_str().unwrap().to_string(),
            record["task"].as_str().unwrap().to_string(),
        );
        assert_same(record, &cli[&key]);
    }
    let (status, body) = rt.block_on(post(&server.url, &[read(&video)], &[]));
    assert_eq!(status, 200, "{body}");
    let record = &body["results"][0];
    assert_eq!(record["input"], "video");
    assert_same(
        record,
        &cli_video[&("baby.mp4".to_string(), "quality".to_string())],
    );
    // One file per request, many at once: the same numbers whatever the batch.
    let answers = rt.block_on(async {
        let mut tasks = Vec::new();
        for file in files.iter().cycle().take(10) {
            let (url, file) = (server.url.clone(), file.clone());
            tasks.push(tokio::spawn(async move {
                post(&url, &[file], &[("task", "aesthetics"), ("scale", "0-1")]).await
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    for (status, body) in answers {
        assert_eq!(status, 200, "{body}");
        let record = &body["results"][0];
        let key = (
            record["path"].as_str().unwrap().to_string(),
            "aesthetics".to_string(),
        );
        assert_same(record, &cli[&key]);
    }
}

#[test]
fn garbage_among_64_concurrent_requests_gets_4xx_and_never_5xx() {
    let server = ServeProcess::start(&["--max-body-mb", "1"]);
    let images = image_paths();
    let cli = cli_records(&images, &[]);
    let files: Vec<_> = images.iter().map(|p| read(p)).collect();
    let mut png_head = std::fs::read(&images[2]).unwrap();
    png_head.truncate(100);
    let garbage: Vec<(String, Vec<u8>)> = vec![
        ("truncated.png".into(), png_head),
        ("text.jpg".into(), b"this is not an image".to_vec()),
        ("empty.png".into(), Vec::new()),
        ("zeros.bin".into(), vec![0u8; 4096]),
        ("bomb.png".into(), common::png_bomb()),
    ];
    let rt = runtime();
    let answers = rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..64usize {
            let url = server.url.clone();
            let (kind, request): (&str, _) = match i % 8 {
                0 => ("garbage", vec![garbage[(i / 8) % garbage.len()].clone()]),
                1 => (
                    "mixed",
                    vec![files[i % 5].clone(), garbage[i % garbage.len()].clone()],
                ),
                2 => ("too-big", vec![("big.png".to_string(), vec![7u8; 2 << 20])]),
                _ => ("valid", vec![files[i % 5].clone()]),
            };
            tasks.push(tokio::spawn(async move {
                let answer = match kind {
                    "too-big" => {
                        // The server may answer 413 before the body is sent, and close.
                        match reqwest::Client::new()
                            .post(format!("{url}/v1/score"))
                            .multipart(form(&request, &[]))
                            .send()
                            .await
                        {
                            Ok(r) => (r.status().as_u16(), Value::Null),
                            Err(_) => (413, Value::Null),
                        }
                    }
                    _ => post(&url, &request, &[]).await,
                };
                (kind, request, answer)
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    for (kind, request, (status, body)) in answers {
        assert!(status < 500, "{kind}: {status} {body}");
        match kind {
            "valid" => {
                assert_eq!(status, 200, "{body}");
                let record = &body["results"][0];
                let key = (request[0].0.clone(), "quality".to_string());
                assert_same(record, &cli[&key]);
            }
            "garbage" => {
                assert_eq!(status, 422, "{body}");
                let error = body["error"].as_str().unwrap();
                assert!(
                    !error.contains("qalign-upload"),
                    "server paths leak: {error}"
                );
                if request[0].0 == "bomb.png" {
                    assert!(
                        error.contains("16384x16384 exceeds the limit of 178956970 pixels"),
                        "{error}"
                    );
                }
                assert!(
                    body["error"].as_str().unwrap().contains(&request[0].0),
                    "{body}"
                );
                assert_eq!(body["results"][0]["path"], request[0].0.as_str());
                assert!(body["results"][0]["error"].is_string());
            }
            "mixed" => {
                assert_eq!(status, 422, "{body}");
                let record = &body["results"][0];
                assert_same(record, &cli[&(request[0].0.clone(), "quality".to_string())]);
                assert!(body["results"][1]["error"].is_string());
                assert!(body["error"].as_str().unwrap().contains("part 2"), "{body}");
            }
            _ => assert_eq!(status, 413),
        }
    }
    assert_eq!(
        serve_common::plain_http::get_status(&format!("{}/health", server.url)).unwrap(),
        200
    );
    let metrics = rt.block_on(async {
        reqwest::get(format!("{}/metrics", server.url))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    });
    assert!(
        metrics.contains("qalign_requests_total{status=\"200\"}"),
        "{metrics}"
    );
    assert!(!metrics.contains("status=\"500\""), "{metrics}");
}

#[test]
fn a_full_server_answers_503_with_retry_after() {
    let server = ServeProcess::start(&["--max-concurrent-requests", "1"]);
    let files: Vec<_> = image_paths().iter().map(|p| read(p)).collect();
    let rt = runtime();
    let statuses = rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..12 {
            let (url, files) = (server.url.clone(), files.clone());
            tasks.push(tokio::spawn(async move {
                let r = reqwest::Client::new()
                    .post(format!("{url}/v1/score"))
                    .multipart(form(&files, &[("task", "all")]))
                    .send()
                    .await
                    .unwrap();
                let retry = r.headers().get("retry-after").cloned();
                (r.status().as_u16(), retry)
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    assert!(statuses.iter().any(|(s, _)| *s == 200), "{statuses:?}");
    let busy: Vec<_> = statuses.iter().filter(|(s, _)| *s == 503).collect();
    assert!(!busy.is_empty(), "{statuses:?}");
    assert!(
        busy.iter()
            .all(|(_, retry)| retry.as_ref().is_some_and(|v| v == "1"))
    );
    assert!(statuses.iter().all(|(s, _)| *s == 200 || *s == 503));
}

#[test]
fn sigterm_under_load_answers_every_accepted_request_and_exits_cleanly() {
    let mut server = ServeProcess::start(&["--max-batch-size", "2", "--shutdown-grace-s", "60"]);
    let files: Vec<_> = image_paths().iter().map(|p| read(p)).collect();
    let rt = runtime();
    let answers = rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..12 {
            let (url, file) = (server.url.clone(), files[i % 5].clone());
            tasks.push(tokio::spawn(async move {
                post(&url, &[file], &[("task", "all")]).await.0
            }));
        }
        // Every request is on its way and accepted before the signal.
        tokio::time::sleep(Duration::from_millis(300)).await;
        server.terminate();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    assert!(answers.iter().all(|&s| s == 200), "{answers:?}");
    assert_eq!(server.wait(Duration::from_secs(60)), 0);
    let log = server.stderr.lock().unwrap().clone();
    assert!(log.contains("shutting down"), "{log}");
    assert!(log.contains("stopped"), "{log}");
}

#[test]
fn loadtest_reports_throughput_and_percentiles() {
    let server = ServeProcess::start(&[]);
    let mut cmd = common::qalign();
    cmd.args([
        "loadtest",
        &server.url,
        "--concurrency",
        "4",
        "--requests",
        "12",
        "--images",
    ])
    .arg(common::images_dir());
    let run = common::run_expecting(&mut cmd, 0);
    let report: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(report["requests"], 12);
    assert_eq!(report["ok"], 12, "{report}");
    assert_eq!(report["statuses"]["200"], 12);
    let l = &report["latency_ms"];
    let (p50, p95, p99, max) = (
        l["p50"].as_f64().unwrap(),
        l["p95"].as_f64().unwrap(),
        l["p99"].as_f64().unwrap(),
        l["max"].as_f64().unwrap(),
    );
    assert!(0.0 < p50 && p50 <= p95 && p95 <= p99 && p99 <= max, "{l}");
    assert!(report["images_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn bad_flags_and_a_bad_model_fail_clearly() {
    let mut cmd = common::qalign();
    cmd.args(["serve", "--max-batch-size", "0"]);
    common::run_expecting(&mut cmd, 2);
    // --random-weights builds a folder's config.json: a hub id is a usage error, for every command.
    for command in [&["serve"][..], &["score", "x.png"], &["bench"]] {
        let mut cmd = common::qalign();
        cmd.args(command)
            .args(["--random-weights", "--model", "org/none"]);
        let run = common::run_expecting(&mut cmd, 2);
        assert!(
            run.stderr
                .contains("--random-weights needs --model to be a folder"),
            "{command:?}: {}",
            run.stderr
        );
    }
    // Durations past a day (or past what a `Duration` holds) are usage errors, not a panic.
    for flag in ["--request-timeout-s", "--shutdown-grace-s"] {
        let mut cmd = common::qalign();
        cmd.args(["serve", flag, "1e300"]);
        let run = common::run_expecting(&mut cmd, 2);
        assert!(
            run.stderr.contains("at most 86400 seconds"),
            "{}",
            run.stderr
        );
    }
    let mut cmd = common::qalign();
    cmd.args(["loadtest", "localhost:8080", "--images", "x.png"]);
    let run = common::run_expecting(&mut cmd, 2);
    assert!(run.stderr.contains("http://"), "{}", run.stderr);
    // Nothing listening: every request fails, the report says so and the run exits 1.
    let image = common::fixtures().join("images/boy_colorful.jpg");
    let mut cmd = common::qalign();
    cmd.args([
        "loadtest",
        "http://127.0.0.1:1",
        "--requests",
        "3",
        "--images",
    ])
    .arg(&image);
    let run = common::run_expecting(&mut cmd, 1);
    let report: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(report["ok"], 0);
    assert_eq!(report["statuses"]["error"], 3);
    assert!(
        run.stderr.contains("no request succeeded"),
        "{}",
        run.stderr
    );
    // A folder without a model: the server says so and exits 1.
    let empty = tempfile::tempdir().unwrap();
    let mut server = ServeProcess::spawn(empty.path(), &[]);
    assert_eq!(server.wait(Duration::from_secs(60)), 1);
    assert!(server.stderr.lock().unwrap().contains("error:"));
}
