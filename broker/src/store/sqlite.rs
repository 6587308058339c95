//! SQLite only: the write-ahead log's checkpoints, and the process write lock.

use super::*;

/// SQLite's own checkpoint threshold, in pages: a backstop above [`SQLITE_WAL_RESTART_PAGES`].
/// It runs inside the committing connection's commit (in the broker, the audit writer's, with
/// every request waiting) to copy the rest of the log and sync the database file, so it should
/// never be what starts the log over under load; the background checkpoint does that.
pub(super) const SQLITE_WAL_BACKSTOP_PAGES: u32 = 20_000;
/// Log size, in pages (32 MiB), from which the background checkpoint makes sure the log starts
/// over (see [`Store::checkpoint_wal`]). A longer log costs every commit (SQLite looks pages up
/// in it); bench/README.md has the measurements behind the figure.
pub const SQLITE_WAL_RESTART_PAGES: i64 = 8192;

impl Store {
    /// SQLite: copies the write-ahead log into the database file without waiting for readers
    /// or the writer (`PRAGMA wal_checkpoint(PASSIVE)`), so that the connection that commits
    /// past the auto-checkpoint threshold (in the broker, the audit writer, on every request's
    /// path) does not do it inline. Returns the frames in the log and those now in the
    /// database; `None` on PostgreSQL.
    ///
    /// SQLite starts the log over only at the start of a write transaction that finds it wholly
    /// copied, which a writer that never pauses (sustained load) never does: the log would grow
    /// until the automatic checkpoint, inside the audit writer's commit, copies the rest and
    /// syncs the database file with every request waiting. So once the log holds
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
        match &self.pool {
            Pool::Sqlite(p) => {
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
                let _g = self.locks.write.lock().await;
                Ok(Some(passive().await?))
            }
            Pool::Postgres(_) => Ok(None),
        }
    }

    /// SQLite: the process's write lock, held by the audit appends and the lease updates on
    /// the request path. SQLite admits one writer; a writer that finds the database locked
    /// polls with sleeps of up to 100 ms (the busy handler), which queueing on this lock (fair,
    /// woken at once) avoids. `None` on PostgreSQL.
    pub(super) async fn sqlite_write_lock(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        match &self.pool {
            Pool::Sqlite(_) => Some(self.locks.write.lock().await),
            Pool::Postgres(_) => None,
        }
    }
}
