//! Tests of `https`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio_rustls::rustls;

use super::super::test_pki::{pki, Pki};
use super::super::{DevIssuer, Verifier};
use super::*;

const JWKS_PATH: &str = "/openid/v1/jwks";

/// What the test server answers, and what it saw.
struct State {
    jwks: Mutex<Vec<u8>>,
    status: AtomicU16,
    /// When set, requests without `Authorization: Bearer <this>` get 401.
    bearer: Mutex<Option<String>>,
    /// `(path, Authorization header)` of every request.
    seen: Mutex<Vec<(String, Option<String>)>>,
    discovery: Mutex<String>,
}

impl State {
    fn seen(&self) -> Vec<(String, Option<String>)> {
        self.seen.lock().unwrap().clone()
    }
}

struct Server {
    addr: SocketAddr,
    state: Arc<State>,
}

impl Server {
    fn url(&self, scheme: &str, path: &str) -> String {
        format!("{scheme}://{}{path}", self.addr)
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let auth = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    state
        .seen
        .lock()
        .unwrap()
        .push((path.clone(), auth.clone()));
    let expected = state.bearer.lock().unwrap().clone();
    if let Some(expected) = expected {
        if auth != Some(format!("Bearer {expected}")) {
            let mut r = Response::new(full("Unauthorized"));
            *r.status_mut() = StatusCode::UNAUTHORIZED;
            return Ok(r);
        }
    }
    let over = MAX_JWKS_BYTES as usize + 1;
    let (status, body) = match path.as_str() {
        JWKS_PATH => (
            StatusCode::from_u16(state.status.load(Ordering::SeqCst)).unwrap(),
            full(state.jwks.lock().unwrap().clone()),
        ),
        "/.well-known/openid-configuration" => (
            StatusCode::OK,
            full(state.discovery.lock().unwrap().clone()),
        ),
        // Declares its length up front.
        "/big" => (StatusCode::OK, full(vec![b' '; over])),
        // Chunked, no length: refused while reading.
        "/big-chunked" => {
            let chunks: Vec<Result<Frame<Bytes>, Infallible>> = (0..=over / 65536)
                .map(|_| Ok(Frame::data(Bytes::from(vec![b' '; 65536]))))
                .collect();
            (
                StatusCode::OK,
                StreamBody::new(tokio_stream::iter(chunks)).boxed(),
            )
        }
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            (StatusCode::OK, full("{}"))
        }
        _ => (StatusCode::NOT_FOUND, full("")),
    };
    let mut r = Response::new(body);
    *r.status_mut() = status;
    Ok(r)
}

/// An HTTP/1.1 server on 127.0.0.1:0, with TLS when given a PKI. Lives as long as the
/// test's runtime.
async fn server(pki: Option<&Pki>, jwks: Vec<u8>) -> Server {
    let acceptor = pki.map(|p| {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = rustls::pki_types::PrivatePkcs8KeyDer::from(p.server_key.clone());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![p.server_cert.clone()], key.into())
            .unwrap();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = Arc::new(State {
        jwks: Mutex::new(jwks),
        status: AtomicU16::new(200),
        bearer: Mutex::new(None),
        seen: Mutex::new(Vec::new()),
        discovery: Mutex::new(String::new()),
    });
    let st = Arc::clone(&state);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (st, acceptor) = (Arc::clone(&st), acceptor.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| handle(Arc::clone(&st), req));
                let http = hyper::server::conn::http1::Builder::new();
                let _ = match acceptor {
                    Some(acceptor) => match acceptor.accept(tcp).await {
                        Ok(tls) => http.serve_connection(TokioIo::new(tls), svc).await,
                        Err(_) => return,
                    },
                    None => http.serve_connection(TokioIo::new(tcp), svc).await,
                };
            });
        }
    });
    Server { addr, state }
}

