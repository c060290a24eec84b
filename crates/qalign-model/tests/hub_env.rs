//! `resolve_model` (what the CLI calls) reads the hub settings from the environment as
//! huggingface_hub does: HF_HUB_CACHE over HF_HOME/hub, HF_HUB_OFFLINE, HF_ENDPOINT.
//! One test in its own binary, because it changes the process environment.

use std::path::{Path, PathBuf};

use qalign_model::hub::{DownloadFailure, HubError, HubOptions, resolve_model};

const REV: &str = "fedcba9876543210fedcba9876543210fedcba98";

/// A cache under `hub` holding `org/tiny` with config.json and model.safetensors; the snapshot.
fn fake_cache(hub: &Path) -> PathBuf {
    let tiny = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/tiny-onealign"
    ));
    let repo = hub.join("models--org--tiny");
    let snapshot = repo.join("snapshots").join(REV);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), REV).unwrap();
    for name in ["config.json", "model.safetensors"] {
        std::os::unix::fs::symlink(tiny.join(name).canonicalize().unwrap(), snapshot.join(name))
            .unwrap();
    }
    snapshot
}

fn set(name: &str, value: impl AsRef<std::ffi::OsStr>) {
    // SAFETY: the only test of this binary; no other thread reads the environment meanwhile.
    unsafe { std::env::set_var(name, value) }
}

fn unset(name: &str) {
    // SAFETY: as in `set`.
    unsafe { std::env::remove_var(name) }
}

#[test]
fn resolve_model_follows_the_hugging_face_environment() {
    for name in [
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "HF_HOME",
        "XDG_CACHE_HOME",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_ENDPOINT",
    ] {
        unset(name);
    }
    let home = tempfile::tempdir().unwrap();
    let snapshot = fake_cache(&home.path().join("hub"));

    // HF_HOME/hub, offline by argument.
    set("HF_HOME", home.path());
    let resolved = resolve_model("org/tiny", true).unwrap();
    assert_eq!(resolved.dir, snapshot);

    // Offline by HF_HUB_OFFLINE, even when the argument says online.
    set("HF_HUB_OFFLINE", "1");
    set("HF_ENDPOINT", "http://127.0.0.1:9");
    assert!(HubOptions::from_env().unwrap().offline);
    assert_eq!(resolve_model("org/tiny", false).unwrap().dir, snapshot);

    // HF_HUB_CACHE wins over HF_HOME: an empty cache there is "not cached", naming that folder.
    let other = tempfile::tempdir().unwrap();
    set("HF_HUB_CACHE", other.path());
    let err = resolve_model("org/tiny", false).unwrap_err();
    assert!(
        matches!(&err, HubError::NotCached { cache, missing, .. }
            if cache == other.path() && missing == "config.json"),
        "{err}"
    );

    // Online: HF_ENDPOINT is the hub asked (a closed port here), and the failure is typed.
    unset("HF_HUB_OFFLINE");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    set("HF_ENDPOINT", format!("{endpoint}/"));
    let opts = HubOptions::from_env().unwrap();
    assert_eq!(
        (opts.endpoint.as_str(), opts.offline),
        (endpoint.as_str(), false)
    );
    let err = resolve_model("org/tiny", false).unwrap_err();
    assert!(
        matches!(&err, HubError::Download { file, kind: DownloadFailure::Unreachable, .. }
            if file == "config.json"),
        "{err:?}"
    );

    // The other names huggingface_hub 0.19.4 reads (constants.py): HUGGINGFACE_HUB_CACHE below
    // HF_HUB_CACHE and above HF_HOME; XDG_CACHE_HOME/huggingface/hub below HF_HOME.
    unset("HF_HUB_CACHE");
    set("HUGGINGFACE_HUB_CACHE", other.path());
    assert_eq!(HubOptions::from_env().unwrap().cache_dir, other.path());
    set("HF_HUB_CACHE", home.path().join("hub"));
    assert_eq!(
        HubOptions::from_env().unwrap().cache_dir,
        home.path().join("hub")
    );
    unset("HF_HUB_CACHE");
    unset("HUGGINGFACE_HUB_CACHE");
    unset("HF_HOME");
    set("XDG_CACHE_HOME", home.path());
    assert_eq!(
        HubOptions::from_env().unwrap().cache_dir,
        home.path().join("huggingface").join("hub")
    );
    // HF_HOME and XDG_CACHE_HOME go through expanduser: a leading `~` is the home folder.
    let user_home = std::env::home_dir().unwrap();
    set("XDG_CACHE_HOME", "~/xdg");
    assert_eq!(
        HubOptions::from_env().unwrap().cache_dir,
        user_home.join("xdg").join("huggingface").join("hub")
    );
    set("HF_HOME", "~/hf");
    assert_eq!(
        HubOptions::from_env().unwrap().cache_dir,
        user_home.join("hf").join("hub")
    );
    unset("XDG_CACHE_HOME");
    set("HF_HOME", home.path());

    // Offline is _is_true(HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE): 1, ON, YES, TRUE in any case;
    // transformers 4.36 is offline on TRANSFORMERS_OFFLINE alone too.
    for (hub, transformers, offline) in [
        (Some("ON"), None, true),
        (Some("yes"), None, true),
        (Some("True"), None, true),
        (Some("0"), None, false),
        (Some("off"), None, false),
        (None, Some("1"), true),
        (Some("0"), Some("1"), true),
        (None, Some("no"), false),
    ] {
        match hub {
            Some(v) => set("HF_HUB_OFFLINE", v),
            None => unset("HF_HUB_OFFLINE"),
        }
        match transformers {
            Some(v) => set("TRANSFORMERS_OFFLINE", v),
            None => unset("TRANSFORMERS_OFFLINE"),
        }
        assert_eq!(
            HubOptions::from_env().unwrap().offline,
            offline,
            "HF_HUB_OFFLINE={hub:?} TRANSFORMERS_OFFLINE={transformers:?}"
        );
    }
    // TRANSFORMERS_OFFLINE=1 reads the cache with no network (the endpoint is closed).
    unset("HF_HUB_OFFLINE");
    set("TRANSFORMERS_OFFLINE", "1");
    assert_eq!(resolve_model("org/tiny", false).unwrap().dir, snapshot);
    unset("TRANSFORMERS_OFFLINE");
    unset("HF_HUB_OFFLINE");

    // A directory is used as is, whatever the environment says.
    let dir = resolve_model(snapshot.to_str().unwrap(), false).unwrap();
    assert_eq!((dir.dir, dir.hub_id), (snapshot, None));
}
