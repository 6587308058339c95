//! KEK rotation state: re-wrap claims and commits, KEK usage counters, retirement and the
//! rotation decision lock.

use super::*;

/// Counts one sealed DEK under a KEK.
pub(super) const USAGE_SEAL: &str =
    "INSERT INTO kek_usage (kek_id, seals, rewraps_in) VALUES ($1, 1, 0) \
     ON CONFLICT (kek_id) DO UPDATE SET seals = kek_usage.seals + 1";
/// Counts `$2` DEKs re-wrapped to a KEK.
pub(super) const USAGE_REWRAP: &str =
    "INSERT INTO kek_usage (kek_id, seals, rewraps_in) VALUES ($1, 0, $2) \
     ON CONFLICT (kek_id) DO UPDATE SET rewraps_in = kek_usage.rewraps_in + excluded.rewraps_in";
/// Arbitrary constant naming the KEK lock (`pg_advisory_xact_lock[_shared]`): shared by
/// everything that wraps a DEK, exclusive while a KEK is being retired.
pub(super) const KEK_LOCK_KEY: i64 = 0x6b68_6b65_6b6c_6b31; // "khkeklk1"
/// Arbitrary constant naming the rotation decision lock (`pg_[try_]advisory_xact_lock`).
pub(super) const ROTATE_LOCK_KEY: i64 = 0x6b68_726f_7461_7431; // "khrotat1"
/// Re-wrap batch records older than this are pruned.
pub(super) const REWRAP_LOG_KEEP_MS: i64 = 60 * 60 * 1000;

/// A stored DEK claimed for re-wrapping.
#[derive(Debug, Clone)]
pub struct RewrapRow {
    /// Secret path.
    pub path: String,
    /// Version.
    pub version: i64,
    /// The DEK as stored (wrapped by an older KEK).
    pub dek: WrappedDek,
}

/// A batch of DEK rows claimed for re-wrapping. On PostgreSQL the rows are locked
/// (`FOR UPDATE SKIP LOCKED`) in an open transaction until [`RewrapClaim::commit`] or drop
/// (rollback); on SQLite (a single writer) they are read without a lock and the commit is one
/// `BEGIN IMMEDIATE` transaction. Either way every update is guarded by the row's old KEK id
/// and wrapped DEK, so a row is never moved twice.
pub struct RewrapClaim {
    inner: ClaimInner,
    /// The claimed rows, in primary-key order.
    pub rows: Vec<RewrapRow>,
    to: KekId,
    started: std::time::Instant,
}

pub(super) enum ClaimInner {
    Postgres(sqlx::Transaction<'static, sqlx::Postgres>),
    Sqlite(SqlitePool),
}

impl std::fmt::Debug for RewrapClaim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RewrapClaim")
            .field("rows", &self.rows.len())
            .field("to", &self.to)
            .finish_non_exhaustive()
    }
}

/// One DEK re-wrapped in memory, to be written by [`RewrapClaim::commit`].
#[derive(Debug, Clone)]
pub struct Rewrapped {
    /// Secret path.
    pub path: String,
    /// Version.
    pub version: i64,
    /// The DEK as it was stored (the update's guard).
    pub old: WrappedDek,
    /// The DEK wrapped by the new KEK.
    pub new: WrappedDek,
}

/// Recent re-wrap activity, over every replica.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RewrapActivity {
    /// DEKs moved by the batches in the window.
    pub rows: i64,
    /// Start of the earliest batch in the window (0: none).
    pub first_start_ms: i64,
    /// End of the latest batch ever recorded (0: none).
    pub last_ms: i64,
    /// Replicas with a batch in the window.
    pub replicas: i64,
}

/// Encryptions recorded under one KEK.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KekUsage {
    /// New DEKs sealed.
    pub seals: i64,
    /// DEKs re-wrapped to it.
    pub rewraps_in: i64,
}

impl KekUsage {
    /// Every wrap under the KEK.
    pub fn encryptions(&self) -> i64 {
        self.seals + self.rewraps_in
    }
}

/// Held while deciding on and making a rotation (one replica at a time). Released on drop.
pub struct RotationGuard {
    _inner: GuardInner,
}

pub(super) enum GuardInner {
    // The transaction holds `pg_advisory_xact_lock`; dropping it rolls back and unlocks.
    Postgres(#[allow(dead_code)] sqlx::Transaction<'static, sqlx::Postgres>),
    Sqlite(#[allow(dead_code)] tokio::sync::OwnedMutexGuard<()>),
}

impl std::fmt::Debug for RotationGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RotationGuard")
    }
}

