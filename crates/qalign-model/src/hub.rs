//! Resolves `--model` to a local checkpoint folder: either a directory as given, or a
//! Hugging Face hub id looked up in the standard cache (`HF_HOME`, `HF_HUB_CACHE`) and,
//! when online, downloaded with the hf-hub crate. Offline use must never touch the network.

use std::path::{Path, PathBuf};

use hf_hub::{Cache, Repo, RepoType};

/// The checkpoint the official scorers load by default.
pub const DEFAULT_MODEL: &str = "q-future/one-align";

/// Files besides the weights that a checkpoint folder must or may hold.
const REQUIRED_FILES: &[&str] = &["config.json"];
const OPTIONAL_FILES: &[&str] = &[
    "preprocessor_config.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
];
/// Weight layouts in order of preference; the first whose anchor file exists wins.
const WEIGHT_ANCHORS: &[&str] = &[
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
];

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(
        "model `{id}` is not in the Hugging Face cache ({cache}) and offline mode is on \
         (missing: {missing}); download it once with network access (run without --offline and \
         without HF_HUB_OFFLINE=1), or pass --model DIR with a local checkpoint folder"
    )]
    NotCached {
        id: String,
        cache: PathBuf,
        missing: String,
    },
    #[error("`{0}` is neither an existing directory nor a hub id of the form owner/name")]
    BadSpec(String),
    #[error("could not download `{file}` of `{id}`: {message}")]
    Download {
        id: String,
        file: String,
        message: String,
    },
    #[error("`{id}` has no weights: none of {anchors} in {where_}")]
    NoWeights {
        id: String,
        anchors: String,
        where_: String,
    },
    #[error("could not read {path}: {message}")]
    Index { path: PathBuf, message: String },
}

/// Where a model spec resolved to.
#[derive(Debug, Clone)]
pub struct ResolvedModel {
    pub dir: PathBuf,
    /// The hub id when the spec was one.
    pub hub_id: Option<String>,
}

/// Is offline mode requested by the environment (`HF_HUB_OFFLINE=1`)?
pub fn offline_from_env() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| matches!(v.trim(), "1" | "true" | "TRUE" | "True" | "yes" | "on"))
        .unwrap_or(false)
}

/// Resolve a `--model` value: an existing directory is used as is; otherwise it must be a hub id.
pub fn resolve_model(spec: &str, offline: bool) -> Result<ResolvedModel, HubError> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(ResolvedModel {
            dir: path.to_path_buf(),
            hub_id: None,
        });
    }
    if !looks_like_hub_id(spec) {
        return Err(HubError::BadSpec(spec.to_string()));
    }
    let dir = if offline {
        from_cache(spec)?
    } else {
        download(spec)?
    };
    Ok(ResolvedModel {
        dir,
        hub_id: Some(spec.to_string()),
    })
}

fn looks_like_hub_id(spec: &str) -> bool {
    let mut parts = spec.split('/');
    let ok = |s: Option<&str>| {
        s.is_some_and(|s| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                && !s.starts_with('.')
        })
    };
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

fn cache() -> Cache {
    // HF_HUB_CACHE overrides HF_HOME/hub, as in huggingface_hub.
    match std::env::var_os("HF_HUB_CACHE") {
        Some(p) => Cache::new(PathBuf::from(p)),
        None => Cache::from_env(),
    }
}

/// Shard file names listed in a `*.index.json` weight map.
fn shard_names(index: &Path) -> Result<Vec<String>, HubError> {
    let text = std::fs::read_to_string(index).map_err(|e| HubError::Index {
        path: index.to_path_buf(),
        message: e.to_string(),
    })?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| HubError::Index {
        path: index.to_path_buf(),
        message: e.to_string(),
    })?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| HubError::Index {
            path: index.to_path_buf(),
            message: "no `weight_map` object".into(),
        })?;
    let mut names: Vec<String> = map
        .values()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

fn from_cache(id: &str) -> Result<PathBuf, HubError> {
    let cache = cache();
    let repo = cache.repo(Repo::new(id.to_string(), RepoType::Model));
    let not_cached = |missing: &str| HubError::NotCached {
        id: id.to_string(),
        cache: cache.path().clone(),
        missing: missing.to_string(),
    };
    let config = repo
        .get("config.json")
        .ok_or_else(|| not_cached("config.json"))?;
    let anchor = WEIGHT_ANCHORS
        .iter()
        .find_map(|name| repo.get(name).map(|p| (*name, p)))
        .ok_or_else(|| not_cached("weights"))?;
    if anchor.0.ends_with(".index.json") {
        for shard in shard_names(&anchor.1)? {
            repo.get(&shard).ok_or_else(|| not_cached(&shard))?;
        }
    }
    Ok(config.parent().map(Path::to_path_buf).unwrap_or_default())
}

fn download(id: &str) -> Result<PathBuf, HubError> {
    let err = |file: &str, e: &dyn std::fmt::Display| HubError::Download {
        id: id.to_string(),
        file: file.to_string(),
        message: e.to_string(),
    };
    let api = hf_hub::api::sync::ApiBuilder::from_cache(cache())
        .with_progress(true)
        .build()
        .map_err(|e| err("(api)", &e))?;
    let repo = api.model(id.to_string());
    let mut dir = None;
    for name in REQUIRED_FILES {
        let p = repo.get(name).map_err(|e| err(name, &e))?;
        dir = p.parent().map(Path::to_path_buf);
    }
    for name in OPTIONAL_FILES {
        let _ = repo.get(name); // absent files are fine; the loader reports what it needs
    }
    let mut found = false;
    for anchor in WEIGHT_ANCHORS {
        let Ok(path) = repo.get(anchor) else { continue };
        if anchor.ends_with(".index.json") {
            for shard in shard_names(&path)? {
                repo.get(&shard).map_err(|e| err(&shard, &e))?;
            }
        }
        found = true;
        break;
    }
    if !found {
        return Err(HubError::NoWeights {
            id: id.to_string(),
            anchors: WEIGHT_ANCHORS.join(", "),
            where_: "the hub repository".into(),
        });
    }
    dir.ok_or_else(|| err("config.json", &"no parent directory"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_id_shapes() {
        assert!(looks_like_hub_id("q-future/one-align"));
        assert!(!looks_like_hub_id("one-align"));
        assert!(!looks_like_hub_id("a/b/c"));
        assert!(!looks_like_hub_id("../x"));
    }

    #[test]
    fn offline_with_empty_cache_says_how_to_get_weights() {
        let tmp = std::env::temp_dir().join(format!("qalign-hub-test-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        let cache = Cache::new(tmp.clone());
        let repo = cache.repo(Repo::new("q-future/one-align".into(), RepoType::Model));
        assert!(repo.get("config.json").is_none());
        let _ = std::fs::remove_dir_all(tmp);
    }
}
