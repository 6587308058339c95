//! Storage: sqlx over SQLite (embedded default: one file, WAL) or PostgreSQL (several broker
//! replicas). The same statements run on both (`$N` placeholders); where the dialects differ
//! (row locking for the reaper) the difference is local to one method. Times are Unix ms.

use std::str::FromStr;
use std::time::Duration;

use keyhaven_hsm::KekId;
use sqlx::postgres::{PgPoolOptions, PgRow};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{PgPool, Row, SqlitePool};

use crate::audit::{AuditEvent, AuditRecord, Checkpoint, EventKind, Outcome};
use crate::crypto::{SealedVersion, WrappedDek};
use crate::identity::Identity;

/// Why a storage call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or timed out; retry later.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// A uniqueness constraint was hit (e.g. two writers took the same version).
    #[error("conflict: {0}")]
    Conflict(String),
    /// A stored row is not what we wrote (bad column contents).
    #[error("corrupt row: {0}")]
    Corrupt(String),
    /// Anything else the database said.
    #[error("database error: {0}")]
    Other(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e.to_string()),
            sqlx::Error::Database(db) => {
                if db.is_unique_violation() {
                    StoreError::Conflict(db.message().to_owned())
                } else if matches!(db.code().as_deref(), Some(c) if c.starts_with("08") || c.starts_with("57P") || c == "5" || c == "6")
                {
                    // PostgreSQL class 08 (connection) and 57P (shutdown); SQLite BUSY/LOCKED.
                    StoreError::Unavailable(db.message().to_owned())
                } else {
                    StoreError::Other(db.message().to_owned())
                }
            }
            _ => StoreError::Other(e.to_string()),
        }
    }
}

impl StoreError {
    /// True when retrying later may succeed.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// Result alias.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A stored secret version.
#[derive(Debug, Clone)]
pub struct StoredVersion {
    /// Path.
    pub path: String,
    /// Version (1, 2, ...).
    pub version: i64,
    /// Creation time.
    pub created_ms: i64,
    /// Soft-delete time, if deleted.
    pub deleted_ms: Option<i64>,
    /// Destroy time, if destroyed (then `sealed` is `None`).
    pub destroyed_ms: Option<i64>,
    /// The encrypted data, unless destroyed.
    pub sealed: Option<SealedVersion>,
}

/// A lease row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRow {
    /// Lease id.
    pub id: String,
    /// Holder.
    pub identity: Identity,
    /// Secret path.
    pub path: String,
    /// Secret version leased.
    pub version: i64,
    /// Issue time.
    pub created_ms: i64,
    /// Current expiry.
    pub expires_ms: i64,
    /// No renewal past this.
    pub max_expires_ms: i64,
    /// How many times renewed.
    pub renewals: i64,
    /// When it ended (revoked or reaped), if it did.
    pub ended_ms: Option<i64>,
    /// Why it ended.
    pub end_reason: Option<String>,
}

impl LeaseRow {
    /// Whether the lease is usable at `now_ms`.
    pub fn is_active(&self, now_ms: i64) -> bool {
        self.ended_ms.is_none() && self.expires_ms > now_ms
    }
}

/// Which leases a bulk revocation targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseFilter {
    /// One lease.
    Id(String),
    /// Every lease of a service account.
    Identity {
        /// Namespace.
        namespace: String,
        /// Service account.
        service_account: String,
    },
    /// Every lease held by a pod (by pod name within a namespace).
    Pod {
        /// Namespace.
        namespace: String,
        /// Pod name.
        pod: String,
    },
    /// Every lease on a path or below it (`team/app` matches `team/app` and `team/app/...`).
    PathPrefix(String),
    /// All leases.
    All,
}

impl LeaseFilter {
    /// SQL condition and its text parameters (placeholders start at `$first`).
    fn sql(&self, first: usize) -> (String, Vec<String>) {
        match self {
            LeaseFilter::Id(id) => (format!("id = ${first}"), vec![id.clone()]),
            LeaseFilter::Identity {
                namespace,
                service_account,
            } => (
                format!("namespace = ${first} AND service_account = ${}", first + 1),
                vec![namespace.clone(), service_account.clone()],
            ),
            LeaseFilter::Pod { namespace, pod } => (
                format!("namespace = ${first} AND pod_name = ${}", first + 1),
                vec![namespace.clone(), pod.clone()],
            ),
            LeaseFilter::PathPrefix(p) => {
                let p = p.trim_end_matches('/').to_owned();
                // Prefix match on whole segments, without LIKE (no escaping pitfalls).
                (
                    format!(
                        "(path = ${first} OR substr(path, 1, length(${first}) + 1) = ${} )",
                        first + 1
                    ),
                    vec![p.clone(), format!("{p}/")],
                )
            }
            LeaseFilter::All => ("1 = 1".into(), vec![]),
        }
    }
}

