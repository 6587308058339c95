//! Readiness and the metrics text.

use super::*;

impl Broker {
    /// Ready to serve: the database answers and a broker KEK exists.
    pub async fn readiness(&self) -> std::result::Result<(), String> {
        self.store
            .ping()
            .await
            .map_err(|e| format!("database: {e}"))?;
        self.current_kek().map_err(|e| e.to_string())?;
        Ok(())
    }

    /// The Prometheus text exposition (scrape-time figures refreshed first).
    pub async fn metrics_text(&self) -> String {
        let m = &self.metrics;
        if let Ok(n) = self.store.count_active_leases(now_ms()).await {
            m.active_leases.set(n);
        }
        let c = self.envelope.cache().stats();
        m.dek_cache_hits.set(c.hits);
        m.dek_cache_misses.set(c.misses);
        m.dek_cache_entries.set(c.entries as i64);
        let (hits, misses) = self.reads.remembered_stats();
        m.remembered_hits.set(hits);
        m.remembered_misses.set(misses);
        if let Ok(h) = self.store.audit_head().await {
            m.audit_records.set(h.seq);
        }
        if let Ok(n) = self.rewrap_remaining().await {
            m.rewrap_remaining.set(n);
        }
        m.encode()
    }
}
