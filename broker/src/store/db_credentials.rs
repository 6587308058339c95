//! Dynamic database credentials: role definitions and one row per database role the broker
//! creates (see the `db_credentials` migrations). A row is written `pending` before its role
//! exists, so nothing the broker creates is ever unrecorded. A shared credential's other
//! leases are rows of `db_credential_leases`.

use super::*;

/// A credential's row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbCredentialRow {
    /// The lease it belongs to.
    pub lease_id: String,
    /// Connection name.
    pub connection: String,
    /// Role definition name.
    pub role: String,
    /// The database role's name.
    pub username: String,
    /// Holder's namespace.
    pub namespace: String,
    /// Holder's service account.
    pub service_account: String,
    /// `pending`, `active`, `dropping` (its lease was never stored) or `dropped`.
    pub state: String,
    /// When the row was written.
    pub created_ms: i64,
    /// The role's `VALID UNTIL`.
    pub valid_until_ms: i64,
    /// Failed drop attempts so far.
    pub attempts: i64,
    /// Not retried before this.
    pub next_attempt_ms: i64,
    /// Why the last drop failed (a fixed message, never the database's).
    pub last_error: Option<String>,
    /// Shared by the leases of one service account (`share: per-serviceaccount`).
    pub shared: bool,
    /// A shared credential's end of life: no lease of it outlives this.
    pub ends_ms: Option<i64>,
}

/// Which cap refused a credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbCap {
    /// `max_per_identity`.
    PerIdentity(u32),
    /// `max_total`.
    Total(u32),
}

/// What [`Store::reserve_db_credential`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reservation {
    /// The row is written `pending`.
    Reserved,
    /// The lease joins this shared credential (its `db_credential_leases` row is written).
    Joined(Box<DbCredentialRow>),
    /// A cap refused it.
    Capped(DbCap),
    /// The role definition is gone (deleted since it was read).
    NoRole,
}

/// What [`Store::delete_db_roles`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoleRemoval {
    /// Deleted this many definitions.
    Deleted(u64),
    /// Refused: this many credentials are live.
    InUse(i64),
}

/// Live credentials per connection, role and state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbCredentialCount {
    /// Connection.
    pub connection: String,
    /// Role.
    pub role: String,
    /// State.
    pub state: String,
    /// How many.
    pub count: i64,
}

const CRED_COLS: &str = "lease_id, connection, role, username, namespace, service_account, \
     state, created_ms, valid_until_ms, attempts, next_attempt_ms, last_error, shared, ends_ms";

/// SQL: credential `c` has no live lease — neither its own (`c.lease_id`) nor one that joined
/// it, where a joined lease not stored yet counts as live for the pending grace. `$1` is now,
/// `$2` now minus the grace.
fn no_live_lease(c: &str) -> String {
    format!(
        "NOT EXISTS (SELECT 1 FROM leases l WHERE l.id = {c}.lease_id \
                     AND l.ended_ms IS NULL AND l.expires_ms > $1) \
         AND NOT EXISTS (SELECT 1 FROM db_credential_leases j LEFT JOIN leases l ON l.id = j.lease_id \
                         WHERE j.credential = {c}.lease_id \
                         AND ((l.id IS NULL AND j.created_ms > $2) \
                              OR (l.ended_ms IS NULL AND l.expires_ms > $1)))"
    )
}

/// SQL: credential `c` is due to be dropped — not dropped, a `pending` one only after the
/// grace, and no live lease (`$1`, `$2` as in [`no_live_lease`]).
fn droppable(c: &str) -> String {
    format!(
        "{c}.state <> 'dropped' AND ({c}.state <> 'pending' OR {c}.created_ms <= $2) AND {}",
        no_live_lease(c)
    )
}

/// Arbitrary constant naming the credential-reservation lock (`pg_advisory_xact_lock`).
const PG_DB_CAP_LOCK: i64 = 0x6b68_6462_6361_7000;

