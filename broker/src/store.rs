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
    /// The KEK is retired (or being retired): no DEK may be wrapped by it any more.
    #[error("KEK {0} is retired")]
    KekRetired(String),
    /// The KEK still wraps this many live DEKs (soft-deleted versions included).
    #[error("KEK {kek_id} still wraps {deks} DEKs")]
    KekInUse {
        /// The KEK.
        kek_id: String,
        /// Live DEKs it wraps.
        deks: i64,
    },
    /// A guarded audit append found the secrets generation moved on: a secret version the
    /// batch hands out may be outdated. Nothing was written.
    #[error("secrets changed (generation {current}, the batch was read under {read})")]
    StaleGeneration {
        /// The generation in the database.
        current: i64,
        /// The generation the batch's versions were read under.
        read: i64,
    },
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
    /// Every lease in a namespace.
    Namespace(String),
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
            LeaseFilter::Namespace(namespace) => {
                (format!("namespace = ${first}"), vec![namespace.clone()])
            }
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

/// SQLite's own checkpoint threshold, in pages: a backstop above [`SQLITE_WAL_RESTART_PAGES`].
/// It runs inside the committing connection's commit (in the broker, the audit writer's, with
/// every request waiting): 10-20 ms at full load, to copy the rest of the log and sync the
/// database file. Before the background checkpoint started the log over itself, this was what
/// did it under sustained load, every ~0.2 s at 128 clients (Lease p99 19-23 ms).
const SQLITE_WAL_BACKSTOP_PAGES: u32 = 20_000;
/// Log size, in pages (32 MiB), from which the background checkpoint makes sure the log starts
/// over (see [`Store::checkpoint_wal`]). Measured at 128 clients against leaving it to a
/// backstop of 40,000 pages: the same Lease p99 (16-18 ms), and at 1 client 2,340-2,550
/// instead of 1,740-1,990 Lease/s (SQLite's lookups in a long log cost every commit).
pub const SQLITE_WAL_RESTART_PAGES: i64 = 8192;

