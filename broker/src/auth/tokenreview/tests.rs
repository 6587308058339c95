//! Tests of `tokenreview`.

use std::convert::Infallible;
use std::net::SocketAddr;

use http_body_util::{BodyExt as _, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio_rustls::rustls;

use super::super::test_pki::{pki, Pki};
use super::super::{DevIssuer, Verifier};
use super::*;

const BROKER_TOKEN: &str = "broker-own-sa-token";

/// What the fake apiserver answers, and what it saw.
struct State {
    /// The bearer token the broker must present.
    bearer: Mutex<String>,
    /// Answer by reviewed token; `default` for the others.
    answers: Mutex<HashMap<String, (u16, String)>>,
    default: Mutex<(u16, String)>,
    /// Every request: the reviewed token (None when the request was refused before the
    /// body was read), and the Authorization header.
    seen: Mutex<Vec<(Option<String>, Option<String>)>>,
}

impl State {
    fn requests(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
    fn reviewed(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(t, _)| t.clone())
            .collect()
    }
    fn answer(&self, token: &str, status: u16, body: String) {
        self.answers
            .lock()
            .unwrap()
            .insert(token.to_owned(), (status, body));
    }
    fn answer_all(&self, status: u16, body: String) {
        self.answers.lock().unwrap().clear();
        *self.default.lock().unwrap() = (status, body);
    }
}

struct Server {
    addr: SocketAddr,
    state: Arc<State>,
}

impl Server {
    fn url(&self, scheme: &str) -> String {
        format!("{scheme}://{}", self.addr)
    }
}

fn respond(status: u16, body: impl Into<Bytes>) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    Ok(r)
}

/// The fake apiserver: checks the method, path, content type, the broker's bearer token and
/// the TokenReview body (400 or 401 when wrong), then answers.
async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let auth = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let well_formed = req.method() == Method::POST
        && req.uri().path() == TOKEN_REVIEW_PATH
        && req.uri().query().is_none()
        && req
            .headers()
            .get(CONTENT_TYPE)
            .is_some_and(|v| v == "application/json");
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let expected = format!("Bearer {}", state.bearer.lock().unwrap());
    if auth.as_deref() != Some(expected.as_str()) {
        state.seen.lock().unwrap().push((None, auth));
        return respond(401, "Unauthorized");
    }
    let review: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let token = review["spec"]["token"].as_str().map(str::to_owned);
    state.seen.lock().unwrap().push((token.clone(), auth));
    let Some(token) = token else {
        return respond(400, "no spec.token");
    };
    if !well_formed
        || review["apiVersion"] != "authentication.k8s.io/v1"
        || review["kind"] != "TokenReview"
        || review["spec"]["audiences"] != json!(["keyhaven"])
    {
        return respond(400, "bad TokenReview request");
    }
    let (status, body) = state
        .answers
        .lock()
        .unwrap()
        .get(&token)
        .cloned()
        .unwrap_or_else(|| state.default.lock().unwrap().clone());
    if status == 599 {
        // Slower than any client timeout in these tests.
        tokio::time::sleep(Duration::from_secs(30)).await;
    }
    respond(status, body)
}

/// A fake apiserver on 127.0.0.1:0 with a certificate from `pki`; by default every token
/// is authenticated as `system:serviceaccount:team-a:app` in pod `app-1`.
async fn apiserver(pki: &Pki) -> Server {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key = rustls::pki_types::PrivatePkcs8KeyDer::from(pki.server_key.clone());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![pki.server_cert.clone()], key.into())
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = Arc::new(State {
        bearer: Mutex::new(BROKER_TOKEN.to_string()),
        answers: Mutex::new(HashMap::new()),
        default: Mutex::new((
            201,
            authenticated("system:serviceaccount:team-a:app", Some("app-1"), None),
        )),
        seen: Mutex::new(Vec::new()),
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
                if let Ok(tls) = acceptor.accept(tcp).await {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                }
            });
        }
    });
    Server { addr, state }
}

