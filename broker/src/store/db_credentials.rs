//! Dynamic database credentials: role definitions and one row per database role the broker
//! creates (see migration 0007). A row is written `pending` before its role exists, so nothing
//! the broker creates is ever unrecorded.

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reservation {
    /// The row is written `pending`.
    Reserved,
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
     state, created_ms, valid_until_ms, attempts, next_attempt_ms, last_error";

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
    })
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
        if defined == 0 {
            Reservation::NoRole
        } else if mine >= i64::from($per_identity) {
            Reservation::Capped(DbCap::PerIdentity($per_identity))
        } else if total >= i64::from($total) {
            Reservation::Capped(DbCap::Total($total))
        } else {
            sqlx::query(&format!(
                "INSERT INTO db_credentials ({CRED_COLS}) \
                 VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7, $8, 0, 0, NULL)"
            ))
            .bind(&$row.lease_id)
            .bind(&$row.connection)
            .bind(&$row.role)
            .bind(&$row.username)
            .bind(&$row.namespace)
            .bind(&$row.service_account)
            .bind($row.created_ms)
            .bind($row.valid_until_ms)
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
    /// so concurrent requests on any replica never overshoot); the cap that refused it.
    pub async fn reserve_db_credential(
        &self,
        row: &DbCredentialRow,
        max_per_identity: u32,
        max_total: u32,
    ) -> Result<Reservation> {
        let _g = self.sqlite_write_lock().await;
        match &self.pool {
            Pool::Sqlite(p) => {
                // IMMEDIATE: the write lock from the start, so the read-then-insert never
                // fails with "database is locked" when another connection wrote in between.
                let mut tx = p.begin_with("BEGIN IMMEDIATE").await?;
                let r = reserve_body!(tx, row, max_per_identity, max_total);
                tx.commit().await?;
                Ok(r)
            }
            Pool::Postgres(p) => {
                let mut tx = p.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(PG_DB_CAP_LOCK)
                    .execute(&mut *tx)
                    .await?;
                let r = reserve_body!(tx, row, max_per_identity, max_total);
                tx.commit().await?;
                Ok(r)
            }
        }
    }

    /// Deletes `connection`'s role definition `role` (all of them when `None`) unless a
    /// credential of theirs is live; under the reservation's lock, so no credential is made
    /// from a definition being deleted.
    pub async fn delete_db_roles(
        &self,
        connection: &str,
        role: Option<&str>,
    ) -> Result<RoleRemoval> {
        let _g = self.sqlite_write_lock().await;
        match &self.pool {
            Pool::Sqlite(p) => {
                // IMMEDIATE: the write lock from the start, so the read-then-insert never
                // fails with "database is locked" when another connection wrote in between.
                let mut tx = p.begin_with("BEGIN IMMEDIATE").await?;
                let r = delete_roles_body!(tx, connection, role);
                tx.commit().await?;
                Ok(r)
            }
            Pool::Postgres(p) => {
                let mut tx = p.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(PG_DB_CAP_LOCK)
                    .execute(&mut *tx)
                    .await?;
                let r = delete_roles_body!(tx, connection, role);
                tx.commit().await?;
                Ok(r)
            }
        }
    }

    /// Marks a credential's lease committed.
    pub async fn activate_db_credential(&self, lease_id: &str) -> Result<()> {
        let _g = self.sqlite_write_lock().await;
        on_pool!(self, p => sqlx::query(
            "UPDATE db_credentials SET state = 'active' WHERE lease_id = $1 AND state = 'pending'")
            .bind(lease_id).execute(p).await.map(|_| ()))?;
        Ok(())
    }

    /// Marks a credential whose lease will not be stored (its creation failed, or the lease
    /// was not committed): its role, if any, is dropped at the revoker's next pass.
    pub async fn abandon_db_credential(&self, lease_id: &str) -> Result<()> {
        let _g = self.sqlite_write_lock().await;
        on_pool!(self, p => sqlx::query(
            "UPDATE db_credentials SET state = 'dropping' WHERE lease_id = $1 AND state = 'pending'")
            .bind(lease_id).execute(p).await.map(|_| ()))?;
        Ok(())
    }

    /// One credential by lease id.
    pub async fn get_db_credential(&self, lease_id: &str) -> Result<Option<DbCredentialRow>> {
        let sql = format!("SELECT {CRED_COLS} FROM db_credentials WHERE lease_id = $1");
        on_pool!(self, p => match sqlx::query(&sql).bind(lease_id).fetch_optional(p).await? {
            Some(r) => Ok(Some(cred_from_row(&r)?)),
            None => Ok(None),
        })
    }

    /// Records a credential's new `VALID UNTIL`.
    pub async fn set_db_valid_until(&self, lease_id: &str, valid_until_ms: i64) -> Result<()> {
        let _g = self.sqlite_write_lock().await;
        on_pool!(self, p => sqlx::query(
            "UPDATE db_credentials SET valid_until_ms = $2 WHERE lease_id = $1")
            .bind(lease_id).bind(valid_until_ms).execute(p).await.map(|_| ()))?;
        Ok(())
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
            "SELECT {CRED_COLS} FROM db_credentials c WHERE c.state <> 'dropped' \
             AND c.next_attempt_ms <= $4 \
             AND (c.state <> 'pending' OR c.created_ms <= $2) \
             AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.id = c.lease_id \
                             AND l.ended_ms IS NULL AND l.expires_ms > $1) \
             ORDER BY c.next_attempt_ms, c.created_ms LIMIT $3"
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
        Ok(on_pool!(self, p => sqlx::query_scalar(
            "SELECT COUNT(*) FROM db_credentials c WHERE c.state <> 'dropped' \
             AND (c.state <> 'pending' OR c.created_ms <= $2) \
             AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.id = c.lease_id \
                             AND l.ended_ms IS NULL AND l.expires_ms > $1)")
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

    /// Marks a credential's role gone from the database.
    pub async fn mark_db_dropped(&self, lease_id: &str, now_ms: i64) -> Result<()> {
        let _g = self.sqlite_write_lock().await;
        on_pool!(self, p => sqlx::query(
            "UPDATE db_credentials SET state = 'dropped', dropped_ms = $2, last_error = NULL \
             WHERE lease_id = $1")
            .bind(lease_id).bind(now_ms).execute(p).await.map(|_| ()))?;
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
