//! The broker's baselines, measured in the bench process on the same machine, the same
//! database server and at the same concurrency as the broker:
//!
//! - **raw-insert**: sqlx alone — one durable single-row INSERT (its own transaction, so one
//!   commit) then a SELECT of that row by primary key. The row is a lease row (the columns
//!   and indexes of the broker's `leases` table) in a table of the bench's own, in a
//!   separate SQLite file (WAL, synchronous=FULL, as the broker opens its file) or a separate
//!   PostgreSQL database on the same cluster (default durable settings). Pool size, busy
//!   timeout and acquire timeout are the broker's.
//! - **raw-jwt**: `keyhaven_broker::auth::Verifier` alone, with the dev issuer's verifier
//!   configuration and JWKS (what the `--dev` broker verifies with), checking a pre-minted
//!   token per client.

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use keyhaven_broker::auth::{DevIssuer, Verifier};
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{PgPool, SqlitePool};

use crate::cli::Db;
use crate::leases::ClientId;
use crate::load::{self, Summary, Window, Worker};

/// The broker's SQLite pool size (`Store::connect`).
pub const SQLITE_POOL: u32 = 8;
/// The broker's PostgreSQL pool size (`Store::connect`).
pub const POSTGRES_POOL: u32 = 16;
/// The broker's pool acquire timeout.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);
/// The broker's SQLite busy timeout.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The baseline table: the broker's `leases` columns and indexes, under another name. The
/// same text works on SQLite and PostgreSQL (BIGINT is an INTEGER on SQLite).
const SCHEMA: [&str; 4] = [
    "CREATE TABLE IF NOT EXISTS bench_leases (
        id              TEXT   PRIMARY KEY,
        namespace       TEXT   NOT NULL,
        service_account TEXT   NOT NULL,
        pod_name        TEXT,
        pod_uid         TEXT,
        path            TEXT   NOT NULL,
        version         BIGINT NOT NULL,
        created_ms      BIGINT NOT NULL,
        expires_ms      BIGINT NOT NULL,
        max_expires_ms  BIGINT NOT NULL,
        renewals        BIGINT NOT NULL DEFAULT 0,
        ended_ms        BIGINT,
        end_reason      TEXT
    )",
    "CREATE INDEX IF NOT EXISTS bench_leases_open_expiry ON bench_leases (expires_ms) WHERE ended_ms IS NULL",
    "CREATE INDEX IF NOT EXISTS bench_leases_subject ON bench_leases (namespace, service_account)",
    "CREATE INDEX IF NOT EXISTS bench_leases_path ON bench_leases (path)",
];

const INSERT: &str = "INSERT INTO bench_leases (id, namespace, service_account, pod_name, \
     pod_uid, path, version, created_ms, expires_ms, max_expires_ms, renewals) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 0)";
const SELECT: &str = "SELECT id, namespace, service_account, pod_name, pod_uid, path, version, \
     created_ms, expires_ms, max_expires_ms, renewals, ended_ms, end_reason \
     FROM bench_leases WHERE id = $1";

/// A pool on the baseline database.
#[derive(Debug, Clone)]
pub enum RawDb {
    /// A SQLite file of its own.
    Sqlite(SqlitePool),
    /// A PostgreSQL database of its own on the broker's cluster.
    Postgres(PgPool),
}

impl RawDb {
    /// Opens (creating) the SQLite file at `path` as the broker opens its own.
    pub async fn sqlite(path: &std::path::Path) -> anyhow::Result<RawDb> {
        let opts = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
            .context("SQLite URL")?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            .max_connections(SQLITE_POOL)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(opts)
            .await
            .context("open the baseline SQLite file")?;
        let db = RawDb::Sqlite(pool);
        db.create_table().await?;
        Ok(db)
    }

    /// Connects to the PostgreSQL database at `url` as the broker does.
    pub async fn postgres(url: &str) -> anyhow::Result<RawDb> {
        let pool = PgPoolOptions::new()
            .max_connections(POSTGRES_POOL)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect(url)
            .await
            .context("connect to the baseline PostgreSQL database")?;
        let db = RawDb::Postgres(pool);
        db.create_table().await?;
        Ok(db)
    }

    /// Which database.
    pub fn kind(&self) -> Db {
        match self {
            RawDb::Sqlite(_) => Db::Sqlite,
            RawDb::Postgres(_) => Db::Postgres,
        }
    }

    /// The pool size.
    pub fn pool_size(&self) -> u32 {
        match self {
            RawDb::Sqlite(p) => p.options().get_max_connections(),
            RawDb::Postgres(p) => p.options().get_max_connections(),
        }
    }

