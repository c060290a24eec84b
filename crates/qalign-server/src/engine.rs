//! The one thread that owns the model. Requests reach it over a bounded channel; it gathers
//! jobs into dynamic batches (up to `max_batch_size` files, waiting at most `max_wait` for
//! more), encodes each batch's files once and runs every query any job of the batch asked for,
//! then hands each job its own records. A panic fails only its batch; a job whose client went
//! away (it left, or its request timed out) is dropped: before its batch runs, or, once every
//! job of a running batch is gone, after the model batch in progress or at a video's next window.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use qalign_core::{Scale, Task};
use qalign_model::{Query, ScoreError, ScoreOptions, ScoreRecord, Scored, VideoOptions};
use tokio::sync::oneshot;

use crate::backend::Backend;
use crate::metrics::Metrics;

/// One uploaded file, spooled to disk.
#[derive(Debug, Clone)]
pub struct Upload {
    /// The name the client gave it: records carry it as `path`.
    pub name: String,
    pub path: PathBuf,
}

/// One request's work.
#[derive(Debug)]
pub struct Job {
    pub files: Vec<Upload>,
    /// What to rate, in report order (never empty).
    pub tasks: Vec<Task>,
    pub scale: Scale,
    pub video: VideoOptions,
    pub reply: oneshot::Sender<JobResult>,
}

/// What became of one file of a job.
#[derive(Debug, Clone)]
pub enum FileOutcome {
    /// One record per task of the job.
    Scored(Vec<ScoreRecord>),
    /// The file could not be scored; `input_fault` tells a bad file from a broken model.
    Failed { message: String, input_fault: bool },
}

/// A whole job's answer: one outcome per file, in order, or a failure of its batch.
pub type JobResult = Result<Vec<FileOutcome>, BatchFailure>;

/// Why a whole batch failed; none of it is the client's fault.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BatchFailure {
    #[error("the engine panicked while scoring this batch: {0}")]
    Panic(String),
    #[error("the model could not score this batch: {0}")]
    Backend(String),
}

/// Batching limits.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Files per batch (a larger single request still runs whole, in chunks of this size).
    pub max_batch_size: usize,
    /// How long the first job of a batch waits for company.
    pub max_wait: Duration,
    /// Jobs the channel holds.
    pub queue_capacity: usize,
}

// Phases; the default, 0, is loading.
const READY: u8 = 1;
const FAILED: u8 = 2;

/// Where the engine stands: shared with the HTTP side.
#[derive(Debug, Default)]
pub struct EngineState {
    phase: AtomicU8,
    queued: AtomicUsize,
    load_error: Mutex<Option<String>>,
}

impl EngineState {
    pub fn is_ready(&self) -> bool {
        self.phase.load(Ordering::Acquire) == READY
    }

    /// The message of a failed model load.
    pub fn load_error(&self) -> Option<String> {
        if self.phase.load(Ordering::Acquire) != FAILED {
            return None;
        }
        self.load_error.lock().ok().and_then(|e| e.clone())
    }

    /// Jobs waiting for the engine.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }
}

/// Why a job was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitError {
    /// The queue is full: try again later.
    Full,
    /// The engine has stopped.
    Closed,
}

/// The HTTP side's handle: submit jobs, read the state. Dropping every handle lets the engine
/// finish the queue and stop.
#[derive(Clone)]
pub struct EngineHandle {
    tx: SyncSender<Job>,
    state: Arc<EngineState>,
    metrics: Arc<Metrics>,
}

impl EngineHandle {
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        self.state.queued.fetch_add(1, Ordering::Relaxed);
        match self.tx.try_send(job) {
            Ok(()) => {
                self.metrics.queue_depth.set(self.state.queued() as i64);
                Ok(())
            }
            Err(e) => {
                self.state.queued.fetch_sub(1, Ordering::Relaxed);
                Err(match e {
                    TrySendError::Full(_) => SubmitError::Full,
                    TrySendError::Disconnected(_) => SubmitError::Closed,
                })
            }
        }
    }

    pub fn state(&self) -> &EngineState {
        &self.state
    }
}

