//! The broker's core: authenticate a caller, ask the policy, and lease / renew / revoke, with
//! every step audited. Transport-free: the gRPC edge (and tests) call these methods.
//!
//! Audit is part of the request: if the audit record cannot be written, the request fails.

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use keyhaven_hsm::KekId;
use secrecy::{ExposeSecret, SecretString};
use zeroize::Zeroizing;

use crate::audit::{AuditEvent, AuditRecord, EventKind, JsonlSink, Outcome};
use crate::auth::{AuthError, TokenReviewer, Verifier};
use crate::crypto::{CryptoError, Envelope, SecretData};
use crate::identity::Identity;
use crate::policy::{validate_secret_path, Capability, Decision, PolicySet};
use crate::store::{LeaseFilter, LeaseRow, Store, StoreError};

/// What a request failed with, by what the caller should do. Messages carry paths and lease
/// ids, never values or tokens.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    /// No valid credential.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// Authenticated, but no policy allows it.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// No such secret or lease (for this caller).
    #[error("not found: {0}")]
    NotFound(String),
    /// The lease can no longer be renewed (expired, revoked, at its maximum).
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// Malformed request.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Database, HSM or key source unavailable; retry later.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Stored data failed its integrity check, or another internal failure.
    #[error("internal: {0}")]
    Internal(String),
}

impl From<StoreError> for BrokerError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(m) => BrokerError::Unavailable(format!("database: {m}")),
            other => BrokerError::Internal(other.to_string()),
        }
    }
}

impl From<CryptoError> for BrokerError {
    fn from(e: CryptoError) -> Self {
        match &e {
            CryptoError::Hsm(h) if h.is_retryable() => BrokerError::Unavailable(e.to_string()),
            _ => BrokerError::Internal(e.to_string()),
        }
    }
}

impl BrokerError {
    /// Short code for audit records and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            BrokerError::Unauthenticated(_) => "unauthenticated",
            BrokerError::PermissionDenied(_) => "no_policy",
            BrokerError::NotFound(_) => "not_found",
            BrokerError::FailedPrecondition(_) => "not_renewable",
            BrokerError::InvalidArgument(_) => "invalid_argument",
            BrokerError::Unavailable(_) => "unavailable",
            BrokerError::Internal(_) => "internal",
        }
    }

    fn outcome(&self) -> Outcome {
        match self {
            BrokerError::Unavailable(_) | BrokerError::Internal(_) => Outcome::Error,
            _ => Outcome::Denied,
        }
    }
}

/// Result alias.
pub type Result<T, E = BrokerError> = std::result::Result<T, E>;

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

impl Authenticated {
    /// Writes the authentication record now (for requests that have no record of their own
    /// or are refused before they get one), returning the caller.
    pub async fn commit(self, broker: &Broker) -> Result<Caller> {
        if let Some(ev) = self.audit {
            broker.audit(ev).await?;
        }
        Ok(self.caller)
    }
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
    audit_writer: tokio::sync::mpsc::Sender<AuditJob>,
    pub(crate) kek: RwLock<Option<KekId>>,
    pub(crate) config: BrokerConfig,
    metrics: crate::metrics::Metrics,
    /// This replica's name in the re-wrap batch log (host name and process id).
    pub(crate) replica: String,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("store", &self.store.kind())
            .field("dev_mode", &self.dev_verifier.is_some())
            .finish_non_exhaustive()
    }
}

