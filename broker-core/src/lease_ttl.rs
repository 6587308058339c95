//! Lease lifetime arithmetic: the expiry of a new lease and of a renewal, in Unix
//! milliseconds. Every sum saturates (an absurd TTL or increment cannot wrap into the past),
//! and no expiry passes the lease's maximum.

use std::time::Duration;

/// Milliseconds of `d`, saturated at `i64::MAX`.
pub fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// `(expires_ms, max_expires_ms)` of a lease granted at `now_ms` for `ttl`, limited by
/// `max_ttl`: the expiry is never after the maximum.
pub fn grant(now_ms: i64, ttl: Duration, max_ttl: Duration) -> (i64, i64) {
    let max_expires = now_ms.saturating_add(millis(max_ttl));
    let expires = now_ms.saturating_add(millis(ttl.min(max_ttl)));
    (expires.min(max_expires), max_expires)
}

/// The expiry of a lease renewed at `now_ms` by `increment`: `now + increment`, never past
/// `max_expires_ms`.
pub fn renewal(now_ms: i64, increment: Duration, max_expires_ms: i64) -> i64 {
    now_ms.saturating_add(millis(increment)).min(max_expires_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Now, as the broker sees it: any time from 1970 to year ~2500.
    fn now() -> impl Strategy<Value = i64> {
        0i64..16_725_225_600_000
    }

    fn any_duration() -> impl Strategy<Value = Duration> {
        prop_oneof![
            (0u64..=u64::MAX).prop_map(Duration::from_secs),
            (0u64..100_000).prop_map(Duration::from_secs),
            any::<(u64, u32)>().prop_map(|(s, n)| Duration::new(s, n % 1_000_000_000)),
        ]
    }

    proptest! {
        #[test]
        fn a_grant_never_wraps_nor_passes_max_ttl(
            now in now(), ttl in any_duration(), max_ttl in any_duration(),
        ) {
            let (exp, max) = grant(now, ttl, max_ttl);
            prop_assert!(exp >= now && max >= now);
            prop_assert!(exp <= max);
            prop_assert!(i128::from(max - now) <= max_ttl.as_millis() as i128);
        }

        #[test]
        fn a_renewal_never_wraps_nor_passes_the_maximum(
            now in now(), max_ttl in any_duration(), inc in any_duration(),
        ) {
            let (_, max) = grant(now, Duration::from_secs(1), max_ttl);
            let exp = renewal(now, inc, max);
            prop_assert!(exp >= now, "negative or wrapped expiry {exp} at {now}");
            prop_assert!(exp <= max);
            // Below the maximum, the lease gets exactly the increment.
            if (now as i128) + (inc.as_millis() as i128) <= max as i128 {
                prop_assert_eq!(i128::from(exp - now), inc.as_millis() as i128);
            }
        }
    }

    #[test]
    fn the_increments_the_issue_names() {
        let now = 1_765_000_000_000;
        let max = now + 3_600_000;
        for secs in [
            0,
            1,
            3600,
            1 << 53,
            (1u64 << 63) / 1000,
            u64::MAX,
            9_223_372_036_854_775,
        ] {
            let exp = renewal(now, Duration::from_secs(secs), max);
            assert!((now..=max).contains(&exp), "{secs}: {exp}");
        }
        assert_eq!(renewal(now, Duration::from_secs(60), max), now + 60_000);
    }
}
