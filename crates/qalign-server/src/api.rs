//! The HTTP surface: routes, request parsing (multipart uploads streamed to disk, or JSON with
//! base64), limits, auth, and the JSON shapes of answers and errors, documented in the OpenAPI
//! document served at `/openapi.json`. Nothing here touches the model: jobs go to the engine.

use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, BodyDataStream, Bytes};
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use futures_util::{Stream, StreamExt};
use qalign_core::{Scale, Task};
use qalign_media::SamplingOptions;
use qalign_model::{ScoreRecord, VideoOptions};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::sync::{Semaphore, oneshot};
use utoipa::{OpenApi, ToSchema};

use crate::ServerConfig;
use crate::engine::{BatchFailure, EngineHandle, FileOutcome, Job, SubmitError, Upload};
use crate::metrics::Metrics;

const INDEX_HTML: &str = include_str!("../assets/index.html");
const DOCS_HTML: &str = include_str!("../assets/docs.html");
const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Everything a handler needs.
#[derive(Clone)]
pub struct AppState {
    engine: EngineHandle,
    metrics: Arc<Metrics>,
    permits: Arc<Semaphore>,
    config: Arc<ServerConfig>,
}

impl AppState {
    pub fn new(engine: EngineHandle, metrics: Arc<Metrics>, config: &ServerConfig) -> Self {
        Self {
            engine,
            metrics,
            permits: Arc::new(Semaphore::new(config.limits.max_concurrent_requests.max(1))),
            config: Arc::new(config.clone()),
        }
    }
}

/// The routes: the scoring API under `/v1` (behind the API key when one is set), and the open
/// `/`, `/docs`, `/openapi.json`, `/health`, `/info`, `/metrics`.
pub fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/v1/score", post(score))
        .layer(DefaultBodyLimit::max(state.config.limits.max_body_bytes))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize));
    Router::new()
        .route("/", get(|| async { Html(INDEX_HTML) }))
        .route("/docs", get(|| async { Html(DOCS_HTML) }))
        .route("/openapi.json", get(openapi))
        .route("/health", get(health))
        .route("/info", get(info))
        .route("/metrics", get(metrics))
        .merge(v1)
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, ErrorType::NotFound, "no such route")
        })
        // After every route, so that each gets it; axum still adds the `Allow` header.
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// 405 as JSON, like every other error; the body, if any, is read first.
async fn method_not_allowed(State(state): State<AppState>, request: Request) -> ApiError {
    let message = format!("method {} is not allowed here", request.method());
    discard_body(request, state.config.limits.max_body_bytes).await;
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        ErrorType::MethodNotAllowed,
        message,
    )
}

/// The OpenAPI document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "qalign",
        description = "Q-Align / OneAlign image and video quality and aesthetics scoring. \
                       When the server was started with --api-key, /v1/* needs \
                       `Authorization: Bearer <key>`."
    ),
    paths(score, health, info, metrics),
    components(schemas(
        ScoreResponse,
        ScoreResult,
        ItemError,
        ErrorResponse,
        ErrorType,
        ScoreForm,
        JsonScoreRequest,
        JsonImage,
        ScoreRecord,
        qalign_model::WarningRecord,
        qalign_model::WindowRecord,
        qalign_model::FrameRecord
    ))
)]
pub struct ApiDoc;

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

/// The answer of `POST /v1/score`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ScoreResponse {
    /// One record per file and task (as `qalign score --format json`), in upload order, or an
    /// error item for a file that could not be scored.
    pub results: Vec<ScoreResult>,
}

/// A record, or the error of a file.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum ScoreResult {
    Scored(Box<ScoreRecord>),
    Failed(ItemError),
}

/// A file that could not be scored.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ItemError {
    /// The uploaded file name.
    pub path: String,
    pub error: String,
}

/// An error answer, as text-embeddings-inference shapes them.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorResponse {
    pub error: String,
    pub error_type: ErrorType,
    /// With 422 for bad files: the results of the whole request, good files included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub results: Option<Vec<ScoreResult>>,
}

