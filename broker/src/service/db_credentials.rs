//! Dynamic database credentials: a database role per lease, born and dropped with it.
//!
//! Order of operations, so that a broker killed anywhere leaves nothing unrecorded:
//! 1. the credential's row is written `pending` (under the caps' lock),
//! 2. the role is created in the target database, `VALID UNTIL` the lease's expiry,
//! 3. the lease is stored with its audit record, then the row marked `active`.
//!
//! The revoker ([`spawn_db_revoker`]) drops the role of every row whose lease is not active —
//! revoked, expired, ended by policy or pod deletion, or never committed (a `pending` row after
//! [`PENDING_GRACE`]) — retrying with capped back-off until the database lets it. The
//! reconciler compares the roles the broker marked in the database with the rows.

use std::collections::BTreeSet;

use keyhaven_broker_core::dbrole::{self, RoleDef, Values};

use super::leases::{new_lease_id, new_lease_row};
use super::*;
use crate::store::Reservation;
use crate::store::{DbCap, DbCredentialCount, DbCredentialRow};
use crate::target_db::{Target, TargetError};

/// A `pending` row whose lease has not committed after this is dropped (a lease is stored
/// within seconds of its role's creation, or never): the default of `--db-pending-grace`.
pub const PENDING_GRACE: Duration = Duration::from_secs(60);
/// How often each replica's revoker looks for roles to drop.
pub const DB_REVOKE_EVERY: Duration = Duration::from_secs(2);
/// How often each replica reconciles every connection.
pub const DB_RECONCILE_EVERY: Duration = Duration::from_secs(300);
/// Longest wait between two attempts to drop one role.
pub const MAX_DROP_BACKOFF: Duration = Duration::from_secs(60);
/// Most credentials one revoker pass takes.
pub const DROP_BATCH: usize = 100;
/// Roles one replica drops at once.
pub const DROP_CONCURRENCY: usize = 4;
/// End reason of a lease whose role vanished from the database.
pub const REVOKED_ROLE_MISSING: &str = "revoked:role_missing";

/// What one reconciliation found (and, unless a dry run, fixed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DbReconcile {
    /// Marked roles with no live credential: dropped.
    pub dropped_roles: Vec<String>,
    /// Active credentials whose role is gone: their leases ended.
    pub ended_leases: Vec<String>,
}

