//! The hash-chained audit log: appends under the lock, the unlocked append after a known head
//! ([`AuditAppender`], the broker's one writer), reads and verification.

use super::*;

pub(super) const AUDIT_HEAD_SQL: &str = "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1";
pub(super) const AUDIT_COLS: &str = audit_cols!();

/// Arbitrary constant naming the audit append lock (`pg_advisory_xact_lock`).
pub(super) const AUDIT_LOCK_KEY: i64 = 0x6b68_6175_6469_7431; // "khaudit1"

pub(super) fn audit_from_row(r: &impl RowExt) -> Result<AuditRecord> {
    let kind: EventKind = r
        .text("kind")?
        .parse()
        .map_err(|_| StoreError::Corrupt("audit kind".into()))?;
    let outcome: Outcome = r
        .text("outcome")?
        .parse()
        .map_err(|_| StoreError::Corrupt("audit outcome".into()))?;
    Ok(AuditRecord {
        seq: r.int("seq")?,
        event: AuditEvent {
            time_ms: r.int("time_ms")?,
            kind,
            identity: r.opt_text("identity")?,
            pod: r.opt_text("pod")?,
            path: r.opt_text("path")?,
            lease_id: r.opt_text("lease_id")?,
            outcome,
            reason: r.opt_text("reason")?,
        },
        prev_hash: r.text("prev_hash")?,
        hash: r.text("hash")?,
    })
}

/// Rows per multi-row INSERT: a batch is a handful of statements, not one per row (each
/// statement is a round trip to PostgreSQL, or a hop to SQLite's worker thread).
pub(super) const ROWS_PER_INSERT: usize = 500;
pub(super) const INSERT_LEASES: &str = concat!("INSERT INTO leases (", lease_cols!(), ") ");
pub(super) const INSERT_AUDIT: &str = concat!("INSERT INTO audit (", audit_cols!(), ") ");
/// SQLite, inside an explicit transaction: a constraint failure rolls the whole transaction
/// back. With the default (ABORT) SQLite keeps a statement journal for every multi-row insert,
/// to undo just that statement: a copy of each page it changes, by default in a temporary
/// file created and deleted per statement.
pub(super) const SQLITE_INSERT_LEASES_OR_ROLLBACK: &str =
    concat!("INSERT OR ROLLBACK INTO leases (", lease_cols!(), ") ");
pub(super) const SQLITE_INSERT_AUDIT_OR_ROLLBACK: &str =
    concat!("INSERT OR ROLLBACK INTO audit (", audit_cols!(), ") ");

/// `VALUES (...), (...)` of lease rows, in [`LEASE_COLS`] order.
macro_rules! push_lease_values {
    ($q:expr, $rows:expr) => {
        $q.push_values($rows, |mut b, l| {
            b.push_bind(&l.id)
                .push_bind(&l.identity.namespace)
                .push_bind(&l.identity.service_account)
                .push_bind(&l.identity.pod_name)
                .push_bind(&l.identity.pod_uid)
                .push_bind(&l.path)
                .push_bind(l.version)
                .push_bind(l.created_ms)
                .push_bind(l.expires_ms)
                .push_bind(l.max_expires_ms)
                .push_bind(l.renewals)
                .push_bind(l.ended_ms)
                .push_bind(&l.end_reason);
        })
    };
}

/// `VALUES (...), (...)` of audit records, in [`AUDIT_COLS`] order.
macro_rules! push_audit_values {
    ($q:expr, $recs:expr) => {
        $q.push_values($recs, |mut b, rec| {
            b.push_bind(rec.seq)
                .push_bind(rec.event.time_ms)
                .push_bind(rec.event.kind.as_text().into_owned())
                .push_bind(&rec.event.identity)
                .push_bind(&rec.event.pod)
                .push_bind(&rec.event.path)
                .push_bind(&rec.event.lease_id)
                .push_bind(rec.event.outcome.as_str())
                .push_bind(&rec.event.reason)
                .push_bind(&rec.prev_hash)
                .push_bind(&rec.hash);
        })
    };
}

/// `events` as the records that follow `head`, in order.
pub(super) fn chain_after(mut head: Checkpoint, events: Vec<AuditEvent>) -> Vec<AuditRecord> {
    events
        .into_iter()
        .map(|e| {
            let r = AuditRecord::after(&head, e);
            head = r.checkpoint();
            r
        })
        .collect()
}

