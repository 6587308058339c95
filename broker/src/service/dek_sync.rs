//! Unwrapped DEKs leave memory on time, on every replica: expired entries are swept (not only
//! dropped at their next lookup), and a deleted or destroyed secret's DEKs are purged at once
//! on the replica that deleted it and within [`DEK_POLL`] on the others, which notice the
//! secrets generation move and read which paths ended from the audit records since.

use super::*;

/// How often each replica checks the secrets generation for deleted or destroyed secrets.
pub const DEK_POLL: Duration = Duration::from_secs(1);

/// What the DEK watch last saw: the secrets generation and the audit head read with it.
#[derive(Debug, Clone, Copy)]
struct Seen {
    generation: i64,
    head: i64,
}

impl Broker {
    /// Purges the cached DEKs of the secrets deleted or destroyed since `seen` (on any
    /// replica); returns what it saw now. Without a `seen` (the first check, or after the
    /// database was away) nothing tells what ended meanwhile, so every cached DEK goes.
    async fn purge_ended_secrets(&self, seen: Option<Seen>) -> Result<Seen> {
        let (generation, head) = self.store.secrets_generation_and_head().await?;
        let now = Seen { generation, head };
        let cache = self.envelope.cache();
        match seen {
            None => cache.clear(),
            Some(s) if s.generation == generation => {}
            Some(s) => {
                for path in self.store.secrets_ended_between(s.head, head).await? {
                    let purged = cache.purge_path(&path);
                    if purged > 0 {
                        tracing::debug!(path = %path, purged, "DEKs of an ended secret purged");
                    }
                }
            }
        }
        Ok(now)
    }
}

/// Every replica: sweeps expired DEKs every [`DekCache::sweep_interval`](crate::crypto::DekCache::sweep_interval)
/// and purges ended secrets' DEKs every [`DEK_POLL`].
pub fn spawn_dek_watch(broker: &Arc<Broker>) {
    let b = Arc::downgrade(broker);
    let tick = broker.envelope.cache().sweep_interval().min(DEK_POLL);
    tokio::spawn(async move {
        let mut seen = None;
        let mut checked = None::<std::time::Instant>;
        loop {
            let Some(b) = b.upgrade() else { return };
            b.envelope.cache().purge_expired();
            if checked.is_none_or(|t| t.elapsed() >= DEK_POLL) {
                checked = Some(std::time::Instant::now());
                seen = match b.purge_ended_secrets(seen).await {
                    Ok(s) => Some(s),
                    Err(e) => {
                        if seen.is_some() {
                            tracing::warn!(error = %e.chain(), "secrets generation check failed; DEKs of secrets deleted meanwhile are purged when it works again");
                        }
                        None
                    }
                };
            }
            drop(b);
            tokio::time::sleep(tick).await;
        }
    });
}