/// A TokenReview answer that authenticates `user`, optionally bound to `pod`, with
/// audiences `["keyhaven"]` unless told otherwise.
fn authenticated(user: &str, pod: Option<&str>, audiences: Option<serde_json::Value>) -> String {
    let mut extra = serde_json::Map::new();
    if let Some(pod) = pod {
        extra.insert(POD_NAME_EXTRA.into(), json!([pod]));
    }
    json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "status": {
            "authenticated": true,
            "user": {"username": user, "uid": "sa-uid", "groups": ["system:serviceaccounts"], "extra": extra},
            "audiences": audiences.unwrap_or_else(|| json!(["keyhaven"])),
        }
    })
    .to_string()
}

fn not_authenticated(error: Option<&str>) -> String {
    let mut status = json!({"user": {}});
    if let Some(e) = error {
        status["error"] = json!(e);
    }
    json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "status": status})
        .to_string()
}

struct Fixture {
    _dir: tempfile::TempDir,
    srv: Server,
    config: TokenReviewConfig,
    token_file: PathBuf,
    dev: DevIssuer,
    verifier: Verifier,
}

impl Fixture {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki = pki("cluster");
        let srv = apiserver(&pki).await;
        let ca = dir.path().join("ca.crt");
        std::fs::write(&ca, &pki.ca_pem).unwrap();
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, format!("{BROKER_TOKEN}\n")).unwrap();
        let config = TokenReviewConfig::new(srv.url("https"), Some(ca), &token_file);
        let dev = DevIssuer::generate().unwrap();
        let verifier = Verifier::new(
            crate::auth::dev_verifier_config(),
            crate::auth::dev_jwks_source(&dev),
        )
        .unwrap();
        Fixture {
            _dir: dir,
            srv,
            config,
            token_file,
            dev,
            verifier,
        }
    }

    fn reviewer(&self) -> TokenReviewer {
        TokenReviewer::new(&self.config).unwrap()
    }

    /// A dev token and the identity the local verifier gives it.
    async fn token(&self, ns: &str, sa: &str, pod: Option<&str>) -> (String, Identity) {
        self.token_for(ns, sa, pod, Duration::from_secs(600)).await
    }

    async fn token_for(
        &self,
        ns: &str,
        sa: &str,
        pod: Option<&str>,
        ttl: Duration,
    ) -> (String, Identity) {
        let token = self.dev.mint(ns, sa, pod, ttl).unwrap();
        let id = self.verifier.verify(&token).await.unwrap();
        (token, id)
    }
}

fn assert_clean(err: &TokenReviewError, tokens: &[&str]) {
    let texts = [err.to_string(), format!("{err:?}")];
    for text in &texts {
        for token in tokens {
            assert!(!text.contains(token), "token leaked into {text:?}");
        }
    }
}

#[tokio::test]
async fn accepts_what_the_apiserver_authenticates_and_sends_a_proper_request() {
    let fx = Fixture::new().await;
    let reviewer = fx.reviewer();
    let (token, id) = fx.token("team-a", "app", Some("app-1")).await;
    reviewer.review(&token, &id).await.unwrap();

    let seen = fx.srv.state.seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![(Some(token.clone()), Some(format!("Bearer {BROKER_TOKEN}")))]
    );
    let debug = format!("{reviewer:?}");
    assert!(debug.contains(TOKEN_REVIEW_PATH), "{debug}");
    assert!(
        !debug.contains(BROKER_TOKEN) && !debug.contains(&token),
        "{debug}"
    );
    assert_eq!(
        reviewer.url(),
        format!("{}{TOKEN_REVIEW_PATH}", fx.srv.url("https"))
    );

    // No audiences in the answer, no pod-name extra, or a token naming no pod: accepted
    // (the local verification already checked the token's own audience and pod).
    let (token2, id2) = fx.token("team-a", "app", Some("app-1")).await;
    fx.srv.state.answer(
        &token2,
        201,
        authenticated("system:serviceaccount:team-a:app", None, Some(json!(null))),
    );
    reviewer.review(&token2, &id2).await.unwrap();
    let (token3, id3) = fx.token("team-a", "app", None).await;
    reviewer.review(&token3, &id3).await.unwrap();
    // The pod uid, when the apiserver reports it, must match too.
    let (token4, id4) = fx.token("team-a", "app", Some("app-1")).await;
    let mut body: serde_json::Value = serde_json::from_str(&authenticated(
        "system:serviceaccount:team-a:app",
        Some("app-1"),
        None,
    ))
    .unwrap();
    body["status"]["user"]["extra"][POD_UID_EXTRA] = json!([id4.pod_uid.clone().unwrap()]);
    fx.srv.state.answer(&token4, 201, body.to_string());
    reviewer.review(&token4, &id4).await.unwrap();
    assert_eq!(fx.srv.state.requests(), 4);
}

