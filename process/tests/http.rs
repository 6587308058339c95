//! The shared HTTP listener over real TCP sockets: idle and slow connections closed after the
//! header timeout, the connection cap, keep-alive, and shutdown draining a request in flight.
#![cfg(feature = "http")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::routing::get;
use keyhaven_process::http::{serve, Limits, Plain};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn limits() -> Limits {
    Limits {
        max_connections: 2,
        handshake_timeout: Duration::from_secs(1),
        header_timeout: Duration::from_millis(500),
        max_age: Duration::from_secs(60),
        drain: Duration::from_secs(5),
    }
}

async fn start(
    limits: Limits,
) -> (
    SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(800)).await;
                "slow\n"
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, app, Plain, limits, async {
        let _ = rx.await;
    }));
    (addr, tx, task)
}

/// Sends one GET and reads the answer (headers and a short body) from a kept-alive connection.
async fn get_on(s: &mut TcpStream, path: &str) -> String {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("no answer")
            .unwrap();
        assert!(n > 0, "closed before the answer");
        out.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&out);
        if text
            .split_once("\r\n\r\n")
            .is_some_and(|(_, body)| body.ends_with('\n'))
        {
            break;
        }
    }
    String::from_utf8(out).unwrap()
}

/// Waits for the server to close `s`; the time it took.
async fn closed_after(s: &mut TcpStream) -> Duration {
    let t0 = Instant::now();
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "the connection was kept open: {r:?}"
    );
    t0.elapsed()
}

#[tokio::test]
async fn idle_and_half_sent_requests_are_closed_after_the_header_timeout() {
    let (addr, _stop, _task) = start(limits()).await;

    // Never sends a byte.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    closed_after(&mut silent).await;

    // Sends half a request line and stalls.
    let mut half = TcpStream::connect(addr).await.unwrap();
    half.write_all(b"GET /healthz HT").await.unwrap();
    closed_after(&mut half).await;

    // Kept alive after a request, then idle.
    let mut kept = TcpStream::connect(addr).await.unwrap();
    let a = get_on(&mut kept, "/healthz").await;
    assert!(a.starts_with("HTTP/1.1 200"), "{a}");
    let b = get_on(&mut kept, "/healthz").await;
    assert!(b.starts_with("HTTP/1.1 200"), "{b}");
    closed_after(&mut kept).await;
}

#[tokio::test]
async fn connections_over_the_cap_wait_until_one_closes() {
    let (addr, _stop, _task) = start(limits()).await;
    let mut a = TcpStream::connect(addr).await.unwrap();
    let _b = TcpStream::connect(addr).await.unwrap();
    // Accepted by the kernel but not served while two are open.
    let mut third = TcpStream::connect(addr).await.unwrap();
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let early = tokio::time::timeout(Duration::from_millis(200), third.read(&mut buf)).await;
    assert!(early.is_err(), "a third connection was served: {early:?}");
    // The first two time out (500 ms); then the third is answered.
    let _ = closed_after(&mut a).await;
    let n = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf))
        .await
        .expect("the third connection was never served")
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn shutdown_lets_a_request_in_flight_finish() {
    let (addr, stop, task) = start(limits()).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.send(()).unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("the connection was not closed after its answer")
        .unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("slow\n"), "{text}");
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("serve did not return after the drain")
        .unwrap();
    assert!(TcpStream::connect(addr).await.is_err(), "still listening");
}
