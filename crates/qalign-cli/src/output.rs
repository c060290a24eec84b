//! The one way commands write results to stdout, so every command fails the same way when stdout
//! cannot take them: a closed stdout (`>&-`) and a full one (`> /dev/full`) are errors that name
//! stdout, while a reader that went away (`| head`) ends the run quietly, as ripgrep does.
//! Also the wording of per-input errors on stderr.

use std::fmt;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};

/// Set before `main` when the process started with file descriptor 1 closed. Rust's runtime
/// then quietly reopens it on /dev/null, so `main` itself can no longer tell.
static STDOUT_WAS_CLOSED: AtomicBool = AtomicBool::new(false);

/// Runs from the ELF `.init_array` (Mach-O `__mod_init_func`), before the Rust runtime's own
/// start-up code replaces a closed stdout with /dev/null.
#[cfg_attr(
    not(any(target_os = "linux", target_os = "android", target_os = "macos")),
    allow(dead_code)
)]
extern "C" fn note_closed_stdout() {
    use std::os::fd::FromRawFd;
    // SAFETY: fd 1 is only borrowed: `ManuallyDrop` never closes it. fstat on a closed
    // descriptor fails with EBADF and touches nothing.
    let file = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(1) });
    if file
        .metadata()
        .is_err_and(|e| e.raw_os_error() == Some(EBADF))
    {
        STDOUT_WAS_CLOSED.store(true, Ordering::Relaxed);
    }
}

/// EBADF is 9 on Linux and macOS.
const EBADF: i32 = 9;

#[cfg(any(target_os = "linux", target_os = "android", target_os = "macos"))]
#[used]
#[cfg_attr(
    any(target_os = "linux", target_os = "android"),
    unsafe(link_section = ".init_array")
)]
#[cfg_attr(target_os = "macos", unsafe(link_section = "__DATA,__mod_init_func"))]
static NOTE_CLOSED_STDOUT: extern "C" fn() = note_closed_stdout;

/// Whether stdout was closed when qalign started.
pub fn stdout_was_closed() -> bool {
    STDOUT_WAS_CLOSED.load(Ordering::Relaxed)
}

/// A failed write to stdout. It travels inside an [`io::Error`] of the same kind, so it goes
/// through `?`, csv and serde writers unchanged; `main` finds it with [`find_stdout_error`].
#[derive(Debug)]
pub struct StdoutError {
    kind: io::ErrorKind,
    message: String,
}

impl StdoutError {
    /// The reader of a pipe went away: not worth an error message.
    pub fn is_broken_pipe(&self) -> bool {
        self.kind == io::ErrorKind::BrokenPipe
    }
}

impl fmt::Display for StdoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot write to stdout: {}", self.message)
    }
}

impl std::error::Error for StdoutError {}

fn stdout_error(err: io::Error) -> io::Error {
    if err.get_ref().is_some_and(|e| e.is::<StdoutError>()) {
        return err;
    }
    let kind = err.kind();
    io::Error::new(
        kind,
        StdoutError {
            kind,
            message: err.to_string(),
        },
    )
}

fn closed_error() -> io::Error {
    io::Error::other(StdoutError {
        kind: io::ErrorKind::NotConnected,
        message: "it is closed (was qalign started with `>&-`?); \
                  redirect it to a file or /dev/null instead"
            .into(),
    })
}

/// The [`StdoutError`] somewhere in an error's chain, if any.
pub fn find_stdout_error(err: &anyhow::Error) -> Option<&StdoutError> {
    err.chain().find_map(|cause| {
        cause.downcast_ref::<StdoutError>().or_else(|| {
            cause
                .downcast_ref::<io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<StdoutError>())
        })
    })
}

/// Locked stdout whose errors are [`StdoutError`]s. Writes through std's line buffer, so
/// streamed formats (jsonl, csv) reach a pipe line by line; call `flush` at the end.
pub struct Stdout {
    inner: io::StdoutLock<'static>,
}

/// Locks stdout for writing results.
pub fn stdout() -> Stdout {
    Stdout {
        inner: io::stdout().lock(),
    }
}

/// Fails early, before any work, when stdout was closed: results would have nowhere to go.
pub fn ensure_stdout_open() -> io::Result<()> {
    if stdout_was_closed() {
        return Err(closed_error());
    }
    Ok(())
}

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        ensure_stdout_open()?;
        self.inner.write(buf).map_err(stdout_error)
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        ensure_stdout_open()?;
        self.inner.write_all(buf).map_err(stdout_error)
    }

    fn flush(&mut self) -> io::Result<()> {
        ensure_stdout_open()?;
        self.inner.flush().map_err(stdout_error)
    }
}

/// Writes `text` to stdout and flushes it (what `eval` and `syllabus` print).
pub fn write_all(text: &str) -> io::Result<()> {
    let mut out = stdout();
    out.write_all(text.as_bytes())?;
    out.flush()
}

/// `err` with the context `with_path`, or `without_path` when the error's own message already
/// names `path` (library errors usually do), so that an error line names each file once.
pub fn context_naming<E>(
    err: E,
    path: &std::path::Path,
    without_path: &str,
    with_path: impl FnOnce(&str) -> String,
) -> anyhow::Error
where
    E: std::error::Error + Send + Sync + 'static,
{
    let name = path.display().to_string();
    let context = if err.to_string().contains(&name) {
        without_path.to_string()
    } else {
        with_path(&name)
    };
    anyhow::Error::new(err).context(context)
}

/// The stderr line for an input that failed: `error: <path>: <why>`, naming the path once even
/// when the library's message already names it.
pub fn input_error_line(name: &str, err: &dyn fmt::Display) -> String {
    let message = err.to_string();
    if message.contains(name) {
        format!("error: {message}")
    } else {
        format!("error: {name}: {message}")
    }
}
