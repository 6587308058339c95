//! The injector's HTTPS server with a real rustls client: the serving certificate reloaded on
//! a file change while a request is in flight, a bad pair refused, the handshake timeout, the
//! body limit, and the probes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use keyhaven_injector::config::InjectionConfig;
use keyhaven_injector::metrics::Metrics;
use keyhaven_injector::server::{self, AppState};
use keyhaven_injector::tls::ReloadingCert;
use keyhaven_process::http::Limits;
use testkit::https::{self, connect, read_response, TlsStream};
use testkit::pki::DevPki;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn config() -> InjectionConfig {
    InjectionConfig::from_flags(&[
        "--agent-image=keyhaven/broker-agent:0.1.0",
        "--broker-addr=https://keyhaven-broker.keyhaven.svc:8443",
    ])
    .unwrap()
}

/// Installs `pki`'s server pair as the serving files, the way a Secret volume updates:
/// written beside, then renamed into place.
fn install(pki: &DevPki, cert: &Path, key: &Path) {
    for (from, to) in [(&pki.server_key, key), (&pki.server_cert, cert)] {
        let tmp = to.with_extension("tmp");
        std::fs::copy(from, &tmp).unwrap();
        std::fs::rename(&tmp, to).unwrap();
    }
}

struct Server {
    addr: SocketAddr,
    state: Arc<AppState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<()>,
}

async fn start(cert: &Path, key: &Path, limits: Limits) -> Server {
    let state = Arc::new(AppState {
        cfg: config(),
        metrics: Metrics::default(),
        cert: Arc::new(ReloadingCert::load(cert, key).unwrap()),
        request_timeout: limits.header_timeout,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(server::reload_loop(
        state.clone(),
        Duration::from_millis(100),
    ));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let s = state.clone();
    let done = tokio::spawn(async move {
        server::serve(listener, s, limits, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    Server {
        addr,
        state,
        stop: Some(stop),
        done,
    }
}

fn limits() -> Limits {
    Limits {
        max_connections: 64,
        handshake_timeout: Duration::from_secs(10),
        header_timeout: Duration::from_secs(10),
        max_age: Duration::from_secs(300),
        drain: Duration::from_secs(5),
    }
}

async fn get(s: &mut TlsStream, path: &str) -> (u16, String) {
    https::send(s, "GET", path, b"").await.unwrap();
    https::read_response(s).await.unwrap()
}

fn admission_review() -> String {
    let pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "p", "namespace": "payments",
            "labels": {"keyhaven.io/inject": "true"},
            "annotations": {"keyhaven.io/secret-db.json": "payments/db"}},
        "spec": {"containers": [{"name": "app", "image": "a:1"}],
            "securityContext": {"runAsUser": 1000}}
    });
    keyhaven_injector::review::create_request(&pod, "payments", UID).to_string()
}

const UID: &str = "3c1a2b7e-0000-4000-8000-000000000001";

#[tokio::test]
async fn a_new_certificate_is_served_without_dropping_a_request_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let one = DevPki::write(&mkdir(dir.path().join("one"))).unwrap();
    let two = DevPki::write(&mkdir(dir.path().join("two"))).unwrap();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    install(&one, &cert, &key);
    let mut server = start(&cert, &key, limits()).await;

    // A request half sent over a connection made with the first certificate.
    let mut inflight = connect(server.addr, &one.ca).await.unwrap();
    let body = admission_review();
    let (head, tail) = body.split_at(body.len() / 2);
    inflight
        .write_all(
            format!(
                "POST /mutate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{head}",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    inflight.flush().await.unwrap();

    install(&two, &cert, &key);
    // New handshakes get the second certificate within a few reload intervals.
    let mut served_two = None;
    for _ in 0..100 {
        if let Ok(s) = connect(server.addr, &two.ca).await {
            served_two = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut fresh = served_two.expect("the reloaded certificate is never served");
    assert!(
        connect(server.addr, &one.ca).await.is_err(),
        "the old certificate is still served to new connections"
    );

    // The request in flight completes on its old connection.
    inflight.write_all(tail.as_bytes()).await.unwrap();
    let (status, resp) = read_response(&mut inflight).await.unwrap();
    assert_eq!(status, 200, "{resp}");
    let v: serde_json::Value = serde_json::from_str(&resp).unwrap();
    assert_eq!(v["response"]["uid"], UID);
    assert_eq!(v["response"]["allowed"], true);
    assert_eq!(v["response"]["patchType"], "JSONPatch");

    let (status, metrics) = get(&mut fresh, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("keyhaven_injector_cert_reloads_total{outcome=\"ok\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("keyhaven_injector_admission_reviews_total{outcome=\"injected\"} 1"));

    // A pair that does not match (the new certificate, the old key) is refused; the current
    // certificate stays in use.
    std::fs::copy(&one.server_key, &key).unwrap();
    let mut refused = false;
    for _ in 0..100 {
        let (_, m) = get(&mut fresh, "/metrics").await;
        if m.contains("keyhaven_injector_cert_reloads_total{outcome=\"error\"}") {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused, "a mismatched pair was not refused");
    assert!(connect(server.addr, &two.ca).await.is_ok());

    let (status, _) = get(&mut fresh, "/healthz").await;
    assert_eq!(status, 200);
    let (status, ready) = get(&mut fresh, "/readyz").await;
    assert_eq!((status, ready.as_str()), (200, "ready\n"));
    assert!(server.state.cert.not_after() > 0);
    drop(fresh);
    drop(inflight);
    server.stop.take().unwrap().send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(20), &mut server.done)
        .await
        .expect("the server did not stop")
        .unwrap();
}

#[tokio::test]
async fn handshake_and_idle_timeouts_body_limit_and_wrong_method() {
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::write(dir.path()).unwrap();
    let mut l = limits();
    l.handshake_timeout = Duration::from_millis(300);
    l.header_timeout = Duration::from_secs(1);
    let server = start(&pki.server_cert, &pki.server_key, l).await;

    // A connection that never starts TLS is closed after the handshake timeout.
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let mut b = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut b)).await;
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "a silent connection was kept open: {r:?}"
    );

    // An over-long body is refused before it is read whole.
    let mut s = connect(server.addr, &pki.ca).await.unwrap();
    let len = server::MAX_BODY + 1;
    s.write_all(
        format!("POST /mutate HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let _ = s.write_all(&vec![b' '; 64 * 1024]).await;
    let (status, _) = read_response(&mut s).await.unwrap();
    assert_eq!(status, 413);

    // Not an AdmissionReview: 400 with an invalid response.
    let mut s = connect(server.addr, &pki.ca).await.unwrap();
    https::send(&mut s, "POST", "/mutate", b"{\"hello\":1}")
        .await
        .unwrap();
    let (status, resp) = read_response(&mut s).await.unwrap();
    assert_eq!(status, 400, "{resp}");
    let (status, _) = get(&mut s, "/mutate").await;
    assert_eq!(status, 405);

    // A kept-alive connection that sends nothing more is closed after the request timeout.
    let t0 = std::time::Instant::now();
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "an idle connection was kept open: {r:?}"
    );
    assert!(
        t0.elapsed() >= Duration::from_millis(500),
        "{:?}",
        t0.elapsed()
    );
}

fn mkdir(p: std::path::PathBuf) -> std::path::PathBuf {
    std::fs::create_dir_all(&p).unwrap();
    p
}
