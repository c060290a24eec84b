//! Resolves `--model` to a local checkpoint folder: either a directory as given, or a
//! Hugging Face hub id looked up in the standard cache (`HF_HUB_CACHE`, `HF_HOME`, ...) and,
//! when online, downloaded with the hf-hub crate. Offline use never touches the network.
//!
//! Which files count as optional, and when their absence is fine:
//! - `config.json` and the weights are required; the weights are the first layout of
//!   [`WEIGHT_ANCHORS`] present (a cached one first), plus every shard its index lists.
//! - `preprocessor_config.json`, `tokenizer.model` and the other companions are optional: a
//!   checkpoint may lack them, and the loader then uses CLIP preprocessing and the built-in
//!   LLaMA-2 vocabulary (it reports which, see `TokenizerSource`).
//! - Online, "lacks" means "not in the repository's file list": an optional file the
//!   repository has but that fails to download (network, HTTP status, cache write) is an
//!   error, never a silent fallback. The file list is fetched only when a file is not cached.
//! - Offline, the cache is all there is: an optional file missing from the cached snapshot is
//!   treated as absent; a missing required file or shard is [`HubError::NotCached`] naming it.
//! - A revision (branch, tag or commit hash; `main` by default) picks the snapshot as
//!   huggingface_hub 0.19 does: a commit hash names its snapshot folder, a branch or tag is read
//!   from `refs/<revision>`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};

use crate::error::ModelError;
use crate::loader::ShardIndex;

/// The checkpoint the official scorers load by default.
pub const DEFAULT_MODEL: &str = "q-future/one-align";

/// The hub used when `HF_ENDPOINT` is not set.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Files besides the weights that a checkpoint folder must or may hold.
pub const REQUIRED_FILES: &[&str] = &["config.json"];
pub const OPTIONAL_FILES: &[&str] = &[
    "preprocessor_config.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
];
/// Weight layouts in order of preference; the first whose anchor file exists wins.
pub const WEIGHT_ANCHORS: &[&str] = &[
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
];

/// Why talking to the hub failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownloadFailure {
    /// The hub could not be reached (DNS, refused connection, TLS, timeout).
    Unreachable,
    /// The hub answered with an error status (401 gated or private, 404 not found, 5xx).
    Status(u16),
    /// The answer arrived but could not be stored in the local cache (I/O, lock, resume).
    Cache,
    /// The answer was not what the hub protocol promises (missing headers, bad JSON).
    Protocol,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HubError {
    /// Offline, and the cached snapshot lacks a required file (`missing` names it).
    #[error(
        "model `{id}` is not in the Hugging Face cache ({cache}) and offline mode is on \
         (missing: {missing})"
    )]
    NotCached {
        id: String,
        cache: PathBuf,
        missing: String,
    },
    /// The spec is neither a directory nor `owner/name`.
    #[error("`{0}` is neither an existing directory nor a hub id of the form owner/name")]
    BadSpec(String),
    /// The revision cannot name a git branch, tag or commit.
    #[error("`{0}` is not a revision: expected a branch, tag or commit hash")]
    BadRevision(String),
    /// A revision was given for a model folder, which has no revisions.
    #[error("--revision {revision} applies to a hub id, but `{dir}` is a folder")]
    RevisionForFolder { dir: PathBuf, revision: String },
    /// No cache folder: none of `HF_HUB_CACHE`, `HUGGINGFACE_HUB_CACHE`, `HF_HOME`,
    /// `XDG_CACHE_HOME`, `HOME` is set.
    #[error("no Hugging Face cache folder: set HF_HOME or HF_HUB_CACHE")]
    NoCacheDir,
    /// A file of the repository could not be fetched.
    #[error("could not download `{file}` of `{id}` from {endpoint}: {message}")]
    Download {
        id: String,
        file: String,
        endpoint: String,
        kind: DownloadFailure,
        message: String,
    },
    /// The repository's file list could not be fetched.
    #[error("could not list the files of `{id}` on {endpoint}: {message}")]
    Listing {
        id: String,
        endpoint: String,
        kind: DownloadFailure,
        message: String,
    },
    /// The repository (or cached snapshot) has no weight layout this crate reads.
    #[error("`{id}` has no weights: none of {anchors} in {where_}")]
    NoWeights {
        id: String,
        anchors: String,
        where_: String,
    },
    /// A shard index could not be read.
    #[error(transparent)]
    Index(Box<ModelError>),
}

impl HubError {
    /// The failure kind of a download or listing error.
    pub fn download_failure(&self) -> Option<DownloadFailure> {
        match self {
            Self::Download { kind, .. } | Self::Listing { kind, .. } => Some(*kind),
            _ => None,
        }
    }
}