fn cred_from_row(r: &impl RowExt) -> Result<DbCredentialRow> {
    Ok(DbCredentialRow {
        lease_id: r.text("lease_id")?,
        connection: r.text("connection")?,
        role: r.text("role")?,
        username: r.text("username")?,
        namespace: r.text("namespace")?,
        service_account: r.text("service_account")?,
        state: r.text("state")?,
        created_ms: r.int("created_ms")?,
        valid_until_ms: r.int("valid_until_ms")?,
        attempts: r.int("attempts")?,
        next_attempt_ms: r.int("next_attempt_ms")?,
        last_error: r.opt_text("last_error")?,
        shared: r.int("shared")? != 0,
        ends_ms: r.opt_int("ends_ms")?,
    })
}

/// Runs `$body` in a transaction holding the credential-caps lock (SQLite: `BEGIN IMMEDIATE`,
/// the write lock from the start, so a read-then-write never fails with "database is locked";
/// PostgreSQL: an advisory lock), so concurrent requests on any replica are serialised.
macro_rules! under_caps_lock {
    ($self:expr, $tx:ident => $body:expr) => {{
        let _g = $self.sqlite_write_lock().await;
        match &$self.pool {
            Pool::Sqlite(p) => {
                let mut $tx = p.begin_with("BEGIN IMMEDIATE").await?;
                let r = $body;
                $tx.commit().await?;
                Ok(r)
            }
            Pool::Postgres(p) => {
                let mut $tx = p.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(PG_DB_CAP_LOCK)
                    .execute(&mut *$tx)
                    .await?;
                let r = $body;
                $tx.commit().await?;
                Ok(r)
            }
        }
    }};
}

/// Counts a row against the caps while it is not dropped.
macro_rules! reserve_body {
    ($tx:expr, $row:expr, $per_identity:expr, $total:expr) => {{
        let defined: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM db_roles WHERE connection = $1 AND role = $2")
                .bind(&$row.connection)
                .bind(&$row.role)
                .fetch_one(&mut *$tx)
                .await?;
        let total: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM db_credentials \
             WHERE connection = $1 AND role = $2 AND state <> 'dropped'",
        )
        .bind(&$row.connection)
        .bind(&$row.role)
        .fetch_one(&mut *$tx)
        .await?;
        let mine: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM db_credentials WHERE connection = $1 AND role = $2 \
             AND namespace = $3 AND service_account = $4 AND state <> 'dropped'",
        )
        .bind(&$row.connection)
        .bind(&$row.role)
        .bind(&$row.namespace)
        .bind(&$row.service_account)
        .fetch_one(&mut *$tx)
        .await?;
        let joinable = if $row.shared && defined > 0 {
            sqlx::query(&format!(
                "SELECT {CRED_COLS} FROM db_credentials WHERE connection = $1 AND role = $2 \
                 AND namespace = $3 AND service_account = $4 AND shared = 1 \
                 AND state = 'active' AND ends_ms >= $5 ORDER BY created_ms DESC LIMIT 1"
            ))
            .bind(&$row.connection)
            .bind(&$row.role)
            .bind(&$row.namespace)
            .bind(&$row.service_account)
            .bind($row.valid_until_ms)
            .fetch_optional(&mut *$tx)
            .await?
            .map(|r| cred_from_row(&r))
            .transpose()?
        } else {
            None
        };
        if defined == 0 {
            Reservation::NoRole
        } else if let Some(c) = joinable {
            sqlx::query(
                "INSERT INTO db_credential_leases (lease_id, credential, created_ms) \
                 VALUES ($1, $2, $3)",
            )
            .bind(&$row.lease_id)
            .bind(&c.lease_id)
            .bind($row.created_ms)
            .execute(&mut *$tx)
            .await?;
            Reservation::Joined(Box::new(c))
        } else if mine >= i64::from($per_identity) {
            Reservation::Capped(DbCap::PerIdentity($per_identity))
        } else if total >= i64::from($total) {
            Reservation::Capped(DbCap::Total($total))
        } else {
            sqlx::query(&format!(
                "INSERT INTO db_credentials ({CRED_COLS}) \
                 VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7, $8, 0, 0, NULL, $9, $10)"
            ))
            .bind(&$row.lease_id)
            .bind(&$row.connection)
            .bind(&$row.role)
            .bind(&$row.username)
            .bind(&$row.namespace)
            .bind(&$row.service_account)
            .bind($row.created_ms)
            .bind($row.valid_until_ms)
            .bind(i64::from($row.shared))
            .bind($row.ends_ms)
            .execute(&mut *$tx)
            .await?;
            Reservation::Reserved
        }
    }};
}

