//! Hub resolution without the network: qalign's `resolve_model_with` against a prepared Hugging Face
//! cache (`models--owner--name/snapshots/<rev>/` + `refs/main`), offline and online. Online runs talk
//! to a closed local port (the hub is unreachable) or to a tiny local HTTP server that answers the
//! file-list request and fails file downloads, so that each failure kind can be asserted.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use qalign_model::hub::{DownloadFailure, HubError, HubOptions, resolve_model_with};
use qalign_model::{CheckpointFiles, WeightFormat};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");
const ID: &str = "org/tiny";
const REV: &str = "0123456789abcdef0123456789abcdef01234567";

fn tiny(name: &str) -> PathBuf {
    Path::new(FIXTURES).join("tiny-onealign").join(name)
}

/// A hub cache holding `ID` at revision `REV` with the given tiny-model files (linked, as the hub
/// cache links snapshots to blobs); returns (cache dir, snapshot dir).
fn fake_cache(files: &[&str]) -> (tempfile::TempDir, PathBuf) {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--org--tiny");
    let snapshot = repo.join("snapshots").join(REV);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    // huggingface_hub writes the ref without a newline.
    std::fs::write(repo.join("refs/main"), REV).unwrap();
    for name in files {
        std::os::unix::fs::symlink(tiny(name).canonicalize().unwrap(), snapshot.join(name))
            .unwrap();
    }
    (cache, snapshot)
}

fn options(cache: &Path, endpoint: &str, offline: bool) -> HubOptions {
    HubOptions {
        cache_dir: cache.to_path_buf(),
        endpoint: endpoint.to_string(),
        offline,
        progress: false,
        revision: None,
    }
}

fn at(mut opts: HubOptions, revision: &str) -> HubOptions {
    opts.revision = Some(revision.to_string());
    opts
}

/// A URL on which nothing listens: connecting fails at once.
fn closed_endpoint() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("http://127.0.0.1:{port}")
}

/// A local HTTP server: `GET /api/models/...` returns a file list of `listed`, every other path
/// answers `file_status` with an empty body. Returns the endpoint and the request paths seen.
fn fake_hub(listed: &[&str], file_status: u16) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let siblings: Vec<_> = listed
        .iter()
        .map(|n| serde_json::json!({ "rfilename": n }))
        .collect();
    let listing = serde_json::json!({ "siblings": siblings, "sha": REV }).to_string();
    let log = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            serve(stream, &listing, file_status, &log);
        }
    });
    (endpoint, seen)
}

fn serve(mut stream: TcpStream, listing: &str, file_status: u16, log: &Mutex<Vec<String>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    reader.read_line(&mut request_line).unwrap();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
            break;
        }
    }
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .to_string();
    let (status, body) = if path.starts_with("/api/models/") {
        (200, listing)
    } else {
        (file_status, "")
    };
    let reply = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    // Logged before answering, so the client never sees an answer before its request is logged.
    log.lock().unwrap().push(path);
    let _ = stream.write_all(reply.as_bytes());
}

#[test]
fn offline_resolves_a_cached_snapshot_to_its_folder() {
    let (cache, snapshot) = fake_cache(&["config.json", "model.safetensors", "tokenizer.model"]);
    let resolved =
        resolve_model_with(ID, &options(cache.path(), &closed_endpoint(), true)).unwrap();
    assert_eq!(resolved.dir, snapshot);
    assert_eq!(resolved.hub_id.as_deref(), Some(ID));
    // The folder is a loadable checkpoint.
    let files = CheckpointFiles::discover(&resolved.dir, WeightFormat::Auto).unwrap();
    assert_eq!(files.shards, vec![snapshot.join("model.safetensors")]);
}

#[test]
fn offline_sharded_snapshot_needs_every_shard() {
    let shards = [
        "pytorch_model-00001-of-00003.bin",
        "pytorch_model-00002-of-00003.bin",
        "pytorch_model-00003-of-00003.bin",
    ];
    let mut files = vec!["config.json", "pytorch_model.bin.index.json"];
    files.extend(shards);
    let (cache, snapshot) = fake_cache(&files);
    let opts = options(cache.path(), &closed_endpoint(), true);
    assert_eq!(resolve_model_with(ID, &opts).unwrap().dir, snapshot);

    std::fs::remove_file(snapshot.join(shards[1])).unwrap();
    let err = resolve_model_with(ID, &opts).unwrap_err();
    assert!(
        matches!(&err, HubError::NotCached { missing, .. } if missing == shards[1]),
        "{err}"
    );
    assert!(err.to_string().contains(shards[1]), "{err}");
}