// Column lists as literal-producing macros, so `concat!` can build whole statements from them.
macro_rules! version_cols {
    () => {
        "path, version, created_ms, deleted_ms, destroyed_ms, kek_id, dek_iv, dek_ct, nonce, ciphertext"
    };
}
macro_rules! lease_cols {
    () => {
        "id, namespace, service_account, pod_name, pod_uid, path, version, \
         created_ms, expires_ms, max_expires_ms, renewals, ended_ms, end_reason"
    };
}
macro_rules! audit_cols {
    () => {
        "seq, time_ms, kind, identity, pod, path, lease_id, outcome, reason, prev_hash, hash"
    };
}
const VERSION_COLS: &str = version_cols!();
const LEASE_COLS: &str = lease_cols!();

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
                .foreign_keys(true)
                // The broker checkpoints the WAL in the background (`checkpoint_wal`), so the
                // committing connection (the audit writer) need not; this is the backstop.
                .pragma("wal_autocheckpoint", SQLITE_WAL_BACKSTOP_PAGES.to_string());
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

    /// SQLite: copies the write-ahead log into the database file without waiting for readers
    /// or the writer (`PRAGMA wal_checkpoint(PASSIVE)`), so that the connection that commits
    /// past the auto-checkpoint threshold (in the broker, the audit writer, on every request's
    /// path) does not do it inline. Returns the frames in the log and those now in the
    /// database; `None` on PostgreSQL.
    ///
    /// SQLite starts the log over only at the start of a write transaction that finds it wholly
    /// copied, which a writer that never pauses (sustained load) never does: the log would grow
    /// until the automatic checkpoint, inside the audit writer's commit, copies the rest and
    /// syncs the database file (10-20 ms with every request waiting). So once the log holds
    /// [`SQLITE_WAL_RESTART_PAGES`], this copies it again under the process write lock: only
    /// what was committed during the first copy is left, no write transaction of this process
    /// can start meanwhile, and the next one starts the log over. A short log also keeps
    /// SQLite's lookups in it cheap.
    pub async fn checkpoint_wal(&self) -> Result<Option<(i64, i64)>> {
        self.checkpoint_wal_restarting_at(SQLITE_WAL_RESTART_PAGES)
            .await
    }

    /// [`Store::checkpoint_wal`], making sure the log starts over from `restart_pages`.
    pub async fn checkpoint_wal_restarting_at(
        &self,
        restart_pages: i64,
    ) -> Result<Option<(i64, i64)>> {
        match self {
            Store::Sqlite(p) => {
                let passive = || async {
                    let r = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                        .fetch_one(p)
                        .await?;
                    Ok::<_, StoreError>((r.try_get::<i64, _>(1)?, r.try_get::<i64, _>(2)?))
                };
                let (log, done) = passive().await?;
                if log < restart_pages {
                    return Ok(Some((log, done)));
                }
                let _g = SQLITE_WRITE_LOCK.lock().await;
                Ok(Some(passive().await?))
            }
            Store::Postgres(_) => Ok(None),
        }
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

    /// Inserts version `version` of `path`. [`StoreError::Conflict`] if it already exists,
    /// [`StoreError::KekRetired`] if its DEK is wrapped by a retired KEK. Counts the DEK as
    /// one encryption under its KEK. Serialised against [`Store::mark_kek_retired`] (a shared
    /// advisory lock on PostgreSQL, the single writer on SQLite), so a retired KEK never gains
    /// a DEK.
    pub async fn insert_version(
        &self,
        path: &str,
        version: i64,
        now_ms: i64,
        sealed: &SealedVersion,
    ) -> Result<()> {
        let insert = "INSERT INTO secret_versions \
            (path, version, created_ms, kek_id, dek_iv, dek_ct, nonce, ciphertext) \
            SELECT $1, $2, $3, $4, $5, $6, $7, $8 \
            WHERE NOT EXISTS (SELECT 1 FROM retired_keks WHERE kek_id = $4)";
        let kek = sealed.dek.kek_id.to_string();
        macro_rules! body {
            ($tx:expr) => {{
                let n = sqlx::query(insert)
                    .bind(path)
                    .bind(version)
                    .bind(now_ms)
                    .bind(&kek)
                    .bind(&sealed.dek.iv)
                    .bind(&sealed.dek.ciphertext)
                    .bind(&sealed.nonce)
                    .bind(&sealed.ciphertext)
                    .execute(&mut *$tx)
                    .await?
                    .rows_affected();
                if n == 0 {
                    return Err(StoreError::KekRetired(kek));
                }
                sqlx::query(USAGE_SEAL)
                    .bind(&kek)
                    .execute(&mut *$tx)
                    .await?;
                $tx.commit().await?;
                Ok(())
            }};
        }
        match self {
            Store::Sqlite(p) => {
                let mut tx = p.begin_with("BEGIN IMMEDIATE").await?;
                body!(tx)
            }
            Store::Postgres(p) => {
                let mut tx = p.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock_shared($1)")
                    .bind(KEK_LOCK_KEY)
                    .execute(&mut *tx)
                    .await?;
                body!(tx)
            }
        }
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
                on_pool!(self, p => match sqlx::query(LATEST_VERSION_SQL).bind(path).fetch_optional(p).await? {
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
        on_pool!(self, p => match sqlx::query(GET_LEASE_SQL).bind(id).fetch_optional(p).await? {
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
        let _g = self.sqlite_write_lock().await;
        on_pool!(self, p => match sqlx::query(&sql).bind(id).bind(now_ms).bind(new_expires_ms)
            .fetch_optional(p).await? {
            Some(r) => Ok(Some(lease_from_row(&r)?)),
            None => Ok(None),
        })
    }

    /// SQLite: the process's write lock, held by the audit appends and the lease updates on
    /// the request path. SQLite admits one writer; a writer that finds the database locked
    /// polls with sleeps of up to 100 ms (the busy handler), which queueing on this lock (fair,
    /// woken at once) avoids. `None` on PostgreSQL.
    async fn sqlite_write_lock(&self) -> Option<tokio::sync::MutexGuard<'static, ()>> {
        match self {
            Store::Sqlite(_) => Some(SQLITE_WRITE_LOCK.lock().await),
            Store::Postgres(_) => None,
        }
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

// ---- KEK rotation ------------------------------------------------------------------------

/// Counts one sealed DEK under a KEK.
const USAGE_SEAL: &str = "INSERT INTO kek_usage (kek_id, seals, rewraps_in) VALUES ($1, 1, 0) \
     ON CONFLICT (kek_id) DO UPDATE SET seals = kek_usage.seals + 1";
/// Counts `$2` DEKs re-wrapped to a KEK.
const USAGE_REWRAP: &str = "INSERT INTO kek_usage (kek_id, seals, rewraps_in) VALUES ($1, 0, $2) \
     ON CONFLICT (kek_id) DO UPDATE SET rewraps_in = kek_usage.rewraps_in + excluded.rewraps_in";
/// Arbitrary constant naming the KEK lock (`pg_advisory_xact_lock[_shared]`): shared by
/// everything that wraps a DEK, exclusive while a KEK is being retired.
const KEK_LOCK_KEY: i64 = 0x6b68_6b65_6b6c_6b31; // "khkeklk1"
/// Arbitrary constant naming the rotation decision lock (`pg_[try_]advisory_xact_lock`).
const ROTATE_LOCK_KEY: i64 = 0x6b68_726f_7461_7431; // "khrotat1"
/// Re-wrap batch records older than this are pruned.
const REWRAP_LOG_KEEP_MS: i64 = 60 * 60 * 1000;

static SQLITE_ROTATE_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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

enum ClaimInner {
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

enum GuardInner {
    // The transaction holds `pg_advisory_xact_lock`; dropping it rolls back and unlocks.
    Postgres(#[allow(dead_code)] sqlx::Transaction<'static, sqlx::Postgres>),
    Sqlite(#[allow(dead_code)] tokio::sync::MutexGuard<'static, ()>),
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
                inner: match self {
                    Store::Sqlite(p) => ClaimInner::Sqlite(p.clone()),
                    Store::Postgres(p) => ClaimInner::Postgres(p.begin().await?),
                },
                rows: Vec::new(),
                to,
                started,
            });
        }
        let ins: Vec<String> = (0..from.len()).map(|i| format!("${}", i + 4)).collect();
        let lock = match self {
            Store::Postgres(_) => " FOR UPDATE SKIP LOCKED",
            Store::Sqlite(_) => "",
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
        match self {
            Store::Sqlite(p) => {
                let rows = fetch!(p);
                Ok(RewrapClaim {
                    inner: ClaimInner::Sqlite(p.clone()),
                    rows,
                    to,
                    started,
                })
            }
            Store::Postgres(p) => {
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
        let id = kek.to_string();
        let count =
            "SELECT COUNT(*) FROM secret_versions WHERE kek_id = $1 AND destroyed_ms IS NULL";
        let mark = "INSERT INTO retired_keks (kek_id, retired_ms) VALUES ($1, $2) \
                    ON CONFLICT (kek_id) DO NOTHING";
        macro_rules! body {
            ($tx:expr) => {{
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
                $tx.commit().await?;
                Ok(())
            }};
        }
        match self {
            Store::Sqlite(p) => {
                let mut tx = p.begin_with("BEGIN IMMEDIATE").await?;
                body!(tx)
            }
            Store::Postgres(p) => {
                let mut tx = p.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(KEK_LOCK_KEY)
                    .execute(&mut *tx)
                    .await?;
                body!(tx)
            }
        }
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
        match self {
            Store::Sqlite(_) => {
                let g = if wait {
                    SQLITE_ROTATE_LOCK.lock().await
                } else {
                    match SQLITE_ROTATE_LOCK.try_lock() {
                        Ok(g) => g,
                        Err(_) => return Ok(None),
                    }
                };
                Ok(Some(RotationGuard {
                    _inner: GuardInner::Sqlite(g),
                }))
            }
            Store::Postgres(p) => {
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

async fn ensure_not_retired(
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

fn rewrap_row(r: &impl RowExt) -> Result<RewrapRow> {
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

const AUDIT_HEAD_SQL: &str = "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1";
const AUDIT_COLS: &str = audit_cols!();

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

/// Rows per multi-row INSERT: a batch is a handful of statements, not one per row (each
/// statement is a round trip to PostgreSQL, or a hop to SQLite's worker thread).
const ROWS_PER_INSERT: usize = 500;
const INSERT_LEASES: &str = concat!("INSERT INTO leases (", lease_cols!(), ") ");
const INSERT_AUDIT: &str = concat!("INSERT INTO audit (", audit_cols!(), ") ");
/// SQLite, inside an explicit transaction: a constraint failure rolls the whole transaction
/// back. With the default (ABORT) SQLite keeps a statement journal for every multi-row insert,
/// to undo just that statement: a copy of each page it changes, by default in a temporary
/// file created and deleted per statement.
const SQLITE_INSERT_LEASES_OR_ROLLBACK: &str =
    concat!("INSERT OR ROLLBACK INTO leases (", lease_cols!(), ") ");
const SQLITE_INSERT_AUDIT_OR_ROLLBACK: &str =
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
fn chain_after(mut head: Checkpoint, events: Vec<AuditEvent>) -> Vec<AuditRecord> {
    events
        .into_iter()
        .map(|e| {
            let r = AuditRecord::after(&head, e);
            head = r.checkpoint();
            r
        })
        .collect()
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

/// Appends batches to the audit log for its one owner (the broker's audit task): on a
/// connection it keeps (no pool checkout, and so no liveness ping, per batch), after the head
/// its previous append left ([`Store::append_audit_batch_after`]), and under the lock
/// ([`Store::append_audit_batch_with`]) when it knows no head yet or another writer (a
/// replica on the same PostgreSQL) moved the chain on. After any error the connection is
/// closed (rolling back whatever it had open) and the head forgotten.
pub struct AuditAppender {
    store: Store,
    conn: Option<HeldConn>,
    head: Option<Checkpoint>,
}

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
        // A conflict means another writer appended; the locked append that follows reads the
        // head afresh. Every append takes the same lock, so one retry normally suffices; the
        // bound only guards against a log that keeps changing under us.
        const ATTEMPTS: usize = 8;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let r = match self.head.take() {
                Some(h) => {
                    let mut conn = match self.conn.take() {
                        Some(c) => c,
                        None => HeldConn::acquire(&self.store).await?,
                    };
                    let r = conn
                        .append_after(&h, events.to_vec(), leases, generation)
                        .await;
                    match &r {
                        Ok(_) => self.conn = Some(conn),
                        Err(_) => conn.discard(),
                    }
                    r
                }
                None => {
                    self.store
                        .append_audit_batch_at(events.to_vec(), leases, generation)
                        .await
                }
            };
            match r {
                Ok(recs) => {
                    self.head = recs.last().map(AuditRecord::checkpoint);
                    return Ok(recs);
                }
                Err(StoreError::Conflict(e)) if attempt < ATTEMPTS => {
                    tracing::debug!(attempt, error = %e, "audit chain moved on; appending under the lock");
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// A pooled connection kept out of the pool ([`AuditAppender`], [`HotReads`]).
enum HeldConn {
    Sqlite(sqlx::pool::PoolConnection<sqlx::Sqlite>),
    Postgres(sqlx::pool::PoolConnection<sqlx::Postgres>),
}

impl HeldConn {
    async fn acquire(store: &Store) -> Result<HeldConn> {
        Ok(match store {
            Store::Sqlite(p) => HeldConn::Sqlite(p.acquire().await?),
            Store::Postgres(p) => HeldConn::Postgres(p.acquire().await?),
        })
    }

    /// Takes the connection off the pool for good (dropping it closes it, with no task to
    /// spawn: usable outside a runtime).
    fn detach(self) {
        match self {
            HeldConn::Sqlite(c) => drop(c.detach()),
            HeldConn::Postgres(c) => drop(c.detach()),
        }
    }

    /// Closes the connection instead of returning it to the pool: a statement may have failed
    /// between `BEGIN` and `COMMIT`, and closing rolls that transaction back.
    fn discard(self) {
        match self {
            HeldConn::Sqlite(mut c) => c.close_on_drop(),
            HeldConn::Postgres(mut c) => c.close_on_drop(),
        }
    }

    async fn append_after(
        &mut self,
        head: &Checkpoint,
        events: Vec<AuditEvent>,
        leases: &[LeaseRow],
        generation: Option<i64>,
    ) -> Result<Vec<AuditRecord>> {
        if head.seq < 1 {
            return Err(StoreError::Conflict("no audit head known yet".into()));
        }
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let recs = chain_after(head.clone(), events);
        let inserted = match self {
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
                let _g = SQLITE_WRITE_LOCK.lock().await;
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
                sqlx::query(PG_APPEND_AFTER_SQL)
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
                    .bind(generation)
                    .fetch_one(&mut **conn)
                    .await?
                    .try_get::<i64, _>(0)? as usize
            }
        };
        match inserted {
            n if n == recs.len() => Ok(recs),
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

/// The reads on the lease hot path (the version a Lease hands out, the lease a Renew or Revoke
/// names) on connections kept out of the pool. sqlx's pool checks a connection with a ping
/// when it is taken and again when it is given back: a round trip to PostgreSQL or a hop to
/// SQLite's worker thread each, as much as the one-row read itself. Up to `keep` connections
/// are kept; more concurrent reads use the pool as usual. A connection whose query fails is
/// closed, and a read that failed as unavailable on a kept connection closes the other kept
/// ones and is tried once more on a fresh one from the pool (which pings it): a database
/// restart fails no request once the database is back.
pub struct HotReads {
    store: Store,
    idle: std::sync::Mutex<Vec<HeldConn>>,
    keep: usize,
    remembered: std::sync::Mutex<Remembered>,
    remembered_hits: std::sync::atomic::AtomicU64,
    remembered_misses: std::sync::atomic::AtomicU64,
}

/// At most this many paths' newest versions are remembered (then all are forgotten at once).
pub const REMEMBERED_PATHS: usize = 4096;
/// At most this many bytes of ciphertext are remembered (then all are forgotten at once).
pub const REMEMBERED_BYTES: usize = 16 << 20;
/// A version whose ciphertext is larger than this is read every time.
pub const REMEMBERED_MAX_VERSION_BYTES: usize = 256 << 10;

/// The newest live version of recently leased paths, all read under one secrets generation
/// (only ciphertext and the wrapped DEK: no plaintext, no unwrapped key).
#[derive(Default)]
struct Remembered {
    /// The newest secrets generation a read saw; every entry was read under it.
    generation: i64,
    /// Bumped by [`HotReads::forget_versions`]: a read that began before is not kept.
    forgotten: u64,
    versions: std::collections::HashMap<String, std::sync::Arc<StoredVersion>>,
    /// Ciphertext bytes in `versions`.
    bytes: usize,
}

impl Remembered {
    fn clear(&mut self) {
        self.versions.clear();
        self.bytes = 0;
    }
}

fn sealed_len(v: &StoredVersion) -> usize {
    v.sealed.as_ref().map_or(0, |s| {
        s.ciphertext.len() + s.nonce.len() + s.dek.ciphertext.len()
    })
}

impl std::fmt::Debug for HotReads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HotReads")
            .field("keep", &self.keep)
            .finish_non_exhaustive()
    }
}

/// One hot read: `$q` is a `sqlx::query(...)` with its binds, `$conv` turns the optional row.
macro_rules! hot_read {
    ($self:expr, $q:expr, $conv:expr) => {{
        let mut retried = false;
        loop {
            let kept = if retried { None } else { $self.take() };
            let (mut conn, kept) = match kept {
                Some(c) => (c, true),
                None => (HeldConn::acquire(&$self.store).await?, false),
            };
            let r: std::result::Result<_, sqlx::Error> = match &mut conn {
                HeldConn::Sqlite(c) => match $q.fetch_optional(&mut **c).await {
                    Ok(row) => Ok(row.as_ref().map($conv).transpose()),
                    Err(e) => Err(e),
                },
                HeldConn::Postgres(c) => match $q.fetch_optional(&mut **c).await {
                    Ok(row) => Ok(row.as_ref().map($conv).transpose()),
                    Err(e) => Err(e),
                },
            };
            match r {
                Ok(v) => {
                    $self.give_back(conn);
                    break v;
                }
                Err(e) => {
                    conn.discard();
                    let e = StoreError::from(e);
                    if kept && !retried && e.is_unavailable() {
                        // The others were idle as long as this one: likely stale too.
                        $self.discard_idle();
                        retried = true;
                        continue;
                    }
                    break Err(e);
                }
            }
        }
    }};
}

impl Drop for HotReads {
    fn drop(&mut self) {
        // Returning a connection to the pool spawns a task; outside a runtime, close them
        // here instead.
        if tokio::runtime::Handle::try_current().is_err() {
            let idle = std::mem::take(&mut *self.idle.lock().unwrap_or_else(|p| p.into_inner()));
            idle.into_iter().for_each(HeldConn::detach);
        }
    }
}

impl HotReads {
    fn take(&self) -> Option<HeldConn> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    fn discard_idle(&self) {
        let idle = std::mem::take(&mut *self.idle.lock().unwrap_or_else(|p| p.into_inner()));
        idle.into_iter().for_each(HeldConn::discard);
    }

    fn give_back(&self, conn: HeldConn) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < self.keep {
            idle.push(conn);
        }
        // else: dropped, back to the pool.
    }

    /// [`Store::get_version`] of the newest live version.
    pub async fn latest_version(&self, path: &str) -> Result<Option<StoredVersion>> {
        hot_read!(
            self,
            sqlx::query(LATEST_VERSION_SQL).bind(path),
            version_from_row
        )
    }

    /// The newest live version of `path` and the secrets generation it was read under, from
    /// memory when this replica read it before under the newest generation it has seen.
    ///
    /// A remembered version may be outdated: another replica may have written since. It is
    /// safe to hand out only through a lease whose audit append is guarded by the returned
    /// generation ([`AuditAppender::append_at`]): the append then fails, writing nothing,
    /// when any secret changed since, and the caller forgets ([`HotReads::forget_versions`])
    /// and reads again with [`HotReads::latest_version`].
    pub async fn latest_version_remembered(
        &self,
        path: &str,
    ) -> Result<(Option<std::sync::Arc<StoredVersion>>, i64)> {
        use std::sync::atomic::Ordering::Relaxed;
        let forgotten = {
            let m = self.remembered();
            if let Some(v) = m.versions.get(path) {
                self.remembered_hits.fetch_add(1, Relaxed);
                return Ok((Some(std::sync::Arc::clone(v)), m.generation));
            }
            m.forgotten
        };
        self.remembered_misses.fetch_add(1, Relaxed);
        let (generation, version) = hot_read!(
            self,
            sqlx::query(LATEST_VERSION_AT_SQL).bind(path),
            |r| -> Result<(i64, Option<StoredVersion>)> {
                let g = r.int("generation")?;
                match r.opt_text("path")? {
                    Some(_) => Ok((g, Some(version_from_row(r)?))),
                    None => Ok((g, None)),
                }
            }
        )?
        .ok_or_else(|| StoreError::Corrupt("no secrets generation row".into()))?;
        let version = version.map(std::sync::Arc::new);
        let mut m = self.remembered();
        if generation > m.generation {
            m.clear();
            m.generation = generation;
        }
        if let Some(v) = &version {
            let len = sealed_len(v);
            if generation == m.generation
                && forgotten == m.forgotten
                && len <= REMEMBERED_MAX_VERSION_BYTES
            {
                if m.versions.len() >= REMEMBERED_PATHS || m.bytes + len > REMEMBERED_BYTES {
                    m.clear();
                }
                m.bytes += len;
                if let Some(old) = m.versions.insert(path.to_owned(), std::sync::Arc::clone(v)) {
                    m.bytes -= sealed_len(&old);
                }
            }
        }
        Ok((version, generation))
    }

    /// Forgets every remembered version (after this replica changed a secret, or a guarded
    /// append found the generation moved on). Reads already under way are not remembered.
    pub fn forget_versions(&self) {
        let mut m = self.remembered();
        m.clear();
        m.forgotten += 1;
        // The next read sets it: the generation may also have gone back (a restored backup).
        m.generation = i64::MIN;
    }

    /// Lookups answered from memory, and those that read the database.
    pub fn remembered_stats(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.remembered_hits.load(Relaxed),
            self.remembered_misses.load(Relaxed),
        )
    }

    fn remembered(&self) -> std::sync::MutexGuard<'_, Remembered> {
        self.remembered.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// [`Store::get_lease`].
    pub async fn get_lease(&self, id: &str) -> Result<Option<LeaseRow>> {
        hot_read!(self, sqlx::query(GET_LEASE_SQL).bind(id), lease_from_row)
    }
}

/// The unlocked PostgreSQL append ([`Store::append_audit_batch_after`]): the append lock is
/// still taken (inside the statement, before the inserts, which depend on `ok`) — without it,
/// a replica appending under the lock after a conflict could lose every race to unlocked
/// appends. `$28`, when not null, is the secrets generation the batch's versions were read
/// under. Returns the number of audit rows written (0: the head is gone or moved on, or the
/// generation did).
const PG_APPEND_AFTER_SQL: &str = concat!(
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
    "WHERE EXISTS (SELECT 1 FROM ok) RETURNING 1) ",
    "SELECT count(*) FROM a"
);

macro_rules! latest_version_sql {
    () => {
        concat!(
            "SELECT ",
            version_cols!(),
            " FROM secret_versions WHERE path = $1 ",
            "AND deleted_ms IS NULL AND destroyed_ms IS NULL ORDER BY version DESC LIMIT 1"
        )
    };
}
const LATEST_VERSION_SQL: &str = latest_version_sql!();
/// The newest live version of a path (its columns null when there is none) and the secrets
/// generation, read in one statement: one snapshot.
const LATEST_VERSION_AT_SQL: &str = concat!(
    "SELECT g.n AS generation, v.* FROM secrets_generation g LEFT JOIN (",
    latest_version_sql!(),
    ") v ON 1 = 1 WHERE g.id = 1"
);
const SECRETS_GENERATION_SQL: &str = "SELECT n FROM secrets_generation WHERE id = 1";
const GET_LEASE_SQL: &str = concat!("SELECT ", lease_cols!(), " FROM leases WHERE id = $1");

/// One writer at a time on SQLite, in this process: see [`Store::sqlite_write_lock`].
static SQLITE_WRITE_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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
        // Reads the head inside the (already locked) transaction, chains after it, inserts.
        macro_rules! append_in {
            ($tx:ident, $db:ty) => {{
                if let Some(read) = generation {
                    let current: i64 = sqlx::query_scalar(SECRETS_GENERATION_SQL)
                        .fetch_one(&mut *$tx)
                        .await?;
                    if current != read {
                        // Dropping the transaction rolls it back.
                        return Err(StoreError::StaleGeneration { current, read });
                    }
                }
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
                let recs = chain_after(head, events);
                for chunk in leases.chunks(ROWS_PER_INSERT) {
                    let mut q = sqlx::QueryBuilder::<$db>::new(INSERT_LEASES);
                    push_lease_values!(q, chunk);
                    // Not cached: each row count is another statement text.
                    q.build().persistent(false).execute(&mut *$tx).await?;
                }
                for chunk in recs.chunks(ROWS_PER_INSERT) {
                    let mut q = sqlx::QueryBuilder::<$db>::new(INSERT_AUDIT);
                    push_audit_values!(q, chunk);
                    q.build().persistent(false).execute(&mut *$tx).await?;
                }
                $tx.commit().await?;
                Ok(recs)
            }};
        }
        match self {
            Store::Sqlite(p) => {
                let _g = SQLITE_WRITE_LOCK.lock().await;
                // IMMEDIATE takes the write lock up front: a deferred transaction that reads
                // then writes can fail at once with SQLITE_BUSY under concurrent writers.
                let mut tx = p.begin_with("BEGIN IMMEDIATE").await?;
                append_in!(tx, sqlx::Sqlite)
            }
            Store::Postgres(p) => {
                let mut tx = p.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(AUDIT_LOCK_KEY)
                    .execute(&mut *tx)
                    .await?;
                append_in!(tx, sqlx::Postgres)
            }
        }
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
        let r = conn.append_after(head, events, leases, None).await;
        if r.is_err() {
            conn.discard();
        }
        r
    }

    /// Hot-path reads on up to `keep` connections kept out of the pool.
    pub fn hot_reads(&self, keep: usize) -> HotReads {
        HotReads {
            store: self.clone(),
            idle: std::sync::Mutex::new(Vec::new()),
            keep,
            remembered: std::sync::Mutex::default(),
            remembered_hits: std::sync::atomic::AtomicU64::new(0),
            remembered_misses: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The secrets generation: bumped (by a trigger) in every transaction that changes a
    /// secret version.
    pub async fn secrets_generation(&self) -> Result<i64> {
        Ok(on_pool!(self, p => sqlx::query_scalar(SECRETS_GENERATION_SQL).fetch_one(p).await?))
    }

    /// The pool's size.
    pub fn max_connections(&self) -> u32 {
        on_pool!(self, p => p.options().get_max_connections())
    }

    /// The audit log's single writer in this process (the broker's audit task).
    pub fn audit_appender(&self) -> AuditAppender {
        AuditAppender {
            store: self.clone(),
            conn: None,
            head: None,
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
    fn insert_heads_name_the_same_columns_as_the_selects() {
        assert_eq!(INSERT_LEASES, format!("INSERT INTO leases ({LEASE_COLS}) "));
        assert_eq!(INSERT_AUDIT, format!("INSERT INTO audit ({AUDIT_COLS}) "));
        assert!(PG_APPEND_AFTER_SQL.contains(INSERT_LEASES));
        assert!(PG_APPEND_AFTER_SQL.contains(INSERT_AUDIT));
        assert!(LATEST_VERSION_SQL.starts_with(&format!("SELECT {VERSION_COLS} FROM ")));
        assert!(GET_LEASE_SQL.starts_with(&format!("SELECT {LEASE_COLS} FROM ")));
    }

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
