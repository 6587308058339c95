//! [`HotReads`]: the lease hot path's reads on kept connections, and the remembered newest
//! versions guarded by the secrets generation.

use super::*;

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
pub(super) struct Remembered {
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

pub(super) fn sealed_len(v: &StoredVersion) -> usize {
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
pub(super) const LATEST_VERSION_SQL: &str = latest_version_sql!();
/// The newest live version of a path (its columns null when there is none) and the secrets
/// generation, read in one statement: one snapshot.
pub(super) const LATEST_VERSION_AT_SQL: &str = concat!(
    "SELECT g.n AS generation, v.* FROM secrets_generation g LEFT JOIN (",
    latest_version_sql!(),
    ") v ON 1 = 1 WHERE g.id = 1"
);
pub(super) const SECRETS_GENERATION_SQL: &str = "SELECT n FROM secrets_generation WHERE id = 1";
pub(super) const GET_LEASE_SQL: &str =
    concat!("SELECT ", lease_cols!(), " FROM leases WHERE id = $1");

impl Store {
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

    /// The secrets generation and the audit log's last sequence number, read together (one
    /// snapshot): a secret changed after this read has a record after that number.
    pub async fn secrets_generation_and_head(&self) -> Result<(i64, i64)> {
        Ok(on_pool!(self, p => {
            let row = sqlx::query(GENERATION_AND_HEAD_SQL).fetch_one(p).await?;
            (row.int("generation")?, row.int("head")?)
        }))
    }

    /// The paths deleted or destroyed by the records after `after` up to `upto` (sequence
    /// numbers), each once.
    pub async fn secrets_ended_between(&self, after: i64, upto: i64) -> Result<Vec<String>> {
        Ok(
            on_pool!(self, p => sqlx::query_scalar::<_, String>(SECRETS_ENDED_SQL)
            .bind(after)
            .bind(upto)
            .fetch_all(p)
            .await?),
        )
    }
}

const GENERATION_AND_HEAD_SQL: &str = concat!(
    "SELECT (SELECT n FROM secrets_generation WHERE id = 1) AS generation, ",
    "COALESCE((SELECT max(seq) FROM audit), 0) AS head"
);
const SECRETS_ENDED_SQL: &str = concat!(
    "SELECT DISTINCT path FROM audit WHERE seq > $1 AND seq <= $2 AND path IS NOT NULL ",
    "AND outcome = 'ok' AND kind IN ('admin:secret_delete', 'admin:secret_destroy')"
);