/// Runs `$body` with `$tx`, a transaction holding the audit append lock (this store's SQLite
/// writer lock, or the PostgreSQL advisory lock every replica's appends take), and `$db` the
/// database type. The body commits; dropping `$tx` rolls back.
macro_rules! in_audit_tx {
    ($self:expr, $tx:ident, $db:ident => $body:expr) => {
        match &$self.pool {
            Pool::Sqlite(p) => {
                #[allow(dead_code)]
                type $db = sqlx::Sqlite;
                let _g = $self.locks.write.lock().await;
                // IMMEDIATE takes the write lock up front: a deferred transaction that reads
                // then writes can fail at once with SQLITE_BUSY under concurrent writers.
                let mut $tx = p.begin_with("BEGIN IMMEDIATE").await?;
                $body
            }
            Pool::Postgres(p) => {
                #[allow(dead_code)]
                type $db = sqlx::Postgres;
                let mut $tx = p.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(AUDIT_LOCK_KEY)
                    .execute(&mut *$tx)
                    .await?;
                $body
            }
        }
    };
}

/// Runs `$body` with `$tx`, a transaction holding the KEK lock (on PostgreSQL the advisory
/// lock `$lock` — `pg_advisory_xact_lock` or `pg_advisory_xact_lock_shared` — takes on
/// `KEK_LOCK_KEY`; on SQLite the single writer's `BEGIN IMMEDIATE`), after the audit append
/// lock when `$audited` (see [`in_audit_tx`]): the lock order every KEK change keeps.
macro_rules! in_kek_tx {
    ($self:expr, $lock:literal, $audited:expr, $tx:ident, $db:ident => $body:expr) => {{
        macro_rules! kek_lock {
            ($t:ident) => {
                if let Pool::Postgres(_) = &$self.pool {
                    sqlx::query(concat!("SELECT ", $lock, "($1)"))
                        .bind(KEK_LOCK_KEY)
                        .execute(&mut *$t)
                        .await?;
                }
            };
        }
        if $audited {
            in_audit_tx!($self, $tx, $db => {
                kek_lock!($tx);
                $body
            })
        } else {
            match &$self.pool {
                Pool::Sqlite(p) => {
                    #[allow(dead_code)]
                    type $db = sqlx::Sqlite;
                    let mut $tx = p.begin_with("BEGIN IMMEDIATE").await?;
                    $body
                }
                Pool::Postgres(p) => {
                    #[allow(dead_code)]
                    type $db = sqlx::Postgres;
                    let mut $tx = p.begin().await?;
                    kek_lock!($tx);
                    $body
                }
            }
        }
    }};
}

/// Appends `$events` to the audit chain inside `$tx` (see [`in_audit_tx`]): reads the head,
/// chains after it, inserts. Evaluates to the records.
macro_rules! append_chain_in {
    ($tx:ident, $db:ty, $events:expr) => {{
        let head = match sqlx::query(AUDIT_HEAD_SQL)
            .fetch_optional(&mut *$tx)
            .await?
        {
            Some(r) => Checkpoint {
                seq: r.int("seq")?,
                hash: r.text("hash")?,
            },
            None => Checkpoint::genesis(),
        };
        let recs = chain_after(head, $events);
        for chunk in recs.chunks(ROWS_PER_INSERT) {
            let mut q = sqlx::QueryBuilder::<$db>::new(INSERT_AUDIT);
            push_audit_values!(q, chunk);
            // Not cached: each row count is another statement text.
            q.build().persistent(false).execute(&mut *$tx).await?;
        }
        recs
    }};
}

/// Stores a batch inside `$tx` (see [`in_audit_tx`]), which it does not commit: when
/// `$generation` is given and the secrets generation is another, returns
/// [`StoreError::StaleGeneration`] (the caller's transaction is dropped, rolling back);
/// otherwise inserts `$leases` and appends `$events` to the chain. Evaluates to the records.
macro_rules! store_batch_in {
    ($tx:ident, $db:ty, $events:expr, $leases:expr, $generation:expr) => {{
        if let Some(read) = $generation {
            let current: i64 = sqlx::query_scalar(SECRETS_GENERATION_SQL)
                .fetch_one(&mut *$tx)
                .await?;
            if current != read {
                return Err(StoreError::StaleGeneration { current, read });
            }
        }
        for chunk in $leases.chunks(ROWS_PER_INSERT) {
            let mut q = sqlx::QueryBuilder::<$db>::new(INSERT_LEASES);
            push_lease_values!(q, chunk);
            // Not cached: each row count is another statement text.
            q.build().persistent(false).execute(&mut *$tx).await?;
        }
        append_chain_in!($tx, $db, $events)
    }};
}