/// The kind of an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorType {
    /// A bad parameter or a bad file (400, 422).
    Validation,
    Unauthorized,
    NotFound,
    MethodNotAllowed,
    PayloadTooLarge,
    UnsupportedMediaType,
    /// Too many requests in flight, or the queue is full (503, with Retry-After).
    Overloaded,
    /// The model is loading, failed to load, or the server is shutting down (503).
    Unhealthy,
    Timeout,
    /// A failure of the model or the server, not of the request (500).
    Backend,
}

/// The multipart form of `POST /v1/score`.
#[derive(ToSchema)]
#[allow(dead_code)]
struct ScoreForm {
    /// One or more image or video files (parts named `file`).
    #[schema(value_type = Vec<String>, format = Binary)]
    file: Vec<Vec<u8>>,
    /// quality (default), aesthetics or all.
    task: Option<String>,
    /// 1-5 (default) or 0-1.
    scale: Option<String>,
    /// Video: frames sampled per second (default 1).
    fps: Option<f64>,
    /// Video: at most this many frames.
    max_frames: Option<u64>,
    /// Video: also score every sampled frame alone (a per-second timeline).
    per_frame: Option<bool>,
}

/// The JSON form of `POST /v1/score`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JsonScoreRequest {
    /// Base64 files (standard or URL-safe alphabet, padded or not; a `data:` URL prefix and line
    /// breaks are allowed), each bare or with a name.
    pub images: Vec<JsonImage>,
    #[serde(default)]
    pub task: Option<String>,
    #[serde(default)]
    pub scale: Option<String>,
    #[serde(default)]
    pub fps: Option<f64>,
    #[serde(default)]
    pub max_frames: Option<u64>,
    #[serde(default)]
    pub per_frame: Option<bool>,
}

/// One base64 file; unnamed ones are called `image-<index>`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum JsonImage {
    Data(String),
    Named { name: String, data: String },
}

/// An error answer with its status.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    body: ErrorResponse,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, error_type: ErrorType, message: impl Into<String>) -> Self {
        Self {
            status,
            body: ErrorResponse {
                error: message.into(),
                error_type,
                results: None,
            },
            retry_after: None,
        }
    }

    fn validation(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorType::Validation, message)
    }

    fn unavailable(error_type: ErrorType, message: impl Into<String>, retry_after: u64) -> Self {
        let mut err = Self::new(StatusCode::SERVICE_UNAVAILABLE, error_type, message);
        err.retry_after = Some(retry_after);
        err
    }

    /// An axum rejection (body too large, malformed multipart, ...) with its own status; a body
    /// over the limit names the limit (axum says only "payload too large").
    fn rejection(status: StatusCode, text: String, max_body_bytes: usize) -> Self {
        let error_type = match status {
            StatusCode::PAYLOAD_TOO_LARGE => ErrorType::PayloadTooLarge,
            StatusCode::UNSUPPORTED_MEDIA_TYPE => ErrorType::UnsupportedMediaType,
            s if s.is_server_error() => ErrorType::Backend,
            _ => ErrorType::Validation,
        };
        let text = if status == StatusCode::PAYLOAD_TOO_LARGE {
            let limit = if max_body_bytes.is_multiple_of(1 << 20) {
                format!("{} MiB", max_body_bytes >> 20)
            } else {
                format!("{max_body_bytes} bytes")
            };
            format!(
                "the request body is larger than this server's limit of {limit} (--max-body-mb)"
            )
        } else {
            text
        };
        Self::new(status, error_type, text)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body)).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// Checks the bearer token when the server has a key (a constant-time comparison).
