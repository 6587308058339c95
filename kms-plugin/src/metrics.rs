//! Prometheus metrics of the plugin (served by [`crate::http`]).

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of request metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodCode {
    /// `Status`, `Encrypt` or `Decrypt`.
    pub method: &'static str,
    /// gRPC code name (`Ok`, `InvalidArgument`, ...).
    pub code: String,
}

/// Labels of HSM metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HsmOp {
    /// `encrypt`, `decrypt`, `self_test`, `list`.
    pub op: &'static str,
}

/// Labels of per-key metrics: only key_ids of KEKs on the token (a bounded set).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyOp {
    /// `encrypt` or `decrypt`.
    pub op: &'static str,
    /// The KEK's key_id.
    pub key_id: String,
}

/// One KEK's operation counters (detached, counting nowhere, until [`Metrics::for_key`]).
#[derive(Debug, Clone, Default)]
pub struct KeyMetrics {
    encrypts: Counter,
    decrypts: Counter,
    last_encrypt: Gauge,
    last_decrypt: Gauge,
}

impl KeyMetrics {
    /// Counts one successful Encrypt.
    pub fn encrypted(&self) {
        self.encrypts.inc();
        self.last_encrypt.set(unix_now());
    }

    /// Counts one successful Decrypt.
    pub fn decrypted(&self) {
        self.decrypts.inc();
        self.last_decrypt.set(unix_now());
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.00005, 2.0, 18))
}

/// Every metric the plugin exports.
pub struct Metrics {
    registry: Registry,
    requests: Family<MethodCode, Counter>,
    latency: Family<MethodCode, Histogram, fn() -> Histogram>,
    hsm_latency: Family<HsmOp, Histogram, fn() -> Histogram>,
    /// 1 while the last self-test passed.
    pub self_test_ok: Gauge,
    /// Unix time of the last passed self-test.
    pub self_test_last_success: Gauge<f64, AtomicU64>,
    /// A 48-bit hash of the current key_id (changes when the primary KEK changes).
    pub key_id_hash: Gauge,
    /// Number of KEKs usable for Decrypt.
    pub keks: Gauge,
    /// Connections refused by `--allow-uid`.
    pub refused_peers: Counter,
    key_ops: Family<KeyOp, Counter>,
    key_last_used: Family<KeyOp, Gauge>,
    login: keyhaven_hsm::login_metrics::LoginMetrics,
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
    /// Registers everything under the `keyhaven_kms` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("keyhaven_kms");
        let requests = Family::<MethodCode, Counter>::default();
        let latency = Family::<MethodCode, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        let hsm_latency =
            Family::<HsmOp, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        let self_test_ok = Gauge::default();
        let self_test_last_success = Gauge::<f64, AtomicU64>::default();
        let key_id_hash = Gauge::default();
        let keks = Gauge::default();
        let refused_peers = Counter::default();
        let key_ops = Family::<KeyOp, Counter>::default();
        let key_last_used = Family::<KeyOp, Gauge>::default();
        let login = keyhaven_hsm::login_metrics::LoginMetrics::default();
        login.register(&mut registry);
        registry.register(
            "key_operations",
            "Successful Encrypt/Decrypt calls by KEK key_id (keys on the token only)",
            key_ops.clone(),
        );
        registry.register(
            "key_last_used_timestamp_seconds",
            "Unix time of the last successful Encrypt/Decrypt by KEK key_id since the plugin started",
            key_last_used.clone(),
        );
        registry.register(
            "requests",
            "gRPC requests by method and code",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "gRPC request latency by method and code",
            latency.clone(),
        );
        registry.register(
            "hsm_operation_duration_seconds",
            "HSM operation latency",
            hsm_latency.clone(),
        );
        registry.register(
            "self_test_ok",
            "1 if the last HSM self-test passed",
            self_test_ok.clone(),
        );
        registry.register(
            "self_test_last_success_timestamp_seconds",
            "Unix time of the last passed HSM self-test",
            self_test_last_success.clone(),
        );
        registry.register(
            "key_id_hash",
            "48-bit hash of the current key_id; changes on rotation",
            key_id_hash.clone(),
        );
        registry.register("keks", "KEKs usable for Decrypt", keks.clone());
        registry.register(
            "refused_peers",
            "Requests refused because the peer UID is not in --allow-uid",
            refused_peers.clone(),
        );
        Metrics {
            registry,
            requests,
            latency,
            hsm_latency,
            self_test_ok,
            self_test_last_success,
            key_id_hash,
            keks,
            refused_peers,
            key_ops,
            key_last_used,
            login,
        }
    }

    /// Copies the login figures of `login` (and of this process) into their metrics.
    pub fn set_login(&self, login: &keyhaven_hsm::login::LoginStatus) {
        self.login.set(login);
    }

    /// The per-key counters of `key_id` (registered once; updating them is a few atomics).
    pub fn for_key(&self, key_id: &str) -> KeyMetrics {
        let labels = |op| KeyOp {
            op,
            key_id: key_id.to_owned(),
        };
        // One statement each: a Family's read guard lives to the end of its statement, and
        // creating the next label needs its write lock.
        let encrypts = self.key_ops.get_or_create(&labels("encrypt")).clone();
        let decrypts = self.key_ops.get_or_create(&labels("decrypt")).clone();
        let last_encrypt = self.key_last_used.get_or_create(&labels("encrypt")).clone();
        let last_decrypt = self.key_last_used.get_or_create(&labels("decrypt")).clone();
        KeyMetrics {
            encrypts,
            decrypts,
            last_encrypt,
            last_decrypt,
        }
    }

    /// Records one finished request.
    pub fn request(&self, method: &'static str, code: tonic::Code, elapsed: Duration) {
        let labels = MethodCode {
            method,
            code: format!("{code:?}"),
        };
        self.requests.get_or_create(&labels).inc();
        self.latency
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }

    /// Records one HSM operation.
    pub fn hsm(&self, op: &'static str, elapsed: Duration) {
        self.hsm_latency
            .get_or_create(&HsmOp { op })
            .observe(elapsed.as_secs_f64());
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The hash exported as `key_id_hash`: first 6 bytes of SHA-256, exact in an f64/i64.
pub fn key_id_hash(key_id: &str) -> i64 {
    use sha2::Digest;
    let d = sha2::Sha256::digest(key_id.as_bytes());
    let mut b = [0u8; 8];
    b[2..].copy_from_slice(&d[..6]);
    i64::from_be_bytes(b)
}