/// Deletes role definitions of a connection (one, or all) unless a credential of theirs is
/// live.
macro_rules! delete_roles_body {
    ($tx:expr, $connection:expr, $role:expr) => {{
        let live: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM db_credentials WHERE connection = $1 \
             AND ($2 IS NULL OR role = $2) AND state <> 'dropped'",
        )
        .bind($connection)
        .bind($role)
        .fetch_one(&mut *$tx)
        .await?;
        if live > 0 {
            RoleRemoval::InUse(live)
        } else {
            let n = sqlx::query(
                "DELETE FROM db_roles WHERE connection = $1 AND ($2 IS NULL OR role = $2)",
            )
            .bind($connection)
            .bind($role)
            .execute(&mut *$tx)
            .await?
            .rows_affected();
            RoleRemoval::Deleted(n)
        }
    }};
}

impl Store {
    /// This installation's id (made by the first migration that knew it; never changes).
    pub async fn installation_id(&self) -> Result<String> {
        Ok(
            on_pool!(self, p => sqlx::query_scalar("SELECT id FROM installation")
            .fetch_one(p).await)?,
        )
    }

    /// Stores (replaces) a role definition.
    pub async fn put_db_role(
        &self,
        connection: &str,
        role: &str,
        definition: &str,
        now_ms: i64,
    ) -> Result<()> {
        let _g = self.sqlite_write_lock().await;
        on_pool!(self, p => sqlx::query(
            "INSERT INTO db_roles (connection, role, definition, updated_ms) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (connection, role) DO UPDATE SET definition = $3, updated_ms = $4")
            .bind(connection).bind(role).bind(definition).bind(now_ms)
            .execute(p).await.map(|_| ()))?;
        Ok(())
    }

    /// A role definition's text.
    pub async fn get_db_role(&self, connection: &str, role: &str) -> Result<Option<String>> {
        Ok(on_pool!(self, p => sqlx::query_scalar(
            "SELECT definition FROM db_roles WHERE connection = $1 AND role = $2")
            .bind(connection).bind(role).fetch_optional(p).await)?)
    }

    /// Every role definition: (connection, role, definition), in order.
    pub async fn list_db_roles(&self) -> Result<Vec<(String, String, String)>> {
        Ok(on_pool!(self, p => sqlx::query_as(
            "SELECT connection, role, definition FROM db_roles ORDER BY connection, role")
            .fetch_all(p).await)?)
    }

    /// Writes `row` as `pending` unless a cap is reached (checked and written under one lock,
    /// so concurrent requests on any replica never overshoot); the cap that refused it. A
    /// shared `row` first joins its service account's active shared credential that lives at
    /// least until `row.valid_until_ms`, if there is one.
    pub async fn reserve_db_credential(
        &self,
        row: &DbCredentialRow,
        max_per_identity: u32,
        max_total: u32,
    ) -> Result<Reservation> {
        under_caps_lock!(self, tx => reserve_body!(tx, row, max_per_identity, max_total))
    }

    /// Deletes `connection`'s role definition `role` (all of them when `None`) unless a
    /// credential of theirs is live; under the reservation's lock, so no credential is made
    /// from a definition being deleted.
    pub async fn delete_db_roles(
        &self,
        connection: &str,
        role: Option<&str>,
    ) -> Result<RoleRemoval> {
        under_caps_lock!(self, tx => delete_roles_body!(tx, connection, role))
    }