#[test]
fn offline_missing_file_is_an_error_naming_it() {
    let (cache, _) = fake_cache(&["model.safetensors"]);
    let err = resolve_model_with(ID, &options(cache.path(), &closed_endpoint(), true)).unwrap_err();
    match &err {
        HubError::NotCached {
            id,
            cache: dir,
            missing,
        } => {
            assert_eq!((id.as_str(), missing.as_str()), (ID, "config.json"));
            assert_eq!(dir, cache.path());
        }
        other => panic!("expected NotCached, got {other:?}"),
    }
    let text = err.to_string();
    assert!(text.contains("config.json") && text.contains(ID), "{text}");
    // Library errors name no command-line flags; the CLI adds its own hint.
    assert!(!text.contains("--"), "{text}");

    let (cache, _) = fake_cache(&["config.json"]);
    let err = resolve_model_with(ID, &options(cache.path(), &closed_endpoint(), true)).unwrap_err();
    assert!(
        matches!(&err, HubError::NotCached { missing, .. } if missing.contains("model.safetensors")),
        "{err}"
    );

    // Nothing cached at all (no refs/main).
    let empty = tempfile::tempdir().unwrap();
    let err = resolve_model_with(ID, &options(empty.path(), &closed_endpoint(), true)).unwrap_err();
    assert!(matches!(&err, HubError::NotCached { .. }), "{err}");
}

#[test]
fn online_unreachable_hub_is_a_typed_error() {
    let empty = tempfile::tempdir().unwrap();
    let endpoint = closed_endpoint();
    let started = std::time::Instant::now();
    let err = resolve_model_with(ID, &options(empty.path(), &endpoint, false)).unwrap_err();
    assert!(started.elapsed().as_secs() < 10);
    match &err {
        HubError::Download {
            file,
            kind,
            endpoint: at,
            ..
        } => {
            assert_eq!(file, "config.json");
            assert_eq!(*kind, DownloadFailure::Unreachable);
            assert_eq!(at, &endpoint);
        }
        other => panic!("expected Download, got {other:?}"),
    }
    assert!(!err.to_string().contains("--"), "{err}");
}

#[test]
fn online_fully_cached_model_needs_no_network() {
    let all = [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "tokenizer.model",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    ];
    let (cache, snapshot) = fake_cache(&all);
    let resolved =
        resolve_model_with(ID, &options(cache.path(), &closed_endpoint(), false)).unwrap();
    assert_eq!(resolved.dir, snapshot);
}

#[test]
fn online_optional_file_not_cached_and_hub_unreachable_is_an_error() {
    // config and weights cached, tokenizer.model not: whether the repository has one cannot be
    // known, so this is an error instead of a silent fallback to the built-in vocabulary.
    let (cache, _) = fake_cache(&["config.json", "model.safetensors"]);
    let err =
        resolve_model_with(ID, &options(cache.path(), &closed_endpoint(), false)).unwrap_err();
    assert!(matches!(&err, HubError::Listing { .. }), "{err:?}");
    assert_eq!(err.download_failure(), Some(DownloadFailure::Unreachable));
}

#[test]
fn online_failed_download_of_a_listed_optional_file_is_an_error() {
    let (cache, _) = fake_cache(&["config.json", "model.safetensors"]);
    let file = "preprocessor_config.json";
    for status in [500, 403] {
        let (endpoint, seen) = fake_hub(
            &[
                "config.json",
                "model.safetensors",
                "preprocessor_config.json",
                "tokenizer.model",
            ],
            status,
        );
        let err = resolve_model_with(ID, &options(cache.path(), &endpoint, false)).unwrap_err();
        match &err {
            HubError::Download {
                file: failed, kind, ..
            } => {
                assert_eq!(failed, file);
                assert_eq!(*kind, DownloadFailure::Status(status));
            }
            other => panic!("expected Download, got {other:?}"),
        }
        let seen = seen.lock().unwrap().clone();
        assert!(seen[0].starts_with("/api/models/org/tiny"), "{seen:?}");
        assert!(seen[1].ends_with("/preprocessor_config.json"), "{seen:?}");
    }
}

#[test]
fn online_optional_files_the_repository_lacks_are_skipped() {
    let (cache, snapshot) = fake_cache(&["config.json", "model.safetensors"]);
    // The repository lists no optional file: nothing is downloaded, the folder resolves.
    let (endpoint, seen) = fake_hub(&["config.json", "model.safetensors"], 500);
    let resolved = resolve_model_with(ID, &options(cache.path(), &endpoint, false)).unwrap();
    assert_eq!(resolved.dir, snapshot);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "only the file list is requested: {seen:?}");
    assert!(seen[0].starts_with("/api/models/org/tiny"), "{seen:?}");
}

