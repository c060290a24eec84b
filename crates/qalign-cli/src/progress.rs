//! The progress bar of every long-running command: on stderr, shown only on a terminal, unless
//! `--quiet`, and only when there is enough work to be worth watching, so piped and scripted
//! runs stay clean.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use qalign_model::{LoadObserver, LoadProgress};

/// Item counts below this are finished before a bar would be worth reading.
const MIN_ITEMS: u64 = 4;

static QUIET: AtomicBool = AtomicBool::new(false);

/// `--quiet`: no bars at all.
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// A bar over the transformer layers of a model load, and the observer that moves it: loading the
/// real OneAlign (reading, converting or quantising 16 GB) can take minutes.
pub fn load_bar() -> (ProgressBar, LoadObserver) {
    let bar = bar_when(true, 0, "loading model (layers)");
    let moved = bar.clone();
    let observer = LoadObserver::new(move |p: LoadProgress| {
        moved.set_length(p.layers as u64);
        moved.set_position(p.layers_done as u64);
    });
    (bar, observer)
}

/// For logs (a server's stderr is rarely a terminal): a line at each tenth of a model load,
/// `loading model: 31/62 layers`; none with `--quiet`.
pub fn load_log() -> LoadObserver {
    let quiet = QUIET.load(Ordering::Relaxed);
    LoadObserver::new(move |p: LoadProgress| {
        let tenth = |done: usize| done * 10 / p.layers.max(1);
        let crossed = p.layers_done > 0 && tenth(p.layers_done) > tenth(p.layers_done - 1);
        if !quiet && (crossed || p.layers_done == p.layers) {
            eprintln!("loading model: {}/{} layers", p.layers_done, p.layers);
        }
    })
}

/// A bar over `len` items labelled `label`, hidden for fewer than [`MIN_ITEMS`] items.
pub fn bar(len: u64, label: &str) -> ProgressBar {
    bar_when(len >= MIN_ITEMS, len, label)
}

/// A bar over `len` items labelled `label`, shown only when `worth_showing` (the caller's
/// measure of how long the work takes), stderr is a terminal and `--quiet` is off.
pub fn bar_when(worth_showing: bool, len: u64, label: &str) -> ProgressBar {
    if !worth_showing || QUIET.load(Ordering::Relaxed) || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    let template = format!("{label} {{bar:30}} {{pos}}/{{len}} [{{elapsed}}<{{eta}}] {{wide_msg}}");
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style);
    }
    bar
}
