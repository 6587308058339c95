//! [`RateLimiter`]: a token bucket per key (the caller's identity), from `governor`.
//!
//! Memory stays bounded by the number of keys active within one refill period: keys whose
//! bucket is full again are dropped every [`RETAIN_EVERY`] checks.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::{DefaultKeyedRateLimiter, Quota};

/// How many checks pass between two sweeps of idle keys.
pub const RETAIN_EVERY: u64 = 4096;

/// A token-bucket limit per key: `per_second` sustained, `burst` at once.
#[derive(Debug)]
pub struct RateLimiter {
    inner: Option<DefaultKeyedRateLimiter<String>>,
    checks: AtomicU64,
}

impl RateLimiter {
    /// `per_second` sustained, `burst` at once (at least 1). `per_second <= 0` (or not a
    /// number) disables the limit.
    pub fn new(per_second: f64, burst: f64) -> Self {
        let quota = (per_second.is_finite() && per_second > 0.0)
            .then(|| Duration::try_from_secs_f64(1.0 / per_second).ok())
            .flatten()
            .and_then(Quota::with_period)
            .map(|q| {
                let burst = burst.clamp(1.0, f64::from(u32::MAX)) as u32;
                q.allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN))
            });
        RateLimiter {
            inner: quota.map(DefaultKeyedRateLimiter::keyed),
            checks: AtomicU64::new(0),
        }
    }

    /// Takes one token for `who`; false when over the limit.
    pub fn allow(&self, who: &str) -> bool {
        let Some(l) = &self.inner else {
            return true;
        };
        if self.checks.fetch_add(1, Ordering::Relaxed) % RETAIN_EVERY == RETAIN_EVERY - 1 {
            l.retain_recent();
            l.shrink_to_fit();
        }
        l.check_key(&who.to_owned()).is_ok()
    }

    /// How many keys are held now.
    pub fn keys(&self) -> usize {
        self.inner.as_ref().map_or(0, |l| l.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_the_burst_then_refuses_per_key() {
        let l = RateLimiter::new(1.0, 3.0);
        assert!(l.allow("a") && l.allow("a") && l.allow("a"));
        assert!(!l.allow("a"));
        assert!(l.allow("b"), "per identity");
        assert!(RateLimiter::new(0.0, 0.0).allow("x"));
        assert!(RateLimiter::new(f64::NAN, 1.0).allow("x"));
    }

    #[test]
    fn refills_at_the_sustained_rate() {
        let l = RateLimiter::new(50.0, 1.0);
        assert!(l.allow("a"));
        assert!(!l.allow("a"));
        std::thread::sleep(Duration::from_millis(60));
        assert!(l.allow("a"), "one token back after 1/50 s");
    }

    #[test]
    fn idle_keys_are_dropped() {
        // Each key's bucket is full again after 1 ms: by the sweep, every key is idle.
        let l = RateLimiter::new(1000.0, 1.0);
        for i in 0..RETAIN_EVERY - 1 {
            assert!(l.allow(&format!("k{i}")));
        }
        assert_eq!(l.keys(), (RETAIN_EVERY - 1) as usize);
        std::thread::sleep(Duration::from_millis(20));
        assert!(l.allow("last"));
        assert!(l.keys() <= 1, "{} keys kept", l.keys());
    }
}