#[tokio::test]
async fn definite_refusals_are_denied() {
    let fx = Fixture::new().await;
    let reviewer = fx.reviewer();
    let user = "system:serviceaccount:team-a:app";
    let cases: Vec<(&str, String, &str)> = vec![
        ("not authenticated", not_authenticated(None), "not authenticated"),
        (
            "pod deleted",
            not_authenticated(Some(
                "[invalid bearer token, service account token has been invalidated, pod \"app-1\" not found]",
            )),
            "pod \"app-1\" not found",
        ),
        (
            "wrong service account",
            authenticated("system:serviceaccount:team-a:other", Some("app-1"), None),
            "team-a:other",
        ),
        (
            "wrong namespace",
            authenticated("system:serviceaccount:team-b:app", Some("app-1"), None),
            "team-b:app",
        ),
        (
            "not a service account",
            authenticated("alice", Some("app-1"), None),
            "alice",
        ),
        (
            "other audience",
            authenticated(user, Some("app-1"), Some(json!(["https://kubernetes.default.svc"]))),
            "include none of",
        ),
        (
            "other pod",
            authenticated(user, Some("app-2"), None),
            "app-2",
        ),
    ];
    for (name, body, mentions) in cases {
        let (token, id) = fx.token("team-a", "app", Some("app-1")).await;
        fx.srv.state.answer(&token, 201, body);
        let err = reviewer.review(&token, &id).await.unwrap_err();
        assert!(matches!(err, TokenReviewError::Denied(_)), "{name}: {err}");
        assert_eq!(err.reason(), "token_review_denied");
        assert!(!err.is_unavailable());
        assert!(err.to_string().contains(mentions), "{name}: {err}");
        assert_clean(&err, &[&token, BROKER_TOKEN]);
    }
    // Another pod uid.
    let (token, id) = fx.token("team-a", "app", Some("app-1")).await;
    let mut body: serde_json::Value =
        serde_json::from_str(&authenticated(user, Some("app-1"), None)).unwrap();
    body["status"]["user"]["extra"][POD_UID_EXTRA] = json!(["another-uid"]);
    fx.srv.state.answer(&token, 201, body.to_string());
    let err = reviewer.review(&token, &id).await.unwrap_err();
    assert!(err.to_string().contains("pod uid"), "{err}");

    // An apiserver error message quoting the token is blanked out; control characters
    // cannot forge log lines.
    let (token, id) = fx.token("team-a", "app", Some("app-1")).await;
    let error = format!("token {token} rejected\nlevel=info msg=forged");
    fx.srv
        .state
        .answer(&token, 201, not_authenticated(Some(&error)));
    let err = reviewer.review(&token, &id).await.unwrap_err();
    assert!(
        err.to_string().contains("token [token] rejected?level"),
        "{err}"
    );
    assert_clean(&err, &[&token]);
}

