//! Progress bars on stderr for long runs: shown only on a terminal and only when there is
//! enough work to be worth watching, so piped and scripted runs stay clean.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Item counts up to this are finished before a bar would be worth reading.
const MIN_ITEMS: u64 = 4;

/// A bar over `len` items labelled `what`, or a hidden one.
pub fn bar(len: u64, what: &str) -> ProgressBar {
    if len < MIN_ITEMS || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    let template = format!("{what} {{bar:30}} {{pos}}/{{len}} [{{elapsed}}<{{eta}}] {{wide_msg}}");
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style);
    }
    bar
}