#[test]
fn online_repository_without_weights_says_so() {
    let all = [
        "config.json",
        "preprocessor_config.json",
        "tokenizer.model",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    ];
    let (cache, _) = fake_cache(&all);
    let (endpoint, _) = fake_hub(&all, 500);
    let err = resolve_model_with(ID, &options(cache.path(), &endpoint, false)).unwrap_err();
    assert!(matches!(&err, HubError::NoWeights { .. }), "{err}");
}

#[test]
fn directories_and_bad_specs() {
    let opts = options(Path::new("/nonexistent"), &closed_endpoint(), false);
    let dir = tiny("");
    let resolved = resolve_model_with(dir.to_str().unwrap(), &opts).unwrap();
    assert_eq!(resolved.dir, dir);
    assert_eq!(resolved.hub_id, None);
    for bad in ["one-align", "a/b/c", "../x", "/nonexistent/dir"] {
        let err = resolve_model_with(bad, &opts).unwrap_err();
        assert!(matches!(&err, HubError::BadSpec(s) if s == bad), "{err}");
    }
}

/// A revision picks the snapshot as huggingface_hub does: a branch or tag through
/// `refs/<revision>` (a ref with slashes is a nested file), a commit hash directly.
#[test]
fn offline_revisions_pick_their_snapshot() {
    let (cache, main) = fake_cache(&["config.json", "model.safetensors"]);
    let repo = cache.path().join("models--org--tiny");
    let other = "fedcba9876543210fedcba9876543210fedcba98";
    let tagged = repo.join("snapshots").join(other);
    std::fs::create_dir_all(&tagged).unwrap();
    for name in ["config.json", "model.safetensors"] {
        std::os::unix::fs::symlink(tiny(name).canonicalize().unwrap(), tagged.join(name)).unwrap();
    }
    std::fs::write(repo.join("refs/v1.0"), other).unwrap();
    std::fs::create_dir_all(repo.join("refs/refs/pr")).unwrap();
    std::fs::write(repo.join("refs/refs/pr/1"), other).unwrap();
    let opts = options(cache.path(), &closed_endpoint(), true);

    let resolved = resolve_model_with(ID, &at(opts.clone(), "v1.0")).unwrap();
    assert_eq!(resolved.dir, tagged);
    assert_eq!(resolved.revision.as_deref(), Some("v1.0"));
    assert_eq!(
        resolve_model_with(ID, &at(opts.clone(), "refs/pr/1"))
            .unwrap()
            .dir,
        tagged
    );
    assert_eq!(
        resolve_model_with(ID, &at(opts.clone(), "main"))
            .unwrap()
            .dir,
        main
    );
    // A commit hash needs no ref.
    assert_eq!(
        resolve_model_with(ID, &at(opts.clone(), REV)).unwrap().dir,
        main
    );
    std::fs::remove_file(repo.join("refs/main")).unwrap();
    assert_eq!(
        resolve_model_with(ID, &at(opts.clone(), other))
            .unwrap()
            .dir,
        tagged
    );

    let err = resolve_model_with(ID, &at(opts.clone(), "v2")).unwrap_err();
    assert!(matches!(&err, HubError::NotCached { .. }), "{err:?}");
    assert!(err.to_string().contains("`org/tiny@v2`"), "{err}");
}

#[test]
fn online_revisions_go_into_the_urls() {
    let empty = tempfile::tempdir().unwrap();
    for (revision, in_url) in [("v1.0", "v1.0"), ("refs/pr/1", "refs%2Fpr%2F1")] {
        let (endpoint, seen) = fake_hub(&["config.json"], 404);
        let opts = at(options(empty.path(), &endpoint, false), revision);
        let err = resolve_model_with(ID, &opts).unwrap_err();
        assert!(
            matches!(
                &err,
                HubError::Download {
                    kind: DownloadFailure::Status(404),
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            err.to_string().contains(&format!("`org/tiny@{revision}`")),
            "{err}"
        );
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen, [format!("/org/tiny/resolve/{in_url}/config.json")]);
    }
}

#[test]
fn bad_revisions_and_a_revision_for_a_folder_are_refused() {
    let cache = tempfile::tempdir().unwrap();
    let opts = options(cache.path(), &closed_endpoint(), true);
    for bad in ["", "../../x", "a//b", "v1 ", "x\ny", "a:b", "refs/"] {
        let err = resolve_model_with(ID, &at(opts.clone(), bad)).unwrap_err();
        assert!(
            matches!(&err, HubError::BadRevision(r) if r == bad),
            "{bad:?}: {err:?}"
        );
    }
    let dir = tiny("");
    let err = resolve_model_with(dir.to_str().unwrap(), &at(opts, "v1.0")).unwrap_err();
    assert!(
        matches!(&err, HubError::RevisionForFolder { .. }),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("--revision v1.0 applies to a hub id"),
        "{err}"
    );
}
