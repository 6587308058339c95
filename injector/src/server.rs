//! The HTTPS listener: `/mutate`, `/healthz`, `/readyz`, `/metrics`.
//!
//! Connections ([`keyhaven_process::http`]): at most `--max-connections` at once (more wait in
//! the kernel's backlog), a TLS handshake timeout, a request timeout (headers, the wait on an
//! idle connection, and the body), HTTP/1.1 keep-alive, and a graceful close after
//! `--max-connection-age`. On SIGTERM the listener closes and open connections finish their
//! request first.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use keyhaven_process::http::{self, Handshake, Limits};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::config::{InjectionConfig, ServeArgs};
use crate::metrics::Metrics;
use crate::review;
use crate::tls::ReloadingCert;

/// Largest AdmissionReview body accepted: a pod is at most ~1.5 MiB in etcd, and a CREATE
/// review carries it once.
pub const MAX_BODY: usize = 3 * 1024 * 1024;

/// What the handlers share.
#[derive(Debug)]
pub struct AppState {
    /// What is injected.
    pub cfg: InjectionConfig,
    /// Metrics.
    pub metrics: Metrics,
    /// The serving certificate.
    pub cert: Arc<ReloadingCert>,
    /// Deadline of reading one request body.
    pub request_timeout: Duration,
}

/// How long open connections get to finish after SIGTERM.
const DRAIN: Duration = Duration::from_secs(15);

/// Connection limits from the flags.
pub fn limits(a: &ServeArgs) -> Limits {
    Limits {
        max_connections: a.max_connections as usize,
        handshake_timeout: a.tls_handshake_timeout,
        header_timeout: a.request_timeout,
        max_age: a.max_connection_age,
        drain: DRAIN,
    }
}

/// The routes.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/mutate", post(mutate))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn mutate(State(s): State<Arc<AppState>>, req: axum::extract::Request) -> Response {
    let started = Instant::now();
    let too_big = || {
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("an AdmissionReview is at most {MAX_BODY} bytes\n"),
        )
            .into_response()
    };
    // Refused before a byte of the body is read when its announced length is over the limit.
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > MAX_BODY as u64) {
        s.metrics.review("invalid", started.elapsed().as_secs_f64());
        return too_big();
    }
    let body: Body = req.into_body();
    let bytes =
        match tokio::time::timeout(s.request_timeout, axum::body::to_bytes(body, MAX_BODY)).await {
            Ok(Ok(b)) => b,
            Ok(Err(_)) => {
                s.metrics.review("invalid", started.elapsed().as_secs_f64());
                return too_big();
            }
            Err(_) => {
                s.metrics.review("invalid", started.elapsed().as_secs_f64());
                return (StatusCode::REQUEST_TIMEOUT, "request body too slow\n").into_response();
            }
        };
    let answer = review::answer(&bytes, &s.cfg);
    s.metrics
        .review(answer.outcome.label(), started.elapsed().as_secs_f64());
    let uid = answer
        .body
        .pointer("/response/uid")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    match answer.outcome {
        review::Outcome::Injected => tracing::info!(uid, "injected the agent"),
        review::Outcome::Untouched(why) => tracing::debug!(uid, why, "allowed untouched"),
        review::Outcome::Denied => {
            let message = answer
                .body
                .pointer("/response/status/message")
                .and_then(|v| v.as_str())
                .unwrap_or("");
            tracing::info!(uid, message, "refused a pod")
        }
        review::Outcome::Invalid => tracing::warn!("answered an invalid AdmissionReview"),
    }
    let status = if answer.outcome == review::Outcome::Invalid {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::OK
    };
    (status, axum::Json(answer.body)).into_response()
}

async fn readyz(State(s): State<Arc<AppState>>) -> Response {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    if s.cert.not_after() <= now {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the serving certificate has expired\n",
        )
            .into_response();
    }
    (StatusCode::OK, "ready\n").into_response()
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    let mut out = String::new();
    match prometheus_client::encoding::text::encode(&mut out, &s.metrics.registry()) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            out,
        )
            .into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n").into_response(),
    }
}

/// Checks the certificate files every `interval` and swaps in a changed pair.
pub async fn reload_loop(state: Arc<AppState>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let cert = state.cert.clone();
        let r = tokio::task::spawn_blocking(move || cert.reload_if_changed()).await;
        match r {
            Ok(Ok(true)) => {
                state.metrics.reload("ok");
                state.metrics.cert_not_after.set(state.cert.not_after());
                tracing::info!(
                    not_after = state.cert.not_after(),
                    "serving certificate reloaded"
                );
            }
            Ok(Ok(false)) => {}
            Ok(Err(e)) => {
                state.metrics.reload("error");
                tracing::warn!(error = %e, "serving certificate not reloaded; keeping the current one");
            }
            Err(_) => {}
        }
    }
}

/// The TLS handshake with the reloading certificate; counts open connections.
#[derive(Clone)]
struct Tls {
    acceptor: TlsAcceptor,
    state: Arc<AppState>,
}

impl Handshake for Tls {
    type Stream = tokio_rustls::server::TlsStream<TcpStream>;
    async fn handshake(&self, tcp: TcpStream) -> Option<Self::Stream> {
        self.acceptor
            .accept(tcp)
            .await
            .map_err(|e| tracing::debug!(error = %e, "TLS handshake failed"))
            .ok()
    }
    fn opened(&self) {
        self.state.metrics.connections.inc();
    }
    fn closed(&self) {
        self.state.metrics.connections.dec();
    }
}

/// Serves HTTPS on `listener` until `shutdown` resolves, then lets open connections finish.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), rustls::Error> {
    let acceptor = TlsAcceptor::from(Arc::new(crate::tls::server_config(state.cert.clone())?));
    let app = router(state.clone());
    http::serve(listener, app, Tls { acceptor, state }, limits, shutdown).await;
    Ok(())
}