async fn authorize(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(key) = state.config.api_key.as_deref() else {
        return next.run(request).await;
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        // The scheme is case-insensitive (RFC 9110, section 11.1).
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map_or("", |(_, token)| token.trim_start_matches(' '));
    let same = given.len() == key.len()
        && given
            .bytes()
            .zip(key.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        return next.run(request).await;
    }
    state.metrics.observe_request(401, 0.0);
    discard_body(request, state.config.limits.max_body_bytes).await;
    let mut response = ApiError::new(
        StatusCode::UNAUTHORIZED,
        ErrorType::Unauthorized,
        "a valid `Authorization: Bearer <key>` header is required",
    )
    .into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// 200 once the model is loaded; 503 while it loads or after it failed to.
#[utoipa::path(get, path = "/health", responses(
    (status = 200, description = "The model is loaded"),
    (status = 503, description = "Loading, or the load failed", body = ErrorResponse)
))]
async fn health(State(state): State<AppState>) -> Response {
    let engine = state.engine.state();
    if engine.is_ready() {
        return Json(serde_json::json!({"status": "ok"})).into_response();
    }
    match engine.load_error() {
        Some(message) => ApiError::unavailable(
            ErrorType::Unhealthy,
            format!("the model failed to load: {message}"),
            60,
        ),
        None => ApiError::unavailable(ErrorType::Unhealthy, "the model is loading", 5),
    }
    .into_response()
}

/// The model, its configuration, device and dtype, and the server's limits.
#[utoipa::path(get, path = "/info", responses((status = 200, description = "Server and model info")))]
async fn info(State(state): State<AppState>) -> Json<serde_json::Value> {
    let config = &state.config;
    let limits = &config.limits;
    Json(serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "ready": state.engine.state().is_ready(),
        "model": config.model_info,
        "limits": {
            "max_concurrent_requests": limits.max_concurrent_requests,
            "max_client_batch_size": limits.max_client_batch_size,
            "max_body_bytes": limits.max_body_bytes,
            "request_timeout_s": limits.request_timeout.as_secs_f64(),
            "max_batch_size": config.engine.max_batch_size,
            "max_wait_ms": config.engine.max_wait.as_secs_f64() * 1e3,
            "queue_capacity": config.engine.queue_capacity,
            "auth": config.api_key.is_some(),
        },
    }))
}

/// The metrics in the OpenMetrics text format, which Prometheus scrapes.
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "OpenMetrics 1.0 text (ends with `# EOF`)", content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8")))]
async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)],
        state.metrics.render(),
    )
        .into_response()
}

/// Scores uploaded images and videos.
#[utoipa::path(
    post,
    path = "/v1/score",
    request_body(content(
        (ScoreForm = "multipart/form-data"),
        (JsonScoreRequest = "application/json")
    )),
    responses(
        (status = 200, description = "Every file scored", body = ScoreResponse),
        (status = 400, description = "A malformed request or parameter", body = ErrorResponse),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 413, description = "The body is larger than --max-body-mb", body = ErrorResponse),
        (status = 415, description = "Neither multipart/form-data nor application/json", body = ErrorResponse),
        (status = 422, description = "Some files could not be scored, or too many files; `results` holds every file's outcome", body = ErrorResponse),
        (status = 503, description = "Overloaded, loading or shutting down; see Retry-After", body = ErrorResponse),
        (status = 504, description = "The request took longer than --request-timeout-s", body = ErrorResponse),
        (status = 500, description = "A failure of the model or the server", body = ErrorResponse),
    )
)]
async fn score(State(state): State<AppState>, request: Request) -> Response {
    let started = Instant::now();
    let timeout = state.config.limits.request_timeout;
    // The handler keeps a hold on the body: a request that times out while its client is still
    // uploading is drained like an early error, so that the client reads the 504.
    let (head, body) = request.into_parts();
    let body = SharedBody::new(body.into_data_stream());
    let request = Request::from_parts(head, Body::from_stream(body.clone()));
    let response = match tokio::time::timeout(timeout, score_request(&state, request, &body)).await
    {
        Ok(Ok(response)) => response,
        Ok(Err(err)) => err.into_response(),
        Err(_) => {
            discard(body, state.config.limits.max_body_bytes).await;
            ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                ErrorType::Timeout,
                format!(
                    "the request took longer than the server's limit of {} s",
                    timeout.as_secs_f64()
                ),
            )
            .into_response()
        }
    };
    state
        .metrics
        .observe_request(response.status().as_u16(), started.elapsed().as_secs_f64());
    response
}

/// The parameters of a scoring request.
struct Params {
    tasks: Vec<Task>,
    scale: Scale,
    video: VideoOptions,
}

/// One file of a request: spooled to disk, or already known to be bad.
struct Part {
    name: String,
    content: Result<std::path::PathBuf, String>,
}

