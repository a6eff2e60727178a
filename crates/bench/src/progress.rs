//! Progress display: indicatif bars on stderr when it is a terminal, and nothing but one
//! plain line per phase otherwise, so logs and CI output stay readable.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Where phases report their progress.
#[derive(Clone)]
pub struct Progress {
    multi: Option<MultiProgress>,
    /// Print phase lines at all (off in tests).
    verbose: bool,
}

impl Progress {
    /// Bars if stderr is a terminal, plain phase lines otherwise.
    pub fn for_stderr() -> Progress {
        let multi = std::io::stderr()
            .is_terminal()
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        Progress {
            multi,
            verbose: true,
        }
    }

    /// No output at all.
    pub fn silent() -> Progress {
        Progress {
            multi: None,
            verbose: false,
        }
    }

    /// A bar counting `len` items; on a non-terminal, one line naming the phase.
    pub fn bar(&self, label: &str, len: u64) -> Bar {
        match &self.multi {
            Some(multi) => {
                let bar = multi.add(ProgressBar::new(len));
                let style = ProgressStyle::with_template(
                    "{prefix:>28} [{bar:30}] {pos}/{len} {per_sec} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
                bar.set_style(style);
                bar.set_prefix(label.to_string());
                bar.enable_steady_tick(Duration::from_millis(200));
                Bar(Some(bar))
            }
            None => {
                self.note(label);
                Bar(None)
            }
        }
    }

    /// A line above the bars (or on stderr).
    pub fn note(&self, line: &str) {
        match &self.multi {
            Some(multi) => {
                let _ = multi.println(line);
            }
            None if self.verbose => eprintln!("{line}"),
            None => {}
        }
    }
}

/// One bar; does nothing when progress is not shown.
pub struct Bar(Option<ProgressBar>);

impl Bar {
    pub fn inc(&self, n: u64) {
        if let Some(b) = &self.0 {
            b.inc(n);
        }
    }

    pub fn set_position(&self, n: u64) {
        if let Some(b) = &self.0 {
            b.set_position(n);
        }
    }

    pub fn set_message(&self, msg: String) {
        if let Some(b) = &self.0 {
            b.set_message(msg);
        }
    }

    /// Removes the bar; the phase's result is printed in the final table.
    pub fn finish(&self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.finish();
    }
}