impl Store {
    /// Claims up to `limit` live DEK rows wrapped by one of `from`, after the cursor `after`
    /// (`(path, version)` in primary-key order; `None` = from the start), to be re-wrapped to
    /// `to`. [`StoreError::KekRetired`] if `to` is retired.
    pub async fn claim_rewrap(
        &self,
        from: &[KekId],
        to: KekId,
        after: Option<(&str, i64)>,
        limit: i64,
    ) -> Result<RewrapClaim> {
        let started = std::time::Instant::now();
        if from.is_empty() {
            return Ok(RewrapClaim {
                inner: match &self.pool {
                    Pool::Sqlite(p) => ClaimInner::Sqlite(p.clone()),
                    Pool::Postgres(p) => ClaimInner::Postgres(p.begin().await?),
                },
                rows: Vec::new(),
                to,
                started,
            });
        }
        let ins: Vec<String> = (0..from.len()).map(|i| format!("${}", i + 4)).collect();
        let lock = match &self.pool {
            Pool::Postgres(_) => " FOR UPDATE SKIP LOCKED",
            Pool::Sqlite(_) => "",
        };
        let sql = format!(
            "SELECT path, version, kek_id, dek_iv, dek_ct FROM secret_versions \
             WHERE destroyed_ms IS NULL AND kek_id IN ({}) \
             AND (path > $1 OR (path = $1 AND version > $2)) \
             ORDER BY path, version LIMIT $3{lock}",
            ins.join(", ")
        );
        let (after_path, after_version) = after.unwrap_or(("", i64::MIN));
        macro_rules! fetch {
            ($ex:expr) => {{
                let mut q = sqlx::query(&sql)
                    .bind(after_path)
                    .bind(after_version)
                    .bind(limit);
                for k in from {
                    q = q.bind(k.to_string());
                }
                let rows = q.fetch_all($ex).await?;
                rows.iter().map(rewrap_row).collect::<Result<Vec<_>>>()?
            }};
        }
        match &self.pool {
            Pool::Sqlite(p) => {
                let rows = fetch!(p);
                Ok(RewrapClaim {
                    inner: ClaimInner::Sqlite(p.clone()),
                    rows,
                    to,
                    started,
                })
            }
            Pool::Postgres(p) => {
                let mut tx = p.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock_shared($1)")
                    .bind(KEK_LOCK_KEY)
                    .execute(&mut *tx)
                    .await?;
                ensure_not_retired(&mut tx, to).await?;
                let rows = fetch!(&mut *tx);
                Ok(RewrapClaim {
                    inner: ClaimInner::Postgres(tx),
                    rows,
                    to,
                    started,
                })
            }
        }
    }

    /// Re-wrap activity of the batches that ended at or after `since_ms`.
    pub async fn rewrap_activity(&self, since_ms: i64) -> Result<RewrapActivity> {
        let sql = "SELECT CAST(COALESCE(SUM(rows_moved), 0) AS BIGINT) AS n, \
             COALESCE(MIN(time_ms - duration_ms), 0) AS first_start, \
             COUNT(DISTINCT replica) AS replicas \
             FROM rewrap_batches WHERE time_ms >= $1";
        let last = "SELECT COALESCE(MAX(time_ms), 0) FROM rewrap_batches";
        on_pool!(self, p => {
            let r = sqlx::query(sql).bind(since_ms).fetch_one(p).await?;
            let last_ms: i64 = sqlx::query_scalar(last).fetch_one(p).await?;
            Ok(RewrapActivity {
                rows: r.int("n")?,
                first_start_ms: r.int("first_start")?,
                last_ms,
                replicas: r.int("replicas")?,
            })
        })
    }

    /// DEKs moved per replica by the recorded batches (the last hour), sorted by replica.
    pub async fn rewrap_moves_by_replica(&self) -> Result<Vec<(String, i64)>> {
        on_pool!(self, p => {
            let rows = sqlx::query(
                "SELECT replica, CAST(SUM(rows_moved) AS BIGINT) AS n FROM rewrap_batches \
                 GROUP BY replica ORDER BY replica")
                .fetch_all(p).await?;
            rows.iter().map(|r| Ok((r.text("replica")?, r.int("n")?))).collect()
        })
    }

    /// Encryptions recorded under `kek`.
    pub async fn kek_usage(&self, kek: KekId) -> Result<KekUsage> {
        let sql = "SELECT seals, rewraps_in FROM kek_usage WHERE kek_id = $1";
        on_pool!(self, p => match sqlx::query(sql).bind(kek.to_string()).fetch_optional(p).await? {
            Some(r) => Ok(KekUsage { seals: r.int("seals")?, rewraps_in: r.int("rewraps_in")? }),
            None => Ok(KekUsage::default()),
        })
    }

