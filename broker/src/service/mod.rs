//! The broker's core: authenticate a caller, ask the policy, and lease / renew / revoke, with
//! every step audited. Transport-free: the gRPC edge (and tests) call these methods.
//!
//! Audit is part of the request: if the audit record cannot be written, the request fails.

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use keyhaven_hsm::KekId;
use zeroize::Zeroizing;

use crate::audit::now_ms;
use crate::audit::writer::{AuditWriter, Committed, WriterMetrics};
use crate::audit::{AuditEvent, AuditRecord, EventKind, JsonlSink, Outcome};
use crate::auth::Authenticator;
pub use crate::auth::Caller;
use crate::bounded::echo;
use crate::crypto::{CryptoError, Envelope, SecretData};
use crate::identity::Identity;
use crate::policy::{validate_secret_path, Capability, Decision, PolicySet};
use crate::store::{LeaseFilter, LeaseRow, Renewing, Store, StoreError};

mod admin;
mod auth_failures;
mod authn;
mod db_connections;
mod db_credentials;
mod db_revoker;
mod db_shared;
mod dek_sync;
mod error;
mod health;
mod holder_watch;
mod leases;
mod policy_sync;
mod replicas;
pub mod rotation;

pub use admin::{KekStatus, PolicyApply};
pub use auth_failures::{spawn_auth_failure_flush, AUTH_FAILURE_FLUSH_EVERY, MAX_FAILURE_KEYS};
pub use db_credentials::{DbStatus, PENDING_GRACE};
pub use db_revoker::{
    spawn_db_revoker, DbReconcile, DB_RECONCILE_EVERY, DB_REVOKE_EVERY, REVOKED_ROLE_MISSING,
};
pub use dek_sync::{spawn_dek_watch, DEK_POLL};
pub use error::{BrokerError, Result};
pub use holder_watch::{
    spawn_holder_watch, Holder, HolderKind, HolderWatchConfig, DEFAULT_RELIST_EVERY,
    REVOKED_POD_DELETED, REVOKED_SERVICEACCOUNT_DELETED,
};
pub use policy_sync::{spawn_policy_watch, POLICY_BOUND, POLICY_POLL, REVOKED_BY_POLICY};
pub use replicas::{spawn_heartbeat, ReplicaStatus, HEARTBEAT_EVERY, HEARTBEAT_STALE};

/// A verified caller whose authentication record is still to be written — with the
/// request's own record ([`Broker::authenticate_deferred`]).
#[derive(Debug)]
pub struct Authenticated {
    /// Who is calling.
    pub caller: Caller,
    audit: Option<AuditEvent>,
}

/// A granted lease, as returned to the workload.
#[derive(Clone)]
pub struct LeaseGrant {
    /// Lease id.
    pub lease_id: String,
    /// Leased secret version.
    pub version: i64,
    /// The secret's values.
    pub data: SecretData,
    /// Seconds until expiry.
    pub ttl: Duration,
    /// Unix seconds after which it cannot be renewed.
    pub renewable_until_unix: i64,
}

impl std::fmt::Debug for LeaseGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseGrant")
            .field("lease_id", &self.lease_id)
            .field("version", &self.version)
            .field("data", &self.data)
            .field("ttl", &self.ttl)
            .finish()
    }
}

/// The outcome of a renewal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renewal {
    /// Seconds until the new expiry.
    pub ttl: Duration,
    /// Unix seconds after which it cannot be renewed.
    pub renewable_until_unix: i64,
    /// A newer version of the secret exists than the leased one.
    pub newer_version: bool,
}

/// Tunables.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Upper bound on any policy's max TTL.
    pub max_ttl_cap: Duration,
    /// Automatic KEK rotation (off by default).
    pub auto_rotation: crate::rotation::AutoRotation,
    /// How long a credential's row may stay `pending` before its role is dropped.
    pub db_pending_grace: Duration,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            max_ttl_cap: crate::policy::DEFAULT_MAX_TTL_CAP,
            auto_rotation: crate::rotation::AutoRotation::default(),
            db_pending_grace: PENDING_GRACE,
        }
    }
}

/// The broker.
pub struct Broker {
    store: Store,
    /// The store's reads on the Lease/Renew/Revoke path, on kept connections.
    reads: crate::store::HotReads,
    envelope: Envelope,
    authenticator: Authenticator,
    policies: RwLock<policy_sync::LoadedPolicies>,
    /// When the loaded policy generation was last confirmed current (Unix ms).
    policy_confirmed_ms: std::sync::atomic::AtomicI64,
    /// Held by the one request that checks a stale policy generation ([`Broker::fresh_policies`]).
    policy_check: tokio::sync::Mutex<()>,
    audit_file: Arc<Mutex<Option<JsonlSink>>>,
    audit_writer: AuditWriter,
    /// Failed authentications with no identity, counted until the next flush.
    auth_failures: Mutex<auth_failures::FailureCounts>,
    kek: RwLock<Option<KekId>>,
    config: BrokerConfig,
    metrics: crate::metrics::Metrics,
    /// This replica's name in the re-wrap batch log and the registry (host name and pid).
    replica: String,
    /// When this replica started (Unix ms).
    started_ms: i64,
    /// Pools of the databases dynamic credentials are made in.
    targets: crate::target_db::Targets,
    /// The comment marking the database roles this installation creates.
    marker: String,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("store", &self.store.kind())
            .field("dev_mode", &self.authenticator.dev_mode())
            .finish_non_exhaustive()
    }
}