#[tokio::test]
async fn server_failures_are_unavailable_and_not_cached() {
    let fx = Fixture::new().await;
    let mut config = fx.config.clone();
    config.timeout = Duration::from_millis(500);
    let reviewer = TokenReviewer::new(&config).unwrap();
    let (token, id) = fx.token("team-a", "app", Some("app-1")).await;
    let state = &fx.srv.state;

    // 500 whose body echoes the token: the body is not read into the error.
    state.answer_all(500, format!("internal error reviewing {token}"));
    let err = reviewer.review(&token, &id).await.unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    assert_eq!(err.reason(), "token_review_unavailable");
    assert!(err.to_string().contains("HTTP 500"), "{err}");
    assert_clean(&err, &[&token, BROKER_TOKEN]);

    // 2xx but not a TokenReview, or without a status.
    for body in [
        "<html>oops</html>".to_string(),
        json!({"kind": "TokenReview"}).to_string(),
    ] {
        state.answer_all(200, body);
        let err = reviewer.review(&token, &id).await.unwrap_err();
        assert!(err.is_unavailable(), "{err}");
    }
    // Larger than the cap.
    state.answer_all(201, " ".repeat(MAX_REVIEW_BYTES as usize + 1));
    let err = reviewer.review(&token, &id).await.unwrap_err();
    assert!(err.to_string().contains("larger than"), "{err}");
    // Too slow.
    state.answer_all(599, String::new());
    let err = reviewer.review(&token, &id).await.unwrap_err();
    assert!(err.to_string().contains("timed out"), "{err}");

    // Nothing of that was cached: once the apiserver is back, the token is accepted.
    let before = state.requests();
    state.answer_all(
        201,
        authenticated("system:serviceaccount:team-a:app", Some("app-1"), None),
    );
    reviewer.review(&token, &id).await.unwrap();
    assert_eq!(state.requests(), before + 1);

    // The apiserver refuses the broker's own token: unavailable, not a verdict on the
    // caller's token, and no token in the error.
    *state.bearer.lock().unwrap() = "some-other-token".into();
    let (token, id) = fx.token("team-a", "app", Some("app-1")).await;
    let err = reviewer.review(&token, &id).await.unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    assert!(err.to_string().contains("HTTP 401"), "{err}");
    assert_clean(&err, &[&token, BROKER_TOKEN]);
}

#[tokio::test]
async fn the_broker_token_file_is_read_on_every_call() {
    let fx = Fixture::new().await;
    let reviewer = fx.reviewer();
    let state = &fx.srv.state;
    let (t1, id) = fx.token("team-a", "app", Some("app-1")).await;
    reviewer.review(&t1, &id).await.unwrap();

    // The kubelet rotates the broker's token.
    *state.bearer.lock().unwrap() = "rotated-broker-token".into();
    std::fs::write(&fx.token_file, "rotated-broker-token").unwrap();
    let (t2, id) = fx.token("team-a", "app", Some("app-1")).await;
    reviewer.review(&t2, &id).await.unwrap();
    let auth: Vec<Option<String>> = state
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|(_, a)| a.clone())
        .collect();
    assert_eq!(
        auth,
        vec![
            Some(format!("Bearer {BROKER_TOKEN}")),
            Some("Bearer rotated-broker-token".to_string())
        ]
    );

    // Empty or missing: unavailable, naming the file, and no request is made.
    let (t3, id) = fx.token("team-a", "app", Some("app-1")).await;
    std::fs::write(&fx.token_file, " \n").unwrap();
    let err = reviewer.review(&t3, &id).await.unwrap_err();
    assert!(
        err.is_unavailable() && err.to_string().contains("is empty"),
        "{err}"
    );
    std::fs::remove_file(&fx.token_file).unwrap();
    let err = reviewer.review(&t3, &id).await.unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    assert!(err.to_string().contains("token"), "{err}");
    assert_clean(&err, &[&t3]);
    assert_eq!(state.requests(), 2);
}