/// What `brokerctl db status` shows.
#[derive(Debug, Clone, Default)]
pub struct DbStatus {
    /// Live credentials by connection, role and state.
    pub counts: Vec<DbCredentialCount>,
    /// Roles waiting to be dropped, with why the last attempt failed.
    pub pending_drops: Vec<DbCredentialRow>,
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
        i64::try_from(self.config.db_pending_grace.as_millis()).unwrap_or(i64::MAX)
    }

    async fn role_def(&self, connection: &str, role: &str) -> Result<RoleDef> {
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
    /// order); the caller stores the lease, then calls [`Broker::db_lease_stored`].
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
        let lease = new_lease_row(new_lease_id(id, path)?, id, path, 1, now, ttl, max_ttl);
        let mut r = [0u8; 4];
        getrandom::fill(&mut r).map_err(|_| BrokerError::internal("random number generator"))?;
        let username = dbrole::username(&def.username, &id.namespace, &id.service_account, role, r);
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
            Reservation::Reserved => {}
        }
        let password = random_hex(24)?;
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
        let dsn = target.endpoint.dsn(&username, &password);
        let data = SecretData::from_pairs([
            ("username", username.as_bytes().to_vec()),
            ("password", password.as_bytes().to_vec()),
            ("dsn", dsn.as_bytes().to_vec()),
            ("host", target.endpoint.host.as_bytes().to_vec()),
            ("port", target.endpoint.port.to_string().into_bytes()),
            ("database", target.endpoint.database.as_bytes().to_vec()),
        ]);
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
        let Some(c) = self.store.get_db_credential(lease_id).await? else {
            return Ok(());
        };
        let def = self.role_def(&c.connection, &c.role).await?;
        let target = self.target(&c.connection).await?;
        let expiration = rfc3339(expires_ms);
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
        self.store.set_db_valid_until(lease_id, expires_ms).await?;
        Ok(())
    }

    /// Drops the role of `c` (idempotent: a role already gone is done).
    async fn drop_role(&self, c: &DbCredentialRow) -> Result<()> {
        let target = self.target(&c.connection).await?;
        if !target
            .role_exists(&c.username)
            .await
            .map_err(target_error)?
        {
            return Ok(());
        }
        let revocation = match self.store.get_db_role(&c.connection, &c.role).await? {
            Some(t) => RoleDef::parse(&t)
                .map(|d| d.revocation)
                .unwrap_or_else(|_| dbrole::DEFAULT_REVOCATION.into()),
            None => dbrole::DEFAULT_REVOCATION.into(),
        };
        self.drop_named(&target, &c.username, &revocation).await
    }

    async fn drop_named(&self, target: &Target, username: &str, revocation: &str) -> Result<()> {
        let sql = dbrole::render(
            revocation,
            &Values {
                name: username,
                password: "",
                expiration: "",
            },
        )
        .map_err(|_| BrokerError::internal("revocation statement"))?;
        target
            .run("revocation", &sql, None)
            .await
            .map_err(target_error)?;
        if target.role_exists(username).await.map_err(target_error)? {
            return Err(BrokerError::FailedPrecondition(
                "the revocation statements left the role in place".into(),
            ));
        }
        Ok(())
    }

    /// One revoker pass: drops the roles of up to [`DROP_BATCH`] credentials whose lease is
    /// not active, [`DROP_CONCURRENCY`] at a time; returns how many were due. A failure is
    /// recorded on its row and retried with back-off.
    pub async fn drop_due_credentials(&self) -> Result<usize> {
        use futures_util::StreamExt as _;
        let now = now_ms();
        let due = self
            .store
            .due_db_credentials(now, now, self.pending_grace_ms(), DROP_BATCH as i64)
            .await?;
        let n = due.len();
        let results: Vec<Result<()>> = futures_util::stream::iter(due)
            .map(|c| self.drop_due(c))
            .buffer_unordered(DROP_CONCURRENCY)
            .collect()
            .await;
        results.into_iter().collect::<Result<Vec<()>>>()?;
        Ok(n)
    }

    /// Drops the role of one due credential, or records why not.
    async fn drop_due(&self, c: DbCredentialRow) -> Result<()> {
        match self.drop_role(&c).await {
            Ok(()) => {
                self.store.mark_db_dropped(&c.lease_id, now_ms()).await?;
                self.metrics.db.revoked(&c.connection, &c.role, "ok");
                let ev = AuditEvent::new(
                    now_ms(),
                    EventKind::Admin("db_role_drop".into()),
                    Outcome::Ok,
                )
                .with_identity(format!(
                    "system:serviceaccount:{}:{}",
                    c.namespace, c.service_account
                ))
                .with_path(format!("db/{}/{}", c.connection, c.role))
                .with_lease_id(c.lease_id.clone());
                self.audit(ev).await.map(drop)
            }
            Err(e) => {
                self.metrics.db.revoked(&c.connection, &c.role, "error");
                let wait = MAX_DROP_BACKOFF
                    .as_millis()
                    .min(1000u128 << c.attempts.clamp(0, 16)) as i64;
                tracing::warn!(lease_id = c.lease_id, username = c.username,
                    attempts = c.attempts + 1, error = %e.chain(),
                    "database role not dropped yet; retrying");
                let why = match &e {
                    BrokerError::Unavailable { what, .. } => format!("unavailable: {what}"),
                    other => echo(&other.to_string()),
                };
                self.store
                    .db_drop_failed(&c.lease_id, now_ms() + wait, &why)
                    .await
                    .map_err(Into::into)
            }
        }
    }

    /// Compares the roles marked in `connection`'s database with the live credentials: drops
    /// marked roles with none, ends the leases of active credentials whose role is gone.
    pub async fn reconcile_db(&self, connection: &str, dry_run: bool) -> Result<DbReconcile> {
        let target = self.target(connection).await?;
        // Rows first: a credential made between the two reads has its row before its role, so
        // it is never taken for an orphan.
        let live = self.store.live_db_credentials(connection).await?;
        let marked: BTreeSet<String> = target
            .marked_roles()
            .await
            .map_err(target_error)?
            .into_iter()
            .collect();
        let known: BTreeSet<&str> = live.iter().map(|c| c.username.as_str()).collect();
        let mut out = DbReconcile::default();
        for name in marked.iter().filter(|n| !known.contains(n.as_str())) {
            if !dry_run {
                self.drop_named(&target, name, dbrole::DEFAULT_REVOCATION)
                    .await?;
                let ev = AuditEvent::new(
                    now_ms(),
                    EventKind::Admin("db_orphan_drop".into()),
                    Outcome::Ok,
                )
                .with_identity("system:keyhaven-broker")
                .with_path(dbrole::connection_path(connection))
                .with_reason(format!("role {name}"));
                self.audit(ev).await?;
            }
            out.dropped_roles.push(name.clone());
        }
        for c in live
            .iter()
            .filter(|c| c.state == "active" && !marked.contains(&c.username))
        {
            if !dry_run {
                let id = c.lease_id.clone();
                self.commit_change(move |store| async move {
                    let (_, records) = store
                        .revoke_leases_audited(
                            &LeaseFilter::Id(id.clone()),
                            now_ms(),
                            REVOKED_ROLE_MISSING,
                            |ended| {
                                ended
                                    .iter()
                                    .map(|l| {
                                        AuditEvent::new(now_ms(), EventKind::Revoke, Outcome::Ok)
                                            .with_identity(l.identity.subject())
                                            .with_path(l.path.clone())
                                            .with_lease_id(l.id.clone())
                                            .with_reason(REVOKED_ROLE_MISSING)
                                    })
                                    .collect()
                            },
                        )
                        .await?;
                    Ok(((), records))
                })
                .await?;
                self.store.mark_db_dropped(&c.lease_id, now_ms()).await?;
            }
            out.ended_leases.push(c.lease_id.clone());
        }
        self.metrics
            .db
            .reconciled(connection, out.dropped_roles.len(), out.ended_leases.len());
        Ok(out)
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

    /// The connections that have roles.
    async fn db_connections(&self) -> Result<Vec<String>> {
        let mut names: Vec<String> = self
            .store
            .list_db_roles()
            .await?
            .into_iter()
            .map(|(c, _, _)| c)
            .collect();
        names.dedup();
        Ok(names)
    }
}

/// Drops the roles of ended credentials every `every`, and reconciles every connection every
/// `reconcile_every`, on this replica, until the broker is dropped.
pub fn spawn_db_revoker(
    broker: std::sync::Weak<Broker>,
    every: Duration,
    reconcile_every: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_reconcile = std::time::Instant::now();
        loop {
            tick.tick().await;
            let Some(b) = broker.upgrade() else { return };
            // A full batch: more may be due (10,000 leases expiring at once); go on at once.
            loop {
                match b.drop_due_credentials().await {
                    Ok(n) if n == DROP_BATCH => continue,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(error = %e.chain(), "credential revoker pass failed");
                        break;
                    }
                }
            }
            if last_reconcile.elapsed() >= reconcile_every {
                last_reconcile = std::time::Instant::now();
                match b.db_connections().await {
                    Ok(names) => {
                        for n in names {
                            if let Err(e) = b.reconcile_db(&n, false).await {
                                tracing::warn!(connection = n, error = %e.chain(), "reconcile failed");
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e.chain(), "reconcile: connections not read"),
                }
            }
            drop(b);
        }
    })
}
