//! The plugin's HTTP listener: `/healthz`, `/readyz`, `/metrics` and `/keys`.

use std::sync::Arc;

/// Serves the HTTP endpoints until `shutdown` resolves. Up before the HSM login: until the
/// plugin runs, `/readyz` answers 503 with the login's reason and `/keys` 503.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    ready: Arc<crate::health::Readiness>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    use axum::routing::get;
    let r1 = ready.clone();
    let r2 = ready.clone();
    let r3 = ready;
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let r = r1.clone();
                async move {
                    match r.check() {
                        Ok(()) => (StatusCode::OK, "ok\n".to_string()),
                        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let r = r2.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        r.metrics_text(),
                    )
                }
            }),
        )
        .route(
            "/keys",
            get(move || {
                let r = r3.clone();
                async move {
                    match r.plugin() {
                        Some(p) => axum::Json(p.key_report()).into_response(),
                        None => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "not logged in to the HSM yet\n",
                        )
                            .into_response(),
                    }
                }
            }),
        );
    use keyhaven_process::http::{serve, Limits, Plain};
    serve(listener, app, Plain, Limits::HEALTH, shutdown).await;
}