#[tokio::test]
async fn an_apiserver_certificate_from_another_ca_is_refused() {
    let fx = Fixture::new().await;
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other.crt");
    std::fs::write(&other, pki("other").ca_pem).unwrap();
    let mut config = fx.config.clone();
    config.ca_file = Some(other);
    let reviewer = TokenReviewer::new(&config).unwrap();
    let (token, id) = fx.token("team-a", "app", Some("app-1")).await;
    let err = reviewer.review(&token, &id).await.unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
    // The handshake failed: neither token reached the server.
    assert_eq!(fx.srv.state.requests(), 0);
}

#[tokio::test]
async fn verdicts_are_cached_by_fingerprint_for_the_ttl_only() {
    let fx = Fixture::new().await;
    let mut config = fx.config.clone();
    config.cache_ttl = Duration::from_millis(400);
    let reviewer = TokenReviewer::new(&config).unwrap();
    let state = &fx.srv.state;
    let (a, id_a) = fx.token("team-a", "app", Some("app-1")).await;
    let (b, id_b) = fx.token("team-a", "app", Some("app-1")).await;

    // The same token twice: one request. Another token: its own request.
    reviewer.review(&a, &id_a).await.unwrap();
    reviewer.review(&a, &id_a).await.unwrap();
    assert_eq!(state.reviewed(), vec![a.clone()]);
    reviewer.review(&b, &id_b).await.unwrap();
    reviewer.review(&b, &id_b).await.unwrap();
    assert_eq!(state.reviewed(), vec![a.clone(), b.clone()]);

    // The cache holds fingerprints, never tokens.
    {
        let cache = reviewer.lock_cache();
        let mut keys: Vec<&String> = cache.map.keys().collect();
        keys.sort();
        let mut want = [token_fingerprint(&a), token_fingerprint(&b)];
        want.sort();
        assert_eq!(keys, want.iter().collect::<Vec<_>>());
        let debug = format!("{:?}", *cache);
        assert!(!debug.contains(&a) && !debug.contains(&b));
    }

    // A cached positive verdict is still checked against the identity asking.
    let other = Identity {
        service_account: "other".into(),
        ..id_a.clone()
    };
    let err = reviewer.review(&a, &other).await.unwrap_err();
    assert!(matches!(err, TokenReviewError::Denied(_)), "{err}");
    assert_eq!(state.requests(), 2);

    // Meanwhile the pod is deleted: the cached verdict holds until the TTL ends, then
    // the apiserver is asked again and the token refused.
    state.answer_all(201, not_authenticated(Some("pod \"app-1\" not found")));
    reviewer.review(&a, &id_a).await.unwrap();
    assert_eq!(state.requests(), 2);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let err = reviewer.review(&a, &id_a).await.unwrap_err();
    assert!(matches!(err, TokenReviewError::Denied(_)), "{err}");
    assert_eq!(state.requests(), 3);

    // The refusal is cached as well (for the same short time).
    let err = reviewer.review(&a, &id_a).await.unwrap_err();
    assert!(matches!(err, TokenReviewError::Denied(_)), "{err}");
    assert_eq!(state.requests(), 3);

    // Zero TTL: no cache at all.
    config.cache_ttl = Duration::ZERO;
    let uncached = TokenReviewer::new(&config).unwrap();
    state.answer_all(
        201,
        authenticated("system:serviceaccount:team-a:app", Some("app-1"), None),
    );
    uncached.review(&b, &id_b).await.unwrap();
    uncached.review(&b, &id_b).await.unwrap();
    assert_eq!(state.requests(), 5);
    assert_eq!(uncached.cached(), 0);
}

#[tokio::test]
async fn a_cached_verdict_never_outlives_the_token() {
    let fx = Fixture::new().await;
    let mut config = fx.config.clone();
    config.cache_ttl = MAX_REVIEW_CACHE_TTL;
    let reviewer = TokenReviewer::new(&config).unwrap();
    // exp is whole seconds: this token has at most one second left.
    let (token, id) = fx
        .token_for("team-a", "app", Some("app-1"), Duration::from_secs(1))
        .await;
    reviewer.review(&token, &id).await.unwrap();
    assert_eq!(fx.srv.state.requests(), 1);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    reviewer.review(&token, &id).await.unwrap();
    assert_eq!(fx.srv.state.requests(), 2);
}