fn now_ms() -> i64 {
    crate::audit::now_ms()
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
            audit_writer: spawn_audit_writer(store_for_audit, audit_file, &metrics),
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

    pub(crate) fn current_kek(&self) -> Result<KekId> {
        self.kek
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .ok_or_else(no_kek)
    }

    /// Re-reads the policies from the store.
    pub async fn reload_policies(&self) -> Result<()> {
        let set = match self.store.load_policies().await? {
            Some(yaml) => PolicySet::from_yaml(&yaml, self.config.max_ttl_cap)
                .map_err(|e| BrokerError::Internal(format!("stored policies invalid: {e}")))?,
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
            Committed::Stale => Err(BrokerError::Internal(
                "an unguarded audit append was refused as stale".into(),
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
        let (reply, wait) = tokio::sync::oneshot::channel();
        let t0 = std::time::Instant::now();
        let unavailable = || BrokerError::Unavailable("audit log unavailable".into());
        self.audit_writer
            .send(AuditJob {
                events,
                lease,
                generation,
                reply,
            })
            .await
            .map_err(|_| unavailable())?;
        let r = wait.await.map_err(|_| unavailable())?;
        self.metrics.audit_wait.observe(t0.elapsed().as_secs_f64());
        r
    }

    /// Verifies a bearer credential: a ServiceAccount token (or, in dev mode, a dev token), or
    /// the bootstrap admin credential. Every attempt is audited.
    pub async fn authenticate(&self, credential: &str) -> Result<Caller> {
        self.authenticate_deferred(credential)
            .await?
            .commit(self)
            .await
    }

    /// Like [`Broker::authenticate`], but a successful authentication's audit record is not
    /// written yet: it travels with the request ([`Authenticated`]) and is stored in the same
    /// transaction as the request's own record (one commit per request instead of two).
    /// Failed authentications are audited at once, as always.
    pub async fn authenticate_deferred(&self, credential: &str) -> Result<Authenticated> {
        if let Some(b) = &self.bootstrap {
            if constant_time_eq(credential.as_bytes(), b.expose_secret().as_bytes()) {
                return Ok(Authenticated {
                    caller: Caller::BootstrapAdmin,
                    audit: Some(
                        AuditEvent::new(now_ms(), EventKind::Authenticate, Outcome::Ok)
                            .with_identity("bootstrap-admin"),
                    ),
                });
            }
        }
        let mut result = self.verifier.verify(credential).await;
        if let (Err(_), Some(dev)) = (&result, &self.dev_verifier) {
            if let Ok(id) = dev.verify(credential).await {
                result = Ok(id);
            }
        }
        match result {
            Ok(id) => {
                if let Some(reviewer) = &self.token_review {
                    if let Err(e) = reviewer.review(credential, &id).await {
                        self.metrics.auth_failure(e.reason());
                        let outcome = if e.is_unavailable() {
                            tracing::warn!(identity = %id, error = %e, "token review failed");
                            Outcome::Error
                        } else {
                            tracing::info!(identity = %id, error = %e, "token refused by TokenReview");
                            Outcome::Denied
                        };
                        let mut ev = AuditEvent::new(now_ms(), EventKind::Authenticate, outcome)
                            .with_identity(id.subject())
                            .with_reason(e.reason());
                        if let Some(p) = &id.pod_name {
                            ev = ev.with_pod(p.clone());
                        }
                        self.audit(ev).await?;
                        return Err(if e.is_unavailable() {
                            BrokerError::Unavailable("token review unavailable".into())
                        } else {
                            BrokerError::Unauthenticated(e.reason().to_owned())
                        });
                    }
                }
                let mut ev = AuditEvent::new(now_ms(), EventKind::Authenticate, Outcome::Ok)
                    .with_identity(id.subject());
                if let Some(p) = &id.pod_name {
                    ev = ev.with_pod(p.clone());
                }
                Ok(Authenticated {
                    caller: Caller::Workload(id),
                    audit: Some(ev),
                })
            }
            Err(e) => {
                self.metrics.auth_failure(e.reason());
                let outcome = if e.is_unavailable() {
                    Outcome::Error
                } else {
                    Outcome::Denied
                };
                self.audit(
                    AuditEvent::new(now_ms(), EventKind::Authenticate, outcome)
                        .with_reason(e.reason()),
                )
                .await?;
                Err(auth_error(&e))
            }
        }
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

    pub(crate) async fn audited<T>(
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

    /// Leases the newest version of `path` for `ttl` (policy default when `None`, capped by the
    /// policy's max TTL).
    pub async fn lease(
        &self,
        caller: &Caller,
        path: &str,
        ttl: Option<Duration>,
    ) -> Result<LeaseGrant> {
        self.lease_with(None, caller, path, ttl).await
    }

    /// [`Broker::lease`] for a request authenticated with [`Broker::authenticate_deferred`].
    pub async fn lease_authenticated(
        &self,
        auth: Authenticated,
        path: &str,
        ttl: Option<Duration>,
    ) -> Result<LeaseGrant> {
        self.lease_with(auth.audit, &auth.caller, path, ttl).await
    }

    async fn lease_with(
        &self,
        auth: Option<AuditEvent>,
        caller: &Caller,
        path: &str,
        ttl: Option<Duration>,
    ) -> Result<LeaseGrant> {
        // Nothing is stored until the audit transaction: the lease row goes in with its record.
        // The version comes from memory when it can; the append then checks that no secret
        // changed since it was read, and if one did, nothing was stored, and the lease is made
        // again from a fresh read.
        let mut remembered = true;
        loop {
            let (r, row, generation) = match self.lease_inner(caller, path, ttl, remembered).await {
                Ok((grant, row, generation)) => (Ok(grant), Some(row), generation),
                Err(e) => (Err(e), None, None),
            };
            let lease_id = r.as_ref().ok().map(|g| g.lease_id.clone());
            let events = Self::audit_events(
                auth.clone(),
                caller,
                EventKind::Lease,
                Some(path),
                lease_id.as_deref(),
                &r,
            );
            match self.submit_at(events, row, generation).await? {
                Committed::Record(_) => return r,
                Committed::Stale => {
                    self.reads.forget_versions();
                    self.metrics.remembered_stale.inc();
                    remembered = false;
                }
            }
        }
    }

    async fn lease_inner(
        &self,
        caller: &Caller,
        path: &str,
        ttl: Option<Duration>,
        remembered: bool,
    ) -> Result<(LeaseGrant, LeaseRow, Option<i64>)> {
        validate_secret_path(path)
            .map_err(|e| BrokerError::InvalidArgument(format!("path '{path}': {e}")))?;
        let Caller::Workload(id) = caller else {
            return Err(BrokerError::PermissionDenied(
                "the bootstrap credential cannot lease secrets".into(),
            ));
        };
        let Decision::Allow {
            ttl: default_ttl,
            max_ttl,
            ..
        } = self.decide(caller, path, Capability::Read)
        else {
            return Err(BrokerError::PermissionDenied(format!(
                "no policy lets {} read {path}",
                id.subject()
            )));
        };
        let mut attempts = 0;
        let (row, data, generation) = loop {
            attempts += 1;
            // The retry after a retired KEK reads afresh.
            let (row, generation) = if remembered && attempts == 1 {
                let (row, g) = self.reads.latest_version_remembered(path).await?;
                (row, Some(g))
            } else {
                (self.reads.latest_version(path).await?.map(Arc::new), None)
            };
            let row = row.ok_or_else(|| BrokerError::NotFound(format!("secret {path}")))?;
            let sealed = row
                .sealed
                .as_ref()
                .ok_or_else(|| BrokerError::NotFound(format!("secret {path}")))?;
            let t0 = std::time::Instant::now();
            let data = self.envelope.open(path, row.version, sealed).await;
            self.metrics.hsm("open", t0.elapsed());
            match data {
                // The row was re-wrapped and its old KEK retired between our read and the
                // unwrap: read it again once.
                Err(CryptoError::Hsm(e))
                    if e.kind() == keyhaven_hsm::ErrorKind::KeyNotFound && attempts < 2 =>
                {
                    continue
                }
                other => break (row, other?, generation),
            }
        };
        let ttl = ttl
            .filter(|t| !t.is_zero())
            .unwrap_or(default_ttl)
            .min(max_ttl);
        let now = now_ms();
        let lease = LeaseRow {
            id: new_lease_id(id, path)?,
            identity: id.clone(),
            path: path.to_owned(),
            version: row.version,
            created_ms: now,
            expires_ms: now + ttl.as_millis() as i64,
            max_expires_ms: now + max_ttl.as_millis() as i64,
            renewals: 0,
            ended_ms: None,
            end_reason: None,
        };
        Ok((
            LeaseGrant {
                lease_id: lease.id.clone(),
                version: row.version,
                data,
                ttl,
                renewable_until_unix: to_secs(lease.max_expires_ms),
            },
            lease,
            generation,
        ))
    }

    /// Extends the caller's own lease by `increment` (the policy default when `None`), never
    /// past its max TTL; says whether a newer secret version exists.
    pub async fn renew(
        &self,
        caller: &Caller,
        lease_id: &str,
        increment: Option<Duration>,
    ) -> Result<Renewal> {
        self.renew_with(None, caller, lease_id, increment).await
    }

    /// [`Broker::renew`] for a request authenticated with [`Broker::authenticate_deferred`].
    pub async fn renew_authenticated(
        &self,
        auth: Authenticated,
        lease_id: &str,
        increment: Option<Duration>,
    ) -> Result<Renewal> {
        self.renew_with(auth.audit, &auth.caller, lease_id, increment)
            .await
    }

    async fn renew_with(
        &self,
        auth: Option<AuditEvent>,
        caller: &Caller,
        lease_id: &str,
        increment: Option<Duration>,
    ) -> Result<Renewal> {
        let r = self.renew_inner(caller, lease_id, increment).await;
        self.audited_with(
            auth,
            None,
            caller,
            EventKind::Renew,
            None,
            Some(lease_id),
            r,
        )
        .await
    }

    async fn own_lease(&self, caller: &Caller, lease_id: &str) -> Result<LeaseRow> {
        let not_found = || BrokerError::NotFound(format!("lease {lease_id}"));
        let Caller::Workload(id) = caller else {
            return Err(not_found());
        };
        let lease = self
            .reads
            .get_lease(lease_id)
            .await?
            .ok_or_else(not_found)?;
        if lease.identity.namespace != id.namespace
            || lease.identity.service_account != id.service_account
        {
            // Someone else's lease: indistinguishable from no lease.
            return Err(not_found());
        }
        Ok(lease)
    }

    async fn renew_inner(
        &self,
        caller: &Caller,
        lease_id: &str,
        increment: Option<Duration>,
    ) -> Result<Renewal> {
        let lease = self.own_lease(caller, lease_id).await?;
        let now = now_ms();
        if !lease.is_active(now) {
            return Err(BrokerError::FailedPrecondition(format!(
                "lease {lease_id} has expired or was revoked"
            )));
        }
        let Decision::Allow {
            ttl: default_ttl, ..
        } = self.decide(caller, &lease.path, Capability::Read)
        else {
            return Err(BrokerError::PermissionDenied(format!(
                "no policy lets this identity read {} any more",
                lease.path
            )));
        };
        if lease.expires_ms >= lease.max_expires_ms {
            return Err(BrokerError::FailedPrecondition(format!(
                "lease {lease_id} is at its maximum TTL"
            )));
        }
        let inc = increment.filter(|t| !t.is_zero()).unwrap_or(default_ttl);
        let updated = self
            .store
            .renew_lease(lease_id, now, now + inc.as_millis() as i64)
            .await?
            .ok_or_else(|| {
                BrokerError::FailedPrecondition(format!(
                    "lease {lease_id} has expired or was revoked"
                ))
            })?;
        let latest = self
            .reads
            .latest_version(&updated.path)
            .await?
            .map(|v| v.version);
        Ok(Renewal {
            ttl: Duration::from_millis((updated.expires_ms - now).max(0) as u64),
            renewable_until_unix: to_secs(updated.max_expires_ms),
            newer_version: latest.is_some_and(|v| v > updated.version),
        })
    }

    /// Ends the caller's own lease now.
    pub async fn revoke(&self, caller: &Caller, lease_id: &str) -> Result<()> {
        self.revoke_with(None, caller, lease_id).await
    }

    /// [`Broker::revoke`] for a request authenticated with [`Broker::authenticate_deferred`].
    pub async fn revoke_authenticated(&self, auth: Authenticated, lease_id: &str) -> Result<()> {
        self.revoke_with(auth.audit, &auth.caller, lease_id).await
    }

    async fn revoke_with(
        &self,
        auth: Option<AuditEvent>,
        caller: &Caller,
        lease_id: &str,
    ) -> Result<()> {
        let r = async {
            self.own_lease(caller, lease_id).await?;
            self.store
                .revoke_leases(
                    &LeaseFilter::Id(lease_id.to_owned()),
                    now_ms(),
                    "revoked:holder",
                )
                .await?;
            Ok(())
        }
        .await;
        self.audited_with(
            auth,
            None,
            caller,
            EventKind::Revoke,
            None,
            Some(lease_id),
            r,
        )
        .await
    }

    // ---- admin -------------------------------------------------------------------------

    pub(crate) async fn require(
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

    /// Writes a new version of `path`; returns its number.
    pub async fn put_secret(&self, caller: &Caller, path: &str, data: SecretData) -> Result<i64> {
        validate_secret_path(path)
            .map_err(|e| BrokerError::InvalidArgument(format!("path '{path}': {e}")))?;
        self.require(caller, path, Capability::Write, "secret_put")
            .await?;
        let r = async {
            // Keys become file names in the sidecar's volume: no separators, no dot names.
            for k in data.0.keys() {
                let ok = !k.is_empty()
                    && k.len() <= 253
                    && k != "."
                    && k != ".."
                    && k.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
                if !ok {
                    return Err(BrokerError::InvalidArgument(format!(
                        "secret key '{}' must be 1-253 characters of [-._A-Za-z0-9] and not . or ..",
                        k.escape_debug()
                    )));
                }
            }
            let mut kek = self.current_kek()?;
            let mut refreshed = false;
            for _ in 0..5 {
                let v = self.store.latest_version(path).await? + 1;
                let t0 = std::time::Instant::now();
                let sealed = self.envelope.seal(kek, path, v, &data).await;
                self.metrics.hsm("seal", t0.elapsed());
                let sealed = match sealed {
                    // Our primary was retired by another replica after a rotation we have not
                    // seen yet: adopt the newest KEK once and seal again.
                    Err(CryptoError::Hsm(e))
                        if e.kind() == keyhaven_hsm::ErrorKind::KeyNotFound && !refreshed =>
                    {
                        refreshed = true;
                        kek = self.refresh_kek().await?.ok_or_else(no_kek)?;
                        continue;
                    }
                    other => other?,
                };
                match self.store.insert_version(path, v, now_ms(), &sealed).await {
                    Ok(()) => {
                        self.reads.forget_versions();
                        return Ok(v);
                    }
                    Err(StoreError::Conflict(_)) => continue,
                    Err(StoreError::KekRetired(_)) if !refreshed => {
                        refreshed = true;
                        kek = self.refresh_kek().await?.ok_or_else(no_kek)?;
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Err(BrokerError::Unavailable(format!(
                "too many concurrent writers on {path}"
            )))
        }
        .await;
        self.audited(
            caller,
            EventKind::Admin("secret_put".into()),
            Some(path),
            None,
            r,
        )
        .await
    }

    /// Soft-deletes `path` (history kept) or destroys it (data erased).
    pub async fn delete_secret(&self, caller: &Caller, path: &str, destroy: bool) -> Result<u64> {
        let (cap, verb) = if destroy {
            (Capability::Destroy, "secret_destroy")
        } else {
            (Capability::Delete, "secret_delete")
        };
        self.require(caller, path, cap, verb).await?;
        let r = if destroy {
            self.store.destroy(path, now_ms()).await
        } else {
            self.store.soft_delete(path, now_ms()).await
        }
        .map_err(BrokerError::from);
        self.reads.forget_versions();
        self.audited(caller, EventKind::Admin(verb.into()), Some(path), None, r)
            .await
    }

    /// Replaces all policies with the YAML document (validated first).
    pub async fn apply_policies(&self, caller: &Caller, yaml: &str) -> Result<usize> {
        self.require(caller, "", Capability::Policy, "policy_apply")
            .await?;
        let r = async {
            let set = PolicySet::from_yaml(yaml, self.config.max_ttl_cap)
                .map_err(|e| BrokerError::InvalidArgument(e.to_string()))?;
            self.store
                .save_policies(
                    &set.to_yaml()
                        .map_err(|e| BrokerError::Internal(e.to_string()))?,
                    now_ms(),
                )
                .await?;
            let n = set.policies().len();
            *self.policies.write().unwrap_or_else(|p| p.into_inner()) = set;
            Ok(n)
        }
        .await;
        self.audited(
            caller,
            EventKind::Admin("policy_apply".into()),
            None,
            None,
            r,
        )
        .await
    }

    /// Revokes every active lease matching `filter`; returns their ids.
    pub async fn revoke_leases(
        &self,
        caller: &Caller,
        filter: &LeaseFilter,
    ) -> Result<Vec<String>> {
        let path = match filter {
            LeaseFilter::PathPrefix(p) => p.clone(),
            _ => String::new(),
        };
        self.require(caller, &path, Capability::Revoke, "lease_revoke")
            .await?;
        let r = self
            .store
            .revoke_leases(filter, now_ms(), "revoked:operator")
            .await
            .map_err(BrokerError::from);
        if let Ok(ids) = &r {
            for id in ids {
                self.audited::<()>(caller, EventKind::Revoke, None, Some(id), Ok(()))
                    .await?;
            }
        }
        self.audited(
            caller,
            EventKind::Admin("lease_revoke".into()),
            (!path.is_empty()).then_some(path.as_str()),
            None,
            r,
        )
        .await
    }

    /// One reaper pass: ends expired leases (audited as `expire`); returns how many.
    pub async fn reap(&self, batch: i64) -> Result<usize> {
        let ended = self.store.reap_expired(now_ms(), batch).await?;
        self.metrics.reaped.inc_by(ended.len() as u64);
        for l in &ended {
            let mut ev = AuditEvent::new(now_ms(), EventKind::Expire, Outcome::Ok)
                .with_identity(l.identity.subject())
                .with_path(l.path.clone())
                .with_lease_id(l.id.clone());
            if let Some(p) = &l.identity.pod_name {
                ev = ev.with_pod(p.clone());
            }
            self.audit(ev).await?;
        }
        Ok(ended.len())
    }
}

/// One KEK's status for operators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KekStatus {
    /// KEK id (hex `CKA_ID`).
    pub kek_id: String,
    /// HSM label.
    pub label: String,
    /// `primary` or `decrypt-only`.
    pub role: &'static str,
    /// DEKs it still wraps (soft-deleted versions included, destroyed ones not).
    pub deks: i64,
    /// Creation time from the label (Unix ms), if the label carries one.
    pub created_ms: Option<i64>,
    /// Encryptions recorded under it: DEKs sealed plus DEKs re-wrapped to it.
    pub encryptions: i64,
}

impl Broker {
    /// Paths under `prefix`.
    pub async fn list_secrets(&self, caller: &Caller, prefix: &str) -> Result<Vec<String>> {
        self.require(
            caller,
            prefix.trim_end_matches('/'),
            Capability::List,
            "secret_list",
        )
        .await?;
        let r = self
            .store
            .list_paths(prefix)
            .await
            .map_err(BrokerError::from);
        self.audited(
            caller,
            EventKind::Admin("secret_list".into()),
            (!prefix.is_empty()).then_some(prefix),
            None,
            r,
        )
        .await
    }

    /// Version history of `path` (no values).
    pub async fn secret_metadata(
        &self,
        caller: &Caller,
        path: &str,
    ) -> Result<Vec<crate::store::StoredVersion>> {
        self.require(caller, path, Capability::List, "secret_metadata")
            .await?;
        let r = self
            .store
            .versions(path)
            .await
            .map_err(BrokerError::from)
            .map(|vs| {
                vs.into_iter()
                    .map(|mut v| {
                        v.sealed = v.sealed.map(|mut s| {
                            // Metadata only: drop the encrypted payloads from the answer.
                            s.ciphertext.clear();
                            s.dek.ciphertext.clear();
                            s
                        });
                        v
                    })
                    .collect()
            });
        self.audited(
            caller,
            EventKind::Admin("secret_metadata".into()),
            Some(path),
            None,
            r,
        )
        .await
    }

    /// The current policy document.
    pub async fn list_policies(&self, caller: &Caller) -> Result<String> {
        self.require(caller, "", Capability::Policy, "policy_list")
            .await?;
        let r = self
            .policies()
            .to_yaml()
            .map_err(|e| BrokerError::Internal(e.to_string()));
        self.audited(
            caller,
            EventKind::Admin("policy_list".into()),
            None,
            None,
            r,
        )
        .await
    }

    /// Leases matching `filter`.
    pub async fn list_leases(
        &self,
        caller: &Caller,
        filter: &LeaseFilter,
        include_ended: bool,
    ) -> Result<Vec<LeaseRow>> {
        let path = match filter {
            LeaseFilter::PathPrefix(p) => p.clone(),
            _ => String::new(),
        };
        self.require(caller, &path, Capability::Revoke, "lease_list")
            .await?;
        let r = self
            .store
            .list_leases(filter, now_ms(), include_ended)
            .await
            .map_err(BrokerError::from);
        self.audited(caller, EventKind::Admin("lease_list".into()), None, None, r)
            .await
    }

    /// Verifies the stored audit chain (optionally against an anchor kept elsewhere).
    pub async fn audit_verify(
        &self,
        caller: &Caller,
        anchor: Option<&crate::audit::Checkpoint>,
    ) -> Result<Result<crate::audit::VerifyReport, crate::audit::VerifyError>> {
        self.require(caller, "", Capability::Audit, "audit_verify")
            .await?;
        let mut all = Vec::new();
        let mut after = 0;
        loop {
            let page = self.store.audit_records(after, 10_000).await?;
            let Some(last) = page.last() else { break };
            after = last.seq;
            all.extend(page);
        }
        let report = match anchor {
            Some(a) => crate::audit::verify_with_anchor(all, a),
            None => crate::audit::verify(all),
        };
        self.audited(
            caller,
            EventKind::Admin("audit_verify".into()),
            None,
            None,
            Ok(()),
        )
        .await?;
        Ok(report)
    }

    /// Audit records after `after_seq`.
    pub async fn audit_tail(
        &self,
        caller: &Caller,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<AuditRecord>> {
        self.require(caller, "", Capability::Audit, "audit_tail")
            .await?;
        Ok(self
            .store
            .audit_records(after_seq, limit.clamp(1, 10_000))
            .await?)
    }

    /// Every broker KEK with its role and how many DEKs it still wraps (the `keks` of
    /// [`Broker::key_report`]).
    pub async fn key_status(&self, caller: &Caller) -> Result<Vec<KekStatus>> {
        Ok(self.key_report(caller).await?.keks)
    }
}

impl Broker {
    /// Ready to serve: the database answers and a broker KEK exists.
    pub async fn readiness(&self) -> std::result::Result<(), String> {
        self.store
            .ping()
            .await
            .map_err(|e| format!("database: {e}"))?;
        self.current_kek().map_err(|e| e.to_string())?;
        Ok(())
    }

    /// The Prometheus text exposition (scrape-time figures refreshed first).
    pub async fn metrics_text(&self) -> String {
        let m = &self.metrics;
        if let Ok(n) = self.store.count_active_leases(now_ms()).await {
            m.active_leases.set(n);
        }
        let c = self.envelope.cache().stats();
        m.dek_cache_hits.set(c.hits);
        m.dek_cache_misses.set(c.misses);
        m.dek_cache_entries.set(c.entries as i64);
        let (hits, misses) = self.reads.remembered_stats();
        m.remembered_hits.set(hits);
        m.remembered_misses.set(misses);
        if let Ok(h) = self.store.audit_head().await {
            m.audit_records.set(h.seq);
        }
        if let Ok(n) = self.rewrap_remaining().await {
            m.rewrap_remaining.set(n);
        }
        m.encode()
    }
}

/// Audit records (and possibly a new lease row) waiting for the writer.
struct AuditJob {
    events: Vec<AuditEvent>,
    lease: Option<LeaseRow>,
    /// The secrets generation the lease's version was read under, when it came from memory.
    generation: Option<i64>,
    reply: tokio::sync::oneshot::Sender<Result<Committed>>,
}

/// What became of an audit job.
enum Committed {
    /// Stored; the job's last record.
    Record(Box<AuditRecord>),
    /// Nothing stored: a secret changed since the job's lease version was read.
    Stale,
}

/// The audit writer: group commit. Requests queue their events; one task writes everything
/// waiting (up to 512) in a single transaction, then appends the records to the JSON-lines file
/// in chain order, then answers each request. A request is answered only after its record is
/// durable, so "if audit cannot be written, the request fails" holds, while concurrent requests
/// share one commit instead of queueing on the chain lock one by one.
fn spawn_audit_writer(
    store: Store,
    file: Arc<Mutex<Option<JsonlSink>>>,
    metrics: &crate::metrics::Metrics,
) -> tokio::sync::mpsc::Sender<AuditJob> {
    let (commit_secs, batch_records) = (metrics.audit_commit.clone(), metrics.audit_batch.clone());
    let (tx, mut rx) = tokio::sync::mpsc::channel::<AuditJob>(8192);
    tokio::spawn(async move {
        // Its own connection, and where its last append left the chain: while nobody else
        // appends (one replica), each batch goes in as one statement, without a head read.
        let mut appender = store.audit_appender();
        while let Some(first) = rx.recv().await {
            let mut jobs = vec![first];
            while jobs.len() < 512 {
                match rx.try_recv() {
                    Ok(j) => jobs.push(j),
                    Err(_) => break,
                }
            }
            // Leases whose versions came from memory are guarded by the generation they were
            // read under. Versions read under an older generation than the newest here are
            // outdated already: those jobs are sent back at once.
            let newest = jobs.iter().filter_map(|j| j.generation).max();
            let (mut jobs, outdated): (Vec<_>, Vec<_>) = jobs
                .into_iter()
                .partition(|j| j.generation.is_none() || j.generation == newest);
            for j in outdated {
                let _ = j.reply.send(Ok(Committed::Stale));
            }
            loop {
                let generation = jobs.iter().filter_map(|j| j.generation).max();
                let written = write_audit_jobs(
                    (&store, &file, &mut appender),
                    &mut jobs,
                    generation,
                    (&commit_secs, &batch_records),
                )
                .await;
                match written {
                    Written::Stale => {
                        // Nothing stored: the guarded jobs go back to be made again, the
                        // others are appended without the guard.
                        let (guarded, rest): (Vec<_>, Vec<_>) =
                            jobs.into_iter().partition(|j| j.generation.is_some());
                        for j in guarded {
                            let _ = j.reply.send(Ok(Committed::Stale));
                        }
                        jobs = rest;
                        if jobs.is_empty() {
                            break;
                        }
                    }
                    Written::Answers(answers) => {
                        for (j, a) in jobs.into_iter().zip(answers) {
                            let _ = j.reply.send(a.map(|r| Committed::Record(Box::new(r))));
                        }
                        break;
                    }
                }
            }
        }
    });
    tx
}

/// What one write of a batch of audit jobs came to.
enum Written {
    /// The append was guarded and a secret changed since: nothing stored.
    Stale,
    /// One answer per job, in order.
    Answers(Vec<Result<AuditRecord>>),
}

/// Stores `jobs` in one transaction (guarded by `generation` when given), then appends the
/// records to the JSON-lines file in chain order. The jobs' events and lease rows are moved
/// into the batch, and given back only when nothing was stored ([`Written::Stale`]).
async fn write_audit_jobs(
    (store, file, appender): (
        &Store,
        &Mutex<Option<JsonlSink>>,
        &mut crate::store::AuditAppender,
    ),
    jobs: &mut [AuditJob],
    generation: Option<i64>,
    (commit_secs, batch_records): (
        &prometheus_client::metrics::histogram::Histogram,
        &prometheus_client::metrics::histogram::Histogram,
    ),
) -> Written {
    let mut events = Vec::with_capacity(jobs.len() * 2);
    let mut leases = Vec::new();
    // Where each job's events end, and whether it brought a lease row.
    let mut ends = Vec::with_capacity(jobs.len());
    for j in jobs.iter_mut() {
        events.append(&mut j.events);
        let lease = j.lease.take();
        ends.push((events.len(), lease.is_some()));
        leases.extend(lease);
    }
    batch_records.observe(events.len() as f64);
    let t0 = std::time::Instant::now();
    let appended = appender.append_at(&events, &leases, generation).await;
    commit_secs.observe(t0.elapsed().as_secs_f64());
    let recs = match appended {
        Ok(recs) => recs,
        Err(StoreError::StaleGeneration { .. }) => {
            // Each job gets its own events and lease row back, last job first.
            for (i, j) in jobs.iter_mut().enumerate().rev() {
                j.events = events.split_off(if i == 0 { 0 } else { ends[i - 1].0 });
                if ends[i].1 {
                    j.lease = leases.pop();
                }
            }
            return Written::Stale;
        }
        Err(e) => {
            tracing::error!(error = %e, "audit write failed; refusing the requests");
            return Written::Answers(
                jobs.iter()
                    .map(|_| Err(BrokerError::Unavailable("audit log unavailable".into())))
                    .collect(),
            );
        }
    };
    let file_failed = {
        let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
        match f.as_mut() {
            Some(sink) => recs.iter().find_map(|r| sink.append(r).err()),
            None => None,
        }
    };
    if let Some(e) = &file_failed {
        tracing::error!(error = %e, "audit file write failed; refusing the requests");
        // The leases of this batch are stored, but their requests fail: end them, so no
        // lease exists that its holder was told it did not get.
        for l in &leases {
            if let Err(e) = store
                .revoke_leases(
                    &LeaseFilter::Id(l.id.clone()),
                    now_ms(),
                    "revoked:audit_failed",
                )
                .await
            {
                tracing::error!(lease_id = %l.id, error = %e, "could not end a lease whose audit failed (it expires by its TTL)");
            }
        }
    }
    Written::Answers(
        ends.into_iter()
            // Each job's answer is the last record of its own events.
            .map(
                |(end, _)| match (&file_failed, recs.get(end.saturating_sub(1))) {
                    (None, Some(rec)) => Ok(rec.clone()),
                    (None, None) => Err(BrokerError::Internal("audit writer lost a record".into())),
                    (Some(_), _) => Err(BrokerError::Unavailable("audit file unavailable".into())),
                },
            )
            .collect(),
    )
}

fn no_kek() -> BrokerError {
    BrokerError::Unavailable("no broker KEK on the HSM token: run `brokerctl keys init`".into())
}

fn auth_error(e: &AuthError) -> BrokerError {
    if e.is_unavailable() {
        BrokerError::Unavailable("token keys unavailable".into())
    } else {
        BrokerError::Unauthenticated(e.reason().to_owned())
    }
}

/// `namespace/serviceaccount/path/<128 random bits hex>`.
fn new_lease_id(id: &Identity, path: &str) -> Result<String> {
    let mut r = Zeroizing::new([0u8; 16]);
    getrandom::fill(&mut r[..])
        .map_err(|_| BrokerError::Internal("random number generator failed".into()))?;
    Ok(format!(
        "{}/{}/{}/{}",
        id.namespace,
        id.service_account,
        path,
        hex::encode(&r[..])
    ))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use sha2::Digest;
    // Compare digests so neither length nor content leaks through timing.
    let (x, y) = (sha2::Sha256::digest(a), sha2::Sha256::digest(b));
    x.iter()
        .zip(y.iter())
        .fold(0u8, |acc, (p, q)| acc | (p ^ q))
        == 0
}