impl From<ModelError> for HubError {
    fn from(err: ModelError) -> Self {
        Self::Index(Box::new(err))
    }
}

/// Where a model spec resolved to.
#[derive(Debug, Clone)]
pub struct ResolvedModel {
    pub dir: PathBuf,
    /// The hub id when the spec was one.
    pub hub_id: Option<String>,
    /// The revision asked for, when one was (else the hub's `main`).
    pub revision: Option<String>,
}

/// Where and how hub ids are resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubOptions {
    /// The hub cache folder (holding `models--owner--name/`).
    pub cache_dir: PathBuf,
    /// The hub's base URL.
    pub endpoint: String,
    /// Read the cache only; never touch the network.
    pub offline: bool,
    /// Show download progress bars on stderr.
    pub progress: bool,
    /// The branch, tag or commit hash to resolve (`None`: `main`).
    pub revision: Option<String>,
}

impl HubOptions {
    /// The settings of `huggingface_hub` 0.19: cache `HF_HUB_CACHE`, else `HUGGINGFACE_HUB_CACHE`,
    /// else `HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`
    /// (a leading `~` of `HF_HOME` or `XDG_CACHE_HOME` is the home folder, as Python's
    /// `expanduser` makes it; a variable set to the empty string counts as unset); endpoint
    /// `HF_ENDPOINT`; offline as [`offline_from_env`] says; progress bars on.
    pub fn from_env() -> Result<Self, HubError> {
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        let cache_dir =
            if let Some(dir) = var("HF_HUB_CACHE").or_else(|| var("HUGGINGFACE_HUB_CACHE")) {
                PathBuf::from(dir)
            } else if let Some(home) = var("HF_HOME") {
                expand_user(PathBuf::from(home)).join("hub")
            } else if let Some(xdg) = var("XDG_CACHE_HOME") {
                expand_user(PathBuf::from(xdg))
                    .join("huggingface")
                    .join("hub")
            } else if let Some(home) = std::env::home_dir() {
                home.join(".cache").join("huggingface").join("hub")
            } else {
                return Err(HubError::NoCacheDir);
            };
        Ok(Self {
            cache_dir,
            endpoint: std::env::var("HF_ENDPOINT")
                .ok()
                .filter(|e| !e.is_empty())
                .map(|e| e.trim_end_matches('/').to_string())
                .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string()),
            offline: offline_from_env(),
            progress: true,
            revision: None,
        })
    }
}

/// `~` or `~/rest` with the home folder put in, as Python's `os.path.expanduser` does; any other
/// path (and `~` when there is no home folder) is returned unchanged.
fn expand_user(path: PathBuf) -> PathBuf {
    let mut components = path.components();
    match (components.next(), std::env::home_dir()) {
        (Some(std::path::Component::Normal(first)), Some(home)) if first == "~" => {
            home.join(components.as_path())
        }
        _ => path,
    }
}

/// Is offline mode requested by the environment? As with huggingface_hub 0.19 and transformers
/// 4.36 together: `HF_HUB_OFFLINE` or `TRANSFORMERS_OFFLINE` set to 1, ON, YES or TRUE (any case).
pub fn offline_from_env() -> bool {
    let is_true = |name: &str| {
        std::env::var(name).is_ok_and(|v| {
            matches!(
                v.trim().to_ascii_uppercase().as_str(),
                "1" | "ON" | "YES" | "TRUE"
            )
        })
    };
    is_true("HF_HUB_OFFLINE") || is_true("TRANSFORMERS_OFFLINE")
}

/// Resolve a `--model` value: an existing directory is used as is; otherwise it must be a hub
/// id, resolved with the environment's settings ([`HubOptions::from_env`]), offline when
/// `offline` is true or the environment asks for it.
pub fn resolve_model(spec: &str, offline: bool) -> Result<ResolvedModel, HubError> {
    resolve_model_at(spec, None, offline)
}

/// [`resolve_model`] at a revision of the hub repository (a branch, tag or commit hash;
/// `None` is `main`). A revision for a folder is an error, not ignored.
pub fn resolve_model_at(
    spec: &str,
    revision: Option<&str>,
    offline: bool,
) -> Result<ResolvedModel, HubError> {
    if let Some(local) = local_dir(spec, revision)? {
        return Ok(local);
    }
    if !looks_like_hub_id(spec) {
        return Err(HubError::BadSpec(spec.to_string()));
    }
    let mut opts = HubOptions::from_env()?;
    opts.offline |= offline;
    opts.revision = revision.map(str::to_string);
    resolve_model_with(spec, &opts)
}