#[test]
fn remaining_life_reads_exp_only_from_a_jwt() {
    let dev = DevIssuer::generate().unwrap();
    let token = dev
        .mint("team-a", "app", None, Duration::from_secs(600))
        .unwrap();
    let left = remaining_life(&token);
    assert!(left > Duration::from_secs(590) && left <= Duration::from_secs(600));
    for junk in ["", "a.b.c", "not a token"] {
        assert_eq!(remaining_life(junk), Duration::ZERO, "{junk}");
    }
}

fn status(user: &str) -> Arc<ReviewStatus> {
    Arc::new(ReviewStatus {
        authenticated: true,
        username: Some(user.into()),
        audiences: None,
        pod_names: None,
        pod_uids: None,
        error: None,
    })
}

#[test]
fn the_cache_is_bounded_and_drops_expired_then_oldest() {
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let mut cache = VerdictCache::new(3);
    cache.insert("a".into(), status("a"), at(0), at(10_000));
    cache.insert("b".into(), status("b"), at(1), at(50)); // short: its token expires soon
    cache.insert("c".into(), status("c"), at(2), at(10_000));
    assert_eq!(cache.map.len(), 3);

    // Full; "b" has expired: it goes, not the oldest.
    cache.insert("d".into(), status("d"), at(100), at(10_000));
    assert!(cache.get("a", at(100)).is_some());
    assert!(cache.get("b", at(100)).is_none());
    assert_eq!(cache.map.len(), 3);

    // Full, nothing expired: the oldest ("a") goes.
    cache.insert("e".into(), status("e"), at(200), at(10_000));
    assert!(cache.get("a", at(200)).is_none());
    for k in ["c", "d", "e"] {
        assert!(cache.get(k, at(200)).is_some(), "{k}");
    }

    // Re-inserting a key replaces it without evicting another.
    cache.insert("c".into(), status("c2"), at(300), at(10_000));
    assert_eq!(cache.map.len(), 3);
    assert_eq!(
        cache.get("c", at(300)).unwrap().username.as_deref(),
        Some("c2")
    );
    // Now "d" is the oldest.
    cache.insert("f".into(), status("f"), at(400), at(10_000));
    assert!(cache.get("d", at(400)).is_none());
    assert!(cache.get("c", at(400)).is_some());

    // Expired entries are not served, and are swept from the front.
    assert!(cache.get("e", at(10_000)).is_none());
    cache.insert("g".into(), status("g"), at(20_000), at(30_000));
    assert_eq!(cache.map.len(), 1);
    assert!(cache.order.len() <= 2 * cache.capacity + 16);

    // Nothing already expired, and nothing at all with capacity zero.
    cache.insert("h".into(), status("h"), at(20_000), at(20_000));
    assert!(cache.get("h", at(20_000)).is_none());
    let mut none = VerdictCache::new(0);
    none.insert("a".into(), status("a"), at(0), at(10_000));
    assert!(none.map.is_empty());
}

#[test]
fn the_order_queue_stays_bounded_under_churn() {
    let t0 = Instant::now();
    let mut cache = VerdictCache::new(4);
    // One long-lived entry at the front, then many re-inserts of the same keys.
    cache.insert(
        "pinned".into(),
        status("p"),
        t0,
        t0 + Duration::from_secs(3600),
    );
    for i in 0..1000u64 {
        let now = t0 + Duration::from_millis(i);
        cache.insert(
            format!("k{}", i % 2),
            status("k"),
            now,
            now + Duration::from_secs(60),
        );
    }
    assert_eq!(cache.map.len(), 3);
    assert!(cache.order.len() <= 2 * 4 + 16, "{}", cache.order.len());
}