/// Starts the engine thread: it builds the backend with `load` (a failure is kept in the state
/// and ends the thread), then serves jobs until every handle is dropped and the queue is empty.
/// `on_loaded` hears the outcome of the load.
pub fn spawn<B, L>(
    load: L,
    config: EngineConfig,
    metrics: Arc<Metrics>,
    on_loaded: oneshot::Sender<Result<(), String>>,
) -> std::io::Result<(EngineHandle, JoinHandle<()>)>
where
    B: Backend,
    L: FnOnce() -> Result<B, String> + Send + 'static,
{
    let (tx, rx) = mpsc::sync_channel(config.queue_capacity.max(1));
    let state = Arc::new(EngineState::default());
    let handle = EngineHandle {
        tx,
        state: Arc::clone(&state),
        metrics: Arc::clone(&metrics),
    };
    let thread = std::thread::Builder::new()
        .name("qalign-engine".into())
        .spawn(move || {
            let backend = match catch_unwind(AssertUnwindSafe(load)) {
                Ok(Ok(backend)) => backend,
                Ok(Err(message)) => return fail_load(&state, message, on_loaded),
                Err(panic) => return fail_load(&state, panic_message(&*panic), on_loaded),
            };
            state.phase.store(READY, Ordering::Release);
            let _ = on_loaded.send(Ok(()));
            Engine {
                backend,
                config,
                rx,
                state,
                metrics,
                deferred: VecDeque::new(),
            }
            .run();
        })?;
    Ok((handle, thread))
}

fn fail_load(state: &EngineState, message: String, on_loaded: oneshot::Sender<Result<(), String>>) {
    if let Ok(mut slot) = state.load_error.lock() {
        *slot = Some(message.clone());
    }
    state.phase.store(FAILED, Ordering::Release);
    let _ = on_loaded.send(Err(message));
}

struct Engine<B> {
    backend: B,
    config: EngineConfig,
    rx: Receiver<Job>,
    state: Arc<EngineState>,
    metrics: Arc<Metrics>,
    /// Jobs taken off the channel that could not join the batch being built.
    deferred: VecDeque<Job>,
}

impl<B: Backend> Engine<B> {
    fn run(mut self) {
        while let Some(batch) = self.next_batch() {
            self.run_batch(batch);
        }
    }

    fn take(&self, job: Job) -> Job {
        self.state.queued.fetch_sub(1, Ordering::Relaxed);
        self.metrics.queue_depth.set(self.state.queued() as i64);
        job
    }

    /// The next batch: the oldest live job, the deferred jobs that fit beside it, then whatever
    /// arrives within `max_wait` while there is room. `None` once the channel is closed and
    /// drained.
    fn next_batch(&mut self) -> Option<Vec<Job>> {
        let first = loop {
            let job = match self.deferred.pop_front() {
                Some(job) => job,
                None => {
                    let job = self.rx.recv().ok()?;
                    self.take(job)
                }
            };
            if self.is_live(&job) {
                break job;
            }
        };
        let max = self.config.max_batch_size.max(1);
        let mut files = first.files.len();
        let mut batch = vec![first];
        let mut index = 0;
        while index < self.deferred.len() && files < max {
            if fits(&batch[0], &self.deferred[index], files, max) {
                let job = self.deferred.remove(index).expect("index in range");
                files += job.files.len();
                batch.push(job);
            } else {
                index += 1;
            }
        }
        let deadline = Instant::now() + self.config.max_wait;
        while files < max {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let job = match self.rx.recv_timeout(deadline - now) {
                Ok(job) => self.take(job),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            };
            if !self.is_live(&job) {
                continue;
            }
            if fits(&batch[0], &job, files, max) {
                files += job.files.len();
                batch.push(job);
            } else {
                self.deferred.push_back(job);
            }
        }
        Some(batch)
    }

    /// False for a job whose client has gone: it is dropped, unscored.
    fn is_live(&self, job: &Job) -> bool {
        if job.reply.is_closed() {
            self.metrics.dropped_jobs.inc();
            return false;
        }
        true
    }

