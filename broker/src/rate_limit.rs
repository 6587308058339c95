//! Token buckets from `governor`: [`RateLimiter`], a bucket per key (the caller's identity
//! after authentication), and [`PreAuthLimits`], the limits on verification work before
//! authentication (per peer address and for the whole replica).
//!
//! Memory stays bounded: keys whose bucket is full again are dropped every [`RETAIN_EVERY`]
//! checks, and [`PreAuthLimits`] holds at most [`MAX_PEERS`] peer addresses (past that, new
//! addresses share one bucket until the next sweep).

use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota};

/// How many checks pass between two sweeps of idle keys.
pub const RETAIN_EVERY: u64 = 4096;

/// Most peer addresses [`PreAuthLimits`] tracks at once.
pub const MAX_PEERS: usize = 65_536;

/// `per_second` sustained, `burst` at once (at least 1); `None` (no limit) when `per_second`
/// is not a positive number.
fn quota(per_second: f64, burst: f64) -> Option<Quota> {
    (per_second.is_finite() && per_second > 0.0)
        .then(|| Duration::try_from_secs_f64(1.0 / per_second).ok())
        .flatten()
        .and_then(Quota::with_period)
        .map(|q| {
            let burst = burst.clamp(1.0, f64::from(u32::MAX)) as u32;
            q.allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN))
        })
}

/// A token-bucket limit per key: `per_second` sustained, `burst` at once.
#[derive(Debug)]
pub struct RateLimiter<K: Hash + Eq + Clone = String> {
    inner: Option<DefaultKeyedRateLimiter<K>>,
    checks: AtomicU64,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    /// `per_second` sustained, `burst` at once (at least 1). `per_second <= 0` (or not a
    /// number) disables the limit.
    pub fn new(per_second: f64, burst: f64) -> Self {
        RateLimiter {
            inner: quota(per_second, burst).map(DefaultKeyedRateLimiter::keyed),
            checks: AtomicU64::new(0),
        }
    }

    /// Takes one token for `key`; false when over the limit.
    pub fn allow_key(&self, key: &K) -> bool {
        let Some(l) = &self.inner else {
            return true;
        };
        if self.checks.fetch_add(1, Ordering::Relaxed) % RETAIN_EVERY == RETAIN_EVERY - 1 {
            l.retain_recent();
            l.shrink_to_fit();
        }
        l.check_key(key).is_ok()
    }

    /// How many keys are held now.
    pub fn keys(&self) -> usize {
        self.inner.as_ref().map_or(0, |l| l.len())
    }
}

impl RateLimiter<String> {
    /// Takes one token for `who`; false when over the limit.
    pub fn allow(&self, who: &str) -> bool {
        self.allow_key(&who.to_owned())
    }
}

/// Whose bucket a peer draws from: its address (an IPv6 address by its /64, what one host
/// usually holds), or the shared bucket when [`MAX_PEERS`] addresses are held already.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum PeerKey {
    Ip(IpAddr),
    Shared,
}

fn peer_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        },
        v4 => v4,
    }
}

/// Which limit refused an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limited {
    /// This peer address made too many attempts.
    Peer,
    /// The replica as a whole is at its limit.
    Global,
}

impl Limited {
    /// The reason code of the refusal (audit and metrics).
    pub fn reason(self) -> &'static str {
        match self {
            Limited::Peer => "peer_rate_limited",
            Limited::Global => "global_rate_limited",
        }
    }
}

/// Limits on verification work before authentication: every credential that is not already
/// known good (a token verified recently, the bootstrap credential) costs a signature check,
/// so each such attempt takes a token from its peer address's bucket and then from the
/// replica's. Failed authentications are all such attempts; a workload whose token verified
/// once is not limited here while its verdict is remembered.
#[derive(Debug)]
pub struct PreAuthLimits {
    per_peer: RateLimiter<PeerKey>,
    global: Option<DefaultDirectRateLimiter>,
}

impl PreAuthLimits {
    /// `per_peer` and `global` attempts per second sustained, twice that at once; 0 disables
    /// either.
    pub fn new(per_peer: f64, global: f64) -> Self {
        PreAuthLimits {
            per_peer: RateLimiter::new(per_peer, per_peer * 2.0),
            global: quota(global, global * 2.0).map(DefaultDirectRateLimiter::direct),
        }
    }

    /// Takes one attempt for `peer` (unknown peers share one bucket), then one from the
    /// replica's bucket.
    pub fn admit(&self, peer: Option<IpAddr>) -> Result<(), Limited> {
        let key = match peer {
            Some(ip) if self.per_peer.keys() < MAX_PEERS => PeerKey::Ip(peer_key(ip)),
            _ => PeerKey::Shared,
        };
        if !self.per_peer.allow_key(&key) {
            return Err(Limited::Peer);
        }
        match &self.global {
            Some(g) if g.check().is_err() => Err(Limited::Global),
            _ => Ok(()),
        }
    }

    /// How many peer addresses are held now.
    pub fn peers(&self) -> usize {
        self.per_peer.keys()
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

    #[test]
    fn pre_auth_limits_per_peer_then_globally() {
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let l = PreAuthLimits::new(1.0, 3.0);
        assert_eq!(l.admit(Some(a)), Ok(()));
        assert_eq!(l.admit(Some(a)), Ok(()));
        assert_eq!(
            l.admit(Some(a)),
            Err(Limited::Peer),
            "a's burst of 2 is spent"
        );
        // Other peers have their own buckets, until the replica's burst (6) is spent.
        let c: IpAddr = "10.0.0.3".parse().unwrap();
        for p in [b, b, c, c] {
            assert_eq!(l.admit(Some(p)), Ok(()));
        }
        assert_eq!(l.admit(None), Err(Limited::Global));
        let g = PreAuthLimits::new(0.0, 1.0);
        assert!(g.admit(Some(a)).is_ok() && g.admit(Some(b)).is_ok());
        assert_eq!(g.admit(None), Err(Limited::Global));
        let off = PreAuthLimits::new(0.0, 0.0);
        assert!((0..100).all(|_| off.admit(Some(a)).is_ok()));
    }

    #[test]
    fn an_ipv6_host_is_one_peer_and_the_peer_table_is_bounded() {
        let l = PreAuthLimits::new(1.0, 0.0);
        let x: IpAddr = "2001:db8::1".parse().unwrap();
        let y: IpAddr = "2001:db8::ffff:1".parse().unwrap();
        assert!(l.admit(Some(x)).is_ok() && l.admit(Some(x)).is_ok());
        assert_eq!(l.admit(Some(y)), Err(Limited::Peer), "same /64");
        assert_eq!(l.peers(), 1);
        // A spray of addresses never holds more than MAX_PEERS (+ the shared bucket).
        let l = PreAuthLimits::new(1.0, 0.0);
        for i in 0..(MAX_PEERS as u32 + 5000) {
            let _ = l.admit(Some(IpAddr::V4(i.into())));
        }
        assert!(l.peers() <= MAX_PEERS + 1, "{}", l.peers());
    }
}
