//! The web page at `/` in a real headless browser (Debian's chromium driven over WebDriver by
//! chromedriver): upload fixture images through the file picker, read the scores the page shows,
//! and compare them with `qalign score`, against a server that is too busy for all of them at
//! once; then bad files, an oversized one and a server that needs a key, each with its message on
//! the page. A screenshot is kept in target/tmp/web-page.png.

mod common;
mod serve_common;

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
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

/// A headless chromium session.
async fn browser(driver_url: &str) -> Client {
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
    ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(driver_url)
        .await
        .expect(INSTALL_HINT)
}

/// Waits until `css` matches `count` elements.
async fn wait_for(client: &Client, css: &str, count: usize) -> Vec<fantoccini::elements::Element> {
    let started = Instant::now();
    loop {
        let found = client.find_all(Locator::Css(css)).await.unwrap();
        if found.len() == count {
            return found;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the page never showed {count} of `{css}` (it shows {})",
            found.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
    // One request at a time, and the page sends no more at once than that: a raw client holds
    // the only slot with an upload that never ends, so the page meets 503 (busy), which it must
    // wait out and retry once the slot is free.
    let server = ServeProcess::start(&["--max-concurrent-requests", "1"]);
    let mut hold = TcpStream::connect(server.url.trim_start_matches("http://")).unwrap();
    write!(
        hold,
        "POST /v1/score HTTP/1.1\r\nHost: qalign\r\n\
         Content-Type: multipart/form-data; boundary=b\r\n\
         Content-Length: 100000\r\n\r\n--b\r\n"
    )
    .unwrap();
    hold.flush().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let (_driver, driver_url) = start_chromedriver();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = browser(&driver_url).await;
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
        wait_for(&client, ".card .pending", names.len()).await;
        let started = Instant::now();
        while !client
            .find(Locator::Css("#cards"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
            .contains("waiting: the server is at its limit of 1 requests in flight")
        {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "no card waits for the busy server"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(hold);
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

/// Text of the elements matching `css`, in page order.
async fn texts(client: &Client, css: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in client.find_all(Locator::Css(css)).await.unwrap() {
        out.push(e.text().await.unwrap());
    }
    out
}

#[test]
fn the_page_explains_bad_files_and_asks_for_the_key() {
    const KEY: &str = "page-key";
    // A file name that is HTML, a text file, and a file over --max-body-mb.
    let dir = tempfile::tempdir().unwrap();
    let html_name = "<img src=x onerror=alert(1)> & é.jpg";
    let photo = std::fs::read(common::images_dir().join("singapore_flyer.jpg")).unwrap();
    std::fs::write(dir.path().join(html_name), &photo).unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not an image\n").unwrap();
    std::fs::write(dir.path().join("big.png"), vec![0u8; 1_200_000]).unwrap();
    let server = ServeProcess::start(&["--api-key", KEY, "--max-body-mb", "1"]);
    let (_driver, driver_url) = start_chromedriver();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // The same file straight to the API.
        let form = reqwest::multipart::Form::new().part(
            "file",
            reqwest::multipart::Part::bytes(photo).file_name(html_name),
        );
        let api: serde_json::Value = reqwest::Client::new()
            .post(format!("{}/v1/score", server.url))
            .bearer_auth(KEY)
            .multipart(form)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let api_score = api["results"][0]["score"].as_f64().unwrap();

        let client = browser(&driver_url).await;
        client.goto(&server.url).await.unwrap();
        // /info says the server needs a key: the field says so once the page has read it.
        wait_for(&client, "#apikey[required]", 1).await;
        let picked: Vec<String> = [html_name, "notes.txt", "big.png"]
            .iter()
            .map(|n| dir.path().join(n).to_string_lossy().into_owned())
            .collect();
        let input = client.find(Locator::Css("#files")).await.unwrap();
        input.send_keys(&picked.join("\n")).await.unwrap();
        wait_for(&client, ".card.done", 3).await;
        let card_error = |name: &str| {
            let css = format!(".card[data-name=\"{name}\"] .error");
            let client = client.clone();
            async move { texts(&client, &css).await.join(" / ") }
        };
        // Without the key: said so, for the files sent; the big file was never sent.
        let needs_key = "error: this server needs an API key: \
                         enter it in the API key field, then retry";
        assert_eq!(card_error(html_name).await, needs_key);
        assert_eq!(card_error("notes.txt").await, needs_key);
        let too_big = "error: big.png is 1.14 MB; \
                       this server accepts at most 1 MB per request (--max-body-mb)";
        assert_eq!(card_error("big.png").await, too_big);
        let key_field = client.find(Locator::Css("#apikey")).await.unwrap();
        let invalid = key_field.attr("aria-invalid").await.unwrap();
        assert_eq!(invalid.as_deref(), Some("true"));
        // With the key, from the keyboard alone: type it, then retry the two sent files.
        key_field.send_keys(KEY).await.unwrap();
        for name in [html_name, "notes.txt"] {
            let css = format!(".card[data-name=\"{name}\"] button.retry");
            let retry = client.find(Locator::Css(&css)).await.unwrap();
            retry.send_keys("\u{E007}").await.unwrap(); // Enter
        }
        wait_for(&client, ".card.done", 3).await;
        wait_for(&client, ".card .score", 1).await;
        // Scored as by the API, and the name is text, not markup.
        let score = client.find(Locator::Css(".card .score")).await.unwrap();
        let shown: f64 = score
            .attr("data-score")
            .await
            .unwrap()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(shown, api_score);
        let names = texts(&client, ".card .name").await;
        assert_eq!(names[0], format!("{html_name} #1"));
        let markup = client.find_all(Locator::Css(".name img")).await.unwrap();
        assert!(markup.is_empty());
        let notes = card_error("notes.txt").await;
        assert!(notes.contains("not a recognised image"), "{notes}");
        // Announced, and exported: one CSV row per file, with the API's numbers.
        let progress = client.find(Locator::Css("#progress")).await.unwrap();
        let live = progress.attr("aria-live").await.unwrap();
        assert_eq!(live.as_deref(), Some("polite"));
        let summary = progress.text().await.unwrap();
        assert_eq!(summary, "3 files done, 1 scored, 2 failed");
        let csv = client.execute("return resultsCsv()", vec![]).await.unwrap();
        let csv = csv.as_str().unwrap();
        let rows: Vec<&str> = csv.lines().collect();
        assert_eq!(rows.len(), 4, "{csv}");
        let record = &api["results"][0];
        let mut numbers = vec![record["std"].to_string(), record["entropy"].to_string()];
        numbers.extend(
            record["probs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p.to_string()),
        );
        let expected = format!("{html_name},quality,1-5,{api_score},{},", numbers.join(","));
        assert_eq!(rows[1], expected);
        let export = client.find(Locator::Css("#export")).await.unwrap();
        assert!(export.is_enabled().await.unwrap());
        let metrics = reqwest::get(format!("{}/metrics", server.url))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(!metrics.contains("status=\"413\""), "{metrics}");
        client.close().await.unwrap();
    });
}
