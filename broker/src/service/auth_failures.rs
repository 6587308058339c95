//! Failed authentications with no identity (a bad, unknown or missing token, or one refused
//! before verification by the pre-authentication limits) are counted per peer address, reason
//! and outcome, and written as ONE `auth_failures:<count>` record per such key per interval
//! ([`spawn_auth_failure_flush`]): however many attempts a flood makes, the audit chain grows
//! by at most [`MAX_FAILURE_KEYS`] records (plus one per reason for the overflow peer) per
//! interval. A refusal that names an identity (a verified token that TokenReview refused) is
//! recorded at once, as every other call is: an attacker cannot make those without a key.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use super::*;

/// Most (peer, reason, outcome) counts held between two flushes; past that, new peers are
/// counted as `peer:other`.
pub const MAX_FAILURE_KEYS: usize = 256;

/// Default interval between two flushes of the counts.
pub const AUTH_FAILURE_FLUSH_EVERY: Duration = Duration::from_secs(10);

/// The peer an aggregated record names, in its `identity` field.
fn peer_name(peer: Option<IpAddr>) -> String {
    match peer {
        Some(ip) => format!("peer:{ip}"),
        None => "peer:unknown".to_owned(),
    }
}

/// Counts of failed authentications since the last flush.
#[derive(Debug, Default)]
pub(super) struct FailureCounts {
    counts: HashMap<(String, &'static str, Outcome), u64>,
}

impl FailureCounts {
    fn add(&mut self, peer: String, reason: &'static str, outcome: Outcome, n: u64) {
        let key = (peer, reason, outcome);
        let key = if self.counts.len() >= MAX_FAILURE_KEYS && !self.counts.contains_key(&key) {
            ("peer:other".to_owned(), key.1, key.2)
        } else {
            key
        };
        let c = self.counts.entry(key).or_insert(0);
        *c = c.saturating_add(n);
    }

    /// The records for the counts held, in a stable order.
    fn events(&self, now: i64) -> Vec<AuditEvent> {
        let mut keys: Vec<_> = self.counts.iter().collect();
        keys.sort_by(|a, b| {
            (&a.0 .0, a.0 .1, a.0 .2.as_str()).cmp(&(&b.0 .0, b.0 .1, b.0 .2.as_str()))
        });
        keys.into_iter()
            .map(|((peer, reason, outcome), n)| {
                AuditEvent::new(now, EventKind::AuthFailures(*n), *outcome)
                    .with_identity(peer.clone())
                    .with_reason(*reason)
            })
            .collect()
    }
}

impl Broker {
    /// Counts a failed authentication that has no identity, from `peer`, for the next flush.
    pub fn auth_failed(&self, peer: Option<IpAddr>, reason: &'static str, outcome: Outcome) {
        self.metrics.auth_failure(reason);
        self.auth_failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add(peer_name(peer), reason, outcome, 1);
    }

    /// Writes the counts held as one record per (peer, reason, outcome), in one transaction;
    /// returns how many records. On failure the counts are kept for the next flush.
    pub async fn flush_auth_failures(&self) -> Result<usize> {
        let taken =
            std::mem::take(&mut *self.auth_failures.lock().unwrap_or_else(|p| p.into_inner()));
        let events = taken.events(now_ms());
        let n = events.len();
        if n == 0 {
            return Ok(0);
        }
        match self.submit(events, None).await {
            Ok(_) => Ok(n),
            Err(e) => {
                let mut held = self.auth_failures.lock().unwrap_or_else(|p| p.into_inner());
                for ((peer, reason, outcome), c) in taken.counts {
                    held.add(peer, reason, outcome, c);
                }
                Err(e)
            }
        }
    }
}

/// Flushes the broker's failed-authentication counts every `every` until it is dropped.
pub fn spawn_auth_failure_flush(broker: &Arc<Broker>, every: Duration) {
    let b = Arc::downgrade(broker);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let Some(b) = b.upgrade() else { return };
            if let Err(e) = b.flush_auth_failures().await {
                tracing::warn!(error = %e.chain(), "failed-authentication records not written; kept for the next flush");
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_bounded_and_summed_per_key() {
        let mut c = FailureCounts::default();
        for i in 0..10_000u32 {
            let ip = IpAddr::V4(i.into());
            c.add(peer_name(Some(ip)), "malformed", Outcome::Denied, 1);
            c.add(peer_name(Some(ip)), "bad_signature", Outcome::Denied, 1);
        }
        c.add(peer_name(None), "missing_credential", Outcome::Denied, 1);
        assert!(c.counts.len() <= MAX_FAILURE_KEYS + 3, "{}", c.counts.len());
        let events = c.events(1);
        let total: u64 = events
            .iter()
            .map(|e| match e.kind {
                EventKind::AuthFailures(n) => n,
                _ => panic!("{e:?}"),
            })
            .sum();
        assert_eq!(total, 20_001, "every attempt counted once");
        assert!(events.iter().all(|e| e.validate().is_ok()));
        assert!(events
            .iter()
            .any(|e| e.identity.as_deref() == Some("peer:other")));
    }
}