/// The broker's database.
#[derive(Debug, Clone)]
pub enum Store {
    /// Embedded SQLite file.
    Sqlite(SqlitePool),
    /// PostgreSQL server.
    Postgres(PgPool),
}

/// Runs the same body against whichever pool this store has.
macro_rules! on_pool {
    ($self:expr, $pool:ident => $body:expr) => {
        match $self {
            Store::Sqlite($pool) => $body,
            Store::Postgres($pool) => $body,
        }
    };
}

trait RowExt {
    fn text(&self, col: &str) -> Result<String>;
    fn opt_text(&self, col: &str) -> Result<Option<String>>;
    fn int(&self, col: &str) -> Result<i64>;
    fn opt_int(&self, col: &str) -> Result<Option<i64>>;
    fn opt_blob(&self, col: &str) -> Result<Option<Vec<u8>>>;
}

macro_rules! row_ext {
    ($t:ty) => {
        impl RowExt for $t {
            fn text(&self, col: &str) -> Result<String> {
                self.try_get(col)
                    .map_err(|e| StoreError::Corrupt(format!("{col}: {e}")))
            }
            fn opt_text(&self, col: &str) -> Result<Option<String>> {
                self.try_get(col)
                    .map_err(|e| StoreError::Corrupt(format!("{col}: {e}")))
            }
            fn int(&self, col: &str) -> Result<i64> {
                self.try_get(col)
                    .map_err(|e| StoreError::Corrupt(format!("{col}: {e}")))
            }
            fn opt_int(&self, col: &str) -> Result<Option<i64>> {
                self.try_get(col)
                    .map_err(|e| StoreError::Corrupt(format!("{col}: {e}")))
            }
            fn opt_blob(&self, col: &str) -> Result<Option<Vec<u8>>> {
                self.try_get(col)
                    .map_err(|e| StoreError::Corrupt(format!("{col}: {e}")))
            }
        }
    };
}
row_ext!(SqliteRow);
row_ext!(PgRow);

fn version_from_row(r: &impl RowExt) -> Result<StoredVersion> {
    let path = r.text("path")?;
    let version = r.int("version")?;
    let kek = r.text("kek_id")?;
    let kek_id = KekId::from_hex(&kek)
        .ok_or_else(|| StoreError::Corrupt(format!("kek_id of {path}#{version}")))?;
    let parts = (
        r.opt_blob("dek_iv")?,
        r.opt_blob("dek_ct")?,
        r.opt_blob("nonce")?,
        r.opt_blob("ciphertext")?,
    );
    let sealed = match parts {
        (Some(iv), Some(ct), Some(nonce), Some(data)) => Some(SealedVersion {
            nonce,
            ciphertext: data,
            dek: WrappedDek {
                kek_id,
                iv,
                ciphertext: ct,
            },
        }),
        (None, None, None, None) => None,
        _ => return Err(StoreError::Corrupt(format!("partial row {path}#{version}"))),
    };
    Ok(StoredVersion {
        path,
        version,
        created_ms: r.int("created_ms")?,
        deleted_ms: r.opt_int("deleted_ms")?,
        destroyed_ms: r.opt_int("destroyed_ms")?,
        sealed,
    })
}

fn lease_from_row(r: &impl RowExt) -> Result<LeaseRow> {
    Ok(LeaseRow {
        id: r.text("id")?,
        identity: Identity {
            namespace: r.text("namespace")?,
            service_account: r.text("service_account")?,
            pod_name: r.opt_text("pod_name")?,
            pod_uid: r.opt_text("pod_uid")?,
        },
        path: r.text("path")?,
        version: r.int("version")?,
        created_ms: r.int("created_ms")?,
        expires_ms: r.int("expires_ms")?,
        max_expires_ms: r.int("max_expires_ms")?,
        renewals: r.int("renewals")?,
        ended_ms: r.opt_int("ended_ms")?,
        end_reason: r.opt_text("end_reason")?,
    })
}

const VERSION_COLS: &str =
    "path, version, created_ms, deleted_ms, destroyed_ms, kek_id, dek_iv, dek_ct, nonce, ciphertext";
const LEASE_COLS: &str = "id, namespace, service_account, pod_name, pod_uid, path, version, \
     created_ms, expires_ms, max_expires_ms, renewals, ended_ms, end_reason";

