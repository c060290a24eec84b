//! `qalign loadtest` run as the real binary against a real `qalign serve` (tiny model) and
//! against a stand-in server whose answers and delays are fixed per request: failures are
//! counted by kind and kept out of the latencies and throughput, timeouts say so, Ctrl-C prints
//! the report so far, and bad flags are usage errors.

mod common;
mod serve_common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::Value;
use serve_common::ServeProcess;

fn image() -> std::path::PathBuf {
    common::fixtures().join("images/boy_colorful.jpg")
}

/// A stand-in server on a loopback port: request `i` (one per connection, in the order they
/// arrive) is answered with `answer(i)` = (status, delay before answering).
fn stub(answer: impl Fn(usize) -> (u16, Duration) + Send + Sync + 'static) -> String {
    stub_counting(answer).0
}

/// [`stub`], with the count of requests it has received so far.
fn stub_counting(
    answer: impl Fn(usize) -> (u16, Duration) + Send + Sync + 'static,
) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let answer = Arc::new(answer);
    let count = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&count);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let i = count.fetch_add(1, Ordering::SeqCst);
            let answer = Arc::clone(&answer);
            std::thread::spawn(move || {
                let (status, delay) = answer(i);
                let _ = serve_one(stream, status, delay);
            });
        }
    });
    (url, seen)
}

/// Reads one request (headers, then a body of Content-Length bytes), waits, answers.
fn serve_one(stream: TcpStream, status: u16, delay: Duration) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap();
        }
    }
    assert!(length > 0, "the stand-in expects a Content-Length");
    reader.take(length as u64).read_to_end(&mut Vec::new())?;
    std::thread::sleep(delay);
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
    )?;
    stream.flush()
}

fn loadtest(url: &str, extra: &[&str]) -> assert_cmd::cmd::Command {
    let mut cmd = assert_cmd::cmd::Command::cargo_bin("qalign").unwrap();
    cmd.env_remove("QALIGN_API_KEY")
        .args(["loadtest", url])
        .args(extra)
        .arg("--images")
        .arg(image());
    cmd
}

struct Run {
    code: i32,
    report: Value,
    stderr: String,
}

fn run(url: &str, extra: &[&str]) -> Run {
    let out = loadtest(url, extra).output().unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    let report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON report ({e}); stderr:\n{stderr}"));
    Run {
        code: out.status.code().expect("killed by a signal"),
        report,
        stderr,
    }
}

fn count(report: &Value, status: &str) -> u64 {
    report["statuses"][status].as_u64().unwrap_or(0)
}

