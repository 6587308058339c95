//! The HTTP/1.1 listener every Keyhaven server shares (feature `http`): the plugin's, the
//! broker's and the agent's `/healthz`, `/readyz`, `/metrics` listeners in plain HTTP, and the
//! injector's webhook over TLS.
//!
//! Every connection is bounded: at most [`Limits::max_connections`] open at once (more wait in
//! the kernel's backlog), the handshake (for TLS) and each request's headers within
//! their own timeouts — the wait for the next request on a kept-alive connection
//! included, so an idle connection is closed after it — and a graceful close after
//! [`Limits::max_age`]. When `shutdown` resolves the listener closes and open connections
//! finish their request, for at most [`Limits::drain`].

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

/// Connection bounds.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once.
    pub max_connections: usize,
    /// Deadline of the [`Handshake`] (TLS).
    pub handshake_timeout: Duration,
    /// Deadline of each request's headers, the wait for them on an idle kept-alive connection
    /// included.
    pub header_timeout: Duration,
    /// A connection is closed gracefully after this.
    pub max_age: Duration,
    /// How long open connections get to finish after shutdown.
    pub drain: Duration,
}

impl Limits {
    /// The bounds of a health and metrics listener: scraped by one Prometheus and probed by
    /// one kubelet, so 64 connections are plenty.
    pub const HEALTH: Limits = Limits {
        max_connections: 64,
        handshake_timeout: Duration::from_secs(10),
        header_timeout: Duration::from_secs(10),
        max_age: Duration::from_secs(300),
        drain: Duration::from_secs(5),
    };
}

/// What turns an accepted TCP connection into the stream HTTP is spoken on.
pub trait Handshake: Clone + Send + Sync + 'static {
    /// The stream (TLS or the TCP stream itself).
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// Completes the handshake, or `None` (the connection is dropped). Bounded by
    /// [`Limits::handshake_timeout`].
    fn handshake(&self, tcp: TcpStream) -> impl Future<Output = Option<Self::Stream>> + Send;
    /// Called when a connection has completed its handshake, and [`Handshake::closed`] when it
    /// ends (a gauge of open connections, say).
    fn opened(&self) {}
    /// See [`Handshake::opened`].
    fn closed(&self) {}
}

/// Plain HTTP.
#[derive(Debug, Clone, Copy)]
pub struct Plain;

impl Handshake for Plain {
    type Stream = TcpStream;
    async fn handshake(&self, tcp: TcpStream) -> Option<TcpStream> {
        Some(tcp)
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets open connections finish.
pub async fn serve<H: Handshake>(
    listener: TcpListener,
    app: axum::Router,
    handshake: H,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let (stop, stopped) = watch::channel(false);
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
        let (app, handshake, mut stopped) = (app.clone(), handshake.clone(), stopped.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tcp.set_nodelay(true);
            let stream = match tokio::time::timeout(
                limits.handshake_timeout,
                handshake.handshake(tcp),
            )
            .await
            {
                Ok(Some(s)) => s,
                Ok(None) => return,
                Err(_) => {
                    tracing::debug!("handshake timed out");
                    return;
                }
            };
            handshake.opened();
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .keep_alive(true);
            let conn =
                builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app));
            tokio::pin!(conn);
            let age = tokio::time::sleep(limits.max_age);
            tokio::pin!(age);
            let finished = tokio::select! {
                _ = conn.as_mut() => true,
                _ = &mut age => false,
                _ = stopped.wait_for(|s| *s) => false,
            };
            if !finished {
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(limits.drain, conn).await;
            }
            handshake.closed();
        });
    }
    drop(listener);
    let _ = stop.send(true);
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(limits.drain, permits.acquire_many(all)).await;
}
