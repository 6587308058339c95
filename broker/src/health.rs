//! What the broker's health endpoints report, from the first second of the process.
//!
//! The HTTP listener (`/healthz`, `/readyz`, `/metrics`) and the gRPC health service are up
//! before the HSM login, so a refused PIN shows as `/readyz` 503 with its reason and gRPC
//! NOT_SERVING, and the liveness probe never restarts the process into one more failed login
//! (see `keyhaven_hsm::login`). Once the broker runs, a probe every [`PROBE_INTERVAL`] asks
//! the database (`SELECT 1`) and the HSM (an encrypt/decrypt round trip with the primary KEK),
//! each within [`PROBE_TIMEOUT`]; `/readyz` answers its cached verdict and the gRPC health
//! service (the whole server, `""`, and each broker service) follows it: NOT_SERVING within
//! `PROBE_INTERVAL + PROBE_TIMEOUT` of either failing, SERVING again after the first good
//! probe.

use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use keyhaven_hsm::login::LoginStatus;
use keyhaven_proto::broker::v1::admin_server::AdminServer;
use keyhaven_proto::broker::v1::leases_server::LeasesServer;
use tonic::server::NamedService;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::grpc::Edge;
use crate::metrics::Metrics;
use crate::service::Broker;

/// How often a running broker probes its database and HSM.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// How long one probe of the database or the HSM may take before it counts as failed.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The gRPC service names whose health follows the broker's (`""` is the whole server).
const SERVICES: [&str; 3] = [
    "",
    <LeasesServer<Edge> as NamedService>::NAME,
    <AdminServer<Edge> as NamedService>::NAME,
];

/// Stands in for the broker service `T` until the broker is assembled: every call is answered
/// UNAVAILABLE (clients retry with back-off) rather than UNIMPLEMENTED.
pub struct Starting<T>(std::marker::PhantomData<fn() -> T>);

impl<T> Starting<T> {
    /// The stand-in.
    pub fn new() -> Self {
        Starting(std::marker::PhantomData)
    }
}

impl<T> std::fmt::Debug for Starting<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Starting")
    }
}

impl<T> Default for Starting<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Clone for Starting<T> {
    fn clone(&self) -> Self {
        Self::new()
    }
}

impl<T: NamedService> NamedService for Starting<T> {
    const NAME: &'static str = T::NAME;
}

impl<T, B> tonic::codegen::Service<tonic::codegen::http::Request<B>> for Starting<T> {
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: tonic::codegen::http::Request<B>) -> Self::Future {
        std::future::ready(Ok(tonic::Status::unavailable(
            "the broker is starting (see its /readyz): retry with back-off",
        )
        .into_http()))
    }
}

/// Readiness shared by `/readyz`, `/metrics` and the gRPC health service.
pub struct Health {
    /// Where the HSM login stands.
    pub login: Arc<LoginStatus>,
    broker: OnceLock<Arc<Broker>>,
    /// Metrics answered before the broker (and its own metrics) exist.
    early_metrics: Metrics,
    verdict: RwLock<Result<(), String>>,
    reporter: HealthReporter,
    connections: OnceLock<Arc<std::sync::atomic::AtomicUsize>>,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health")
            .field("login", &self.login)
            .finish_non_exhaustive()
    }
}

impl Health {
    /// Before the login: NOT_SERVING everywhere. Returns the gRPC health service too.
    pub async fn new() -> (
        Arc<Self>,
        tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    ) {
        let (reporter, service) = tonic_health::server::health_reporter();
        for s in SERVICES {
            reporter
                .set_service_status(s, ServingStatus::NotServing)
                .await;
        }
        let h = Arc::new(Health {
            login: Arc::default(),
            broker: OnceLock::new(),
            early_metrics: Metrics::new(),
            verdict: RwLock::new(Err("starting".into())),
            reporter,
            connections: OnceLock::new(),
        });
        (h, service)
    }

    /// `Ok` when ready, else why not: the login's reason, then the last probe's.
    pub fn check(&self) -> Result<(), String> {
        if let Some(why) = self.login.not_ready_reason() {
            return Err(why);
        }
        self.verdict
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Reports the open gRPC connections `open` counts in the metrics.
    pub fn count_connections(&self, open: Arc<std::sync::atomic::AtomicUsize>) {
        let _ = self.connections.set(open);
    }

    /// The metrics text (the broker's once it runs), login and connection figures refreshed.
    pub async fn metrics_text(&self) -> String {
        let open = self.connections.get().map_or(0, |c| {
            i64::try_from(c.load(std::sync::atomic::Ordering::Relaxed)).unwrap_or(i64::MAX)
        });
        match self.broker.get() {
            Some(b) => {
                b.metrics().set_login(&self.login);
                b.metrics().connections_open.set(open);
                b.metrics_text().await
            }
            None => {
                self.early_metrics.set_login(&self.login);
                self.early_metrics.connections_open.set(open);
                self.early_metrics.encode()
            }
        }
    }

    /// Records the running broker and starts probing it every [`PROBE_INTERVAL`].
    pub fn start_probing(self: &Arc<Self>, broker: Arc<Broker>) {
        let _ = self.broker.set(broker);
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PROBE_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last: Option<bool> = None;
            loop {
                tick.tick().await;
                let Some(h) = weak.upgrade() else { return };
                let Some(b) = h.broker.get().cloned() else {
                    return;
                };
                let verdict = b.probe(PROBE_TIMEOUT).await;
                let ok = verdict.is_ok();
                match (&verdict, last) {
                    (Err(why), Some(true) | None) => {
                        tracing::warn!(reason = %why, "not ready: gRPC health NOT_SERVING")
                    }
                    (Ok(()), Some(false)) => tracing::info!("ready again: gRPC health SERVING"),
                    _ => {}
                }
                b.metrics().ready.set(i64::from(ok));
                *h.verdict.write().unwrap_or_else(|p| p.into_inner()) = verdict;
                if last != Some(ok) {
                    let status = if ok {
                        ServingStatus::Serving
                    } else {
                        ServingStatus::NotServing
                    };
                    for s in SERVICES {
                        h.reporter.set_service_status(s, status).await;
                    }
                    last = Some(ok);
                }
            }
        });
    }
}
