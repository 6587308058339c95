//! `/healthz` (alive), `/readyz` (database answers and a KEK exists), `/metrics` (Prometheus).

use std::sync::Arc;

use crate::service::Broker;

/// Serves until `shutdown` resolves.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    broker: Arc<Broker>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::http::StatusCode;
    use axum::routing::get;
    let b1 = broker.clone();
    let b2 = broker;
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let b = b1.clone();
                async move {
                    match b.readiness().await {
                        Ok(()) => (StatusCode::OK, "ok\n".to_string()),
                        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let b = b2.clone();
                async move { b.metrics_text().await }
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
