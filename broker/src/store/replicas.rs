//! The replica registry: each broker replica's row, refreshed by its heartbeat.

use super::*;

/// One broker replica, as it last reported itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaRow {
    /// Host name and process id.
    pub name: String,
    /// The broker's version.
    pub version: String,
    /// When it started.
    pub started_ms: i64,
    /// Its last heartbeat.
    pub heartbeat_ms: i64,
    /// The policy generation it enforces.
    pub policy_generation: i64,
    /// The primary broker KEK it encrypts new secrets under, if any.
    pub primary_kek: Option<String>,
}

impl Store {
    /// Records (or refreshes) a replica's row.
    pub async fn heartbeat(&self, r: &ReplicaRow) -> Result<()> {
        on_pool!(self, p => sqlx::query(
            "INSERT INTO replicas (name, version, started_ms, heartbeat_ms, policy_generation, \
             primary_kek) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (name) DO UPDATE SET version = excluded.version, \
             started_ms = excluded.started_ms, heartbeat_ms = excluded.heartbeat_ms, \
             policy_generation = excluded.policy_generation, primary_kek = excluded.primary_kek")
            .bind(&r.name).bind(&r.version).bind(r.started_ms).bind(r.heartbeat_ms)
            .bind(r.policy_generation).bind(&r.primary_kek)
            .execute(p).await.map(|r| r.rows_affected()))?;
        Ok(())
    }

    /// Every replica row, newest heartbeat first.
    pub async fn replicas(&self) -> Result<Vec<ReplicaRow>> {
        on_pool!(self, p => sqlx::query(
            "SELECT name, version, started_ms, heartbeat_ms, policy_generation, primary_kek \
             FROM replicas ORDER BY heartbeat_ms DESC, name")
            .fetch_all(p).await?.iter().map(|r| Ok(ReplicaRow {
                name: r.text("name")?,
                version: r.text("version")?,
                started_ms: r.int("started_ms")?,
                heartbeat_ms: r.int("heartbeat_ms")?,
                policy_generation: r.int("policy_generation")?,
                primary_kek: r.opt_text("primary_kek")?,
            })).collect())
    }

    /// Removes the rows of replicas silent since before `before_ms`; returns how many.
    pub async fn forget_replicas(&self, before_ms: i64) -> Result<u64> {
        Ok(
            on_pool!(self, p => sqlx::query("DELETE FROM replicas WHERE heartbeat_ms < $1")
            .bind(before_ms).execute(p).await.map(|r| r.rows_affected()))?,
        )
    }
}
