//! Secret versions: insert, read, list, soft delete, destroy.

use super::*;

const SOFT_DELETE_SQL: &str =
    "UPDATE secret_versions SET deleted_ms = $2 WHERE path = $1 AND deleted_ms IS NULL";
const DESTROY_SQL: &str =
    "UPDATE secret_versions SET destroyed_ms = $2, deleted_ms = COALESCE(deleted_ms, $2), \
     dek_iv = NULL, dek_ct = NULL, nonce = NULL, ciphertext = NULL \
     WHERE path = $1 AND destroyed_ms IS NULL";

impl Store {
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
        self.insert_version_audited(path, version, now_ms, sealed, Vec::new)
            .await
            .map(drop)
    }

    /// [`Store::insert_version`], appending the records `events()` gives in the same
    /// transaction (none: no audit lock taken). Lock order: the audit lock, then the KEK lock
    /// (which [`Store::mark_kek_retired`] takes alone).
    pub async fn insert_version_audited(
        &self,
        path: &str,
        version: i64,
        now_ms: i64,
        sealed: &SealedVersion,
        events: impl FnOnce() -> Vec<AuditEvent>,
    ) -> Result<Vec<AuditRecord>> {
        let insert = "INSERT INTO secret_versions \
            (path, version, created_ms, kek_id, dek_iv, dek_ct, nonce, ciphertext) \
            SELECT $1, $2, $3, $4, $5, $6, $7, $8 \
            WHERE NOT EXISTS (SELECT 1 FROM retired_keks WHERE kek_id = $4)";
        let kek = sealed.dek.kek_id.to_string();
        let events = events();
        macro_rules! body {
            ($tx:ident, $db:ty) => {{
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
                let records = if events.is_empty() {
                    Vec::new()
                } else {
                    append_chain_in!($tx, $db, events)
                };
                $tx.commit().await?;
                Ok(records)
            }};
        }
        in_kek_tx!(self, "pg_advisory_xact_lock_shared", !events.is_empty(), tx, Db => body!(tx, Db))
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
        let n = on_pool!(self, p => sqlx::query(SOFT_DELETE_SQL)
            .bind(path).bind(now_ms).execute(p).await.map(|r| r.rows_affected()))?;
        Ok(n)
    }

    /// Destroys every version of `path`: the encrypted data and wrapped DEKs are erased,
    /// only the metadata row stays. Returns how many.
    pub async fn destroy(&self, path: &str, now_ms: i64) -> Result<u64> {
        let n = on_pool!(self, p => sqlx::query(DESTROY_SQL)
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
}

impl Store {
    /// Soft-deletes (or, when `destroy`, destroys) every version of `path` — see
    /// [`Store::soft_delete`] and [`Store::destroy`] — and appends the records `events(n)`
    /// gives for the `n` versions changed, in ONE transaction.
    pub async fn delete_audited(
        &self,
        path: &str,
        destroy: bool,
        now_ms: i64,
        events: impl FnOnce(u64) -> Vec<AuditEvent>,
    ) -> Result<(u64, Vec<AuditRecord>)> {
        let sql = if destroy {
            DESTROY_SQL
        } else {
            SOFT_DELETE_SQL
        };
        in_audit_tx!(self, tx, Db => {
            let n = sqlx::query(sql)
                .bind(path)
                .bind(now_ms)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            let records = append_chain_in!(tx, Db, events(n));
            tx.commit().await?;
            Ok((n, records))
        })
    }
}
