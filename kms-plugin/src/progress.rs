//! Progress of a long operator command on stderr: an `indicatif` bar with rate and ETA on a
//! terminal, a plain line every few seconds otherwise (logs, CI, `kubectl exec`).

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often the plain form prints.
const PLAIN_EVERY: Duration = Duration::from_secs(5);

/// One progress display; cheap to update from many tasks.
#[derive(Debug)]
pub struct Progress {
    what: String,
    bar: Option<ProgressBar>,
    done: AtomicU64,
    total: Mutex<Option<u64>>,
    started: Instant,
    last_line: Mutex<Instant>,
}

impl Progress {
    /// Starts a display of `what` (`"keys"`, `"secrets"`), out of `total` when known.
    pub fn new(what: impl Into<String>, total: Option<u64>) -> Progress {
        let what = what.into();
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr());
            let template = if total.is_some() {
                "{bar:40} {pos}/{len} {msg} ({per_sec}, ETA {eta})"
            } else {
                "{spinner} {pos} {msg} ({per_sec})"
            };
            if let Ok(style) = ProgressStyle::with_template(template) {
                b.set_style(style);
            }
            b.set_message(what.clone());
            b.enable_steady_tick(Duration::from_millis(200));
            b
        });
        let now = Instant::now();
        Progress {
            what,
            bar,
            done: AtomicU64::new(0),
            total: Mutex::new(total),
            started: now,
            last_line: Mutex::new(now),
        }
    }

    /// Sets the total once it is known (a paginated list learns it from its first page).
    pub fn set_total(&self, total: u64) {
        *self.total.lock().unwrap_or_else(|p| p.into_inner()) = Some(total);
        if let Some(b) = &self.bar {
            b.set_length(total);
            if let Ok(style) =
                ProgressStyle::with_template("{bar:40} {pos}/{len} {msg} ({per_sec}, ETA {eta})")
            {
                b.set_style(style);
            }
        }
    }

    /// Counts `n` more done.
    pub fn inc(&self, n: u64) {
        let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
        if let Some(b) = &self.bar {
            b.inc(n);
            return;
        }
        let mut last = self.last_line.lock().unwrap_or_else(|p| p.into_inner());
        if last.elapsed() >= PLAIN_EVERY {
            *last = Instant::now();
            eprintln!("{}", self.line(done));
        }
    }

    /// Prints a line without tearing the bar.
    pub fn println(&self, msg: &str) {
        match &self.bar {
            Some(b) => b.println(msg),
            None => eprintln!("{msg}"),
        }
    }

    /// Ends the display.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }

    fn line(&self, done: u64) -> String {
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = done as f64 / secs;
        let total = *self.total.lock().unwrap_or_else(|p| p.into_inner());
        match total {
            Some(t) => format!("{done}/{t} {} ({rate:.0}/s)", self.what),
            None => format!("{done} {} ({rate:.0}/s)", self.what),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}
