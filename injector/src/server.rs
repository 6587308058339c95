//! The HTTPS listener: `/mutate`, `/healthz`, `/readyz`, `/metrics`.
//!
//! Connections: at most `--max-connections` at once (more wait in the kernel's backlog), a TLS
//! handshake timeout, a request timeout (headers and body), HTTP/1.1 keep-alive, and a
//! graceful close after `--max-connection-age` (which also bounds an idle connection). On
//! SIGTERM the listener closes and open connections finish their request first.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::config::{InjectionConfig, ServeArgs};
use crate::metrics::Metrics;
use crate::review;
use crate::tls::ReloadingCert;

/// Largest AdmissionReview body accepted: a pod is at most ~1.5 MiB in etcd, and a CREATE
/// review carries it once.
pub const MAX_BODY: usize = 3 * 1024 * 1024;

/// How long open connections get to finish after SIGTERM.
const DRAIN: Duration = Duration::from_secs(15);

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

/// Connection limits (from [`ServeArgs`]).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once.
    pub max_connections: usize,
    /// TLS handshake deadline.
    pub handshake: Duration,
    /// Request headers and body deadline.
    pub request: Duration,
    /// Graceful close after this.
    pub max_age: Duration,
}

impl From<&ServeArgs> for Limits {
    fn from(a: &ServeArgs) -> Self {
        Self {
            max_connections: a.max_connections as usize,
            handshake: a.tls_handshake_timeout,
            request: a.request_timeout,
            max_age: a.max_connection_age,
        }
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

/// Serves HTTPS on `listener` until `shutdown` resolves, then lets open connections finish.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), rustls::Error> {
    let tls = TlsAcceptor::from(Arc::new(crate::tls::server_config(state.cert.clone())?));
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let (stop, stopped) = watch::channel(false);
    let app = router(state.clone());
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = &mut shutdown => break,
        };
        let tcp = tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let conn = Connection {
            tls: tls.clone(),
            app: app.clone(),
            limits,
            stopped: stopped.clone(),
            state: state.clone(),
            _permit: permit,
        };
        tokio::spawn(conn.run(tcp));
    }
    drop(listener);
    let _ = stop.send(true);
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(DRAIN, permits.acquire_many(all)).await;
    Ok(())
}

struct Connection {
    tls: TlsAcceptor,
    app: Router,
    limits: Limits,
    stopped: watch::Receiver<bool>,
    state: Arc<AppState>,
    _permit: OwnedSemaphorePermit,
}

impl Connection {
    async fn run(mut self, tcp: TcpStream) {
        let _ = tcp.set_nodelay(true);
        let stream = match tokio::time::timeout(self.limits.handshake, self.tls.accept(tcp)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!("TLS handshake timed out");
                return;
            }
        };
        self.state.metrics.connections.inc();
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.limits.request)
            .keep_alive(true);
        let conn = builder.serve_connection(
            TokioIo::new(stream),
            TowerToHyperService::new(self.app.clone()),
        );
        tokio::pin!(conn);
        let age = tokio::time::sleep(self.limits.max_age);
        tokio::pin!(age);
        let finished = tokio::select! {
            _ = conn.as_mut() => true,
            _ = &mut age => false,
            _ = self.stopped.wait_for(|s| *s) => false,
        };
        if !finished {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(DRAIN, conn).await;
        }
        self.state.metrics.connections.dec();
    }
}
