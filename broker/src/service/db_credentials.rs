//! Dynamic database credentials: a database role per lease, born and dropped with it.
//!
//! Order of operations, so that a broker killed anywhere leaves nothing unrecorded:
//! 1. the credential's row is written `pending` (under the caps' lock),
//! 2. the role is created in the target database, `VALID UNTIL` the lease's expiry,
//! 3. the lease is stored with its audit record, then the row marked `active`.
//!
//! A role with `share: per-serviceaccount` gives the leases of one service account one
//! credential (see [`db_shared`](super::db_shared)). The revoker and the reconciler are in
//! [`db_revoker`](super::db_revoker).

use keyhaven_broker_core::dbrole::{self, RoleDef, Share, Values};

use super::leases::{new_lease_id, new_lease_row};
use super::*;
use crate::store::Reservation;
use crate::store::{DbCap, DbCredentialCount, DbCredentialRow};
use crate::target_db::{Target, TargetError};

/// A `pending` row whose lease has not committed after this is dropped (a lease is stored
/// within seconds of its role's creation, or never): the default of `--db-pending-grace`.
pub const PENDING_GRACE: Duration = Duration::from_secs(60);

/// What `brokerctl db status` shows.
#[derive(Debug, Clone, Default)]
pub struct DbStatus {
    /// Live credentials by connection, role and state.
    pub counts: Vec<DbCredentialCount>,
    /// Roles waiting to be dropped, with why the last attempt failed.
    pub pending_drops: Vec<DbCredentialRow>,
    /// The comment marking the roles this installation creates.
    pub marker: String,
}

pub(super) fn target_error(e: TargetError) -> BrokerError {
    if e.is_unavailable() {
        BrokerError::unavailable_by("credential database", e)
    } else {
        BrokerError::FailedPrecondition(e.to_string())
    }
}

pub(super) fn check_segment(what: &str, s: &str) -> Result<()> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && s != "."
        && s != "..";
    if ok {
        Ok(())
    } else {
        Err(BrokerError::InvalidArgument(format!(
            "{what} '{}' must be 1-63 characters of [-._A-Za-z0-9]",
            echo(s)
        )))
    }
}

/// A duration in ms, saturating.
pub(super) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// What a credential's lease carries: the login, a DSN, and where to connect.
fn credential_data(def: &RoleDef, target: &Target, username: &str, password: &str) -> SecretData {
    let dsn = target.endpoint.dsn(username, password, &def.dsn_params);
    SecretData::from_pairs([
        ("username", username.as_bytes().to_vec()),
        ("password", password.as_bytes().to_vec()),
        ("dsn", dsn.as_bytes().to_vec()),
        ("host", target.endpoint.host.as_bytes().to_vec()),
        ("port", target.endpoint.port.to_string().into_bytes()),
        ("database", target.endpoint.database.as_bytes().to_vec()),
    ])
}