#[test]
fn apiserver_text_is_cleaned() {
    assert_eq!(clean_text("a\nb\u{1b}c", "tok"), "a?b?c");
    assert_eq!(clean_text("x tok y", "tok"), "x [token] y");
    let long = "é".repeat(MAX_DETAIL_CHARS + 5);
    let cut = clean_text(&long, "tok");
    assert_eq!(cut.chars().count(), MAX_DETAIL_CHARS + 1);
    assert!(cut.ends_with('…'));
    // A token longer than the cut is blanked before cutting, so no prefix of it is kept.
    let token = "t".repeat(MAX_DETAIL_CHARS * 2);
    assert_eq!(clean_text(&format!("bad {token}"), &token), "bad [token]");
}

#[test]
fn unusable_configurations_are_refused_at_construction() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.crt");
    std::fs::write(&ca, pki("x").ca_pem).unwrap();
    let empty = dir.path().join("empty.crt");
    std::fs::write(&empty, "").unwrap();
    let token = dir.path().join("token");
    let cfg = |url: &str| TokenReviewConfig::new(url, Some(ca.clone()), &token);
    for url in [
        "http://kubernetes.default.svc",
        "http://10.0.0.1",
        "http://localhost.example.com",
        "ftp://127.0.0.1",
        "https://user:pass@kubernetes.default.svc",
        "https://kubernetes.default.svc/?x=1",
        "https://kubernetes.default.svc/#frag",
        "not a url",
        "",
    ] {
        let err = TokenReviewer::new(&cfg(url)).unwrap_err();
        assert!(matches!(err, SetupError::InvalidConfig(_)), "{url}: {err}");
        assert!(!err.to_string().contains("pass@"), "{err}");
    }
    for (url, endpoint) in [
        (
            "https://kubernetes.default.svc",
            "https://kubernetes.default.svc/apis/authentication.k8s.io/v1/tokenreviews",
        ),
        (
            "https://kubernetes.default.svc:6443/",
            "https://kubernetes.default.svc:6443/apis/authentication.k8s.io/v1/tokenreviews",
        ),
        (
            "https://proxy.example/k8s/",
            "https://proxy.example/k8s/apis/authentication.k8s.io/v1/tokenreviews",
        ),
        (
            "http://127.0.0.1:8080",
            "http://127.0.0.1:8080/apis/authentication.k8s.io/v1/tokenreviews",
        ),
        (
            "http://[::1]:8080",
            "http://[::1]:8080/apis/authentication.k8s.io/v1/tokenreviews",
        ),
    ] {
        assert_eq!(TokenReviewer::new(&cfg(url)).unwrap().url(), endpoint);
    }
    // http on loopback does not read the CA bundle.
    let mut c = cfg("http://localhost:8080");
    c.ca_file = Some(dir.path().join("missing.crt"));
    TokenReviewer::new(&c).unwrap();

    let https = "https://kubernetes.default.svc";
    let mut bad = Vec::new();
    let mut c = cfg(https);
    c.ca_file = None;
    bad.push(c);
    let mut c = cfg(https);
    c.ca_file = Some(dir.path().join("missing.crt"));
    bad.push(c);
    let mut c = cfg(https);
    c.ca_file = Some(empty);
    bad.push(c);
    let mut c = cfg(https);
    c.timeout = Duration::ZERO;
    bad.push(c);
    let mut c = cfg(https);
    c.cache_ttl = MAX_REVIEW_CACHE_TTL + Duration::from_secs(1);
    bad.push(c);
    let mut c = cfg(https);
    c.audiences = Vec::new();
    bad.push(c);
    let mut c = cfg(https);
    c.audiences = vec![" ".into()];
    bad.push(c);
    for c in bad {
        let err = TokenReviewer::new(&c).unwrap_err();
        assert!(matches!(err, SetupError::InvalidConfig(_)), "{c:?}: {err}");
    }
}
