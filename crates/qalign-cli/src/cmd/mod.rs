//! One module per subcommand: its clap `Args`, their validation, and `run`.

pub mod bench;
pub mod eval;
pub mod info;
pub mod score;
pub mod syllabus;
pub mod train;

/// The run failed (bad input, unreadable file, model error).
pub const EXIT_ERROR: u8 = 1;
/// Some inputs failed and were skipped; the others were processed.
pub const EXIT_PARTIAL: u8 = 3;