/// A parsed request; its files live as long as `_dir`.
struct Parsed {
    params: Params,
    parts: Vec<Part>,
    _dir: tempfile::TempDir,
}

/// Admits, parses and answers a request whose body the caller also holds as `body`, to
/// discard what is left of it after an early error.
async fn score_request(
    state: &AppState,
    request: Request,
    body: &SharedBody,
) -> Result<Response, ApiError> {
    match admit(state) {
        Ok(permit) => score_admitted(state, request, body, permit).await,
        Err(err) => {
            discard_body(request, state.config.limits.max_body_bytes).await;
            Err(err)
        }
    }
}

/// Reads and drops a request body that will not be used (up to `limit` bytes, for at most a few
/// seconds), so that a client still sending its upload reads the error answer instead of
/// a broken connection.
async fn discard_body(request: Request, limit: usize) {
    discard(request.into_body().into_data_stream(), limit).await;
}

/// Reads and drops what is left of `stream`, as [`discard_body`].
async fn discard<E>(mut stream: impl Stream<Item = Result<Bytes, E>> + Unpin, limit: usize) {
    let drain = async {
        let mut seen = 0usize;
        while let Some(Ok(chunk)) = stream.next().await {
            seen += chunk.len();
            if seen > limit {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
}

/// A request body that the parser reads through while the handler keeps a hold on it, so that
/// what a parser that failed early left unread can still be discarded.
#[derive(Clone)]
struct SharedBody {
    stream: Arc<Mutex<BodyDataStream>>,
    /// Set once reading from the connection failed: the client closed it, or sent less than it
    /// announced. (A body over the limit fails outside, in the extractor's limit.)
    cut_off: Arc<AtomicBool>,
}

impl SharedBody {
    fn new(stream: BodyDataStream) -> Self {
        Self {
            stream: Arc::new(Mutex::new(stream)),
            cut_off: Arc::default(),
        }
    }

    fn is_cut_off(&self) -> bool {
        self.cut_off.load(Ordering::Relaxed)
    }
}

impl Stream for SharedBody {
    type Item = Result<Bytes, axum::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let poll = match self.stream.lock() {
            Ok(mut stream) => stream.poll_next_unpin(cx),
            Err(_) => Poll::Ready(None),
        };
        if let Poll::Ready(Some(Err(_))) = &poll {
            self.cut_off.store(true, Ordering::Relaxed);
        }
        poll
    }
}

/// Whether a scoring request may start: the model is loaded and a slot is free.
fn admit(state: &AppState) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
    let engine = state.engine.state();
    if !engine.is_ready() {
        return Err(match engine.load_error() {
            Some(message) => ApiError::unavailable(
                ErrorType::Unhealthy,
                format!("the model failed to load: {message}"),
                60,
            ),
            None => ApiError::unavailable(ErrorType::Unhealthy, "the model is loading", 5),
        });
    }
    Arc::clone(&state.permits).try_acquire_owned().map_err(|_| {
        ApiError::unavailable(
            ErrorType::Overloaded,
            format!(
                "the server is at its limit of {} requests in flight; retry later",
                state.config.limits.max_concurrent_requests
            ),
            1,
        )
    })
}

/// Parses, queues and answers an admitted request. `_permit` is held until the answer is
/// built: it bounds uploads on disk as well as queued work.
async fn score_admitted(
    state: &AppState,
    request: Request,
    body: &SharedBody,
    _permit: tokio::sync::OwnedSemaphorePermit,
) -> Result<Response, ApiError> {
    let parsed = match parse(state, request).await {
        Ok(parsed) => parsed,
        // A body cut off is the client's doing, not the server's (axum calls it a 500 for
        // multipart): a 400, so that clients that go away mid-upload do not look like failures.
        Err(_) if body.is_cut_off() => {
            return Err(ApiError::validation(
                "the request body was cut off: the client closed the connection or sent less than it announced",
            ));
        }
        Err(err) => {
            // The client may still be uploading: let it finish, then read the error.
            discard(body.clone(), state.config.limits.max_body_bytes).await;
            return Err(err);
        }
    };
    if parsed.parts.is_empty() {
        return Err(ApiError::validation(
            "no file given: send one or more multipart parts named `file`, or a JSON body with `images`",
        ));
    }
    let files: Vec<Upload> = parsed
        .parts
        .iter()
        .filter_map(|part| {
            let path = part.content.as_ref().ok()?;
            Some(Upload {
                name: part.name.clone(),
                path: path.clone(),
            })
        })
        .collect();
    let mut outcomes = if files.is_empty() {
        Vec::new()
    } else {
        run_job(state, files, parsed.params).await?
    }
    .into_iter();
    let mut results = Vec::new();
    let mut bad = Vec::new();
    let mut internal = None;
    for (index, part) in parsed.parts.iter().enumerate() {
        let outcome = match &part.content {
            Err(message) => FileOutcome::Failed {
                message: message.clone(),
                input_fault: true,
            },
            Ok(_) => outcomes.next().ok_or_else(|| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    ErrorType::Backend,
                    "the engine answered for fewer files than it was given",
                )
            })?,
        };
        match outcome {
            FileOutcome::Scored(records) => results.extend(
                records
                    .into_iter()
                    .map(|record| ScoreResult::Scored(Box::new(record))),
            ),
            FileOutcome::Failed {
                message,
                input_fault,
            } => {
                let line = format!("part {} (`{}`): {message}", index + 1, part.name);
                if input_fault {
                    bad.push(line);
                } else {
                    internal.get_or_insert(line);
                }
                results.push(ScoreResult::Failed(ItemError {
                    path: part.name.clone(),
                    error: message,
                }));
            }
        }
    }
    let (status, error_type, message) = if let Some(line) = internal {
        (StatusCode::INTERNAL_SERVER_ERROR, ErrorType::Backend, line)
    } else if !bad.is_empty() {
        let total = parsed.parts.len();
        let message = format!(
            "{} of {total} file(s) could not be scored: {}",
            bad.len(),
            bad.join("; ")
        );
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            ErrorType::Validation,
            message,
        )
    } else {
        return Ok(Json(ScoreResponse { results }).into_response());
    };
    Ok((
        status,
        Json(ErrorResponse {
            error: message,
            error_type,
            results: Some(results),
        }),
    )
        .into_response())
}

