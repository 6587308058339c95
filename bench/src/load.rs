//! The measuring engine. N workers run one operation back to back; each cell has an
//! unmeasured warm-up, then a fixed measured window. An operation counts if it *completes*
//! inside the window (throughput = completions / window length); its latency is kept
//! exactly, and percentiles come from the sorted list (nearest rank).

use std::future::Future;
use std::time::{Duration, Instant};

/// Longest one operation may take before it counts as an error (the plugin's own HSM
/// deadline is 2 s; this only keeps a wedged server from hanging the bench).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Warm-up and measured time of one cell.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// Unmeasured time first.
    pub warmup: Duration,
    /// Measured time.
    pub measure: Duration,
}

/// The absolute measured window of one cell.
#[derive(Debug, Clone, Copy)]
struct Clock {
    from: Instant,
    until: Instant,
}

impl Clock {
    fn start(w: Window) -> Clock {
        let from = Instant::now() + w.warmup;
        Clock {
            from,
            until: from + w.measure,
        }
    }
}

/// What one worker (or all of them, merged) saw inside the window.
#[derive(Debug, Default)]
struct Recorder {
    latencies_ns: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
}

impl Recorder {
    fn record(&mut self, clock: &Clock, t0: Instant, t1: Instant, r: Result<(), String>) {
        if t1 < clock.from || t1 >= clock.until {
            return;
        }
        match r {
            Ok(()) => self
                .latencies_ns
                .push(u64::try_from((t1 - t0).as_nanos()).unwrap_or(u64::MAX)),
            Err(e) => {
                self.errors += 1;
                self.first_error.get_or_insert(e);
            }
        }
    }

    fn merge(&mut self, other: Recorder) {
        self.latencies_ns.extend(other.latencies_ns);
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    fn finish(mut self, measured: Duration) -> Summary {
        self.latencies_ns.sort_unstable();
        let ops = self.latencies_ns.len() as u64;
        Summary {
            ops,
            errors: self.errors,
            throughput: ops as f64 / measured.as_secs_f64(),
            p50: Duration::from_nanos(percentile(&self.latencies_ns, 0.50)),
            p99: Duration::from_nanos(percentile(&self.latencies_ns, 0.99)),
            first_error: self.first_error,
        }
    }
}

/// Nearest-rank percentile of a sorted list (0 for an empty one).
fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The result of one cell.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Successful operations completed in the window.
    pub ops: u64,
    /// Failed operations completed in the window.
    pub errors: u64,
    /// Successful operations per second.
    pub throughput: f64,
    /// Median latency of the successful operations.
    pub p50: Duration,
    /// 99th-percentile latency of the successful operations.
    pub p99: Duration,
    /// The first failure seen, to show why.
    pub first_error: Option<String>,
}

/// One async client: each call is one operation.
pub trait Worker: Send + 'static {
    /// Does one operation and checks its answer.
    fn call(&mut self) -> impl Future<Output = Result<(), String>> + Send;
}

/// Runs every worker as its own tokio task for `window`.
pub async fn drive_async<W: Worker>(workers: Vec<W>, window: Window) -> anyhow::Result<Summary> {
    let clock = Clock::start(window);
    let mut tasks = tokio::task::JoinSet::new();
    for mut w in workers {
        tasks.spawn(async move {
            let mut rec = Recorder::default();
            loop {
                let t0 = Instant::now();
                if t0 >= clock.until {
                    break;
                }
                let r = match tokio::time::timeout(CALL_TIMEOUT, w.call()).await {
                    Ok(r) => r,
                    Err(_) => Err(format!("no answer within {CALL_TIMEOUT:?}")),
                };
                rec.record(&clock, t0, Instant::now(), r);
            }
            rec
        });
    }
    let mut all = Recorder::default();
    while let Some(r) = tasks.join_next().await {
        all.merge(r?);
    }
    Ok(all.finish(window.measure))
}

/// Runs `op(thread, sequence)` on `threads` OS threads for `window`. Blocks the caller.
pub fn drive_threads<F>(threads: usize, window: Window, op: F) -> anyhow::Result<Summary>
where
    F: Fn(usize, u64) -> Result<(), String> + Sync,
{
    let clock = Clock::start(window);
    let op = &op;
    let joined: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                s.spawn(move || {
                    let mut rec = Recorder::default();
                    for seq in 0.. {
                        let t0 = Instant::now();
                        if t0 >= clock.until {
                            break;
                        }
                        let r = op(i, seq);
                        rec.record(&clock, t0, Instant::now(), r);
                    }
                    rec
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join()).collect()
    });
    let mut all = Recorder::default();
    for r in joined {
        all.merge(r.map_err(|_| anyhow::anyhow!("a benchmark thread panicked"))?);
    }
    Ok(all.finish(window.measure))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.50), 50);
        assert_eq!(percentile(&v, 0.99), 99);
        assert_eq!(percentile(&v, 1.0), 100);
        assert_eq!(percentile(&[7], 0.99), 7);
        assert_eq!(percentile(&[1, 2], 0.5), 1);
        assert_eq!(percentile(&[], 0.5), 0);
    }

    #[test]
    fn only_completions_inside_the_window_count() {
        let now = Instant::now();
        let clock = Clock {
            from: now + Duration::from_millis(10),
            until: now + Duration::from_millis(20),
        };
        let mut rec = Recorder::default();
        let at = |ms| now + Duration::from_millis(ms);
        rec.record(&clock, at(0), at(5), Ok(())); // warm-up
        rec.record(&clock, at(5), at(12), Ok(())); // started in warm-up, counts
        rec.record(&clock, at(12), at(13), Err("boom".into()));
        rec.record(&clock, at(13), at(14), Err("later".into()));
        rec.record(&clock, at(19), at(20), Ok(())); // completes at the end: out
        let s = rec.finish(Duration::from_millis(10));
        assert_eq!((s.ops, s.errors), (1, 2));
        assert_eq!(s.p50, Duration::from_millis(7));
        assert_eq!(s.first_error.as_deref(), Some("boom"));
        assert!((s.throughput - 100.0).abs() < 1e-9);
    }

    #[test]
    fn threads_run_for_the_window() {
        let w = Window {
            warmup: Duration::from_millis(10),
            measure: Duration::from_millis(50),
        };
        let t0 = Instant::now();
        let s = drive_threads(3, w, |_, seq| {
            std::thread::sleep(Duration::from_millis(1));
            if seq % 2 == 0 {
                Ok(())
            } else {
                Err("odd".into())
            }
        })
        .unwrap_or_default();
        assert!(t0.elapsed() >= Duration::from_millis(60));
        assert!(s.ops > 10 && s.errors > 10, "{s:?}");
        assert!(s.p50 >= Duration::from_millis(1));
    }

    struct Sleepy;
    impl Worker for Sleepy {
        async fn call(&mut self) -> Result<(), String> {
            tokio::time::sleep(Duration::from_millis(1)).await;
            Ok(())
        }
    }

    #[tokio::test]
    async fn async_workers_run_for_the_window() {
        let w = Window {
            warmup: Duration::ZERO,
            measure: Duration::from_millis(50),
        };
        let s = drive_async(vec![Sleepy, Sleepy], w)
            .await
            .unwrap_or_default();
        assert!(s.ops > 10 && s.errors == 0, "{s:?}");
    }
}