/// Adds `AND <the secrets generation is $generation>` to an insert's guard, when given.
macro_rules! push_generation_guard {
    ($q:expr, $generation:expr) => {
        if let Some(g) = $generation {
            $q.push(" AND (SELECT n FROM secrets_generation WHERE id = 1) = ")
                .push_bind(g);
        }
    };
}

/// Appends batches to the audit log for its one owner (the broker's audit task), on a
/// connection it keeps (no pool checkout, and so no liveness ping, per batch): after the head
/// its previous append left, unlocked, as one statement ([`Store::append_audit_batch_after`]);
/// under the lock, reading the head, when it knows no head yet, when the batch renews leases,
/// and for a while after another writer (a replica on the same PostgreSQL) moved the chain on
/// ([`AuditAppender::append_renewing`]). After any error but a stale generation the connection
/// is closed (rolling back whatever it had open) and the head forgotten.
pub struct AuditAppender {
    store: Store,
    conn: Option<HeldConn>,
    head: Option<Checkpoint>,
    /// Until when appends go under the lock at once: another writer appended lately.
    contended_until: Option<std::time::Instant>,
}

/// How long after a conflict appends take the lock at once. While replicas append in turn,
/// the unlocked attempt would mostly wait for the other's commit only to find the head moved.
const CONTENDED_FOR: Duration = Duration::from_secs(1);

impl std::fmt::Debug for AuditAppender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditAppender")
            .field("head", &self.head)
            .field("connected", &self.conn.is_some())
            .finish()
    }
}

impl AuditAppender {
    /// Appends `events` (in order) and `leases` in one transaction; returns the records.
    pub async fn append(
        &mut self,
        events: Vec<AuditEvent>,
        leases: &[LeaseRow],
    ) -> Result<Vec<AuditRecord>> {
        self.append_at(&events, leases, None).await
    }

    /// [`AuditAppender::append`], guarded by the secrets generation when one is given: if
    /// the database's is another, nothing is written and the result is
    /// [`StoreError::StaleGeneration`] (see [`HotReads::latest_version_remembered`]).
    pub async fn append_at(
        &mut self,
        events: &[AuditEvent],
        leases: &[LeaseRow],
        generation: Option<i64>,
    ) -> Result<Vec<AuditRecord>> {
        Ok(self
            .append_renewing(events, leases, &[], generation)
            .await?
            .0)
    }