/// Hands the files to the engine and waits for their outcomes.
async fn run_job(
    state: &AppState,
    files: Vec<Upload>,
    params: Params,
) -> Result<Vec<FileOutcome>, ApiError> {
    let (reply, answer) = oneshot::channel();
    let job = Job {
        files,
        tasks: params.tasks,
        scale: params.scale,
        video: params.video,
        reply,
    };
    state.engine.submit(job).map_err(|e| match e {
        SubmitError::Full => {
            ApiError::unavailable(ErrorType::Overloaded, "the queue is full; retry later", 1)
        }
        SubmitError::Closed => {
            ApiError::unavailable(ErrorType::Unhealthy, "the server is shutting down", 5)
        }
    })?;
    match answer.await {
        Ok(Ok(outcomes)) => Ok(outcomes),
        Ok(Err(failure)) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorType::Backend,
            failure.to_string(),
        )),
        Err(_) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorType::Backend,
            BatchFailure::Backend("the engine stopped before answering".into()).to_string(),
        )),
    }
}

async fn parse(state: &AppState, request: Request) -> Result<Parsed, ApiError> {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let dir = tempfile::Builder::new()
        .prefix("qalign-upload-")
        .tempdir()
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorType::Backend,
                format!("cannot create a folder for the upload: {e}"),
            )
        })?;
    if content_type.starts_with("multipart/form-data") {
        parse_multipart(state, request, dir).await
    } else if content_type.starts_with("application/json") {
        parse_json(state, request, dir).await
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorType::UnsupportedMediaType,
            format!(
                "content type `{content_type}`: send multipart/form-data (parts named `file`) or application/json"
            ),
        ))
    }
}

/// Form fields, as text, before validation.
#[derive(Default)]
struct RawParams {
    task: Option<String>,
    scale: Option<String>,
    fps: Option<String>,
    max_frames: Option<String>,
    per_frame: Option<String>,
}

