//! Readiness and the metrics text.

use super::*;

impl Broker {
    /// Ready to serve: the database answers, a broker KEK exists and the HSM encrypts and
    /// decrypts with it, each within `timeout` (see [`crate::health`]).
    pub async fn probe(&self, timeout: std::time::Duration) -> std::result::Result<(), String> {
        match tokio::time::timeout(timeout, self.store.ping()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("database: {e}")),
            Err(_) => return Err(format!("database: no answer within {timeout:?}")),
        }
        let kek = self.current_kek().map_err(|e| e.to_string())?;
        match tokio::time::timeout(timeout, self.envelope.keystore().self_test(Some(kek))).await {
            Ok(Ok(_)) => Ok(()),
            // The error's own words (its PKCS#11 cause goes to the log only).
            Ok(Err(e)) => Err(format!("HSM: {e}")),
            Err(_) => Err(format!("HSM: no answer within {timeout:?}")),
        }
    }

    /// The Prometheus text exposition (scrape-time figures refreshed first). The database
    /// figures are read at once and given [`SCRAPE_DB_TIMEOUT`]: with the database gone, a
    /// scrape answers in time with their last values (and `ready` 0).
    pub async fn metrics_text(&self) -> String {
        let m = &self.metrics;
        let c = self.envelope.cache().stats();
        m.dek_cache_hits.set(c.hits);
        m.dek_cache_misses.set(c.misses);
        m.dek_cache_entries.set(c.entries as i64);
        let (hits, misses) = self.reads.remembered_stats();
        m.remembered_hits.set(hits);
        m.remembered_misses.set(misses);
        let db = async {
            tokio::join!(
                self.store.count_active_leases(now_ms()),
                self.store.audit_head(),
                self.rewrap_remaining(),
                self.store.count_db_credentials(),
                self.store
                    .count_pending_db_drops(now_ms(), self.pending_grace_ms()),
            )
        };
        if let Ok((active, head, rewrap, creds, drops)) =
            tokio::time::timeout(SCRAPE_DB_TIMEOUT, db).await
        {
            if let Ok(counts) = creds {
                m.db.set_credentials(&counts);
            }
            if let Ok(n) = drops {
                m.db.pending_drops.set(n);
            }
            if let Ok(n) = active {
                m.active_leases.set(n);
            }
            if let Ok(h) = head {
                m.audit_records.set(h.seq);
            }
            if let Ok(n) = rewrap {
                m.rewrap_remaining.set(n);
            }
        }
        m.encode()
    }
}

/// How long a scrape waits for its database figures.
const SCRAPE_DB_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);