    /// Marks `kek` retired, unless a live DEK (soft-deleted versions included, destroyed ones
    /// not) is still wrapped by it: [`StoreError::KekInUse`]. Exclusive against every wrap
    /// (`pg_advisory_xact_lock` on PostgreSQL, `BEGIN IMMEDIATE` on SQLite): once this commits,
    /// no DEK can be wrapped by `kek` again. Idempotent.
    pub async fn mark_kek_retired(&self, kek: KekId, now_ms: i64) -> Result<()> {
        self.mark_kek_retired_audited(kek, now_ms, Vec::new)
            .await
            .map(drop)
    }

    /// [`Store::mark_kek_retired`], appending the records `events()` gives in the same
    /// transaction (none: no audit lock taken). Lock order: the audit lock, then the KEK lock,
    /// as [`Store::insert_version_audited`].
    pub async fn mark_kek_retired_audited(
        &self,
        kek: KekId,
        now_ms: i64,
        events: impl FnOnce() -> Vec<AuditEvent>,
    ) -> Result<Vec<AuditRecord>> {
        let id = kek.to_string();
        let count =
            "SELECT COUNT(*) FROM secret_versions WHERE kek_id = $1 AND destroyed_ms IS NULL";
        let mark = "INSERT INTO retired_keks (kek_id, retired_ms) VALUES ($1, $2) \
                    ON CONFLICT (kek_id) DO NOTHING";
        let events = events();
        macro_rules! body {
            ($tx:ident, $db:ty) => {{
                let n: i64 = sqlx::query_scalar(count)
                    .bind(&id)
                    .fetch_one(&mut *$tx)
                    .await?;
                if n > 0 {
                    return Err(StoreError::KekInUse {
                        kek_id: id,
                        deks: n,
                    });
                }
                sqlx::query(mark)
                    .bind(&id)
                    .bind(now_ms)
                    .execute(&mut *$tx)
                    .await?;
                let records = if events.is_empty() {
                    Vec::new()
                } else {
                    append_chain_in!($tx, $db, events)
                };
                $tx.commit().await?;
                Ok(records)
            }};
        }
        in_kek_tx!(self, "pg_advisory_xact_lock", !events.is_empty(), tx, Db => body!(tx, Db))
    }

    /// Whether `kek` is marked retired.
    pub async fn is_kek_retired(&self, kek: KekId) -> Result<bool> {
        let n: i64 = on_pool!(self, p => sqlx::query_scalar(
            "SELECT COUNT(*) FROM retired_keks WHERE kek_id = $1")
            .bind(kek.to_string()).fetch_one(p).await)?;
        Ok(n > 0)
    }

    /// The rotation decision lock: one replica at a time decides on and makes a rotation
    /// (`pg_advisory_xact_lock` on PostgreSQL, a process lock on SQLite, which has one broker
    /// per file). With `wait == false`, `None` when another holder has it.
    pub async fn rotation_lock(&self, wait: bool) -> Result<Option<RotationGuard>> {
        match &self.pool {
            Pool::Sqlite(_) => {
                let g = if wait {
                    self.locks.rotate.clone().lock_owned().await
                } else {
                    match self.locks.rotate.clone().try_lock_owned() {
                        Ok(g) => g,
                        Err(_) => return Ok(None),
                    }
                };
                Ok(Some(RotationGuard {
                    _inner: GuardInner::Sqlite(g),
                }))
            }
            Pool::Postgres(p) => {
                let mut tx = p.begin().await?;
                if wait {
                    sqlx::query("SELECT pg_advisory_xact_lock($1)")
                        .bind(ROTATE_LOCK_KEY)
                        .execute(&mut *tx)
                        .await?;
                } else {
                    let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
                        .bind(ROTATE_LOCK_KEY)
                        .fetch_one(&mut *tx)
                        .await?;
                    if !got {
                        return Ok(None);
                    }
                }
                Ok(Some(RotationGuard {
                    _inner: GuardInner::Postgres(tx),
                }))
            }
        }
    }

    /// Per-row re-wrap counters (`path`, `version`, `rewraps`) of every live row, in order.
    pub async fn rewrap_counts(&self) -> Result<Vec<(String, i64, i64)>> {
        on_pool!(self, p => {
            let rows = sqlx::query(
                "SELECT path, version, rewraps FROM secret_versions \
                 WHERE destroyed_ms IS NULL ORDER BY path, version")
                .fetch_all(p).await?;
            rows.iter()
                .map(|r| Ok((r.text("path")?, r.int("version")?, r.int("rewraps")?)))
                .collect()
        })
    }
}

pub(super) async fn ensure_not_retired(
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    kek: KekId,
) -> Result<()> {
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM retired_keks WHERE kek_id = $1")
        .bind(kek.to_string())
        .fetch_one(&mut **tx)
        .await?;
    if n > 0 {
        return Err(StoreError::KekRetired(kek.to_string()));
    }
    Ok(())
}

