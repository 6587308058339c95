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

/// Runs the same body against whichever pool this store has.
macro_rules! on_pool {
    ($self:expr, $pool:ident => $body:expr) => {
        match &$self.pool {
            Pool::Sqlite($pool) => $body,
            Pool::Postgres($pool) => $body,
        }
    };
}

#[macro_use]
mod rows;
#[macro_use]
mod audit;
mod db_credentials;
mod error;
mod hot_reads;
mod leases;
mod policies;
mod renewals;
mod replicas;
mod rotation;
mod secrets;
mod sqlite;

pub use audit::AuditAppender;
pub use db_credentials::{DbCap, DbCredentialCount, DbCredentialRow, Reservation, RoleRemoval};
pub use error::{Result, StoreError};
pub use hot_reads::{HotReads, REMEMBERED_BYTES, REMEMBERED_MAX_VERSION_BYTES, REMEMBERED_PATHS};
pub use policies::{PolicyApplied, StoredPolicies};
pub use renewals::{RenewedLease, Renewing};
pub use replicas::ReplicaRow;
pub use rotation::{KekUsage, RewrapActivity, RewrapClaim, RewrapRow, Rewrapped, RotationGuard};
pub use rows::{LeaseFilter, LeaseRow, StoredVersion};
pub use sqlite::SQLITE_WAL_RESTART_PAGES;

#[allow(unused_imports)]
use self::{audit::*, hot_reads::*, rotation::*, rows::*, sqlite::*};

/// The broker's database: a pool, and the locks this store's users share.
#[derive(Debug, Clone)]
pub struct Store {
    pool: Pool,
    locks: std::sync::Arc<Locks>,
}

/// The connection pool of either database.
#[derive(Debug, Clone)]
pub enum Pool {
    /// Embedded SQLite file.
    Sqlite(SqlitePool),
    /// PostgreSQL server.
    Postgres(PgPool),
}

/// SQLite admits one writer and one broker per file: these queue this store's writers
/// (fair, woken at once) instead of SQLite's busy handler polling. Unused on PostgreSQL, where
/// advisory locks in the database do the same across replicas.
#[derive(Debug, Default)]
struct Locks {
    /// Audit appends and lease updates ([`Store::sqlite_write_lock`]).
    write: tokio::sync::Mutex<()>,
    /// The rotation decision ([`Store::rotation_lock`]).
    rotate: std::sync::Arc<tokio::sync::Mutex<()>>,
}

/// A pooled connection kept out of the pool ([`AuditAppender`], [`HotReads`]).
enum HeldConn {
    Sqlite(sqlx::pool::PoolConnection<sqlx::Sqlite>),
    Postgres(sqlx::pool::PoolConnection<sqlx::Postgres>),
}

impl HeldConn {
    async fn acquire(store: &Store) -> Result<HeldConn> {
        Ok(match &store.pool {
            Pool::Sqlite(p) => HeldConn::Sqlite(p.acquire().await?),
            Pool::Postgres(p) => HeldConn::Postgres(p.acquire().await?),
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
}

impl Store {
    /// A store over an open pool (migrations not applied: see [`Store::connect`]).
    pub fn from_pool(pool: Pool) -> Store {
        Store {
            pool,
            locks: std::sync::Arc::default(),
        }
    }

    /// The connection pool (tests and tools that need raw SQL).
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

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
            Store::from_pool(Pool::Sqlite(pool))
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let pool = PgPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(Duration::from_secs(3))
                .connect(url)
                .await?;
            Store::from_pool(Pool::Postgres(pool))
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
        let r = match &self.pool {
            Pool::Sqlite(p) => sqlx::migrate!("./migrations/sqlite").run(p).await,
            Pool::Postgres(p) => sqlx::migrate!("./migrations/postgres").run(p).await,
        };
        r.map_err(|e| StoreError::Other(format!("migration failed: {e}")))
    }

    /// `sqlite` or `postgres`.
    pub fn kind(&self) -> &'static str {
        match &self.pool {
            Pool::Sqlite(_) => "sqlite",
            Pool::Postgres(_) => "postgres",
        }
    }

    /// A cheap round trip, for readiness.
    pub async fn ping(&self) -> Result<()> {
        on_pool!(self, p => sqlx::query("SELECT 1").execute(p).await.map(|_| ()))?;
        Ok(())
    }
}

impl Store {
    /// The pool's size.
    pub fn max_connections(&self) -> u32 {
        on_pool!(self, p => p.options().get_max_connections())
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
