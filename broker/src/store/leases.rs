//! Lease rows: insert, read, revoke by filter, list, count and reap (renewals are stored
//! with their records: renewals.rs).

use super::*;

impl Store {
    /// Records a new lease.
    pub async fn insert_lease(&self, l: &LeaseRow) -> Result<()> {
        let sql = format!(
            "INSERT INTO leases ({LEASE_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
        );
        on_pool!(self, p => sqlx::query(&sql)
            .bind(&l.id).bind(&l.identity.namespace).bind(&l.identity.service_account)
            .bind(&l.identity.pod_name).bind(&l.identity.pod_uid)
            .bind(&l.path).bind(l.version).bind(l.created_ms).bind(l.expires_ms)
            .bind(l.max_expires_ms).bind(l.renewals).bind(l.ended_ms).bind(&l.end_reason)
            .execute(p).await.map(|r| r.rows_affected()))?;
        Ok(())
    }

    /// One lease by id.
    pub async fn get_lease(&self, id: &str) -> Result<Option<LeaseRow>> {
        on_pool!(self, p => match sqlx::query(GET_LEASE_SQL).bind(id).fetch_optional(p).await? {
            Some(r) => Ok(Some(lease_from_row(&r)?)),
            None => Ok(None),
        })
    }

    /// Ends every active lease matching `filter`; returns their ids.
    pub async fn revoke_leases(
        &self,
        filter: &LeaseFilter,
        now_ms: i64,
        reason: &str,
    ) -> Result<Vec<String>> {
        let (cond, params) = filter.sql(3);
        let sql = format!(
            "UPDATE leases SET ended_ms = $1, end_reason = $2 \
             WHERE ended_ms IS NULL AND expires_ms > $1 AND {cond} RETURNING id"
        );
        let _g = self.sqlite_write_lock().await;
        on_pool!(self, p => {
            let mut q = sqlx::query_scalar::<_, String>(&sql).bind(now_ms).bind(reason);
            for v in &params {
                q = q.bind(v);
            }
            Ok(q.fetch_all(p).await?)
        })
    }

    /// Leases matching `filter`; only active ones unless `include_ended`.
    pub async fn list_leases(
        &self,
        filter: &LeaseFilter,
        now_ms: i64,
        include_ended: bool,
    ) -> Result<Vec<LeaseRow>> {
        let (cond, params) = filter.sql(2);
        let active = if include_ended {
            "1 = 1 OR $1 = $1"
        } else {
            "ended_ms IS NULL AND expires_ms > $1"
        };
        let sql = format!(
            "SELECT {LEASE_COLS} FROM leases WHERE ({active}) AND {cond} ORDER BY created_ms, id"
        );
        on_pool!(self, p => {
            let mut q = sqlx::query(&sql).bind(now_ms);
            for v in &params {
                q = q.bind(v);
            }
            let rows = q.fetch_all(p).await?;
            rows.iter().map(lease_from_row).collect()
        })
    }

    /// Number of active leases.
    pub async fn count_active_leases(&self, now_ms: i64) -> Result<i64> {
        let n: i64 = on_pool!(self, p => sqlx::query_scalar(
            "SELECT COUNT(*) FROM leases WHERE ended_ms IS NULL AND expires_ms > $1")
            .bind(now_ms).fetch_one(p).await)?;
        Ok(n)
    }
}

/// Ends every active lease matching `$filter` inside `$tx`; evaluates to the ended rows.
macro_rules! revoke_in {
    ($tx:ident, $filter:expr, $now_ms:expr, $reason:expr) => {{
        let (cond, params) = $filter.sql(3);
        let sql = format!(
            "UPDATE leases SET ended_ms = $1, end_reason = $2 \
             WHERE ended_ms IS NULL AND expires_ms > $1 AND {cond} RETURNING {LEASE_COLS}"
        );
        let mut q = sqlx::query(&sql).bind($now_ms).bind($reason);
        for v in &params {
            q = q.bind(v);
        }
        q.fetch_all(&mut *$tx)
            .await?
            .iter()
            .map(lease_from_row)
            .collect::<Result<Vec<LeaseRow>>>()?
    }};
}

impl Store {
    /// Ends every active lease matching `filter` (`reason`) and appends the records
    /// `events(ended)` gives, in ONE transaction. Returns the ended rows and the records.
    pub async fn revoke_leases_audited(
        &self,
        filter: &LeaseFilter,
        now_ms: i64,
        reason: &str,
        events: impl FnOnce(&[LeaseRow]) -> Vec<AuditEvent>,
    ) -> Result<(Vec<LeaseRow>, Vec<AuditRecord>)> {
        in_audit_tx!(self, tx, Db => {
            let ended = revoke_in!(tx, filter, now_ms, reason);
            let records = append_chain_in!(tx, Db, events(&ended));
            tx.commit().await?;
            Ok((ended, records))
        })
    }

    /// [`Store::reap_expired_audited`] with no records (tests of the row selection).
    pub async fn reap_expired(&self, now_ms: i64, batch: i64) -> Result<Vec<LeaseRow>> {
        Ok(self
            .reap_expired_audited(now_ms, batch, |_| Vec::new())
            .await?
            .0)
    }

    /// The reaper, atomic with its records: ends up to `batch` leases that expired by `now_ms`
    /// (`expired`) and appends `events(ended)`, in ONE transaction. Safe with several brokers
    /// on one PostgreSQL (`FOR UPDATE SKIP LOCKED`: no lease is processed twice).
    pub async fn reap_expired_audited(
        &self,
        now_ms: i64,
        batch: i64,
        events: impl FnOnce(&[LeaseRow]) -> Vec<AuditEvent>,
    ) -> Result<(Vec<LeaseRow>, Vec<AuditRecord>)> {
        // Several brokers on one PostgreSQL skip each other's rows; SQLite has one writer.
        let lock = match &self.pool {
            Pool::Postgres(_) => " FOR UPDATE SKIP LOCKED",
            Pool::Sqlite(_) => "",
        };
        let sql = format!(
            "UPDATE leases SET ended_ms = $1, end_reason = 'expired' WHERE id IN \
             (SELECT id FROM leases WHERE ended_ms IS NULL AND expires_ms <= $1 \
              ORDER BY expires_ms LIMIT $2{lock}) RETURNING {LEASE_COLS}"
        );
        in_audit_tx!(self, tx, Db => {
            let ended = sqlx::query(&sql)
                .bind(now_ms)
                .bind(batch)
                .fetch_all(&mut *tx)
                .await?
                .iter()
                .map(lease_from_row)
                .collect::<Result<Vec<LeaseRow>>>()?;
            if ended.is_empty() {
                return Ok((ended, Vec::new()));
            }
            let records = append_chain_in!(tx, Db, events(&ended));
            tx.commit().await?;
            Ok((ended, records))
        })
    }
}
