//! The revoker and the reconciler of dynamic database credentials.
//!
//! Each replica's revoker ([`spawn_db_revoker`]) drops the role of every credential with no
//! live lease — revoked, expired, ended by policy or pod deletion, or never committed (a
//! `pending` row after the pending grace) — retrying with capped back-off until the database
//! lets it. The reconciler compares the roles the broker marked in the database with the rows.

use std::collections::BTreeSet;

use keyhaven_broker_core::dbrole::{self, RoleDef, Values};

use super::db_credentials::target_error;
use super::*;
use crate::store::DbCredentialRow;
use crate::target_db::Target;

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

impl Broker {
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
        // A shared credential is claimed first: a lease may have joined it since it was read.
        if c.shared
            && !self
                .store
                .claim_db_credential(&c.lease_id, now_ms(), self.pending_grace_ms())
                .await?
        {
            return Ok(());
        }
        match self.drop_role(&c).await {
            Ok(()) => {
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
                self.credential_gone(&c, ev).await
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
            // Every lease of it: the one that created it and, if shared, those that joined.
            let leases = self.store.leases_of_db_credential(&c.lease_id).await?;
            if !dry_run {
                for id in &leases {
                    self.end_lease_role_missing(id).await?;
                }
                let ev = AuditEvent::new(
                    now_ms(),
                    EventKind::Admin("db_role_missing".into()),
                    Outcome::Ok,
                )
                .with_identity("system:keyhaven-broker")
                .with_path(format!("db/{}/{}", c.connection, c.role))
                .with_lease_id(c.lease_id.clone())
                .with_reason(format!("role {}", c.username));
                self.credential_gone(c, ev).await?;
            }
            out.ended_leases.extend(leases);
        }
        self.metrics
            .db
            .reconciled(connection, out.dropped_roles.len(), out.ended_leases.len());
        Ok(out)
    }

    /// Ends lease `id` (if still active) as `revoked:role_missing`, audited.
    async fn end_lease_role_missing(&self, id: &str) -> Result<()> {
        let id = id.to_owned();
        self.commit_change(move |store| async move {
            let (_, records) = store
                .revoke_leases_audited(
                    &LeaseFilter::Id(id),
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