/// RFC 3339 UTC of a Unix ms time, for `VALID UNTIL`.
fn rfc3339(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

pub(super) fn random_hex(n: usize) -> Result<Zeroizing<String>> {
    let mut b = Zeroizing::new(vec![0u8; n]);
    getrandom::fill(&mut b[..]).map_err(|_| BrokerError::internal("random number generator"))?;
    Ok(Zeroizing::new(hex::encode(&b[..])))
}

impl Broker {
    pub(super) fn pending_grace_ms(&self) -> i64 {
        millis(self.config.db_pending_grace)
    }

    pub(super) async fn role_def(&self, connection: &str, role: &str) -> Result<RoleDef> {
        let text = self
            .store
            .get_db_role(connection, role)
            .await?
            .ok_or_else(|| {
                BrokerError::NotFound(format!("database role db/{connection}/{role}"))
            })?;
        RoleDef::parse(&text).map_err(|_| BrokerError::internal("stored role definition"))
    }

    /// Makes the credential of a Lease on `db/CONN/ROLE` (steps 1 and 2 of the module's
    /// order), or joins the caller's shared one; the caller stores the lease, then calls
    /// [`Broker::db_lease_stored`].
    pub(super) async fn lease_db(
        &self,
        id: &Identity,
        path: &str,
        connection: &str,
        role: &str,
        ttl: Option<Duration>,
        (policy_ttl, policy_max_ttl): (Duration, Duration),
    ) -> Result<(LeaseGrant, LeaseRow)> {
        let def = self.role_def(connection, role).await?;
        let target = self.target(connection).await?;
        let max_ttl = policy_max_ttl.min(def.max_ttl);
        // Unless asked for, the shorter of the policy's and the role's default.
        let ttl = ttl
            .filter(|t| !t.is_zero())
            .unwrap_or(def.ttl.min(policy_ttl))
            .min(max_ttl);
        let now = now_ms();
        let mut lease = new_lease_row(new_lease_id(id, path)?, id, path, 1, now, ttl, max_ttl);
        let mut r = [0u8; 4];
        getrandom::fill(&mut r).map_err(|_| BrokerError::internal("random number generator"))?;
        let username = dbrole::username(&def.username, &id.namespace, &id.service_account, role, r);
        let shared = def.share == Share::PerServiceaccount;
        let row = DbCredentialRow {
            lease_id: lease.id.clone(),
            connection: connection.to_owned(),
            role: role.to_owned(),
            username: username.clone(),
            namespace: id.namespace.clone(),
            service_account: id.service_account.clone(),
            state: "pending".into(),
            created_ms: now,
            valid_until_ms: lease.expires_ms,
            attempts: 0,
            next_attempt_ms: 0,
            last_error: None,
            shared,
            ends_ms: shared.then(|| now.saturating_add(millis(def.max_ttl))),
        };
        match self
            .store
            .reserve_db_credential(&row, def.max_per_identity, def.max_total)
            .await?
        {
            Reservation::NoRole => {
                return Err(BrokerError::NotFound(format!("database role {path}")));
            }
            Reservation::Capped(DbCap::PerIdentity(n)) => {
                self.metrics.db.capped(connection, role, "max_per_identity");
                return Err(BrokerError::ResourceExhausted(format!(
                    "{path}: this service account holds max_per_identity ({n}) live credentials"
                )));
            }
            Reservation::Capped(DbCap::Total(n)) => {
                self.metrics.db.capped(connection, role, "max_total");
                return Err(BrokerError::ResourceExhausted(format!(
                    "{path}: max_total ({n}) live credentials reached"
                )));
            }
            Reservation::Joined(c) => {
                let r = self.join_shared(&def, &target, &c, &mut lease).await;
                if r.is_err() {
                    self.store.abandon_db_credential(&lease.id).await?;
                }
                let password = r?;
                self.metrics.db.created(connection, role, "joined");
                let data = credential_data(&def, &target, &c.username, &password);
                return Ok((LeaseGrant::of(&lease, data, ttl), lease));
            }
            Reservation::Reserved => {}
        }
        let password = random_hex(24)?;
        if shared {
            // Sealed before the role exists: every lease that joins reads it from there.
            if let Err(e) = self.seal_shared_password(id, &row, &password).await {
                self.store.abandon_db_credential(&lease.id).await?;
                return Err(e);
            }
        }
        let expiration = rfc3339(lease.expires_ms);
        let values = Values {
            name: &username,
            password: &password,
            expiration: &expiration,
        };
        let created = match dbrole::render(&def.creation, &values) {
            Ok(sql) => target.run("creation", &sql, Some(&username)).await,
            Err(_) => Err(TargetError::Statement {
                what: "creation",
                code: None,
            }),
        };
        if let Err(e) = created {
            self.metrics.db.created(connection, role, "error");
            // The statements ran in one transaction: nothing was created. The row is dropped
            // at once (it checks, and drops whatever is there).
            self.store.abandon_db_credential(&lease.id).await?;
            tracing::warn!(path, lease_id = lease.id, error = %e, "credential not created");
            return Err(target_error(e));
        }
        self.metrics.db.created(connection, role, "ok");
        let data = credential_data(&def, &target, &username, &password);
        Ok((LeaseGrant::of(&lease, data, ttl), lease))
    }

    /// Step 3: the lease of a credential was stored (`true`) or not.
    pub(super) async fn db_lease_stored(&self, lease_id: &str, stored: bool) {
        let r = if stored {
            self.store.activate_db_credential(lease_id).await
        } else {
            self.store.abandon_db_credential(lease_id).await
        };
        // Not fatal: a pending row stays pending (dropped once its lease ends or after the
        // grace when it never committed).
        if let Err(e) = r {
            tracing::warn!(lease_id, error = %e, "credential row not updated");
        }
    }

    /// After a renewal of a credential's lease: its role's `VALID UNTIL` moves to the lease's
    /// new expiry. An error fails the Renew (the client renews again; the statement is
    /// idempotent).
    pub(super) async fn db_renewed(&self, lease_id: &str, expires_ms: i64) -> Result<()> {
        let Some(c) = self.store.db_credential_of_lease(lease_id).await? else {
            return Ok(());
        };
        let def = self.role_def(&c.connection, &c.role).await?;
        let target = self.target(&c.connection).await?;
        self.extend_valid_until(&def, &target, &c, expires_ms).await
    }

    /// Moves `c`'s `VALID UNTIL` to `expires_ms` unless it is already later. Several leases of
    /// a shared credential renew concurrently, on any replica: the store keeps the latest
    /// expiry, and a statement overtaken by a later one runs again with it, so the role's
    /// `VALID UNTIL` never ends before a live lease does.
    pub(super) async fn extend_valid_until(
        &self,
        def: &RoleDef,
        target: &Target,
        c: &DbCredentialRow,
        expires_ms: i64,
    ) -> Result<()> {
        let mut want = self
            .store
            .raise_db_valid_until(&c.lease_id, expires_ms)
            .await?;
        for _ in 0..4 {
            let expiration = rfc3339(want);
            let sql = dbrole::render(
                &def.renewal,
                &Values {
                    name: &c.username,
                    password: "",
                    expiration: &expiration,
                },
            )
            .map_err(|_| BrokerError::internal("renewal statement"))?;
            target
                .run("renewal", &sql, None)
                .await
                .map_err(target_error)?;
            let recorded = self.store.raise_db_valid_until(&c.lease_id, want).await?;
            if recorded == want {
                return Ok(());
            }
            want = recorded;
        }
        Err(BrokerError::unavailable(
            "credential database (VALID UNTIL kept moving)",
        ))
    }

    /// Stores role `CONN/ROLE`'s definition (YAML, see [`RoleDef`]).
    pub async fn put_db_role(
        &self,
        caller: &Caller,
        connection: &str,
        role: &str,
        yaml: &str,
    ) -> Result<()> {
        check_segment("connection name", connection)?;
        check_segment("role name", role)?;
        let path = format!("db/{connection}/{role}");
        self.require(caller, &path, Capability::Write, "db_role_put")
            .await?;
        let r = async {
            RoleDef::parse(yaml).map_err(|e| BrokerError::InvalidArgument(e.to_string()))?;
            if self
                .reads
                .latest_version(&dbrole::connection_path(connection))
                .await?
                .is_none()
            {
                return Err(BrokerError::NotFound(format!(
                    "database connection {connection}"
                )));
            }
            self.store
                .put_db_role(connection, role, yaml, now_ms())
                .await?;
            Ok(())
        }
        .await;
        self.audited(
            caller,
            EventKind::Admin("db_role_put".into()),
            Some(&path),
            None,
            r,
        )
        .await
    }

    /// Every role definition: (connection, role, definition YAML).
    pub async fn list_db_roles(&self, caller: &Caller) -> Result<Vec<(String, String, String)>> {
        self.require(caller, "db", Capability::List, "db_role_list")
            .await?;
        Ok(self.store.list_db_roles().await?)
    }

    /// Live credentials and the roles still to drop.
    pub async fn db_status(&self, caller: &Caller) -> Result<DbStatus> {
        self.require(caller, "db", Capability::List, "db_status")
            .await?;
        Ok(DbStatus {
            counts: self.store.count_db_credentials().await?,
            pending_drops: self
                .store
                .due_db_credentials(now_ms(), i64::MAX, self.pending_grace_ms(), 1000)
                .await?,
            marker: self.marker.clone(),
        })
    }

    /// [`Broker::reconcile_db`] for an operator (`revoke` on `db/CONN`), audited.
    pub async fn reconcile_db_by(
        &self,
        caller: &Caller,
        connection: &str,
        dry_run: bool,
    ) -> Result<DbReconcile> {
        check_segment("connection name", connection)?;
        let path = dbrole::connection_path(connection);
        self.require(caller, &path, Capability::Revoke, "db_reconcile")
            .await?;
        let r = self.reconcile_db(connection, dry_run).await;
        self.audited(
            caller,
            EventKind::Admin("db_reconcile".into()),
            Some(&path),
            None,
            r,
        )
        .await
    }
}
