//! Active leases for the memory reading, written straight into the broker's own `leases`
//! table while it runs (through the API they would take minutes): the broker's columns, its
//! lease-id shape (`namespace/sa/path/<32 hex>`), 1,000 service accounts of namespace
//! `bench-mem` with a pod each, the run's secret paths at version 1, expiring in an hour
//! (before the end of the run neither the reaper nor a renewal limit touches them). No audit
//! records are written for them: they only have to exist.

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{Connection, QueryBuilder};

use crate::cli::Db;

/// Namespace of the filled leases (distinct from the load clients').
pub const NAMESPACE: &str = "bench-mem";
/// Service accounts the filled leases are spread over.
const HOLDERS: usize = 1000;
/// Rows per INSERT statement (13 parameters each: under SQLite's and PostgreSQL's limits).
const BATCH: usize = 500;

/// Inserts `count` active leases into the broker database at `url` (the broker's URL) in one
/// transaction; returns how long it took.
pub async fn leases(db: Db, url: &str, count: usize) -> anyhow::Result<Duration> {
    let t0 = std::time::Instant::now();
    match db {
        Db::Sqlite => {
            let opts = SqliteConnectOptions::from_str(url)
                .context("SQLite URL")?
                .busy_timeout(Duration::from_secs(30));
            let mut c = sqlx::SqliteConnection::connect_with(&opts)
                .await
                .context("open the broker's SQLite file")?;
            let mut tx = c.begin().await?;
            for start in (0..count).step_by(BATCH) {
                let mut q = QueryBuilder::<sqlx::Sqlite>::new(INSERT_HEAD);
                push_rows(&mut q, start, count)?;
                q.build().execute(&mut *tx).await.context("insert leases")?;
            }
            tx.commit().await.context("commit the leases")?;
            c.close().await.ok();
        }
        Db::Postgres => {
            let mut c = sqlx::PgConnection::connect(url)
                .await
                .context("connect to the broker's database")?;
            let mut tx = c.begin().await?;
            for start in (0..count).step_by(BATCH) {
                let mut q = QueryBuilder::<sqlx::Postgres>::new(INSERT_HEAD);
                push_rows(&mut q, start, count)?;
                q.build().execute(&mut *tx).await.context("insert leases")?;
            }
            tx.commit().await.context("commit the leases")?;
            c.close().await.ok();
        }
    }
    Ok(t0.elapsed())
}

const INSERT_HEAD: &str = "INSERT INTO leases (id, namespace, service_account, pod_name, \
     pod_uid, path, version, created_ms, expires_ms, max_expires_ms, renewals) ";

/// Appends `VALUES (...)` rows `start..min(start + BATCH, count)`.
fn push_rows<'a, DB>(q: &mut QueryBuilder<'a, DB>, start: usize, count: usize) -> anyhow::Result<()>
where
    DB: sqlx::Database,
    String: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("clock before 1970")?
        .as_millis();
    let now = i64::try_from(now).context("clock out of range")?;
    let mut rows = Vec::with_capacity(BATCH);
    for i in start..(start + BATCH).min(count) {
        let sa = format!("holder-{}", i % HOLDERS);
        let path = format!("bench/secret-{}", i % crate::leases::SECRETS);
        let id = format!(
            "{NAMESPACE}/{sa}/{path}/{}",
            hex::encode(testkit::random::bytes::<16>()?)
        );
        rows.push((id, sa, path));
    }
    q.push_values(rows, |mut b, (id, sa, path)| {
        b.push_bind(id)
            .push_bind(NAMESPACE.to_owned())
            .push_bind(sa.clone())
            .push_bind(format!("{sa}-0"))
            .push_bind("00000000-0000-4000-8000-000000000000".to_owned())
            .push_bind(path)
            .push_bind(1_i64)
            .push_bind(now)
            .push_bind(now + 3_600_000)
            .push_bind(now + 43_200_000)
            .push_bind(0_i64);
    });
    Ok(())
}
