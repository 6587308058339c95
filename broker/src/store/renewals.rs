//! Renewals stored with their audit records: the audit writer's batch extends the leases of
//! the Renew requests it carries and appends their records in the same transaction, so a
//! lease is extended if and only if the record saying so is stored, and a batch of renewals
//! shares one durable commit with the Leases beside it.

use std::collections::HashMap;

use super::*;

/// A renewal waiting for the audit writer.
#[derive(Debug, Clone)]
pub struct Renewing {
    /// The lease.
    pub lease_id: String,
    /// When the renewal was decided; the lease must still be active then.
    pub now_ms: i64,
    /// The new expiry (capped by the lease's max).
    pub expires_ms: i64,
    /// The record stored instead of the renewal's own when the lease was no longer renewable
    /// (ended or expired since it was read).
    pub refused: AuditEvent,
}

/// A renewed lease, as the renewal left it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RenewedLease {
    /// Its new expiry.
    pub expires_ms: i64,
    /// Its max expiry.
    pub max_expires_ms: i64,
    /// The secret version it holds.
    pub version: i64,
    /// The newest live version of its path, read in the same statement.
    pub latest_version: Option<i64>,
}

/// Renews the leases in `$1` (ids), `$2` (each renewal's `now`), `$3` (new expiries): only
/// active ones, never past their max. Prepared: `keyhaven_renew` finds each lease by its key
/// whatever the statistics (migration 0006).
const PG_RENEW_SQL: &str = pg_renew_from!("$1::text[], $2::int8[], $3::int8[]");
const SQLITE_RENEW_HEAD: &str = "WITH r(id, now_ms, expires_ms) AS (";
const SQLITE_RENEW_TAIL: &str = concat!(
    ") UPDATE leases SET expires_ms = min(r.expires_ms, leases.max_expires_ms), ",
    "renewals = leases.renewals + 1 FROM r ",
    "WHERE leases.id = r.id AND leases.ended_ms IS NULL AND leases.expires_ms > r.now_ms ",
    renewed_cols!("leases")
);

/// The renewals as the PostgreSQL statements bind them: ids, each one's `now`, new expiries.
pub(super) fn renewal_arrays<'a>(
    renewals: &[(usize, &'a Renewing)],
) -> (Vec<&'a str>, Vec<i64>, Vec<i64>) {
    (
        renewals.iter().map(|(_, r)| r.lease_id.as_str()).collect(),
        renewals.iter().map(|(_, r)| r.now_ms).collect(),
        renewals.iter().map(|(_, r)| r.expires_ms).collect(),
    )
}

pub(super) fn renewed_from_row(r: &impl RowExt) -> Result<(String, RenewedLease)> {
    Ok((
        r.text("id")?,
        RenewedLease {
            expires_ms: r.int("expires_ms")?,
            max_expires_ms: r.int("max_expires_ms")?,
            version: r.int("version")?,
            latest_version: r.opt_int("latest")?,
        },
    ))
}

/// Stores a batch with renewals inside `$tx` and commits: the renewals first, then, with the
/// records of the leases that were not renewable replaced by their refusals, the batch
/// ([`store_batch_in`]). Evaluates to the records and each renewal's lease (`None`: not
/// renewed).
macro_rules! renew_and_store_in {
    ($tx:ident, $db:ty, $renewed:expr, $events:expr, $leases:expr, $renewals:expr, $generation:expr) => {{
        let renewed: HashMap<String, RenewedLease> = $renewed;
        let mut events = $events;
        let outcome: Vec<Option<RenewedLease>> = $renewals
            .iter()
            .map(|(i, r)| match renewed.get(&r.lease_id) {
                Some(l) => Some(*l),
                None => {
                    events[*i] = r.refused.clone();
                    None
                }
            })
            .collect();
        let recs = store_batch_in!($tx, $db, events, $leases, $generation);
        $tx.commit().await?;
        Ok((recs, outcome))
    }};
}

impl HeldConn {
    /// The locked append: renews the leases of `renewals` (each with the index of its record
    /// in `events`; none: no statement), then stores `leases` and `events` — the records of
    /// leases not renewed replaced by their refusals — all in one transaction under the audit
    /// append lock, reading the chain's head inside it. Guarded by the secrets generation when
    /// given, as [`AuditAppender::append_at`].
    pub(super) async fn append_locked(
        &mut self,
        write_lock: &tokio::sync::Mutex<()>,
        events: Vec<AuditEvent>,
        leases: &[LeaseRow],
        renewals: &[(usize, &Renewing)],
        generation: Option<i64>,
    ) -> Result<(Vec<AuditRecord>, Vec<Option<RenewedLease>>)> {
        match self {
            HeldConn::Sqlite(conn) => {
                let _g = write_lock.lock().await;
                let mut tx = sqlx::Connection::begin_with(&mut **conn, "BEGIN IMMEDIATE").await?;
                let mut renewed = HashMap::with_capacity(renewals.len());
                // No chunk, no statement.
                for chunk in renewals.chunks(ROWS_PER_INSERT) {
                    let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(SQLITE_RENEW_HEAD);
                    q.push_values(chunk, |mut b, (_, r)| {
                        b.push_bind(&r.lease_id)
                            .push_bind(r.now_ms)
                            .push_bind(r.expires_ms);
                    });
                    q.push(SQLITE_RENEW_TAIL);
                    let rows = q
                        .build()
                        .persistent(chunk.len() <= 2)
                        .fetch_all(&mut *tx)
                        .await?;
                    for r in &rows {
                        let (id, l) = renewed_from_row(r)?;
                        renewed.insert(id, l);
                    }
                }
                renew_and_store_in!(
                    tx,
                    sqlx::Sqlite,
                    renewed,
                    events,
                    leases,
                    renewals,
                    generation
                )
            }
            HeldConn::Postgres(conn) => {
                let mut tx = sqlx::Connection::begin(&mut **conn).await?;
                // The append lock before any lease row lock: a change transaction (a
                // revocation) takes them in this order too.
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(AUDIT_LOCK_KEY)
                    .execute(&mut *tx)
                    .await?;
                let renewed = if renewals.is_empty() {
                    HashMap::new()
                } else {
                    let (ids, nows, expiries) = renewal_arrays(renewals);
                    sqlx::query(PG_RENEW_SQL)
                        .bind(ids)
                        .bind(nows)
                        .bind(expiries)
                        .fetch_all(&mut *tx)
                        .await?
                        .iter()
                        .map(renewed_from_row)
                        .collect::<Result<HashMap<_, _>>>()?
                };
                renew_and_store_in!(
                    tx,
                    sqlx::Postgres,
                    renewed,
                    events,
                    leases,
                    renewals,
                    generation
                )
            }
        }
    }
}
