//! One module per subcommand: its clap `Args`, their validation, and `run`.

pub mod bench;
pub mod eval;
pub mod info;
pub mod loadtest;
pub mod quantize;
pub mod score;
pub mod serve;
pub mod syllabus;
pub mod train;

/// The run failed (bad input, unreadable file, model error).
pub const EXIT_ERROR: u8 = 1;
/// A usage error (an invalid flag value), as clap's own.
pub const EXIT_USAGE: u8 = 2;
/// Some inputs failed and were skipped; the others were processed.
pub const EXIT_PARTIAL: u8 = 3;

/// Interrupted by Ctrl-C (SIGINT), as a shell reports a process the signal killed (128 + 2).
pub const EXIT_INTERRUPTED: u8 = 130;
/// Stopped by SIGTERM (128 + 15).
pub const EXIT_TERMINATED: u8 = 143;

/// Reports a usage error that clap could not see (it depends on several flags or on files).
pub fn usage_error(message: &str) -> std::process::ExitCode {
    eprintln!("error: {message}");
    std::process::ExitCode::from(EXIT_USAGE)
}