fn to_secs(ms: i64) -> i64 {
    ms.div_euclid(1000)
}

impl Broker {
    /// Assembles a broker that admits the callers `authenticator` accepts. Policies are loaded
    /// from the store (none: everything is denied).
    pub async fn new(
        store: Store,
        mut envelope: Envelope,
        authenticator: Authenticator,
        config: BrokerConfig,
    ) -> Result<Broker> {
        let metrics = crate::metrics::Metrics::new();
        envelope.set_hsm_observer(metrics.hsm_observer());
        let audit_file: Arc<Mutex<Option<JsonlSink>>> = Arc::default();
        let store_for_audit = store.clone();
        // Half the pool: the rest serves the audit writer, admin calls, reaper and re-wrap.
        let reads = store.hot_reads((store.max_connections() / 2).max(1) as usize);
        let marker = crate::target_db::marker(&store.installation_id().await?);
        let b = Broker {
            store,
            reads,
            envelope,
            authenticator,
            policies: RwLock::default(),
            policy_confirmed_ms: std::sync::atomic::AtomicI64::new(0),
            policy_check: tokio::sync::Mutex::new(()),
            audit_file: audit_file.clone(),
            auth_failures: Mutex::default(),
            audit_writer: AuditWriter::spawn(
                store_for_audit,
                audit_file,
                WriterMetrics {
                    commit_secs: metrics.audit_commit.clone(),
                    batch_records: metrics.audit_batch.clone(),
                },
            ),
            kek: RwLock::new(None),
            config,
            metrics,
            replica: crate::rotation::replica_name(),
            started_ms: now_ms(),
            targets: crate::target_db::Targets::new(marker.clone()),
            marker,
        };
        b.reload_policies().await?;
        b.refresh_kek().await?;
        Ok(b)
    }

    /// Also writes every audit record to this JSON-lines file.
    pub fn with_audit_file(self, sink: JsonlSink) -> Self {
        *self.audit_file.lock().unwrap_or_else(|p| p.into_inner()) = Some(sink);
        self
    }

    /// The automatic-rotation rule this broker was configured with.
    pub fn config_auto_rotation(&self) -> &crate::rotation::AutoRotation {
        &self.config.auto_rotation
    }

    /// The metrics.
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The envelope (keystore and DEK cache).
    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    /// Re-reads the primary broker KEK (newest with the broker's prefix) from the HSM.
    pub async fn refresh_kek(&self) -> Result<Option<KekId>> {
        let newest = self
            .envelope
            .keystore()
            .list_keks()
            .await
            .map_err(|e| BrokerError::from(CryptoError::Hsm(e)))?
            .pop()
            .map(|k| k.id);
        *self.kek.write().unwrap_or_else(|p| p.into_inner()) = newest;
        Ok(newest)
    }

    fn current_kek(&self) -> Result<KekId> {
        self.kek
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .ok_or_else(no_kek)
    }

    /// The current policies, read-locked (evaluated in place: no copy per request).
    fn policies(&self) -> std::sync::RwLockReadGuard<'_, policy_sync::LoadedPolicies> {
        self.policies.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes one audit record (database, then the optional file). Failure fails the request.
    pub async fn audit(&self, event: AuditEvent) -> Result<AuditRecord> {
        self.submit(vec![event], None).await
    }

    /// Queues `events` (in order) and, when given, a new lease row for the audit writer, which
    /// stores them in ONE transaction; returns the last record once it is durable. A lease is
    /// thereby stored if and only if its audit record is.
    async fn submit(
        &self,
        events: Vec<AuditEvent>,
        lease: Option<LeaseRow>,
    ) -> Result<AuditRecord> {
        match self.submit_at(events, lease, None).await? {
            Committed::Record(r) | Committed::Renewal(r, _) => Ok(*r),
            Committed::Stale => Err(BrokerError::internal(
                "an unguarded audit append was refused as stale",
            )),
        }
    }

    /// [`Broker::submit`], guarded by the secrets generation the lease's version was read
    /// under, when given: [`Committed::Stale`] if a secret changed since (nothing stored).
    async fn submit_at(
        &self,
        events: Vec<AuditEvent>,
        lease: Option<LeaseRow>,
        generation: Option<i64>,
    ) -> Result<Committed> {
        let t0 = std::time::Instant::now();
        let r = self.audit_writer.write(events, lease, generation).await;
        self.metrics.audit_wait.observe(t0.elapsed().as_secs_f64());
        Ok(r?)
    }