pub(super) fn rewrap_row(r: &impl RowExt) -> Result<RewrapRow> {
    let path = r.text("path")?;
    let version = r.int("version")?;
    let kek_id = KekId::from_hex(&r.text("kek_id")?)
        .ok_or_else(|| StoreError::Corrupt(format!("kek_id of {path}#{version}")))?;
    match (r.opt_blob("dek_iv")?, r.opt_blob("dek_ct")?) {
        (Some(iv), Some(ciphertext)) => Ok(RewrapRow {
            path,
            version,
            dek: WrappedDek {
                kek_id,
                iv,
                ciphertext,
            },
        }),
        _ => Err(StoreError::Corrupt(format!("partial row {path}#{version}"))),
    }
}

impl RewrapClaim {
    /// The KEK the rows are being re-wrapped to.
    pub fn to(&self) -> KekId {
        self.to
    }

    /// Writes the re-wrapped DEKs (each update guarded by the row's old KEK id and wrapped
    /// DEK; the data ciphertext is not touched), counts them under the new KEK, records the
    /// batch for progress, and commits: all or nothing. Returns how many rows moved.
    pub async fn commit(self, moved: &[Rewrapped], replica: &str, now_ms: i64) -> Result<u64> {
        // One statement per chunk: the rows' new wrapped DEKs as a VALUES list, each update
        // guarded by the row's old KEK id and wrapped DEK (6 parameters a row).
        const CHUNK: usize = 500;
        const HEAD: &str = "WITH v (path, version, old_kek, old_ct, new_iv, new_ct) AS (";
        const SET: &str = ") UPDATE secret_versions SET kek_id = ";
        const TAIL: &str =
            ", dek_iv = v.new_iv, dek_ct = v.new_ct, rewraps = secret_versions.rewraps + 1 \
             FROM v WHERE secret_versions.path = v.path AND secret_versions.version = v.version \
             AND secret_versions.kek_id = v.old_kek AND secret_versions.dek_ct = v.old_ct \
             AND secret_versions.destroyed_ms IS NULL";
        let log = "INSERT INTO rewrap_batches (time_ms, replica, to_kek, rows_moved, duration_ms) \
             VALUES ($1, $2, $3, $4, $5)";
        let prune = "DELETE FROM rewrap_batches WHERE time_ms < $1";
        let to = self.to.to_string();
        let elapsed = i64::try_from(self.started.elapsed().as_millis()).unwrap_or(i64::MAX);
        macro_rules! body {
            ($tx:expr, $db:ty) => {{
                let mut n: u64 = 0;
                for chunk in moved.chunks(CHUNK) {
                    let mut q = sqlx::QueryBuilder::<$db>::new(HEAD);
                    q.push_values(chunk, |mut b, m| {
                        debug_assert_eq!(m.new.kek_id, self.to);
                        b.push_bind(m.path.clone())
                            .push_bind(m.version)
                            .push_bind(m.old.kek_id.to_string())
                            .push_bind(m.old.ciphertext.clone())
                            .push_bind(m.new.iv.clone())
                            .push_bind(m.new.ciphertext.clone());
                    });
                    q.push(SET);
                    q.push_bind(to.clone());
                    q.push(TAIL);
                    n += q.build().execute(&mut *$tx).await?.rows_affected();
                }
                if n > 0 {
                    let rows = i64::try_from(n).unwrap_or(i64::MAX);
                    sqlx::query(USAGE_REWRAP)
                        .bind(&to)
                        .bind(rows)
                        .execute(&mut *$tx)
                        .await?;
                    sqlx::query(log)
                        .bind(now_ms)
                        .bind(replica)
                        .bind(&to)
                        .bind(rows)
                        .bind(elapsed)
                        .execute(&mut *$tx)
                        .await?;
                    sqlx::query(prune)
                        .bind(now_ms - REWRAP_LOG_KEEP_MS)
                        .execute(&mut *$tx)
                        .await?;
                }
                $tx.commit().await?;
                Ok(n)
            }};
        }
        match self.inner {
            ClaimInner::Postgres(mut tx) => body!(tx, sqlx::Postgres),
            ClaimInner::Sqlite(p) => {
                if moved.is_empty() {
                    return Ok(0);
                }
                let mut tx = p.begin_with("BEGIN IMMEDIATE").await?;
                let retired: i64 =
                    sqlx::query_scalar("SELECT COUNT(*) FROM retired_keks WHERE kek_id = $1")
                        .bind(&to)
                        .fetch_one(&mut *tx)
                        .await?;
                if retired > 0 {
                    return Err(StoreError::KekRetired(to));
                }
                body!(tx, sqlx::Sqlite)
            }
        }
    }
}