fn write(dir: &Path, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

fn config(url: String, ca: Option<&Path>, token: Option<&Path>) -> HttpsJwksConfig {
    HttpsJwksConfig {
        url,
        ca_file: ca.map(Path::to_path_buf),
        token_file: token.map(Path::to_path_buf),
        timeout: Duration::from_secs(5),
    }
}

fn dev_jwks(dev: &DevIssuer) -> Vec<u8> {
    serde_json::to_vec(&dev.jwks()).unwrap()
}

fn assert_unavailable(err: &AuthError, contains: &str) {
    assert_eq!(err.reason(), "jwks_unavailable", "{err}");
    let full = error_chain(err);
    assert!(
        full.contains(contains),
        "{full:?} should mention {contains:?}"
    );
}

fn error_chain(err: &AuthError) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[tokio::test]
async fn fetches_over_https_with_the_ca_and_the_token_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki("cluster");
    let dev = DevIssuer::generate().unwrap();
    let srv = server(Some(&pki), dev_jwks(&dev)).await;
    *srv.state.bearer.lock().unwrap() = Some("sa-token-1".into());
    let ca = write(dir.path(), "ca.crt", &pki.ca_pem);
    let token_file = write(dir.path(), "token", "sa-token-1\n");

    let source = HttpsJwks::new(&config(
        srv.url("https", JWKS_PATH),
        Some(&ca),
        Some(&token_file),
    ))
    .unwrap();
    let debug = format!("{source:?}");
    assert!(!debug.contains("sa-token-1"), "{debug}");
    assert!(debug.contains(JWKS_PATH), "{debug}");

    let verifier = Verifier::new(crate::auth::dev_verifier_config(), source).unwrap();
    assert_eq!(verifier.refresh().await.unwrap(), 1);
    let token = dev
        .mint("team-a", "app", Some("app-1"), Duration::from_secs(600))
        .unwrap();
    let identity = verifier.verify(&token).await.unwrap();
    assert_eq!(identity.namespace, "team-a");
    assert_eq!(identity.service_account, "app");
    assert_eq!(
        srv.state.seen(),
        vec![(JWKS_PATH.to_string(), Some("Bearer sa-token-1".to_string()))]
    );
    assert!(!format!("{verifier:?}").contains("sa-token-1"));
}

#[tokio::test]
async fn rotated_token_file_is_read_on_the_next_fetch() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki("cluster");
    let dev = DevIssuer::generate().unwrap();
    let srv = server(Some(&pki), dev_jwks(&dev)).await;
    let ca = write(dir.path(), "ca.crt", &pki.ca_pem);
    let token_file = write(dir.path(), "token", "first-token");
    *srv.state.bearer.lock().unwrap() = Some("first-token".into());
    let source = HttpsJwks::new(&config(
        srv.url("https", JWKS_PATH),
        Some(&ca),
        Some(&token_file),
    ))
    .unwrap();
    source.fetch().await.unwrap();

    // The kubelet rotates the token; the apiserver now wants the new one.
    *srv.state.bearer.lock().unwrap() = Some("second-token".into());
    write(dir.path(), "token", "second-token\n");
    assert_eq!(source.fetch().await.unwrap(), dev_jwks(&dev));
    let seen: Vec<Option<String>> = srv.state.seen().into_iter().map(|(_, a)| a).collect();
    assert_eq!(
        seen,
        vec![
            Some("Bearer first-token".to_string()),
            Some("Bearer second-token".to_string())
        ]
    );

    // A token the server refuses: 401, reported by status code, token not echoed.
    write(dir.path(), "token", "stale-token");
    let err = source.fetch().await.unwrap_err();
    assert_unavailable(&err, "HTTP 401");
    assert!(!error_chain(&err).contains("stale-token"));
    assert!(!format!("{err:?}").contains("stale-token"));

    // Missing or empty token file: unavailable, naming the file.
    write(dir.path(), "token", " \n");
    assert_unavailable(&source.fetch().await.unwrap_err(), "is empty");
    std::fs::remove_file(&token_file).unwrap();
    assert_unavailable(&source.fetch().await.unwrap_err(), "No such file");
    assert_eq!(srv.state.seen().len(), 3, "no request without a token");
}