impl RawParams {
    fn validate(self) -> Result<Params, ApiError> {
        let tasks = match self.task.as_deref().map(str::trim) {
            None | Some("") => vec![Task::Quality],
            Some(t) if t.eq_ignore_ascii_case("all") => Task::ALL.to_vec(),
            Some(t) => vec![Task::from_str(t).map_err(|_| {
                ApiError::validation(format!("task `{t}`: expected quality, aesthetics or all"))
            })?],
        };
        let scale = match self.scale.as_deref().map(str::trim) {
            None | Some("") => Scale::OneToFive,
            Some(s) => Scale::from_str(s)
                .map_err(|_| ApiError::validation(format!("scale `{s}`: expected 1-5 or 0-1")))?,
        };
        let fps = match self.fps.as_deref().map(str::trim) {
            None | Some("") => 1.0,
            Some(s) => s.parse::<f64>().map_err(|_| {
                ApiError::validation(format!("fps `{s}`: expected a positive number"))
            })?,
        };
        let max_frames = match self.max_frames.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(s) => Some(s.parse::<usize>().map_err(|_| {
                ApiError::validation(format!("max_frames `{s}`: expected a positive integer"))
            })?),
        };
        let per_frame = match self.per_frame.as_deref().map(str::trim) {
            None | Some("") => false,
            Some("true" | "1" | "on" | "yes") => true,
            Some("false" | "0" | "off" | "no") => false,
            Some(s) => {
                return Err(ApiError::validation(format!(
                    "per_frame `{s}`: expected true or false"
                )));
            }
        };
        let sampling = SamplingOptions::new(fps, max_frames)
            .map_err(|e| ApiError::validation(e.to_string()))?;
        Ok(Params {
            tasks,
            scale,
            video: VideoOptions {
                sampling,
                window: None,
                per_frame,
            },
        })
    }
}

/// The spool file of part `index`, keeping a short extension of the client's name.
fn spool_path(dir: &std::path::Path, index: usize, name: &str) -> std::path::PathBuf {
    let ext = std::path::Path::new(name)
        .extension()
        .and_then(|e| e.to_str())
        .filter(|e| e.len() <= 8 && e.chars().all(|c| c.is_ascii_alphanumeric()))
        .map(|e| format!(".{}", e.to_ascii_lowercase()))
        .unwrap_or_default();
    dir.join(format!("{index:05}{ext}"))
}

/// 422 for a request with more files than `--max-client-batch-size`; `count` says how many.
fn too_many_files(count: &str, max: usize) -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        ErrorType::Validation,
        format!("{count} files in one request; the limit is {max} (--max-client-batch-size)"),
    )
}

fn spool_error(e: std::io::Error) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        ErrorType::Backend,
        format!("cannot store the upload: {e}"),
    )
}

async fn parse_multipart(
    state: &AppState,
    request: Request,
    dir: tempfile::TempDir,
) -> Result<Parsed, ApiError> {
    let limit = state.config.limits.max_body_bytes;
    let mut multipart = Multipart::from_request(request, state)
        .await
        .map_err(|e| ApiError::rejection(e.status(), e.body_text(), limit))?;
    let max_files = state.config.limits.max_client_batch_size;
    let mut raw = RawParams::default();
    let mut parts = Vec::new();
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(e) => {
                return Err(ApiError::rejection(e.status(), e.body_text(), limit));
            }
        };
        let field_name = field.name().unwrap_or("").to_string();
        if field_name == "file" || field_name == "files" {
            let index = parts.len();
            if index == max_files {
                return Err(too_many_files(&format!("more than {max_files}"), max_files));
            }
            let name = field
                .file_name()
                .filter(|n| !n.is_empty())
                .map(str::to_string)
                .unwrap_or_else(|| format!("file-{index}"));
            let path = spool_path(dir.path(), index, &name);
            let mut file = tokio::fs::File::create(&path).await.map_err(spool_error)?;
            let mut field = field;
            loop {
                match field.chunk().await {
                    Ok(Some(chunk)) => file.write_all(&chunk).await.map_err(spool_error)?,
                    Ok(None) => break,
                    Err(e) => {
                        return Err(ApiError::rejection(e.status(), e.body_text(), limit));
                    }
                }
            }
            file.flush().await.map_err(spool_error)?;
            parts.push(Part {
                name,
                content: Ok(path),
            });
            continue;
        }
        let slot = match field_name.as_str() {
            "task" => &mut raw.task,
            "scale" => &mut raw.scale,
            "fps" => &mut raw.fps,
            "max_frames" => &mut raw.max_frames,
            "per_frame" => &mut raw.per_frame,
            other => {
                return Err(ApiError::validation(format!(
                    "unknown form field `{other}`: expected file, task, scale, fps, max_frames or per_frame"
                )));
            }
        };
        let text = field
            .text()
            .await
            .map_err(|e| ApiError::rejection(e.status(), e.body_text(), limit))?;
        *slot = Some(text);
    }
    Ok(Parsed {
        params: raw.validate()?,
        parts,
        _dir: dir,
    })
}

