//! `/healthz` (alive), `/readyz` (logged in to the HSM; database and HSM answer: see
//! [`crate::health`]), `/metrics` (Prometheus). Up before the HSM login.

use std::sync::Arc;

use crate::health::Health;

/// Serves until `shutdown` resolves.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    health: Arc<Health>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    use axum::http::StatusCode;
    use axum::routing::get;
    let h1 = health.clone();
    let h2 = health;
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let h = h1.clone();
                async move {
                    match h.check() {
                        Ok(()) => (StatusCode::OK, "ok\n".to_string()),
                        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let h = h2.clone();
                async move { h.metrics_text().await }
            }),
        );
    use keyhaven_process::http::{serve, Limits, Plain};
    serve(listener, app, Plain, Limits::HEALTH, shutdown).await;
}