impl Store {
    /// Opens `sqlite:///path/to/broker.db` (created if missing; WAL, synchronous=FULL) or
    /// `postgres://...`, and applies migrations.
    pub async fn connect(url: &str) -> Result<Store> {
        let store = if url.starts_with("sqlite:") {
            let opts = SqliteConnectOptions::from_str(url)
                .map_err(|e| StoreError::Other(format!("bad SQLite URL: {e}")))?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Full)
                .busy_timeout(Duration::from_secs(5))
                .foreign_keys(true);
            let pool = SqlitePoolOptions::new()
                .max_connections(8)
                .acquire_timeout(Duration::from_secs(3))
                .connect_with(opts)
                .await?;
            Store::Sqlite(pool)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let pool = PgPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(Duration::from_secs(3))
                .connect(url)
                .await?;
            Store::Postgres(pool)
        } else {
            return Err(StoreError::Other(
                "database URL must start with sqlite: or postgres:".into(),
            ));
        };
        store.migrate().await?;
        Ok(store)
    }

    /// Applies pending migrations.
    pub async fn migrate(&self) -> Result<()> {
        let r = match self {
            Store::Sqlite(p) => sqlx::migrate!("./migrations/sqlite").run(p).await,
            Store::Postgres(p) => sqlx::migrate!("./migrations/postgres").run(p).await,
        };
        r.map_err(|e| StoreError::Other(format!("migration failed: {e}")))
    }

    /// `sqlite` or `postgres`.
    pub fn kind(&self) -> &'static str {
        match self {
            Store::Sqlite(_) => "sqlite",
            Store::Postgres(_) => "postgres",
        }
    }

    /// A cheap round trip, for readiness.
    pub async fn ping(&self) -> Result<()> {
        on_pool!(self, p => sqlx::query("SELECT 1").execute(p).await.map(|_| ()))?;
        Ok(())
    }

    // ---- secrets ---------------------------------------------------------------------

    /// Highest version of `path` (0 if none), including deleted ones.
    pub async fn latest_version(&self, path: &str) -> Result<i64> {
        let v: Option<i64> = on_pool!(self, p => sqlx::query_scalar(
            "SELECT MAX(version) FROM secret_versions WHERE path = $1")
            .bind(path).fetch_one(p).await)?;
        Ok(v.unwrap_or(0))
    }

    /// Inserts version `version` of `path`. [`StoreError::Conflict`] if it already exists.
    pub async fn insert_version(
        &self,
        path: &str,
        version: i64,
        now_ms: i64,
        sealed: &SealedVersion,
    ) -> Result<()> {
        let sql = "INSERT INTO secret_versions \
            (path, version, created_ms, kek_id, dek_iv, dek_ct, nonce, ciphertext) \
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";
        on_pool!(self, p => sqlx::query(sql)
            .bind(path).bind(version).bind(now_ms)
            .bind(sealed.dek.kek_id.to_string())
            .bind(&sealed.dek.iv).bind(&sealed.dek.ciphertext)
            .bind(&sealed.nonce).bind(&sealed.ciphertext)
            .execute(p).await.map(|r| r.rows_affected()))?;
        Ok(())
    }

    /// One version, or the newest version that is not deleted when `version` is `None`.
    pub async fn get_version(
        &self,
        path: &str,
        version: Option<i64>,
    ) -> Result<Option<StoredVersion>> {
        let row = match version {
            Some(v) => {
                let sql = format!(
                    "SELECT {VERSION_COLS} FROM secret_versions WHERE path = $1 AND version = $2"
                );
                on_pool!(self, p => match sqlx::query(&sql).bind(path).bind(v).fetch_optional(p).await? {
                    Some(r) => Some(version_from_row(&r)?),
                    None => None,
                })
            }
            None => {
                let sql = format!(
                    "SELECT {VERSION_COLS} FROM secret_versions WHERE path = $1 \
                     AND deleted_ms IS NULL AND destroyed_ms IS NULL ORDER BY version DESC LIMIT 1"
                );
                on_pool!(self, p => match sqlx::query(&sql).bind(path).fetch_optional(p).await? {
                    Some(r) => Some(version_from_row(&r)?),
                    None => None,
                })
            }
        };
        Ok(row)
    }

    /// Every version of `path`, oldest first (metadata and sealed data).
    pub async fn versions(&self, path: &str) -> Result<Vec<StoredVersion>> {
        let sql =
            format!("SELECT {VERSION_COLS} FROM secret_versions WHERE path = $1 ORDER BY version");
        on_pool!(self, p => {
            let rows = sqlx::query(&sql).bind(path).fetch_all(p).await?;
            rows.iter().map(version_from_row).collect()
        })
    }

    /// Distinct paths under `prefix` (all when empty), sorted.
    pub async fn list_paths(&self, prefix: &str) -> Result<Vec<String>> {
        let p2 = format!("{}/", prefix.trim_end_matches('/'));
        let rows: Vec<String> = if prefix.is_empty() {
            on_pool!(self, p => sqlx::query_scalar(
                "SELECT DISTINCT path FROM secret_versions WHERE destroyed_ms IS NULL ORDER BY path")
                .fetch_all(p).await)?
        } else {
            on_pool!(self, p => sqlx::query_scalar(
                "SELECT DISTINCT path FROM secret_versions WHERE destroyed_ms IS NULL \
                 AND (path = $1 OR substr(path, 1, length($2)) = $2) ORDER BY path")
                .bind(prefix.trim_end_matches('/')).bind(&p2).fetch_all(p).await)?
        };
        Ok(rows)
    }

    /// Soft-deletes every live version of `path` (history kept). Returns how many.
    pub async fn soft_delete(&self, path: &str, now_ms: i64) -> Result<u64> {
        let n = on_pool!(self, p => sqlx::query(
            "UPDATE secret_versions SET deleted_ms = $2 WHERE path = $1 AND deleted_ms IS NULL")
            .bind(path).bind(now_ms).execute(p).await.map(|r| r.rows_affected()))?;
        Ok(n)
    }

    /// Destroys every version of `path`: the encrypted data and wrapped DEKs are erased,
    /// only the metadata row stays. Returns how many.
    pub async fn destroy(&self, path: &str, now_ms: i64) -> Result<u64> {
        let n = on_pool!(self, p => sqlx::query(
            "UPDATE secret_versions SET destroyed_ms = $2, deleted_ms = COALESCE(deleted_ms, $2), \
             dek_iv = NULL, dek_ct = NULL, nonce = NULL, ciphertext = NULL \
             WHERE path = $1 AND destroyed_ms IS NULL")
            .bind(path).bind(now_ms).execute(p).await.map(|r| r.rows_affected()))?;
        Ok(n)
    }

    /// How many live (not destroyed) DEKs each KEK wraps.
    pub async fn deks_per_kek(&self) -> Result<Vec<(String, i64)>> {
        let rows = on_pool!(self, p => {
            let rows = sqlx::query(
                "SELECT kek_id, COUNT(*) AS n FROM secret_versions WHERE destroyed_ms IS NULL \
                 GROUP BY kek_id ORDER BY kek_id")
                .fetch_all(p).await?;
            rows.iter().map(|r| Ok((r.text("kek_id")?, r.int("n")?))).collect::<Result<Vec<_>>>()
        })?;
        Ok(rows)
    }

    // ---- leases ----------------------------------------------------------------------

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
        let sql = format!("SELECT {LEASE_COLS} FROM leases WHERE id = $1");
        on_pool!(self, p => match sqlx::query(&sql).bind(id).fetch_optional(p).await? {
            Some(r) => Ok(Some(lease_from_row(&r)?)),
            None => Ok(None),
        })
    }

    /// Extends an active lease to `new_expires_ms` (capped by its max). Atomic: returns the
    /// updated row, or `None` if the lease is unknown, ended or already expired at `now_ms`.
    pub async fn renew_lease(
        &self,
        id: &str,
        now_ms: i64,
        new_expires_ms: i64,
    ) -> Result<Option<LeaseRow>> {
        let sql = format!(
            "UPDATE leases SET expires_ms = CASE WHEN $3 < max_expires_ms THEN $3 ELSE max_expires_ms END, \
             renewals = renewals + 1 \
             WHERE id = $1 AND ended_ms IS NULL AND expires_ms > $2 RETURNING {LEASE_COLS}"
        );
        on_pool!(self, p => match sqlx::query(&sql).bind(id).bind(now_ms).bind(new_expires_ms)
            .fetch_optional(p).await? {
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

    /// The reaper: marks up to `batch` leases that expired by `now_ms` as ended, and returns
    /// them. Safe with several brokers on one PostgreSQL (`FOR UPDATE SKIP LOCKED`: no lease
    /// is processed twice); SQLite has a single writer.
    pub async fn reap_expired(&self, now_ms: i64, batch: i64) -> Result<Vec<LeaseRow>> {
        let lock = match self {
            Store::Postgres(_) => " FOR UPDATE SKIP LOCKED",
            Store::Sqlite(_) => "",
        };
        let sql = format!(
            "UPDATE leases SET ended_ms = $1, end_reason = 'expired' WHERE id IN \
             (SELECT id FROM leases WHERE ended_ms IS NULL AND expires_ms <= $1 \
              ORDER BY expires_ms LIMIT $2{lock}) RETURNING {LEASE_COLS}"
        );
        on_pool!(self, p => {
            let rows = sqlx::query(&sql).bind(now_ms).bind(batch).fetch_all(p).await?;
            rows.iter().map(lease_from_row).collect()
        })
    }
}

const AUDIT_COLS: &str =
    "seq, time_ms, kind, identity, pod, path, lease_id, outcome, reason, prev_hash, hash";

/// Arbitrary constant naming the audit append lock (`pg_advisory_xact_lock`).
const AUDIT_LOCK_KEY: i64 = 0x6b68_6175_6469_7431; // "khaudit1"

fn audit_from_row(r: &impl RowExt) -> Result<AuditRecord> {
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

static SQLITE_AUDIT_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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
        let insert = format!(
            "INSERT INTO audit ({AUDIT_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
        );
        let head_sql = "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1";
        macro_rules! bind_record {
            ($q:expr, $rec:expr) => {
                $q.bind($rec.seq)
                    .bind($rec.event.time_ms)
                    .bind($rec.event.kind.as_text().into_owned())
                    .bind(&$rec.event.identity)
                    .bind(&$rec.event.pod)
                    .bind(&$rec.event.path)
                    .bind(&$rec.event.lease_id)
                    .bind($rec.event.outcome.as_str())
                    .bind(&$rec.event.reason)
                    .bind(&$rec.prev_hash)
                    .bind(&$rec.hash)
            };
        }
        fn chain(head: Checkpoint, events: Vec<AuditEvent>) -> Vec<AuditRecord> {
            let mut head = head;
            events
                .into_iter()
                .map(|e| {
                    let r = AuditRecord::after(&head, e);
                    head = r.checkpoint();
                    r
                })
                .collect()
        }
        match self {
            Store::Sqlite(p) => {
                let _g = SQLITE_AUDIT_LOCK.lock().await;
                // IMMEDIATE takes the write lock up front: a deferred transaction that reads
                // then writes can fail at once with SQLITE_BUSY under concurrent writers.
                let mut tx = p.begin_with("BEGIN IMMEDIATE").await?;
                let head = match sqlx::query(head_sql).fetch_optional(&mut *tx).await? {
                    Some(r) => Checkpoint {
                        seq: r.int("seq")?,
                        hash: r.text("hash")?,
                    },
                    None => Checkpoint::genesis(),
                };
                let recs = chain(head, events);
                for rec in &recs {
                    bind_record!(sqlx::query(&insert), rec)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                Ok(recs)
            }
            Store::Postgres(p) => {
                let mut tx = p.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(AUDIT_LOCK_KEY)
                    .execute(&mut *tx)
                    .await?;
                let head = match sqlx::query(head_sql).fetch_optional(&mut *tx).await? {
                    Some(r) => Checkpoint {
                        seq: r.int("seq")?,
                        hash: r.text("hash")?,
                    },
                    None => Checkpoint::genesis(),
                };
                let recs = chain(head, events);
                for rec in &recs {
                    bind_record!(sqlx::query(&insert), rec)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                Ok(recs)
            }
        }
    }

    /// The last record's position ([`Checkpoint::genesis`] when the log is empty).
    pub async fn audit_head(&self) -> Result<Checkpoint> {
        let sql = "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1";
        on_pool!(self, p => match sqlx::query(sql).fetch_optional(p).await? {
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

impl Store {
    /// The stored policy document, if any.
    pub async fn load_policies(&self) -> Result<Option<String>> {
        let y: Option<String> = on_pool!(self, p => sqlx::query_scalar(
            "SELECT yaml FROM policies WHERE id = 1").fetch_optional(p).await)?;
        Ok(y)
    }

    /// Replaces the stored policy document.
    pub async fn save_policies(&self, yaml: &str, now_ms: i64) -> Result<()> {
        on_pool!(self, p => sqlx::query(
            "INSERT INTO policies (id, yaml, updated_ms) VALUES (1, $1, $2) \
             ON CONFLICT (id) DO UPDATE SET yaml = excluded.yaml, updated_ms = excluded.updated_ms")
            .bind(yaml).bind(now_ms).execute(p).await.map(|r| r.rows_affected()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_filter_binds_whole_segments() {
        let (cond, params) = LeaseFilter::PathPrefix("team/app/".into()).sql(3);
        assert!(cond.contains("$3") && cond.contains("$4"));
        assert_eq!(
            params,
            vec!["team/app".to_string(), "team/app/".to_string()]
        );
    }
}