    /// Claims a shared credential for its drop (`dropping`) if it is still due — under the
    /// reservation's lock, so no lease joins it afterwards; `false` when a lease joined it.
    pub async fn claim_db_credential(
        &self,
        lease_id: &str,
        now_ms: i64,
        pending_grace_ms: i64,
    ) -> Result<bool> {
        let sql = format!(
            "UPDATE db_credentials SET state = 'dropping' WHERE lease_id = $3 AND {}",
            droppable("db_credentials")
        );
        under_caps_lock!(self, tx => sqlx::query(&sql)
            .bind(now_ms)
            .bind(now_ms - pending_grace_ms)
            .bind(lease_id)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            == 1)
    }

    /// Marks a credential's lease committed.
    pub async fn activate_db_credential(&self, lease_id: &str) -> Result<()> {
        let _g = self.sqlite_write_lock().await;
        on_pool!(self, p => sqlx::query(
            "UPDATE db_credentials SET state = 'active' WHERE lease_id = $1 AND state = 'pending'")
            .bind(lease_id).execute(p).await.map(|_| ()))?;
        Ok(())
    }

    /// A lease whose credential will not be stored with it (its creation failed, or the lease
    /// was not committed): a credential it created is dropped at the revoker's next pass; a
    /// shared one it joined just loses it.
    pub async fn abandon_db_credential(&self, lease_id: &str) -> Result<()> {
        let _g = self.sqlite_write_lock().await;
        on_pool!(self, p => {
            sqlx::query(
                "UPDATE db_credentials SET state = 'dropping' WHERE lease_id = $1 AND state = 'pending'")
                .bind(lease_id).execute(p).await?;
            sqlx::query("DELETE FROM db_credential_leases WHERE lease_id = $1")
                .bind(lease_id).execute(p).await.map(|_| ())
        })?;
        Ok(())
    }

    /// The credential of a lease: the one it created, or the shared one it joined.
    pub async fn db_credential_of_lease(&self, lease_id: &str) -> Result<Option<DbCredentialRow>> {
        let sql = format!(
            "SELECT {CRED_COLS} FROM db_credentials WHERE lease_id = $1 OR lease_id = \
             (SELECT credential FROM db_credential_leases WHERE lease_id = $1)"
        );
        on_pool!(self, p => match sqlx::query(&sql).bind(lease_id).fetch_optional(p).await? {
            Some(r) => Ok(Some(cred_from_row(&r)?)),
            None => Ok(None),
        })
    }

    /// Every lease of a credential: the one that created it and those that joined it.
    pub async fn leases_of_db_credential(&self, credential: &str) -> Result<Vec<String>> {
        let joined: Vec<String> = on_pool!(self, p => sqlx::query_scalar(
            "SELECT lease_id FROM db_credential_leases WHERE credential = $1 ORDER BY created_ms")
            .bind(credential).fetch_all(p).await)?;
        Ok(std::iter::once(credential.to_owned())
            .chain(joined)
            .collect())
    }

    /// Moves a credential's recorded `VALID UNTIL` to `valid_until_ms` unless it is already
    /// later (leases of a shared credential renew in any order); the recorded value after.
    pub async fn raise_db_valid_until(&self, credential: &str, valid_until_ms: i64) -> Result<i64> {
        let _g = self.sqlite_write_lock().await;
        Ok(on_pool!(self, p => sqlx::query_scalar(
            "UPDATE db_credentials SET valid_until_ms = \
             CASE WHEN valid_until_ms < $2 THEN $2 ELSE valid_until_ms END \
             WHERE lease_id = $1 RETURNING valid_until_ms")
            .bind(credential).bind(valid_until_ms).fetch_one(p).await)?)
    }

