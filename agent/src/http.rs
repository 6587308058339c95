//! The agent's HTTP listener: `/healthz`, `/readyz` (every file in place under a lease) and `/metrics`.

use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::agent::Shared;
use crate::metrics::FileLabel;

/// Serves `/healthz`, `/readyz` and `/metrics` on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(shared);
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "metrics listener up (/healthz, /readyz, /metrics)");
    }
    use keyhaven_process::http::{serve, Limits, Plain};
    serve(listener, app, Plain, Limits::HEALTH, std::future::pending()).await;
}

async fn readyz(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    let missing = s.not_ready();
    if missing.is_empty() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", missing.join("; ")),
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
