//! Prometheus metrics of the broker (`keyhaven_broker_` prefix).

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

mod db;
pub use db::DbMetrics;

/// Request labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodCode {
    /// RPC method.
    pub method: &'static str,
    /// gRPC code name.
    pub code: String,
}

/// A single `reason` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    /// Short code.
    pub reason: String,
}

/// A single `op` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Op {
    /// Operation.
    pub op: &'static str,
}

fn histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

/// Every broker metric.
pub struct Metrics {
    registry: Registry,
    requests: Family<MethodCode, Counter>,
    latency: Family<MethodCode, Histogram, fn() -> Histogram>,
    auth_failures: Family<Reason, Counter>,
    hsm: Family<Op, Histogram, fn() -> Histogram>,
    hsm_calls: Family<Op, Histogram, fn() -> Histogram>,
    /// Leases ended by the reaper.
    pub reaped: Counter,
    /// Active leases (set at scrape time).
    pub active_leases: Gauge,
    /// The policy generation this replica enforces.
    pub policy_generation: Gauge,
    /// DEK cache hits (set at scrape time).
    pub dek_cache_hits: Gauge<u64, AtomicU64>,
    /// DEK cache misses (set at scrape time).
    pub dek_cache_misses: Gauge<u64, AtomicU64>,
    /// DEKs in the cache (set at scrape time).
    pub dek_cache_entries: Gauge,
    /// Lease versions taken from memory (set at scrape time).
    pub remembered_hits: Gauge<u64, AtomicU64>,
    /// Lease versions read from the database (set at scrape time).
    pub remembered_misses: Gauge<u64, AtomicU64>,
    /// Leases made again because a secret changed after their remembered version was read.
    pub remembered_stale: Counter,
    /// Audit records written (head seq, set at scrape time).
    pub audit_records: Gauge,
    /// DEKs this replica re-wrapped to a newer KEK.
    pub rewrapped_deks: Counter,
    /// KEK rotations this replica made (by command or automatically).
    pub kek_rotations: Counter,
    /// Live DEKs still wrapped by an older KEK (set at scrape time).
    pub rewrap_remaining: Gauge,
    /// Seconds per audit append (one durable commit of a group of requests).
    pub audit_commit: Histogram,
    /// Records per audit append (how many requests share a commit).
    pub audit_batch: Histogram,
    /// Seconds a request's records waited for the audit writer, then for their commit.
    pub audit_wait: Histogram,
    /// Leases the pod / service-account watch ended, by end reason.
    pub holder_gone_ended: Family<Reason, Counter>,
    /// Full lists the pod / service-account watch made (its start, each re-list), by resource.
    pub holder_watch_lists: Family<Resource, Counter>,
    /// Errors of the pod / service-account watch (apiserver or database), by resource.
    pub holder_watch_errors: Family<Resource, Counter>,
    /// 1 while the last database and HSM probe passed (see [`crate::health`]).
    pub ready: Gauge,
    /// gRPC connections open (set at scrape time; at most `--max-connections`).
    pub connections_open: Gauge,
    login: keyhaven_hsm::login_metrics::LoginMetrics,
    /// Dynamic database credentials.
    pub db: DbMetrics,
}