    /// [`AuditAppender::append_at`] for a batch that may also renew leases: `renewals` each
    /// with the index of its record in `events` (see [`HeldConn::append_locked`]). Returns the
    /// records and, per renewal, the renewed lease (`None`: it was no longer renewable, and its
    /// record is the renewal's refusal).
    ///
    /// Without renewals, after its own last append and with no other writer lately, the batch
    /// goes in unlocked after the known head ([`HeldConn::append_after`]); otherwise, or when
    /// that finds the chain moved on, under the lock reading the head
    /// ([`HeldConn::append_locked`]).
    pub async fn append_renewing(
        &mut self,
        events: &[AuditEvent],
        leases: &[LeaseRow],
        renewals: &[(usize, &Renewing)],
        generation: Option<i64>,
    ) -> Result<(Vec<AuditRecord>, Vec<Option<RenewedLease>>)> {
        // A conflict means another writer appended; the locked append that follows reads the
        // head afresh. Every append takes the same lock, so one retry normally suffices; the
        // bound only guards against a log that keeps changing under us.
        const ATTEMPTS: usize = 8;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let contended = self
                .contended_until
                .is_some_and(|t| std::time::Instant::now() < t);
            let mut conn = match self.conn.take() {
                Some(c) => c,
                None => HeldConn::acquire(&self.store).await?,
            };
            let lock = &self.store.locks.write;
            // SQLite appends renewals under the lock: its locked append is a few calls to
            // its worker thread, not round trips to a server.
            let unlocked =
                !contended && (renewals.is_empty() || matches!(self.store.pool, Pool::Postgres(_)));
            let r = match self.head.take().filter(|_| unlocked) {
                Some(h) => {
                    conn.append_after(lock, &h, events.to_vec(), leases, renewals, generation)
                        .await
                }
                None => {
                    conn.append_locked(lock, events.to_vec(), leases, renewals, generation)
                        .await
                }
            };
            match &r {
                // Nothing stored; a dropped transaction rolls back before the next statement.
                Ok(_) | Err(StoreError::StaleGeneration { .. }) => self.conn = Some(conn),
                Err(_) => conn.discard(),
            }
            match r {
                Ok((recs, renewed)) => {
                    self.head = recs.last().map(AuditRecord::checkpoint);
                    return Ok((recs, renewed));
                }
                Err(StoreError::Conflict(e)) if attempt < ATTEMPTS => {
                    tracing::debug!(attempt, error = %e, "audit chain moved on; appending under the lock");
                    self.contended_until = Some(std::time::Instant::now() + CONTENDED_FOR);
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl HeldConn {
    /// The unlocked append after `head` (see [`Store::append_audit_batch_after`]). Renewals
    /// only on PostgreSQL (SQLite appends them under the lock: [`HeldConn::append_locked`]).
    async fn append_after(
        &mut self,
        write_lock: &tokio::sync::Mutex<()>,
        head: &Checkpoint,
        events: Vec<AuditEvent>,
        leases: &[LeaseRow],
        renewals: &[(usize, &Renewing)],
        generation: Option<i64>,
    ) -> Result<(Vec<AuditRecord>, Vec<Option<RenewedLease>>)> {
        if head.seq < 1 {
            return Err(StoreError::Conflict("no audit head known yet".into()));
        }
        if events.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let recs = chain_after(head.clone(), events);
        let mut renewed = std::collections::HashMap::new();
        let inserted = match self {
            HeldConn::Sqlite(_) if !renewals.is_empty() => {
                return Err(StoreError::Other(
                    "renewals are appended under the lock on SQLite".into(),
                ))
            }
            HeldConn::Sqlite(conn) => {
                // Small batches (one or two requests: the latency-bound case) keep their
                // prepared statement; larger ones vary in row count and would fill the cache.
                let cached = leases.len() <= 2 && recs.len() <= 6;
                let guard = " WHERE EXISTS (SELECT 1 FROM audit WHERE seq = ";
                // The rows written are counted with total_changes() around the inserts (one
                // row back each), not with RETURNING: every row the worker thread returns is a
                // message to this task.
                let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                    "BEGIN IMMEDIATE; SELECT total_changes(); ",
                );
                for chunk in leases.chunks(ROWS_PER_INSERT) {
                    q.push(SQLITE_INSERT_LEASES_OR_ROLLBACK)
                        .push("SELECT * FROM (");
                    push_lease_values!(q, chunk);
                    q.push(")").push(guard).push_bind(head.seq);
                    q.push(" AND hash = ").push_bind(&head.hash);
                    push_generation_guard!(q, generation);
                    q.push("); ");
                }
                for chunk in recs.chunks(ROWS_PER_INSERT) {
                    q.push(SQLITE_INSERT_AUDIT_OR_ROLLBACK)
                        .push("SELECT * FROM (");
                    push_audit_values!(q, chunk);
                    q.push(")").push(guard).push_bind(head.seq);
                    q.push(" AND hash = ").push_bind(&head.hash);
                    push_generation_guard!(q, generation);
                    q.push("); ");
                }
                q.push("SELECT total_changes(); COMMIT");
                let _g = write_lock.lock().await;
                let rows = q.build().persistent(cached).fetch_all(&mut **conn).await?;
                let count = |i: usize| -> Result<i64> {
                    rows.get(i)
                        .ok_or_else(|| StoreError::Other("audit append: no change count".into()))
                        .and_then(|r| Ok(r.try_get::<i64, _>(0)?))
                };
                match count(1)? - count(0)? {
                    0 => 0,
                    n if n as usize == leases.len() + recs.len() => recs.len(),
                    n => {
                        return Err(StoreError::Other(format!(
                            "audit append changed {n} rows for {} records and {} leases",
                            recs.len(),
                            leases.len()
                        )))
                    }
                }
            }
            HeldConn::Postgres(conn) => {
                // One prepared statement for every batch size: the rows travel as one array
                // per column (UNNEST), so PostgreSQL neither parses nor plans per batch.
                let col = |f: &dyn Fn(&LeaseRow) -> Option<String>| -> Vec<Option<String>> {
                    leases.iter().map(f).collect()
                };
                let num = |f: &dyn Fn(&LeaseRow) -> Option<i64>| -> Vec<Option<i64>> {
                    leases.iter().map(f).collect()
                };
                let atext = |f: &dyn Fn(&AuditRecord) -> Option<String>| -> Vec<Option<String>> {
                    recs.iter().map(f).collect()
                };
                let sql = if renewals.is_empty() {
                    PG_APPEND_AFTER_SQL
                } else {
                    PG_APPEND_AFTER_RENEWING_SQL
                };
                let mut q = sqlx::query(sql)
                    .bind(AUDIT_LOCK_KEY)
                    .bind(head.seq)
                    .bind(&head.hash)
                    .bind(col(&|l| Some(l.id.clone())))
                    .bind(col(&|l| Some(l.identity.namespace.clone())))
                    .bind(col(&|l| Some(l.identity.service_account.clone())))
                    .bind(col(&|l| l.identity.pod_name.clone()))
                    .bind(col(&|l| l.identity.pod_uid.clone()))
                    .bind(col(&|l| Some(l.path.clone())))
                    .bind(num(&|l| Some(l.version)))
                    .bind(num(&|l| Some(l.created_ms)))
                    .bind(num(&|l| Some(l.expires_ms)))
                    .bind(num(&|l| Some(l.max_expires_ms)))
                    .bind(num(&|l| Some(l.renewals)))
                    .bind(num(&|l| l.ended_ms))
                    .bind(col(&|l| l.end_reason.clone()))
                    .bind(recs.iter().map(|r| r.seq).collect::<Vec<i64>>())
                    .bind(recs.iter().map(|r| r.event.time_ms).collect::<Vec<i64>>())
                    .bind(atext(&|r| Some(r.event.kind.as_text().into_owned())))
                    .bind(atext(&|r| r.event.identity.clone()))
                    .bind(atext(&|r| r.event.pod.clone()))
                    .bind(atext(&|r| r.event.path.clone()))
                    .bind(atext(&|r| r.event.lease_id.clone()))
                    .bind(atext(&|r| Some(r.event.outcome.as_str().to_owned())))
                    .bind(atext(&|r| r.event.reason.clone()))
                    .bind(atext(&|r| Some(r.prev_hash.clone())))
                    .bind(atext(&|r| Some(r.hash.clone())))
                    .bind(generation);
                if !renewals.is_empty() {
                    let (ids, nows, expiries) = super::renewals::renewal_arrays(renewals);
                    q = q.bind(ids).bind(nows).bind(expiries);
                }
                let rows = q.fetch_all(&mut **conn).await?;
                for row in &rows {
                    if row.opt_text("id")?.is_some() {
                        let (id, l) = super::renewals::renewed_from_row(row)?;
                        renewed.insert(id, l);
                    }
                }
                match rows.first() {
                    Some(r) => r.int("appended")? as usize,
                    None => return Err(StoreError::Other("audit append: no count".into())),
                }
            }
        };
        match inserted {
            n if n == recs.len() => {
                // Every renewal applied (or the statement was aborted).
                let outcome = renewals
                    .iter()
                    .map(|(_, r)| renewed.get(&r.lease_id).copied())
                    .collect();
                Ok((recs, outcome))
            }
            // Or the generation moved on: the locked append that follows tells which.
            0 => Err(StoreError::Conflict(format!(
                "audit head {} is no longer the end of the log",
                head.seq
            ))),
            n => Err(StoreError::Other(format!(
                "audit append wrote {n} of {} records",
                recs.len()
            ))),
        }
    }
}

/// The CTEs of the one-statement PostgreSQL append (see [`PG_APPEND_AFTER_SQL`]); more CTEs
/// or the final SELECT follow.
macro_rules! pg_append_after_ctes {
    () => {
        concat!(
            "WITH ok AS (SELECT 1 FROM (SELECT pg_advisory_xact_lock($1)) lk, audit ",
            "WHERE audit.seq = $2 AND audit.hash = $3 AND ($28::int8 IS NULL OR ",
            "(SELECT n FROM secrets_generation WHERE id = 1) = $28::int8)), ",
            "l AS (INSERT INTO leases (",
            lease_cols!(),
            ") SELECT * FROM UNNEST($4::text[], $5::text[], $6::text[], $7::text[], $8::text[], ",
            "$9::text[], $10::int8[], $11::int8[], $12::int8[], $13::int8[], $14::int8[], ",
            "$15::int8[], $16::text[]) WHERE EXISTS (SELECT 1 FROM ok)), ",
            "a AS (INSERT INTO audit (",
            audit_cols!(),
            ") SELECT * FROM UNNEST($17::int8[], $18::int8[], $19::text[], $20::text[], $21::text[], ",
            "$22::text[], $23::text[], $24::text[], $25::text[], $26::text[], $27::text[]) ",
            "WHERE EXISTS (SELECT 1 FROM ok) RETURNING 1)"
        )
    };
}

/// SQLSTATE of `keyhaven_renewals_changed()` (migration 0005): a one-statement append whose
/// renewals did not all apply was aborted.
pub(super) const RENEWALS_CHANGED: &str = "KH001";

/// The unlocked PostgreSQL append ([`Store::append_audit_batch_after`]): the append lock is
/// still taken (inside the statement, before the inserts and the renewals, which depend on
/// `ok`) — without it, a replica appending under the lock after a conflict could lose every
/// race to unlocked appends. `$28`, when not null, is the secrets generation the batch's
/// versions were read under. `$29..$31` are the batch's renewals (ids, each one's `now`, new
/// expiries); if one of them does not apply (its lease ended since the Renew's check), the
/// statement is aborted ([`RENEWALS_CHANGED`]): nothing is stored. Returns rows of the number
/// of audit rows written (0: the head is gone or moved on, or the generation did) beside each
/// renewed lease (one row with a null id when none).
pub(super) const PG_APPEND_AFTER_SQL: &str = concat!(
    pg_append_after_ctes!(),
    " SELECT count(*) AS appended, NULL::text AS id, NULL::int8 AS expires_ms, ",
    "NULL::int8 AS max_expires_ms, NULL::int8 AS version, NULL::int8 AS latest FROM a"
);

/// [`PG_APPEND_AFTER_SQL`] for a batch with renewals, prepared as well: `keyhaven_renew`
/// (migration 0006) renews only once the head is confirmed (`ok`), and finds each lease by
/// its key whatever the table's statistics.
pub(super) const PG_APPEND_AFTER_RENEWING_SQL: &str = concat!(
    pg_append_after_ctes!(),
    ", rn AS (",
    pg_renew_from!(
        "CASE WHEN EXISTS (SELECT 1 FROM ok) THEN $29::text[] END, $30::int8[], $31::int8[]"
    ),
    "), ",
    "n AS (SELECT (SELECT count(*) FROM a) AS appended, ",
    "(SELECT count(*) FROM rn) AS renewed) ",
    "SELECT n.appended, rn.id, rn.expires_ms, rn.max_expires_ms, rn.version, rn.latest, ",
    "CASE WHEN n.appended > 0 AND n.renewed <> cardinality($29::text[]) ",
    "THEN keyhaven_renewals_changed() END AS guard ",
    "FROM n LEFT JOIN rn ON true"
);

impl Store {
    /// Appends `event` to the hash-chained audit log and returns the stored record.
    pub async fn append_audit(&self, event: AuditEvent) -> Result<AuditRecord> {
        let mut v = self.append_audit_batch(vec![event]).await?;
        v.pop()
            .ok_or_else(|| StoreError::Other("empty audit batch".into()))
    }

    /// Appends several events, in order, in ONE transaction (group commit), and returns the
    /// stored records. Appends are serialised: on PostgreSQL with a transaction-scoped
    /// advisory lock (so several broker replicas share one chain), on SQLite (one broker per
    /// file) with a process lock.
    pub async fn append_audit_batch(&self, events: Vec<AuditEvent>) -> Result<Vec<AuditRecord>> {
        self.append_audit_batch_with(events, &[]).await
    }

    /// [`Store::append_audit_batch`], also inserting `leases` in the same transaction: a
    /// lease exists if and only if the audit record that grants it does.
    pub async fn append_audit_batch_with(
        &self,
        events: Vec<AuditEvent>,
        leases: &[LeaseRow],
    ) -> Result<Vec<AuditRecord>> {
        self.append_audit_batch_at(events, leases, None).await
    }

    /// [`Store::append_audit_batch_with`], guarded by the secrets generation when one is
    /// given: if the database's is another, nothing is written
    /// ([`StoreError::StaleGeneration`]).
    pub async fn append_audit_batch_at(
        &self,
        events: Vec<AuditEvent>,
        leases: &[LeaseRow],
        generation: Option<i64>,
    ) -> Result<Vec<AuditRecord>> {
        // The audit appender's locked append, on a connection of the pool.
        let mut conn = HeldConn::acquire(self).await?;
        let r = conn
            .append_locked(&self.locks.write, events, leases, &[], generation)
            .await;
        // Nothing stored on a stale generation; the dropped transaction rolls back before the
        // connection's next statement.
        if matches!(&r, Err(e) if !matches!(e, StoreError::StaleGeneration { .. })) {
            conn.discard();
        }
        Ok(r?.0)
    }

    /// [`Store::append_audit_batch_with`] for a writer that knows where the chain ends: `head`
    /// is the last record of its own previous append. The head is not read; the batch goes in
    /// as ONE statement on PostgreSQL (autocommit, the append lock taken inside it) and as one
    /// call to SQLite's worker thread (`BEGIN IMMEDIATE; inserts; COMMIT`), which is what a
    /// lone writer's latency is made of. [`AuditAppender`] does this on a connection of its own.
    ///
    /// Every insert is guarded by `head` still being in the log, and `seq` is the primary key,
    /// so when the chain has moved on (another replica appended, or the log is not the one the
    /// writer saw) nothing is written and the result is [`StoreError::Conflict`]: the caller
    /// appends with [`Store::append_audit_batch_with`] instead, which reads the head under
    /// the lock.
    pub async fn append_audit_batch_after(
        &self,
        head: &Checkpoint,
        events: Vec<AuditEvent>,
        leases: &[LeaseRow],
    ) -> Result<Vec<AuditRecord>> {
        let mut conn = HeldConn::acquire(self).await?;
        let r = conn
            .append_after(&self.locks.write, head, events, leases, &[], None)
            .await;
        if r.is_err() {
            conn.discard();
        }
        Ok(r?.0)
    }

    /// The audit log's single writer in this process (the broker's audit task).
    pub fn audit_appender(&self) -> AuditAppender {
        AuditAppender {
            store: self.clone(),
            conn: None,
            head: None,
            contended_until: None,
        }
    }

    /// The last record's position ([`Checkpoint::genesis`] when the log is empty).
    pub async fn audit_head(&self) -> Result<Checkpoint> {
        on_pool!(self, p => match sqlx::query(AUDIT_HEAD_SQL).fetch_optional(p).await? {
            Some(r) => Ok(Checkpoint { seq: r.int("seq")?, hash: r.text("hash")? }),
            None => Ok(Checkpoint::genesis()),
        })
    }

    /// Up to `limit` records with `seq > after_seq`, in order.
    pub async fn audit_records(&self, after_seq: i64, limit: i64) -> Result<Vec<AuditRecord>> {
        let sql = format!("SELECT {AUDIT_COLS} FROM audit WHERE seq > $1 ORDER BY seq LIMIT $2");
        on_pool!(self, p => {
            let rows = sqlx::query(&sql).bind(after_seq).bind(limit).fetch_all(p).await?;
            rows.iter().map(audit_from_row).collect()
        })
    }

    /// Verifies the whole stored audit chain, reading it in pages.
    pub async fn verify_audit(
        &self,
    ) -> Result<Result<crate::audit::VerifyReport, crate::audit::VerifyError>> {
        let mut all = Vec::new();
        let mut after = 0;
        loop {
            let page = self.audit_records(after, 10_000).await?;
            let Some(last) = page.last() else { break };
            after = last.seq;
            all.extend(page);
        }
        Ok(crate::audit::verify(all))
    }
}
