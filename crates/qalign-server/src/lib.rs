//! `qalign serve` as a library: an HTTP API over one engine thread that owns the model and
//! batches requests dynamically, with the limits, health, metrics and OpenAPI conventions of
//! Hugging Face's text-embeddings-inference. The engine crates never depend on this one.
//!
//! The layering: [`backend::Backend`] is the model with no HTTP types; [`engine`] batches jobs
//! onto it; [`api`] turns requests into jobs and answers into JSON; [`serve`] ties them to a
//! socket and to graceful shutdown.

pub mod api;
pub mod backend;
pub mod engine;
pub mod loadtest;
pub mod metrics;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, oneshot};

pub use api::{ErrorResponse, ItemError, ScoreResponse, ScoreResult};
pub use backend::Backend;
pub use engine::EngineConfig;

/// What the server will take; every limit is documented in README ("serve") and `/info`.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Scoring requests in flight (uploading, queued or running); the next one gets 503.
    pub max_concurrent_requests: usize,
    /// Files in one request.
    pub max_client_batch_size: usize,
    /// Bytes of one request body.
    pub max_body_bytes: usize,
    /// From arrival to answer, upload included.
    pub request_timeout: Duration,
}

/// The validated configuration of a server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub engine: EngineConfig,
    pub limits: Limits,
    /// When set, `/v1/*` needs `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// How long shutdown may take to finish accepted requests.
    pub shutdown_grace: Duration,
    /// What `/info` says about the model (name, device, dtype, config, ...).
    pub model_info: serde_json::Value,
}

/// What the server reports while it runs, for the caller to log.
#[derive(Debug, Clone)]
pub enum ServerEvent {
    Listening(SocketAddr),
    ModelLoaded { seconds: f64 },
    ShuttingDown,
    Stopped,
}

/// Why a server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot load the model: {0}")]
    Load(String),
    #[error(
        "shutdown did not finish within the grace period of {0:?}; unfinished requests were abandoned"
    )]
    GraceExpired(Duration),
}

/// A callback that hears [`ServerEvent`]s.
pub type Events = Arc<dyn Fn(ServerEvent) + Send + Sync>;

/// Binds `addr`, loads the model with `load` on the engine thread (answering `/health` with 503
/// meanwhile), and serves until SIGTERM or SIGINT; then stops accepting, finishes every accepted
/// request within the grace period, and returns.
pub fn serve<B, L>(
    addr: SocketAddr,
    config: ServerConfig,
    load: L,
    events: Events,
) -> Result<(), ServerError>
where
    B: Backend,
    L: FnOnce() -> Result<B, String> + Send + 'static,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("qalign-http")
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        run(listener, config, load, events, shutdown_signal()).await
    })
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

/// Serves on `listener` until `shutdown` resolves (or the model fails to load), then drains.
pub async fn run<B, L>(
    listener: tokio::net::TcpListener,
    config: ServerConfig,
    load: L,
    events: Events,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError>
where
    B: Backend,
    L: FnOnce() -> Result<B, String> + Send + 'static,
{
    let metrics = Arc::new(metrics::Metrics::default());
    let (loaded_tx, loaded_rx) = oneshot::channel();
    let started = Instant::now();
    let (engine, engine_thread) =
        engine::spawn(load, config.engine, Arc::clone(&metrics), loaded_tx)?;
    let grace = config.shutdown_grace;
    let app = api::router(api::AppState::new(engine, metrics, &config));
    events(ServerEvent::Listening(listener.local_addr()?));

    let load_failure: Arc<Mutex<Option<String>>> = Arc::default();
    let draining = Arc::new(Notify::new());
    let stop = {
        let (events, load_failure, draining) = (
            Arc::clone(&events),
            Arc::clone(&load_failure),
            Arc::clone(&draining),
        );
        async move {
            tokio::pin!(shutdown);
            tokio::pin!(loaded_rx);
            let mut loaded = false;
            loop {
                tokio::select! {
                    () = &mut shutdown => {
                        events(ServerEvent::ShuttingDown);
                        break;
                    }
                    outcome = &mut loaded_rx, if !loaded => {
                        loaded = true;
                        let failure = match outcome {
                            Ok(Ok(())) => {
                                let seconds = started.elapsed().as_secs_f64();
                                events(ServerEvent::ModelLoaded { seconds });
                                continue;
                            }
                            Ok(Err(message)) => message,
                            Err(_) => "the engine thread stopped while loading".to_string(),
                        };
                        if let Ok(mut slot) = load_failure.lock() {
                            *slot = Some(failure);
                        }
                        break;
                    }
                }
            }
            draining.notify_one();
        }
    };
    let server = axum::serve(listener, app).with_graceful_shutdown(stop);
    let deadline = async {
        draining.notified().await;
        tokio::time::sleep(grace).await;
    };
    let drained_at = tokio::select! {
        result = server => {
            result?;
            Instant::now()
        }
        () = deadline => return Err(ServerError::GraceExpired(grace)),
    };
    // Every handle is gone with the router: the engine finishes its queue and stops.
    let left = grace.saturating_sub(drained_at.elapsed());
    let joined = tokio::task::spawn_blocking(move || engine_thread.join());
    if tokio::time::timeout(left, joined).await.is_err() {
        return Err(ServerError::GraceExpired(grace));
    }
    if let Some(message) = load_failure.lock().ok().and_then(|mut f| f.take()) {
        return Err(ServerError::Load(message));
    }
    events(ServerEvent::Stopped);
    Ok(())
}
