//! The plugin's HTTP listener: `/healthz`, `/readyz`, `/metrics` and `/keys`.

use std::sync::Arc;

/// Serves the HTTP endpoints until `shutdown` resolves.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    plugin: Arc<crate::plugin::Plugin>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::http::StatusCode;
    use axum::routing::get;
    let p1 = plugin.clone();
    let p2 = plugin.clone();
    let p3 = plugin;
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let p = p1.clone();
                async move {
                    let h = p.healthz();
                    if h == "ok" {
                        (StatusCode::OK, "ok\n".to_string())
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, format!("{h}\n"))
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let p = p2.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        p.metrics().encode(),
                    )
                }
            }),
        )
        .route(
            "/keys",
            get(move || {
                let p = p3.clone();
                async move { axum::Json(p.key_report()) }
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