/// [`resolve_model_at`] with explicit hub settings instead of the environment's.
pub fn resolve_model_with(spec: &str, opts: &HubOptions) -> Result<ResolvedModel, HubError> {
    let revision = opts.revision.as_deref();
    if let Some(local) = local_dir(spec, revision)? {
        return Ok(local);
    }
    if !looks_like_hub_id(spec) {
        return Err(HubError::BadSpec(spec.to_string()));
    }
    if let Some(revision) = revision
        && !is_valid_revision(revision)
    {
        return Err(HubError::BadRevision(revision.to_string()));
    }
    let dir = if opts.offline {
        from_cache(spec, opts)?
    } else {
        download(spec, opts)?
    };
    Ok(ResolvedModel {
        dir,
        hub_id: Some(spec.to_string()),
        revision: revision.map(str::to_string),
    })
}

fn local_dir(spec: &str, revision: Option<&str>) -> Result<Option<ResolvedModel>, HubError> {
    let path = Path::new(spec);
    if !path.is_dir() {
        return Ok(None);
    }
    if let Some(revision) = revision {
        return Err(HubError::RevisionForFolder {
            dir: path.to_path_buf(),
            revision: revision.to_string(),
        });
    }
    Ok(Some(ResolvedModel {
        dir: path.to_path_buf(),
        hub_id: None,
        revision: None,
    }))
}

/// A name git could give a branch, tag or commit (`v1.0`, `refs/pr/1`, a hash): no empty,
/// `.` or `..` component, no whitespace, control or `~^:?*[\\` characters, so that it stays a
/// path inside the cache's `refs/` folder.
pub fn is_valid_revision(revision: &str) -> bool {
    !revision.is_empty()
        && revision
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
        && !revision
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "~^:?*[\\".contains(c))
}

/// A full commit hash, which names its snapshot folder directly.
fn is_commit_hash(revision: &str) -> bool {
    revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The cached snapshot of one repository revision, found as huggingface_hub 0.19 finds it: a
/// commit hash is the snapshot's name; a branch or tag names it in `refs/<revision>`.
/// The ref is read at each lookup, since a download writes it.
struct CachedSnapshot {
    repo: PathBuf,
    revision: String,
}

impl CachedSnapshot {
    fn new(cache_dir: &Path, id: &str, revision: &str) -> Self {
        Self {
            repo: cache_dir.join(format!("models--{}", id.replace('/', "--"))),
            revision: revision.to_string(),
        }
    }

    fn dir(&self) -> Option<PathBuf> {
        let commit = if is_commit_hash(&self.revision) {
            self.revision.clone()
        } else {
            let text = std::fs::read_to_string(self.repo.join("refs").join(&self.revision)).ok()?;
            Some(text.trim().to_string()).filter(|commit| is_valid_revision(commit))?
        };
        Some(self.repo.join("snapshots").join(commit))
    }

    /// The cached file, if the snapshot holds it.
    fn get(&self, name: &str) -> Option<PathBuf> {
        let path = self.dir()?.join(name);
        path.exists().then_some(path)
    }
}

/// How errors name the repository: `owner/name`, or `owner/name@revision` for another revision.
fn repo_label(id: &str, opts: &HubOptions) -> String {
    match opts.revision.as_deref() {
        Some(revision) if revision != "main" => format!("{id}@{revision}"),
        _ => id.to_string(),
    }
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

fn from_cache(id: &str, opts: &HubOptions) -> Result<PathBuf, HubError> {
    let repo = CachedSnapshot::new(
        &opts.cache_dir,
        id,
        opts.revision.as_deref().unwrap_or("main"),
    );
    let label = repo_label(id, opts);
    let not_cached = |missing: &str| HubError::NotCached {
        id: label.clone(),
        cache: opts.cache_dir.clone(),
        missing: missing.to_string(),
    };
    let mut dir = None;
    for name in REQUIRED_FILES {
        let path = repo.get(name).ok_or_else(|| not_cached(name))?;
        dir = path.parent().map(Path::to_path_buf);
    }
    let (anchor, path) = WEIGHT_ANCHORS
        .iter()
        .find_map(|name| repo.get(name).map(|p| (*name, p)))
        .ok_or_else(|| not_cached(&format!("weights (one of {})", WEIGHT_ANCHORS.join(", "))))?;
    if anchor.ends_with(".index.json") {
        for shard in ShardIndex::read(&path)?.shard_names() {
            repo.get(shard).ok_or_else(|| not_cached(shard))?;
        }
    }
    dir.ok_or_else(|| not_cached(REQUIRED_FILES[0]))
}

/// Maps an hf-hub error to its [`DownloadFailure`]; `io_kind` is what a plain I/O error means
/// in this context (writing the cache while downloading, decoding while listing).
fn classify(err: &ApiError, io_kind: DownloadFailure) -> DownloadFailure {
    match err {
        ApiError::RequestError(e) => match e.as_ref() {
            ureq::Error::Status(code, _) => DownloadFailure::Status(*code),
            ureq::Error::Transport(_) => DownloadFailure::Unreachable,
        },
        ApiError::TooManyRetries(inner) => classify(inner, io_kind),
        ApiError::IoError(_) => io_kind,
        ApiError::LockAcquisition(_) | ApiError::InvalidResume => DownloadFailure::Cache,
        _ => DownloadFailure::Protocol,
    }
}

/// One online resolution: files come from the cache when there, else from the hub; the
/// repository's file list is fetched at most once, and only when a file is not cached.
struct Online<'a> {
    /// The repository as errors name it ([`repo_label`]).
    id: String,
    endpoint: &'a str,
    api_repo: ApiRepo,
    cached: CachedSnapshot,
    listing: Option<BTreeSet<String>>,
}

impl Online<'_> {
    fn is_cached(&self, name: &str) -> bool {
        self.cached.get(name).is_some()
    }

    fn in_repo(&mut self, name: &str) -> Result<bool, HubError> {
        if self.listing.is_none() {
            let info = self.api_repo.info().map_err(|e| HubError::Listing {
                id: self.id.to_string(),
                endpoint: self.endpoint.to_string(),
                kind: classify(&e, DownloadFailure::Protocol),
                message: e.to_string(),
            })?;
            self.listing = Some(info.siblings.into_iter().map(|s| s.rfilename).collect());
        }
        Ok(self.listing.as_ref().is_some_and(|l| l.contains(name)))
    }

    fn fetch(&self, name: &str) -> Result<PathBuf, HubError> {
        if let Some(path) = self.cached.get(name) {
            return Ok(path);
        }
        self.api_repo.get(name).map_err(|e| HubError::Download {
            id: self.id.to_string(),
            file: name.to_string(),
            endpoint: self.endpoint.to_string(),
            kind: classify(&e, DownloadFailure::Cache),
            message: e.to_string(),
        })
    }

    /// Fetches `name` if the repository has it; `None` if it does not.
    fn fetch_if_present(&mut self, name: &str) -> Result<Option<PathBuf>, HubError> {
        if self.is_cached(name) || self.in_repo(name)? {
            self.fetch(name).map(Some)
        } else {
            Ok(None)
        }
    }
}

