//! The broker's gRPC connections: a cap on concurrent connections, a TLS handshake timeout, a
//! maximum connection age (which also ends idle connections) and HTTP/2 keep-alive.
//!
//! A connection holds one of `--max-connections` permits from accept to close; at the cap the
//! broker stops accepting and new connections wait in the kernel's backlog. A connection that
//! does not finish its TLS handshake within `--tls-handshake-timeout` (including one that
//! never sends a byte) is closed. Every connection is closed gracefully after
//! `--max-connection-age` (clients reconnect), so an idle one lives at most that long;
//! HTTP/2 PINGs every `--http2-keepalive-interval` close a connection whose peer does not
//! answer within `--http2-keepalive-timeout`.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use clap::Args;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Connection limits of the gRPC listener.
#[derive(Debug, Clone, Args)]
pub struct ConnectionArgs {
    /// Most gRPC connections open at once; more wait in the kernel's accept queue.
    #[arg(long, env = "KEYHAVEN_MAX_CONNECTIONS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,
    /// A connection that has not finished its TLS handshake after this is closed.
    #[arg(long, env = "KEYHAVEN_TLS_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = positive)]
    pub tls_handshake_timeout: Duration,
    /// Every connection is closed gracefully after this (clients reconnect); bounds how long
    /// an idle connection stays open.
    #[arg(long, env = "KEYHAVEN_MAX_CONNECTION_AGE", default_value = "5m", value_parser = positive)]
    pub max_connection_age: Duration,
    /// Interval of the HTTP/2 PINGs the broker sends to check a connection's peer.
    #[arg(long, env = "KEYHAVEN_HTTP2_KEEPALIVE_INTERVAL", default_value = "60s", value_parser = positive)]
    pub http2_keepalive_interval: Duration,
    /// A connection whose peer does not answer a PING within this is closed.
    #[arg(long, env = "KEYHAVEN_HTTP2_KEEPALIVE_TIMEOUT", default_value = "20s", value_parser = positive)]
    pub http2_keepalive_timeout: Duration,
}

fn positive(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(d)
}

impl ConnectionArgs {
    /// A tonic server with these limits (and the broker's per-request ones).
    pub fn server(&self) -> tonic::transport::Server {
        tonic::transport::Server::builder()
            .timeout(Duration::from_secs(30))
            .concurrency_limit_per_connection(256)
            // Graceful close at the age (GOAWAY, in-flight calls finish: each has the 30 s
            // timeout above). No `max_connection_age_grace`: with it, tonic 0.14 skips the
            // graceful close and cuts the connection at age + grace.
            .max_connection_age(self.max_connection_age)
            .http2_keepalive_interval(Some(self.http2_keepalive_interval))
            .http2_keepalive_timeout(Some(self.http2_keepalive_timeout))
            .tcp_keepalive(Some(Duration::from_secs(60)))
    }
}

/// The bound gRPC socket and the permits of its connections.
#[derive(Debug)]
pub struct Listener {
    socket: std::net::TcpListener,
    permits: Arc<Semaphore>,
    open: Arc<AtomicUsize>,
}

impl Listener {
    /// Binds `addr`, allowing `max` connections at once.
    pub fn bind(addr: SocketAddr, max: u32) -> io::Result<Self> {
        let socket = std::net::TcpListener::bind(addr)?;
        socket.set_nonblocking(true)?;
        Ok(Listener {
            socket,
            permits: Arc::new(Semaphore::new(max as usize)),
            open: Arc::default(),
        })
    }

    /// Connections open now (a metric).
    pub fn open_connections(&self) -> Arc<AtomicUsize> {
        self.open.clone()
    }

    /// A stream of accepted connections for one tonic server (several servers may take turns
    /// on the same socket; the permits are shared).
    pub fn incoming(
        &self,
    ) -> io::Result<impl futures_util::Stream<Item = io::Result<Capped>> + Send + 'static> {
        let l = tokio::net::TcpListener::from_std(self.socket.try_clone()?)?;
        let (permits, open) = (self.permits.clone(), self.open.clone());
        Ok(futures_util::stream::unfold(
            (l, permits, open),
            |(l, permits, open)| async move {
                let permit = permits.clone().acquire_owned().await.ok()?;
                loop {
                    match l.accept().await {
                        Ok((io, _)) => {
                            let _ = io.set_nodelay(true);
                            open.fetch_add(1, Ordering::Relaxed);
                            let c = Capped {
                                io,
                                _permit: permit,
                                open: open.clone(),
                            };
                            return Some((Ok(c), (l, permits, open)));
                        }
                        Err(e) => {
                            // Out of descriptors or a connection reset before accept: wait a
                            // little and accept again; the server goes on.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            },
        ))
    }
}

/// An accepted connection holding its permit until closed.
#[derive(Debug)]
pub struct Capped {
    io: TcpStream,
    _permit: OwnedSemaphorePermit,
    open: Arc<AtomicUsize>,
}

impl Drop for Capped {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Connected for Capped {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.io.connect_info()
    }
}

impl AsyncRead for Capped {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Capped {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