    /// Credentials whose role must be dropped now: not dropped, no active lease (ended,
    /// expired or never committed — a `pending` row only after `pending_grace_ms`), and due
    /// for an attempt.
    /// `attempt_by`: only rows due by then (`i64::MAX`: all, for a status listing).
    pub async fn due_db_credentials(
        &self,
        now_ms: i64,
        attempt_by: i64,
        pending_grace_ms: i64,
        limit: i64,
    ) -> Result<Vec<DbCredentialRow>> {
        let sql = format!(
            "SELECT {CRED_COLS} FROM db_credentials c WHERE {} AND c.next_attempt_ms <= $4 \
             ORDER BY c.next_attempt_ms, c.created_ms LIMIT $3",
            droppable("c")
        );
        on_pool!(self, p => {
            let rows = sqlx::query(&sql).bind(now_ms).bind(now_ms - pending_grace_ms).bind(limit)
                .bind(attempt_by).fetch_all(p).await?;
            rows.iter().map(cred_from_row).collect()
        })
    }

    /// How many roles are waiting to be dropped (what [`Store::due_db_credentials`] would
    /// return, whenever their next attempt is).
    pub async fn count_pending_db_drops(&self, now_ms: i64, pending_grace_ms: i64) -> Result<i64> {
        let sql = format!(
            "SELECT COUNT(*) FROM db_credentials c WHERE {}",
            droppable("c")
        );
        Ok(on_pool!(self, p => sqlx::query_scalar(&sql)
            .bind(now_ms).bind(now_ms - pending_grace_ms).fetch_one(p).await)?)
    }

    /// Credentials not dropped for `connection` (what the database should hold).
    pub async fn live_db_credentials(&self, connection: &str) -> Result<Vec<DbCredentialRow>> {
        let sql = format!(
            "SELECT {CRED_COLS} FROM db_credentials \
             WHERE connection = $1 AND state <> 'dropped' ORDER BY created_ms"
        );
        on_pool!(self, p => {
            let rows = sqlx::query(&sql).bind(connection).fetch_all(p).await?;
            rows.iter().map(cred_from_row).collect()
        })
    }

    /// Marks a credential's role gone from the database (and forgets the leases that joined
    /// it).
    pub async fn mark_db_dropped(&self, lease_id: &str, now_ms: i64) -> Result<()> {
        let _g = self.sqlite_write_lock().await;
        on_pool!(self, p => {
            sqlx::query(
                "UPDATE db_credentials SET state = 'dropped', dropped_ms = $2, last_error = NULL \
                 WHERE lease_id = $1")
                .bind(lease_id).bind(now_ms).execute(p).await?;
            sqlx::query("DELETE FROM db_credential_leases WHERE credential = $1")
                .bind(lease_id).execute(p).await.map(|_| ())
        })?;
        Ok(())
    }

    /// Records a failed drop and when to try again.
    pub async fn db_drop_failed(
        &self,
        lease_id: &str,
        next_attempt_ms: i64,
        error: &str,
    ) -> Result<()> {
        let _g = self.sqlite_write_lock().await;
        on_pool!(self, p => sqlx::query(
            "UPDATE db_credentials SET attempts = attempts + 1, next_attempt_ms = $2, \
             last_error = $3 WHERE lease_id = $1")
            .bind(lease_id).bind(next_attempt_ms).bind(error).execute(p).await.map(|_| ()))?;
        Ok(())
    }

    /// Credentials not dropped, by connection, role and state.
    pub async fn count_db_credentials(&self) -> Result<Vec<DbCredentialCount>> {
        let rows: Vec<(String, String, String, i64)> = on_pool!(self, p => sqlx::query_as(
            "SELECT connection, role, state, COUNT(*) FROM db_credentials \
             WHERE state <> 'dropped' GROUP BY connection, role, state \
             ORDER BY connection, role, state")
            .fetch_all(p).await)?;
        Ok(rows
            .into_iter()
            .map(|(connection, role, state, count)| DbCredentialCount {
                connection,
                role,
                state,
                count,
            })
            .collect())
    }
}
