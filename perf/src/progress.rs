//! Progress of a long bench: each line it reports goes to stdout as it always did (the record,
//! also in CI logs), and in a terminal a spinner on stderr shows the time so far and the latest
//! line. indicatif hides the spinner when stderr is not a terminal, so CI and pipes stay quiet.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bench's progress display.
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// Starts the spinner for the bench `what`.
    pub fn new(what: &str) -> Progress {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        if let Ok(style) =
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {prefix}: {wide_msg}")
        {
            bar.set_style(style);
        }
        bar.set_prefix(what.to_string());
        bar.enable_steady_tick(Duration::from_millis(200));
        Progress { bar }
    }

    /// Prints `line` (above the spinner) and shows it as the latest.
    pub fn line(&self, line: &str) {
        self.bar.suspend(|| println!("{line}"));
        self.bar.set_message(line.trim().to_string());
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}
