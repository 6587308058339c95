//! Prometheus metrics and the `/healthz`, `/readyz`, `/metrics` listener.

use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::agent::Shared;

/// `outcome` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// `ok`, `refused`, `unauthenticated`, `unavailable`.
    pub outcome: String,
}

/// `reason` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    /// What failed.
    pub reason: String,
}

/// `file` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FileLabel {
    /// The file under the output directory.
    pub file: String,
}

/// The agent's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Leases currently held.
    pub leases_held: Gauge,
    /// Lease calls by outcome.
    pub leases: Family<Outcome, Counter>,
    /// Renew calls by outcome.
    pub renewals: Family<Outcome, Counter>,
    /// Failures by reason (lease, renew, render, write, revoke...).
    pub failures: Family<Reason, Counter>,
    /// Files written.
    pub file_writes: Counter,
    /// Seconds until each file's lease expires (negative: ended).
    pub expiry_seconds: Family<FileLabel, Gauge>,
    /// 1 when every file is in place.
    pub ready: Gauge,
}

impl Metrics {
    /// Counts one lease call.
    pub fn lease(&self, outcome: &str) {
        self.leases
            .get_or_create(&Outcome {
                outcome: outcome.into(),
            })
            .inc();
    }

    /// Counts one renew call.
    pub fn renewal(&self, outcome: &str) {
        self.renewals
            .get_or_create(&Outcome {
                outcome: outcome.into(),
            })
            .inc();
    }

    /// Counts one failure.
    pub fn failure(&self, reason: &str) {
        self.failures
            .get_or_create(&Reason {
                reason: reason.into(),
            })
            .inc();
    }

    fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("keyhaven_agent");
        r.register(
            "leases_held",
            "Leases currently held",
            self.leases_held.clone(),
        );
        r.register("leases", "Lease calls by outcome", self.leases.clone());
        r.register("renewals", "Renew calls by outcome", self.renewals.clone());
        r.register("failures", "Failures by reason", self.failures.clone());
        r.register(
            "file_writes",
            "Secret files written",
            self.file_writes.clone(),
        );
        r.register(
            "lease_expiry_seconds",
            "Seconds until the lease behind each file expires",
            self.expiry_seconds.clone(),
        );
        r.register(
            "ready",
            "1 when every secret file is in place",
            self.ready.clone(),
        );
        r
    }
}

/// Serves `/healthz`, `/readyz` and `/metrics` on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(shared);
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "metrics listener up (/healthz, /readyz, /metrics)");
    }
    axum::serve(listener, app).await
}

async fn readyz(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    let missing = s.not_ready();
    if missing.is_empty() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {} not written\n", missing.join(", ")),
        )
    }
}

async fn metrics(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    let now = SystemTime::now();
    for (file, expires) in s.expiries() {
        let secs = match expires {
            Some(t) => match t.duration_since(now) {
                Ok(d) => d.as_secs() as i64,
                Err(e) => -(e.duration().as_secs() as i64),
            },
            None => 0,
        };
        s.metrics
            .expiry_seconds
            .get_or_create(&FileLabel { file })
            .set(secs);
    }
    let mut out = String::new();
    match prometheus_client::encoding::text::encode(&mut out, &s.metrics.registry()) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            out,
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            "encoding failed\n".to_string(),
        ),
    }
}