/// The counts add up and the throughput is of the 200 answers, as documented.
fn check_consistent(r: &Value) {
    let statuses: u64 = r["statuses"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert_eq!(statuses, r["completed"].as_u64().unwrap(), "{r}");
    assert_eq!(r["ok"].as_u64().unwrap(), count(r, "200"), "{r}");
    let (ok, wall) = (r["ok"].as_f64().unwrap(), r["wall_s"].as_f64().unwrap());
    assert!(wall > 0.0, "{r}");
    let rps = r["requests_per_s"].as_f64().unwrap();
    assert!((rps * wall - ok).abs() < 1e-6 * ok.max(1.0), "{r}");
    let ips = r["images_per_s"].as_f64().unwrap();
    let fpr = r["files_per_request"].as_f64().unwrap();
    assert!((ips - rps * fpr).abs() < 1e-9 * ips.max(1.0), "{r}");
    match r["latency_ms"].as_object() {
        None => assert_eq!(ok, 0.0, "{r}"),
        Some(l) => {
            let v = |k: &str| l[k].as_f64().unwrap();
            assert!(v("p50") > 0.0 && v("p50") <= v("p95"), "{r}");
            assert!(v("p95") <= v("p99") && v("p99") <= v("max"), "{r}");
            assert!(v("mean") <= v("max") && v("mean").is_finite(), "{r}");
        }
    }
}

#[test]
fn failed_answers_stay_out_of_latency_and_throughput() {
    // Every other request: 500 after 400 ms; the others: 200 at once.
    let url = stub(|i| {
        if i % 2 == 1 {
            (500, Duration::from_millis(400))
        } else {
            (200, Duration::ZERO)
        }
    });
    let r = run(&url, &["--requests", "8", "--concurrency", "2"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert_eq!((count(&r.report, "200"), count(&r.report, "500")), (4, 4));
    assert_eq!(r.report["completed"], 8);
    assert_eq!(r.report["interrupted"], false);
    check_consistent(&r.report);
    // The slow 500s are not among the latencies.
    let max = r.report["latency_ms"]["max"].as_f64().unwrap();
    assert!(max < 400.0, "{}", r.report);
    assert!(r.stderr.contains("4 of 8 requests failed"), "{}", r.stderr);
}

#[test]
fn timeouts_are_counted_as_timeouts() {
    let url = stub(|_| (200, Duration::from_secs(3)));
    let r = run(&url, &["--requests", "2", "--timeout-s", "0.2"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(count(&r.report, "timeout"), 2, "{}", r.report);
    assert!(r.report["latency_ms"].is_null(), "{}", r.report);
    assert_eq!(r.report["requests_per_s"], 0.0);
    check_consistent(&r.report);
    assert!(r.stderr.contains("raise --timeout-s"), "{}", r.stderr);
}

#[test]
fn ctrl_c_prints_the_report_so_far() {
    let (url, seen) = stub_counting(|_| (200, Duration::from_millis(50)));
    let mut child = Command::new(env!("CARGO_BIN_EXE_qalign"))
        .args([
            "loadtest",
            &url,
            "--requests",
            "1000000",
            "--concurrency",
            "2",
        ])
        .arg("--images")
        .arg(image())
        .env_remove("QALIGN_API_KEY")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupted once requests are flowing (the handler is in place before the first is sent).
    let started = std::time::Instant::now();
    while seen.load(Ordering::SeqCst) < 5 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no request came"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let (mut stdout, mut stderr) = (String::new(), String::new());
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let code = child.wait().unwrap().code();
    assert_eq!(code, Some(130), "{stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["interrupted"], true);
    let completed = report["completed"].as_u64().unwrap();
    assert!(completed > 0 && completed < 1_000_000, "{report}");
    assert_eq!(report["ok"].as_u64().unwrap(), completed, "{report}");
    check_consistent(&report);
    assert!(stderr.contains("interrupted after"), "{stderr}");
}

#[test]
fn bad_flags_are_usage_errors() {
    for (url, extra) in [
        ("http://", &[][..]),
        ("http://exa mple", &[]),
        ("http://127.0.0.1:1?x=1", &[]),
        ("http://127.0.0.1:1/v1/score", &[]),
        ("localhost:8080", &[]),
        ("http://127.0.0.1:1", &["--timeout-s", "1e300"]),
        ("http://127.0.0.1:1", &["--timeout-s", "0"]),
        ("http://127.0.0.1:1", &["--requests", "0"]),
        ("http://127.0.0.1:1", &["--requests", "10000001"]),
        ("http://127.0.0.1:1", &["--concurrency", "0"]),
        ("http://127.0.0.1:1", &["--files-per-request", "0"]),
    ] {
        let out = loadtest(url, extra).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{url} {extra:?}: {stderr}");
        assert!(stderr.starts_with("error: "), "{url} {extra:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{url} {extra:?}");
    }
}

#[test]
fn real_server_wrong_path_and_overload() {
    let server = ServeProcess::start(&["--max-concurrent-requests", "1"]);
    // Nothing at /foo/v1/score: 404s, and the hint names the base URL.
    let r = run(&format!("{}/foo", server.url), &["--requests", "2"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(count(&r.report, "404"), 2, "{}", r.report);
    check_consistent(&r.report);
    assert!(r.stderr.contains("base URL"), "{}", r.stderr);
    // Six clients against one slot: some are turned away with 503, the rest scored.
    let r = run(&server.url, &["--requests", "12", "--concurrency", "6"]);
    check_consistent(&r.report);
    assert_eq!(r.report["completed"], 12);
    let (ok, busy) = (count(&r.report, "200"), count(&r.report, "503"));
    assert_eq!(ok + busy, 12, "{}", r.report);
    assert!(ok > 0 && busy > 0, "{}", r.report);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!("{busy} of 12 requests failed")),
        "{}",
        r.stderr
    );
    // A healthy run: every request answered, exit 0.
    let r = run(&server.url, &["--requests", "3", "--concurrency", "1"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        (r.report["ok"].as_u64(), r.report["completed"].as_u64()),
        (Some(3), Some(3))
    );
    check_consistent(&r.report);
}