    /// Runs `f(store)` — a transaction that stores a change together with its audit records
    /// and gives back `(outcome, records)` — in turn with the audit writer's batches (so the
    /// JSON-lines file keeps chain order); returns the outcome.
    async fn commit_change<T, F, Fut>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(Store) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<(T, Vec<AuditRecord>), StoreError>>
            + Send
            + 'static,
    {
        Ok(self.commit_change_or_store_error(f).await?)
    }

    /// [`Broker::commit_change`], keeping the store's error for callers that act on it
    /// (a version conflict, a retired KEK).
    async fn commit_change_or_store_error<T, F, Fut>(
        &self,
        f: F,
    ) -> std::result::Result<T, crate::audit::writer::ChangeError>
    where
        T: Send + 'static,
        F: FnOnce(Store) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<(T, Vec<AuditRecord>), StoreError>>
            + Send
            + 'static,
    {
        let store = self.store.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let change: crate::audit::writer::Change = Box::pin(async move {
            let (outcome, records) = f(store).await?;
            let _ = tx.send(outcome);
            Ok(records)
        });
        self.audit_writer.change(change).await?;
        rx.await
            .map_err(|_| crate::audit::writer::ChangeError::Gone)
    }

    fn decide(&self, caller: &Caller, path: &str, cap: Capability) -> Decision {
        match caller {
            Caller::BootstrapAdmin if cap.is_admin() => Decision::Allow {
                ttl: Duration::from_secs(60),
                max_ttl: Duration::from_secs(60),
                policies: vec!["bootstrap-admin".into()],
            },
            Caller::BootstrapAdmin => Decision::Deny,
            Caller::Workload(id) => self.policies().set.evaluate(id, path, cap),
        }
    }

    async fn audited<T>(
        &self,
        caller: &Caller,
        kind: EventKind,
        path: Option<&str>,
        lease_id: Option<&str>,
        r: Result<T>,
    ) -> Result<T> {
        self.audited_with(None, None, caller, kind, path, lease_id, r)
            .await
    }

    /// [`Broker::audited`], also storing a deferred authentication record (first) and a new
    /// lease row in the same transaction.
    #[allow(clippy::too_many_arguments)]
    async fn audited_with<T>(
        &self,
        auth: Option<AuditEvent>,
        lease: Option<LeaseRow>,
        caller: &Caller,
        kind: EventKind,
        path: Option<&str>,
        lease_id: Option<&str>,
        r: Result<T>,
    ) -> Result<T> {
        let events = Self::audit_events(auth, caller, kind, path, lease_id, &r);
        self.submit(events, lease).await?;
        r
    }

    /// The records of one request: its authentication's (when deferred), then its own.
    fn audit_events<T>(
        auth: Option<AuditEvent>,
        caller: &Caller,
        kind: EventKind,
        path: Option<&str>,
        lease_id: Option<&str>,
        r: &Result<T>,
    ) -> Vec<AuditEvent> {
        let mut ev = AuditEvent::new(
            now_ms(),
            kind,
            match r {
                Ok(_) => Outcome::Ok,
                Err(e) => e.outcome(),
            },
        )
        .with_identity(caller.audit_name());
        if let Some(p) = caller.pod() {
            ev = ev.with_pod(p);
        }
        if let Some(p) = path {
            ev = ev.with_path(p);
        }
        if let Some(l) = lease_id {
            ev = ev.with_lease_id(l);
        }
        if let Err(e) = r {
            ev = ev.with_reason(e.code());
        }
        auth.into_iter().chain(std::iter::once(ev)).collect()
    }

    async fn require(
        &self,
        caller: &Caller,
        path: &str,
        cap: Capability,
        verb: &str,
    ) -> Result<()> {
        let allowed = match caller {
            Caller::BootstrapAdmin => true,
            Caller::Workload(id) => {
                self.fresh_policies().await?;
                let d = if path.is_empty() {
                    self.policies().set.evaluate_global(id, cap)
                } else {
                    self.policies().set.evaluate(id, path, cap)
                };
                d.is_allowed()
            }
        };
        if allowed {
            Ok(())
        } else {
            let e = BrokerError::PermissionDenied(format!("{verb} needs the '{cap}' capability"));
            self.audited::<()>(
                caller,
                EventKind::Admin(verb.into()),
                (!path.is_empty()).then_some(path),
                None,
                Err(e.clone()),
            )
            .await?;
            Err(e)
        }
    }
}

fn no_kek() -> BrokerError {
    BrokerError::unavailable("broker KEK (none on the HSM token: run `brokerctl keys init`)")
}