fn download(id: &str, opts: &HubOptions) -> Result<PathBuf, HubError> {
    let cache = Cache::new(opts.cache_dir.clone());
    let api = ApiBuilder::from_cache(cache.clone())
        .with_endpoint(opts.endpoint.clone())
        .with_progress(opts.progress)
        .build()
        .map_err(|e| HubError::Download {
            id: repo_label(id, opts),
            file: "(client setup)".to_string(),
            endpoint: opts.endpoint.clone(),
            kind: classify(&e, DownloadFailure::Cache),
            message: e.to_string(),
        })?;
    let revision = opts.revision.as_deref().unwrap_or("main");
    let repo = Repo::with_revision(id.to_string(), RepoType::Model, revision.to_string());
    let mut online = Online {
        id: repo_label(id, opts),
        endpoint: &opts.endpoint,
        api_repo: api.repo(repo),
        cached: CachedSnapshot::new(&opts.cache_dir, id, revision),
        listing: None,
    };
    let mut dir = None;
    for name in REQUIRED_FILES {
        let path = online.fetch(name)?;
        dir = path.parent().map(Path::to_path_buf);
    }
    for name in OPTIONAL_FILES {
        online.fetch_if_present(name)?;
    }
    // A cached layout wins (no network needed); else the first layout the repository has.
    let mut weights = match WEIGHT_ANCHORS.iter().find(|a| online.is_cached(a)) {
        Some(anchor) => Some((*anchor, online.fetch(anchor)?)),
        None => None,
    };
    for anchor in WEIGHT_ANCHORS {
        if weights.is_some() {
            break;
        }
        weights = online.fetch_if_present(anchor)?.map(|path| (*anchor, path));
    }
    let Some((anchor, path)) = weights else {
        return Err(HubError::NoWeights {
            id: online.id,
            anchors: WEIGHT_ANCHORS.join(", "),
            where_: "the hub repository".into(),
        });
    };
    if anchor.ends_with(".index.json") {
        for shard in ShardIndex::read(&path)?.shard_names() {
            online.fetch(shard)?;
        }
    }
    dir.ok_or_else(|| HubError::Download {
        id: online.id,
        file: REQUIRED_FILES[0].to_string(),
        endpoint: opts.endpoint.clone(),
        kind: DownloadFailure::Cache,
        message: "the cached file has no parent folder".into(),
    })
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
}
