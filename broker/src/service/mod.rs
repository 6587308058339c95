//! The broker's core: authenticate a caller, ask the policy, and lease / renew / revoke, with
//! every step audited. Transport-free: the gRPC edge (and tests) call these methods.
//!
//! Audit is part of the request: if the audit record cannot be written, the request fails.

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use keyhaven_hsm::KekId;
use secrecy::{ExposeSecret, SecretString};
use zeroize::Zeroizing;

use crate::audit::now_ms;
use crate::audit::writer::{AuditWriter, Committed, WriterMetrics};
use crate::audit::{AuditEvent, AuditRecord, EventKind, JsonlSink, Outcome};
use crate::auth::{AuthError, TokenReviewer, Verifier};
use crate::crypto::{CryptoError, Envelope, SecretData};
use crate::identity::Identity;
use crate::policy::{validate_secret_path, Capability, Decision, PolicySet};
use crate::store::{LeaseFilter, LeaseRow, Store, StoreError};

mod admin;
mod authn;
mod error;
mod health;
mod leases;
pub mod rotation;

pub use admin::KekStatus;
pub use error::{BrokerError, Result};

/// Who is calling, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A workload (or an operator's service account) with a verified token.
    Workload(Identity),
    /// The bootstrap admin credential: every admin capability, for first setup.
    BootstrapAdmin,
}

/// A verified caller whose authentication record is still to be written — with the
/// request's own record ([`Broker::authenticate_deferred`]).
#[derive(Debug)]
pub struct Authenticated {
    /// Who is calling.
    pub caller: Caller,
    audit: Option<AuditEvent>,
}

impl Caller {
    fn audit_name(&self) -> String {
        match self {
            Caller::Workload(i) => i.subject(),
            Caller::BootstrapAdmin => "bootstrap-admin".into(),
        }
    }
    fn pod(&self) -> Option<String> {
        match self {
            Caller::Workload(i) => i.pod_name.clone(),
            Caller::BootstrapAdmin => None,
        }
    }
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
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            max_ttl_cap: crate::policy::DEFAULT_MAX_TTL_CAP,
            auto_rotation: crate::rotation::AutoRotation::default(),
        }
    }
}

/// The broker.
pub struct Broker {
    store: Store,
    /// The store's reads on the Lease/Renew/Revoke path, on kept connections.
    reads: crate::store::HotReads,
    envelope: Envelope,
    verifier: Arc<Verifier>,
    dev_verifier: Option<Arc<Verifier>>,
    /// TokenReview mode: every locally verified workload token is also reviewed here.
    token_review: Option<Arc<TokenReviewer>>,
    bootstrap: Option<SecretString>,
    policies: RwLock<PolicySet>,
    audit_file: Arc<Mutex<Option<JsonlSink>>>,
    audit_writer: AuditWriter,
    kek: RwLock<Option<KekId>>,
    config: BrokerConfig,
    metrics: crate::metrics::Metrics,
    /// This replica's name in the re-wrap batch log (host name and process id).
    replica: String,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("store", &self.store.kind())
            .field("dev_mode", &self.dev_verifier.is_some())
            .finish_non_exhaustive()
    }
}

fn to_secs(ms: i64) -> i64 {
    ms.div_euclid(1000)
}

impl Broker {
    /// Assembles a broker. Policies are loaded from the store (none: everything is denied).
    pub async fn new(
        store: Store,
        mut envelope: Envelope,
        verifier: Arc<Verifier>,
        config: BrokerConfig,
    ) -> Result<Broker> {
        let metrics = crate::metrics::Metrics::new();
        envelope.set_hsm_observer(metrics.hsm_observer());
        let audit_file: Arc<Mutex<Option<JsonlSink>>> = Arc::default();
        let store_for_audit = store.clone();
        // Half the pool: the rest serves the audit writer, admin calls, reaper and re-wrap.
        let reads = store.hot_reads((store.max_connections() / 2).max(1) as usize);
        let b = Broker {
            store,
            reads,
            envelope,
            verifier,
            dev_verifier: None,
            token_review: None,
            bootstrap: None,
            policies: RwLock::new(PolicySet::default()),
            audit_file: audit_file.clone(),
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
        };
        b.reload_policies().await?;
        b.refresh_kek().await?;
        Ok(b)
    }

    /// Also trusts dev-mode tokens (`brokerctl dev-token`). For demos and tests only.
    pub fn with_dev_verifier(mut self, v: Arc<Verifier>) -> Self {
        tracing::warn!(
            "DEV MODE: trusting tokens minted with the dev key — never use this in production"
        );
        self.dev_verifier = Some(v);
        self
    }

    /// TokenReview mode: after a workload token verifies locally, also ask the apiserver
    /// (through `reviewer`, which caches verdicts for seconds) and refuse it unless the
    /// apiserver agrees: `token_review_denied` (UNAUTHENTICATED) or `token_review_unavailable`
    /// (UNAVAILABLE), audited like other authentication failures.
    pub fn with_token_review(mut self, reviewer: Arc<TokenReviewer>) -> Self {
        self.token_review = Some(reviewer);
        self
    }

    /// Accepts this bootstrap admin credential (read from a file by the binary).
    pub fn with_bootstrap_admin(mut self, credential: SecretString) -> Self {
        self.bootstrap = Some(credential);
        self
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

    /// Re-reads the policies from the store.
    pub async fn reload_policies(&self) -> Result<()> {
        let set = match self.store.load_policies().await? {
            Some(yaml) => PolicySet::from_yaml(&yaml, self.config.max_ttl_cap)
                .map_err(|e| BrokerError::internal_by("stored policies invalid", e))?,
            None => PolicySet::default(),
        };
        *self.policies.write().unwrap_or_else(|p| p.into_inner()) = set;
        Ok(())
    }

    /// The current policies, read-locked (evaluated in place: no copy per request).
    fn policies(&self) -> std::sync::RwLockReadGuard<'_, PolicySet> {
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
            Committed::Record(r) => Ok(*r),
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

    fn decide(&self, caller: &Caller, path: &str, cap: Capability) -> Decision {
        match caller {
            Caller::BootstrapAdmin if cap.is_admin() => Decision::Allow {
                ttl: Duration::from_secs(60),
                max_ttl: Duration::from_secs(60),
                policies: vec!["bootstrap-admin".into()],
            },
            Caller::BootstrapAdmin => Decision::Deny,
            Caller::Workload(id) => self.policies().evaluate(id, path, cap),
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
                let d = if path.is_empty() {
                    self.policies().evaluate_global(id, cap)
                } else {
                    self.policies().evaluate(id, path, cap)
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