/// A single `resource` label (`pods`, `serviceaccounts`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Resource {
    /// The Kubernetes resource.
    pub resource: &'static str,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers everything.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("keyhaven_broker");
        let requests = Family::<MethodCode, Counter>::default();
        let latency =
            Family::<MethodCode, Histogram, fn() -> Histogram>::new_with_constructor(histogram);
        let auth_failures = Family::<Reason, Counter>::default();
        let hsm = Family::<Op, Histogram, fn() -> Histogram>::new_with_constructor(histogram);
        let hsm_calls = Family::<Op, Histogram, fn() -> Histogram>::new_with_constructor(histogram);
        let reaped = Counter::default();
        let active_leases = Gauge::default();
        let policy_generation = Gauge::default();
        let dek_cache_hits = Gauge::<u64, AtomicU64>::default();
        let dek_cache_misses = Gauge::<u64, AtomicU64>::default();
        let dek_cache_entries = Gauge::default();
        let remembered_hits = Gauge::<u64, AtomicU64>::default();
        let remembered_misses = Gauge::<u64, AtomicU64>::default();
        let remembered_stale = Counter::default();
        let audit_records = Gauge::default();
        let rewrapped_deks = Counter::default();
        let kek_rotations = Counter::default();
        let rewrap_remaining = Gauge::default();
        let audit_commit = histogram();
        let audit_batch = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        let audit_wait = histogram();
        registry.register(
            "audit_commit_duration_seconds",
            "Audit append latency: one transaction with the records (and new lease rows) of every request waiting",
            audit_commit.clone(),
        );
        registry.register(
            "audit_batch_records",
            "Audit records per append (group commit)",
            audit_batch.clone(),
        );
        registry.register(
            "audit_wait_duration_seconds",
            "From a request handing its records to the audit writer to their commit",
            audit_wait.clone(),
        );
        registry.register(
            "rewrapped_deks",
            "DEKs re-wrapped to a newer KEK by this replica",
            rewrapped_deks.clone(),
        );
        registry.register(
            "kek_rotations",
            "KEK rotations made by this replica",
            kek_rotations.clone(),
        );
        registry.register(
            "rewrap_remaining_deks",
            "Live DEKs still wrapped by an older KEK",
            rewrap_remaining.clone(),
        );
        registry.register(
            "requests",
            "gRPC requests by method and code",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "gRPC latency by method and code",
            latency.clone(),
        );
        registry.register(
            "auth_failures",
            "Refused credentials by reason",
            auth_failures.clone(),
        );
        registry.register(
            "envelope_duration_seconds",
            "Secret seal/open latency (HSM call or DEK-cache hit, plus AES-GCM of the data)",
            hsm.clone(),
        );
        registry.register(
            "hsm_operation_duration_seconds",
            "HSM call latency: wrap (new DEK), unwrap (DEK-cache miss), rewrap (a re-wrap batch lane)",
            hsm_calls.clone(),
        );
        registry.register(
            "reaped_leases",
            "Leases ended by the reaper",
            reaped.clone(),
        );
        registry.register("active_leases", "Active leases", active_leases.clone());
        registry.register(
            "policy_generation",
            "The policy generation this replica enforces",
            policy_generation.clone(),
        );
        registry.register(
            "dek_cache_hits",
            "DEK cache hits since start",
            dek_cache_hits.clone(),
        );
        registry.register(
            "dek_cache_misses",
            "DEK cache misses since start",
            dek_cache_misses.clone(),
        );
        registry.register(
            "dek_cache_entries",
            "DEKs in the cache",
            dek_cache_entries.clone(),
        );
        registry.register(
            "lease_version_memory_hits",
            "Leases whose secret version came from memory since start",
            remembered_hits.clone(),
        );
        registry.register(
            "lease_version_memory_misses",
            "Leases whose secret version was read from the database since start",
            remembered_misses.clone(),
        );
        registry.register(
            "lease_version_memory_stale",
            "Leases made again from a fresh read because a secret changed after their remembered version was read",
            remembered_stale.clone(),
        );
        registry.register(
            "audit_records",
            "Audit records in the log",
            audit_records.clone(),
        );
        let holder_gone_ended = Family::<Reason, Counter>::default();
        let holder_watch_lists = Family::<Resource, Counter>::default();
        let holder_watch_errors = Family::<Resource, Counter>::default();
        registry.register(
            "holder_gone_ended_leases",
            "Leases ended because the pod or service account holding them was deleted (reason: revoked:pod_deleted, revoked:serviceaccount_deleted)",
            holder_gone_ended.clone(),
        );
        registry.register(
            "holder_watch_lists",
            "Full lists made by the pod / service-account watch (its start and every re-list: 410 Gone, periodic resync, after an error)",
            holder_watch_lists.clone(),
        );
        registry.register(
            "holder_watch_errors",
            "Errors of the pod / service-account watch (apiserver unreachable or refusing, database failures while ending leases)",
            holder_watch_errors.clone(),
        );
        let ready = Gauge::default();
        let connections_open = Gauge::default();
        registry.register(
            "connections_open",
            "gRPC connections open (at most --max-connections)",
            connections_open.clone(),
        );
        let login = keyhaven_hsm::login_metrics::LoginMetrics::default();
        login.register(&mut registry);
        let db = DbMetrics::default();
        db.register(&mut registry);
        registry.register(
            "ready",
            "1 while the last database and HSM probe passed",
            ready.clone(),
        );
        Metrics {
            registry,
            requests,
            latency,
            auth_failures,
            hsm,
            hsm_calls,
            reaped,
            active_leases,
            policy_generation,
            dek_cache_hits,
            dek_cache_misses,
            dek_cache_entries,
            remembered_hits,
            remembered_misses,
            remembered_stale,
            audit_records,
            rewrapped_deks,
            kek_rotations,
            rewrap_remaining,
            audit_commit,
            audit_batch,
            audit_wait,
            holder_gone_ended,
            holder_watch_lists,
            holder_watch_errors,
            ready,
            connections_open,
            login,
            db,
        }
    }

    /// Copies the login figures of `login` (and of this process) into their metrics.
    pub fn set_login(&self, login: &keyhaven_hsm::login::LoginStatus) {
        self.login.set(login);
    }

    /// One finished RPC.
    pub fn request(&self, method: &'static str, code: tonic::Code, elapsed: Duration) {
        let l = MethodCode {
            method,
            code: format!("{code:?}"),
        };
        self.requests.get_or_create(&l).inc();
        self.latency
            .get_or_create(&l)
            .observe(elapsed.as_secs_f64());
    }

    /// One refused credential.
    pub fn auth_failure(&self, reason: &str) {
        self.auth_failures
            .get_or_create(&Reason {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// An observer recording each HSM call in `hsm_operation_duration_seconds{op}` (for
    /// [`crate::crypto::Envelope::set_hsm_observer`]).
    pub fn hsm_observer(&self) -> crate::crypto::HsmObserver {
        let family = self.hsm_calls.clone();
        std::sync::Arc::new(move |op: &'static str, elapsed: Duration| {
            family
                .get_or_create(&Op { op })
                .observe(elapsed.as_secs_f64());
        })
    }

    /// One seal/open.
    pub fn hsm(&self, op: &'static str, elapsed: Duration) {
        self.hsm
            .get_or_create(&Op { op })
            .observe(elapsed.as_secs_f64());
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