async fn parse_json(
    state: &AppState,
    request: Request,
    dir: tempfile::TempDir,
) -> Result<Parsed, ApiError> {
    let limit = state.config.limits.max_body_bytes;
    let body = Bytes::from_request(request, state)
        .await
        .map_err(|e| ApiError::rejection(e.status(), e.body_text(), limit))?;
    let request: JsonScoreRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::validation(format!("malformed JSON body: {e}")))?;
    let raw = RawParams {
        task: request.task,
        scale: request.scale,
        fps: request.fps.map(|f| f.to_string()),
        max_frames: request.max_frames.map(|n| n.to_string()),
        per_frame: request.per_frame.map(|b| b.to_string()),
    };
    let params = raw.validate()?;
    let max_files = state.config.limits.max_client_batch_size;
    if request.images.len() > max_files {
        return Err(too_many_files(&request.images.len().to_string(), max_files));
    }
    let mut parts = Vec::with_capacity(request.images.len());
    for (index, image) in request.images.into_iter().enumerate() {
        let (name, mut data) = match image {
            JsonImage::Data(data) => (format!("image-{index}"), data),
            JsonImage::Named { name, data } => (name, data),
        };
        // Line breaks (as `base64` without -w0 writes them) and other ASCII white space are
        // dropped in place; anything else that is not base64 still fails below.
        if data.bytes().any(|b| b.is_ascii_whitespace()) {
            data.retain(|c| !c.is_ascii_whitespace());
        }
        let encoded = match data.split_once(";base64,") {
            Some((prefix, rest)) if prefix.starts_with("data:") => rest,
            _ => data.as_str(),
        };
        let content = match decode_base64(encoded) {
            Ok(bytes) => {
                let path = spool_path(dir.path(), index, &name);
                tokio::fs::write(&path, bytes).await.map_err(spool_error)?;
                Ok(path)
            }
            Err(e) => Err(format!("not valid base64: {e}")),
        };
        parts.push(Part { name, content });
    }
    Ok(Parsed {
        params,
        parts,
        _dir: dir,
    })
}

/// Decodes base64 in the standard alphabet (`+/`) or the URL-safe one (`-_`, chosen when either
/// character occurs), padded with `=` or not. Anything else (a mix of both alphabets, other
/// characters, a wrong amount of padding, a lone trailing character) is an error.
fn decode_base64(encoded: &str) -> Result<Vec<u8>, base64::DecodeError> {
    use base64::alphabet::{STANDARD, URL_SAFE};
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    const CONFIG: GeneralPurposeConfig =
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    const STANDARD_ANY_PAD: GeneralPurpose = GeneralPurpose::new(&STANDARD, CONFIG);
    const URL_SAFE_ANY_PAD: GeneralPurpose = GeneralPurpose::new(&URL_SAFE, CONFIG);
    if encoded.bytes().any(|b| b == b'-' || b == b'_') {
        URL_SAFE_ANY_PAD.decode(encoded)
    } else {
        STANDARD_ANY_PAD.decode(encoded)
    }
}

/// The `Retry-After` seconds of a response, if any (for clients and tests).
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .parse()
        .ok()
        .map(Duration::from_secs)
}
