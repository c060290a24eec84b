//! A real `qalign serve` process for the server tests: started on a free loopback port, its
//! address read from stderr, waited on until healthy, stopped with SIGTERM.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures"))
}

pub fn tiny_model() -> PathBuf {
    fixtures().join("tiny-onealign")
}

pub struct ServeProcess {
    child: Child,
    pub url: String,
    /// Everything the server wrote to stderr so far.
    pub stderr: Arc<Mutex<String>>,
}

impl ServeProcess {
    /// `qalign serve --model <tiny> --port 0 <extra>`, healthy.
    pub fn start(extra: &[&str]) -> Self {
        let server = Self::spawn(&tiny_model(), extra);
        server.wait_healthy(Duration::from_secs(60));
        server
    }

    /// Started, not waited on.
    pub fn spawn(model: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_qalign"))
            .args(["serve", "--port", "0", "--model"])
            .arg(model)
            .args(extra)
            .env_remove("QALIGN_MODEL")
            .env_remove("QALIGN_API_KEY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start qalign serve");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let log = Arc::clone(&stderr);
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            while let Some(Ok(line)) = lines.next() {
                if let Some(addr) = line.strip_prefix("listening on ")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(addr.to_string());
                }
                let mut log = log.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let url = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(url) => url,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "qalign serve never said where it listens:\n{}",
                    stderr.lock().unwrap()
                );
            }
        };
        Self { child, url, stderr }
    }

    pub fn wait_healthy(&self, limit: Duration) {
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Ok(r) = plain_http::get_status(&format!("{}/health", self.url))
                && r == 200
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("never healthy:\n{}", self.stderr.lock().unwrap());
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit, returning its exit code.
    pub fn wait(&mut self, limit: Duration) -> i32 {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().expect("killed by a signal");
            }
            if started.elapsed() > limit {
                let _ = self.child.kill();
                panic!(
                    "did not exit in {limit:?}:\n{}",
                    self.stderr.lock().unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tiny synchronous GET for health polling, over a plain TCP socket (no runtime needed).
pub mod plain_http {
    use std::io::{Read, Write};
    use std::net::TcpStream;

    pub fn get_status(url: &str) -> std::io::Result<u16> {
        let rest = url.strip_prefix("http://").unwrap_or(url);
        let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
        let mut stream = TcpStream::connect(host)?;
        write!(
            stream,
            "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head)?;
        std::str::from_utf8(&head[9..12])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other("not an HTTP answer"))
    }
}