    async fn create_table(&self) -> anyhow::Result<()> {
        for sql in SCHEMA {
            match self {
                RawDb::Sqlite(p) => sqlx::query(sql).execute(p).await.map(|_| ()),
                RawDb::Postgres(p) => sqlx::query(sql).execute(p).await.map(|_| ()),
            }
            .context("create the baseline table")?;
        }
        Ok(())
    }

    /// Inserts one lease-shaped row with id `id`, then reads it back.
    async fn insert_select(&self, id: &str, sa: &str, now_ms: i64) -> Result<(), String> {
        macro_rules! run {
            ($p:expr) => {{
                sqlx::query(INSERT)
                    .bind(id)
                    .bind(crate::leases::NAMESPACE)
                    .bind(sa)
                    .bind(format!("{sa}-0"))
                    .bind("00000000-0000-4000-8000-000000000000")
                    .bind("bench/secret-0")
                    .bind(1_i64)
                    .bind(now_ms)
                    .bind(now_ms + 300_000)
                    .bind(now_ms + 43_200_000)
                    .execute($p)
                    .await
                    .map_err(|e| format!("INSERT: {e}"))?;
                sqlx::query_scalar::<_, String>(SELECT)
                    .bind(id)
                    .fetch_optional($p)
                    .await
                    .map_err(|e| format!("SELECT: {e}"))?
            }};
        }
        let back = match self {
            RawDb::Sqlite(p) => run!(p),
            RawDb::Postgres(p) => run!(p),
        };
        if back.as_deref() != Some(id) {
            return Err(format!("SELECT after INSERT gave {back:?}"));
        }
        Ok(())
    }

    /// Closes the pool.
    pub async fn close(&self) {
        match self {
            RawDb::Sqlite(p) => p.close().await,
            RawDb::Postgres(p) => p.close().await,
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

struct InsertWorker {
    db: RawDb,
    sa: String,
    run: Arc<str>,
    seq: Arc<AtomicU64>,
}

impl Worker for InsertWorker {
    async fn call(&mut self) -> Result<(), String> {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        // Shaped like a broker lease id: namespace/sa/path/<32 hex>.
        let id = format!(
            "{}/{}/bench/secret-0/{}{n:016x}",
            crate::leases::NAMESPACE,
            self.sa,
            self.run
        );
        self.db.insert_select(&id, &self.sa, now_ms()).await
    }
}

/// raw-insert load: `n` tokio tasks sharing the pool, for `window`. Row ids are unique
/// across cells (a random run tag and a counter).
pub async fn insert(
    db: &RawDb,
    ids: &[ClientId],
    n: usize,
    window: Window,
) -> anyhow::Result<Summary> {
    let run: Arc<str> = hex::encode(testkit::random::bytes::<8>()?).into();
    let seq = Arc::new(AtomicU64::new(0));
    let workers = ids
        .iter()
        .take(n)
        .map(|id| InsertWorker {
            db: db.clone(),
            sa: id.service_account.clone(),
            run: run.clone(),
            seq: seq.clone(),
        })
        .collect();
    load::drive_async(workers, window).await
}

struct JwtWorker {
    verifier: Arc<Verifier>,
    token: secrecy::SecretString,
    sa: String,
}

impl Worker for JwtWorker {
    async fn call(&mut self) -> Result<(), String> {
        use secrecy::ExposeSecret;
        let id = self
            .verifier
            .verify_uncached(self.token.expose_secret())
            .await
            .map_err(|e| format!("verify: {e}"))?
            .identity;
        if id.service_account != self.sa || id.namespace != crate::leases::NAMESPACE {
            return Err(format!("verified as {}", id.subject()));
        }
        Ok(())
    }
}

/// A verifier of the dev issuer's tokens, as the `--dev` broker builds it, with its key set
/// already fetched.
pub async fn verifier(issuer: &DevIssuer) -> anyhow::Result<Arc<Verifier>> {
    let v = Verifier::new(
        keyhaven_broker::auth::dev_verifier_config(),
        keyhaven_broker::auth::dev_jwks_source(issuer),
    )
    .context("build the token verifier")?;
    v.refresh().await.context("load the dev JWKS")?;
    Ok(Arc::new(v))
}

/// raw-jwt load: `n` tokio tasks, each verifying its client's token, for `window`.
pub async fn jwt(
    verifier: &Arc<Verifier>,
    ids: &[ClientId],
    n: usize,
    window: Window,
) -> anyhow::Result<Summary> {
    let workers = ids
        .iter()
        .take(n)
        .map(|id| JwtWorker {
            verifier: verifier.clone(),
            token: secrecy::SecretString::from(id.token()),
            sa: id.service_account.clone(),
        })
        .collect();
    load::drive_async(workers, window).await
}