#[tokio::test]
async fn server_certificate_from_another_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (real, other) = (pki("real"), pki("other"));
    let srv = server(Some(&real), b"{\"keys\": []}".to_vec()).await;
    let other_ca = write(dir.path(), "other.crt", &other.ca_pem);
    let token_file = write(dir.path(), "token", "sa-token");
    let source = HttpsJwks::new(&config(
        srv.url("https", JWKS_PATH),
        Some(&other_ca),
        Some(&token_file),
    ))
    .unwrap();
    let err = source.fetch().await.unwrap_err();
    assert_unavailable(&err, "cannot fetch JWKS endpoint");
    // The verifier logs the text only, so the cause must be in it.
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
    // The handshake failed, so no request (and no token) reached the server.
    assert!(srv.state.seen().is_empty());

    // Through the verifier: unavailable, not a verdict on the token.
    let verifier = Verifier::new(crate::auth::dev_verifier_config(), source).unwrap();
    let dev = DevIssuer::generate().unwrap();
    let token = dev
        .mint("team-a", "app", None, Duration::from_secs(600))
        .unwrap();
    assert!(verifier.verify(&token).await.unwrap_err().is_unavailable());
}

#[tokio::test]
async fn non_2xx_is_unavailable_with_the_status_and_without_the_body() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki("cluster");
    let srv = server(Some(&pki), b"internal detail: db=secret".to_vec()).await;
    srv.state.status.store(500, Ordering::SeqCst);
    let ca = write(dir.path(), "ca.crt", &pki.ca_pem);
    let source = HttpsJwks::new(&config(srv.url("https", JWKS_PATH), Some(&ca), None)).unwrap();
    let err = source.fetch().await.unwrap_err();
    assert_unavailable(&err, "HTTP 500");
    assert!(!error_chain(&err).contains("internal detail"));

    let missing = HttpsJwks::new(&config(srv.url("https", "/nope"), Some(&ca), None)).unwrap();
    assert_unavailable(&missing.fetch().await.unwrap_err(), "HTTP 404");
    // No token file configured: no Authorization header sent.
    assert!(srv.state.seen().iter().all(|(_, auth)| auth.is_none()));
}

#[tokio::test]
async fn oversize_body_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki("cluster");
    let srv = server(Some(&pki), Vec::new()).await;
    let ca = write(dir.path(), "ca.crt", &pki.ca_pem);
    for path in ["/big", "/big-chunked"] {
        let source = HttpsJwks::new(&config(srv.url("https", path), Some(&ca), None)).unwrap();
        let err = source.fetch().await.unwrap_err();
        assert_unavailable(&err, &format!("larger than {MAX_JWKS_BYTES} bytes"));
    }
}

#[tokio::test]
async fn slow_server_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki("cluster");
    let srv = server(Some(&pki), Vec::new()).await;
    let ca = write(dir.path(), "ca.crt", &pki.ca_pem);
    let mut cfg = config(srv.url("https", "/slow"), Some(&ca), None);
    cfg.timeout = Duration::from_millis(300);
    let source = HttpsJwks::new(&cfg).unwrap();
    let started = std::time::Instant::now();
    let err = source.fetch().await.unwrap_err();
    assert_unavailable(&err, "timed out");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn plain_http_on_loopback_works() {
    let dev = DevIssuer::generate().unwrap();
    let srv = server(None, dev_jwks(&dev)).await;
    // The CA bundle is not read for http:// (this path does not exist).
    let source = HttpsJwks::new(&config(
        srv.url("http", JWKS_PATH),
        Some(Path::new("/nonexistent/ca.crt")),
        None,
    ))
    .unwrap();
    let verifier = Verifier::new(crate::auth::dev_verifier_config(), source).unwrap();
    let token = dev
        .mint("team-a", "app", None, Duration::from_secs(600))
        .unwrap();
    verifier.verify(&token).await.unwrap();
}

