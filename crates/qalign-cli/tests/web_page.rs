//! The web page at `/` in a real headless browser (Debian's chromium driven over WebDriver by
//! chromedriver): upload fixture images through the file picker, read the scores the page shows,
//! and compare them with `qalign score`, against a server that is too busy for all of them at
//! once. A screenshot is kept in target/tmp/web-page.png.

mod common;
mod serve_common;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{ClientBuilder, Locator};
use serve_common::ServeProcess;

const INSTALL_HINT: &str = "the web page test needs Debian's chromium and chromium-driver: \
                            apt-get install -y chromium chromium-driver";

struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_chromedriver() -> (Driver, String) {
    let port = free_port();
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect(INSTALL_HINT);
    let driver = Driver(child);
    let url = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    while serve_common::plain_http::get_status(&format!("{url}/status")).ok() != Some(200) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "chromedriver did not start; {INSTALL_HINT}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (driver, url)
}

fn chromium() -> String {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect(INSTALL_HINT)
        .to_string()
}

/// `qalign score` of one fixture image on the 1-5 scale.
fn cli_score(name: &str) -> f64 {
    let mut cmd = common::score();
    cmd.args(["--format", "json"])
        .arg(common::images_dir().join(name));
    let run = common::run_expecting(&mut cmd, 0);
    common::num(&common::json_records(&run.stdout)[0]["score"])
}

#[test]
fn the_page_scores_uploads_like_the_cli_and_sorts_them() {
    let names = ["singapore_flyer.jpg", "synth_landscape_300x200_rgb.png"];
    let expected: Vec<f64> = names.iter().map(|n| cli_score(n)).collect();
    // One request at a time: of files sent together, all but one first get 503 (busy), which
    // the page must wait out and retry.
    let server = ServeProcess::start(&["--max-concurrent-requests", "1"]);
    let (_driver, driver_url) = start_chromedriver();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": chromium(),
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1200,900"],
            }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&driver_url)
            .await
            .expect(INSTALL_HINT);
        client.goto(&server.url).await.unwrap();
        let input = client.find(Locator::Css("#files")).await.unwrap();
        // Picked together (one `change` event): the page sends them at once.
        let picked: Vec<String> = names
            .iter()
            .map(|name| {
                let path = common::images_dir().join(name).canonicalize().unwrap();
                path.to_string_lossy().into_owned()
            })
            .collect();
        input.send_keys(&picked.join("\n")).await.unwrap();
        let started = Instant::now();
        let cards = loop {
            let cards = client.find_all(Locator::Css(".card.done")).await.unwrap();
            if cards.len() == names.len() {
                break cards;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the page did not show the scores"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let mut shown = Vec::new();
        for card in &cards {
            let name = card.attr("data-name").await.unwrap().unwrap();
            let score = card.find(Locator::Css(".score")).await.unwrap();
            let exact: f64 = score
                .attr("data-score")
                .await
                .unwrap()
                .unwrap()
                .parse()
                .unwrap();
            let text = score.text().await.unwrap();
            let bars = card.find_all(Locator::Css(".bar")).await.unwrap();
            assert_eq!(bars.len(), 5, "one bar per level");
            shown.push((name, exact, text));
        }
        // A video gets its per-frame timeline: one dot per sampled frame.
        let video = common::fixtures()
            .join("video/baby.mp4")
            .canonicalize()
            .unwrap();
        input.send_keys(&video.to_string_lossy()).await.unwrap();
        let started = Instant::now();
        let dots = loop {
            let dots = client
                .find_all(Locator::Css(
                    ".card.done[data-name='baby.mp4'] svg.timeline circle",
                ))
                .await
                .unwrap();
            if !dots.is_empty() {
                break dots.len();
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "the page did not show the video timeline"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let metrics = reqwest::get(format!("{}/metrics", server.url))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let busy: u64 = metrics
            .lines()
            .find_map(|line| line.strip_prefix("qalign_requests_total{status=\"503\"} "))
            .map_or(0, |n| n.parse().unwrap());
        assert!(busy >= 1, "no upload met a busy server:\n{metrics}");
        assert!(
            client
                .find_all(Locator::Css(".error"))
                .await
                .unwrap()
                .is_empty()
        );
        let png = client.screenshot().await.unwrap();
        let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("web-page.png");
        std::fs::write(&shot, png).unwrap();
        client.close().await.unwrap();
        for (name, exact, text) in &shown {
            let i = names.iter().position(|n| n == name).unwrap();
            assert_eq!(*exact, expected[i], "{name}");
            assert_eq!(*text, format!("{:.4}", expected[i]), "{name}");
        }
        let mut cmd = common::score();
        cmd.args(["--format", "json", "--per-frame"])
            .arg(common::fixtures().join("video/baby.mp4"));
        let run = common::run_expecting(&mut cmd, 0);
        let frames = common::json_records(&run.stdout)[0]["per_frame"]
            .as_array()
            .unwrap()
            .len();
        assert_eq!(dots, frames);
        // Side by side, best first.
        assert!(shown[0].1 >= shown[1].1, "{shown:?}");
    });
}