    fn run_batch(&self, batch: Vec<Job>) {
        // A client may have left while the batch was gathered.
        let batch: Vec<Job> = batch.into_iter().filter(|job| self.is_live(job)).collect();
        let Some(first) = batch.first() else { return };
        let mut queries: Vec<Task> = Vec::new();
        for task in batch.iter().flat_map(|job| &job.tasks) {
            if !queries.contains(task) {
                queries.push(*task);
            }
        }
        let queries: Vec<Query> = queries.into_iter().map(Query::Task).collect();
        let paths: Vec<PathBuf> = batch
            .iter()
            .flat_map(|job| job.files.iter().map(|f| f.path.clone()))
            .collect();
        self.metrics.batch_size.observe(paths.len() as f64);
        let options = ScoreOptions {
            batch_size: self.config.max_batch_size.max(1),
            video: first.video.clone(),
            strict: false,
            decode_ahead: true,
        };
        let anyone_waiting = || batch.iter().any(|job| !job.reply.is_closed());
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            self.backend
                .score(&paths, &queries, &options, &anyone_waiting)
        }));
        let outcomes = match outcome {
            Ok(Ok(outcomes)) if outcomes.len() == paths.len() => outcomes,
            // Stopped early because nobody waits any more (a closed reply stays closed).
            Ok(Ok(_)) if !anyone_waiting() => {
                self.metrics.dropped_jobs.inc_by(batch.len() as u64);
                return;
            }
            Ok(Ok(outcomes)) => {
                let message = format!(
                    "{} outcomes for {} files (a backend bug)",
                    outcomes.len(),
                    paths.len()
                );
                return fail_all(batch, BatchFailure::Backend(message));
            }
            Ok(Err(err)) => return fail_all(batch, BatchFailure::Backend(err.to_string())),
            Err(panic) => return fail_all(batch, BatchFailure::Panic(panic_message(&*panic))),
        };
        let mut outcomes = outcomes.into_iter();
        for job in batch {
            // Its client left while the batch ran: neither answered nor counted as scored.
            if !self.is_live(&job) {
                outcomes.by_ref().take(job.files.len()).for_each(drop);
                continue;
            }
            let results: Vec<FileOutcome> = job
                .files
                .iter()
                .zip(outcomes.by_ref())
                .map(|(file, outcome)| self.file_outcome(&job, &queries, file, outcome))
                .collect();
            let _ = job.reply.send(Ok(results));
        }
    }

    /// The records of one file for its job's tasks, on its job's scale.
    fn file_outcome(
        &self,
        job: &Job,
        queries: &[Query],
        file: &Upload,
        outcome: Result<Scored, ScoreError>,
    ) -> FileOutcome {
        let scored = match outcome {
            Ok(scored) => scored,
            Err(err) => {
                // Errors name the spool file: name the upload instead, and keep server paths private.
                let spool = file.path.display().to_string();
                return FileOutcome::Failed {
                    input_fault: !matches!(err, ScoreError::NonFiniteOutput { .. }),
                    message: err.to_string().replace(&spool, &file.name),
                };
            }
        };
        self.metrics.images_scored.inc();
        let levels = self.backend.levels();
        let records = job
            .tasks
            .iter()
            .map(|task| {
                let q = queries
                    .iter()
                    .position(|query| *query == Query::Task(*task))
                    .expect("the batch's queries hold every task of its jobs");
                match &scored {
                    Scored::Image(scores) => {
                        ScoreRecord::image(&file.name, task.as_str(), &scores[q], levels, job.scale)
                    }
                    Scored::Video(video) => {
                        ScoreRecord::video(&file.name, task.as_str(), q, video, levels, job.scale)
                    }
                }
            })
            .collect();
        FileOutcome::Scored(records)
    }
}

/// Whether `job` may join a batch started by `first` that holds `files` files: the same video
/// settings (one call takes one), and room left.
fn fits(first: &Job, job: &Job, files: usize, max: usize) -> bool {
    let same_video = first.video.sampling == job.video.sampling
        && first.video.window == job.video.window
        && first.video.per_frame == job.video.per_frame;
    same_video && files + job.files.len() <= max
}

fn fail_all(batch: Vec<Job>, failure: BatchFailure) {
    for job in batch {
        let _ = job.reply.send(Err(failure.clone()));
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string())
}