#[test]
fn unusable_urls_and_ca_bundles_are_refused_at_construction() {
    let dir = tempfile::tempdir().unwrap();
    let ca = write(dir.path(), "ca.crt", pki("x").ca_pem);
    let empty = write(dir.path(), "empty.crt", "");
    let garbage = write(
        dir.path(),
        "garbage.crt",
        "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
    );
    // Construction only: none of these touches the network.
    for url in [
        "http://kubernetes.default.svc/openid/v1/jwks",
        "http://example.com/jwks",
        "http://10.0.0.1/jwks",
        "http://[2001:db8::1]/jwks",
        "http://localhost.example.com/jwks",
        "ftp://127.0.0.1/jwks",
        "file:///etc/jwks.json",
        "https://user:pass@kubernetes.default.svc/openid/v1/jwks",
        "not a url",
        "",
    ] {
        let err = HttpsJwks::new(&config(url.into(), Some(&ca), None)).unwrap_err();
        assert!(matches!(err, SetupError::InvalidConfig(_)), "{url}: {err}");
        assert!(!err.to_string().contains("pass@"), "{err}");
    }
    for url in [
        "http://127.0.0.1:8080/jwks",
        "http://127.1.2.3/jwks",
        "http://[::1]:8080/jwks",
        "http://localhost:8080/jwks",
        "https://kubernetes.default.svc/openid/v1/jwks",
    ] {
        HttpsJwks::new(&config(url.into(), Some(&ca), None)).unwrap();
    }
    let https = "https://kubernetes.default.svc/openid/v1/jwks".to_string();
    let err = HttpsJwks::new(&config(https.clone(), None, None)).unwrap_err();
    assert!(matches!(err, SetupError::InvalidConfig(_)), "{err}");
    let err = HttpsJwks::new(&config(
        https.clone(),
        Some(&dir.path().join("missing.crt")),
        None,
    ))
    .unwrap_err();
    assert!(matches!(err, SetupError::InvalidConfig(_)), "{err}");
    assert!(err.to_string().contains("missing.crt"), "{err}");
    for bad in [&empty, &garbage] {
        let err = HttpsJwks::new(&config(https.clone(), Some(bad), None)).unwrap_err();
        assert!(matches!(err, SetupError::InvalidConfig(_)), "{err}");
    }
    let mut zero = config(https, Some(&ca), None);
    zero.timeout = Duration::ZERO;
    assert!(HttpsJwks::new(&zero).is_err());
}

#[tokio::test]
async fn discovery_follows_jwks_uri_on_the_same_host_only() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki("cluster");
    let dev = DevIssuer::generate().unwrap();
    let srv = server(Some(&pki), dev_jwks(&dev)).await;
    *srv.state.bearer.lock().unwrap() = Some("sa-token".into());
    let ca = write(dir.path(), "ca.crt", &pki.ca_pem);
    let token_file = write(dir.path(), "token", "sa-token");
    let issuer = srv.url("https", "/");
    let source =
        HttpsJwks::via_discovery(&config(issuer.clone(), Some(&ca), Some(&token_file))).unwrap();
    let set_jwks_uri = |uri: &str| {
        *srv.state.discovery.lock().unwrap() =
            serde_json::json!({"issuer": issuer, "jwks_uri": uri}).to_string();
    };

    set_jwks_uri(&srv.url("https", JWKS_PATH));
    assert_eq!(source.fetch().await.unwrap(), dev_jwks(&dev));
    let paths: Vec<String> = srv.state.seen().into_iter().map(|(p, _)| p).collect();
    assert_eq!(paths, vec!["/.well-known/openid-configuration", JWKS_PATH]);

    // Another host, plain http off loopback, or no jwks_uri at all: refused before any
    // request goes there.
    for uri in [
        "https://evil.example/openid/v1/jwks",
        "http://evil.example/openid/v1/jwks",
        "not a url",
    ] {
        set_jwks_uri(uri);
        let err = source.fetch().await.unwrap_err();
        assert_unavailable(&err, "jwks_uri");
    }
    *srv.state.discovery.lock().unwrap() = "{}".into();
    assert_unavailable(&source.fetch().await.unwrap_err(), "no jwks_uri");
    assert_eq!(srv.state.seen().len(), 2 + 4);

    let err = HttpsJwks::via_discovery(&config(
        "https://issuer.example/?x=1".into(),
        Some(&ca),
        None,
    ))
    .unwrap_err();
    assert!(matches!(err, SetupError::InvalidConfig(_)), "{err}");
}
