//! Tests of `verifier`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use jsonwebtoken::EncodingKey;
use serde_json::{json, Value};

use super::super::jwks::FetchFuture;
use super::super::test_keys::{
    self, claims, ec_jwk, ec_key, jwks_json, now, rsa_jwk, rsa_key, sign,
};
use super::*;

const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// A source whose document can be swapped and which counts fetches.
#[derive(Debug)]
struct CountingSource {
    json: Mutex<Vec<u8>>,
    fetches: AtomicUsize,
    fail: AtomicBool,
}

impl CountingSource {
    fn new(json: Vec<u8>) -> Arc<Self> {
        Arc::new(CountingSource {
            json: Mutex::new(json),
            fetches: AtomicUsize::new(0),
            fail: AtomicBool::new(false),
        })
    }
    fn set(&self, json: Vec<u8>) {
        *self.json.lock().unwrap() = json;
    }
    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

impl JwksSource for CountingSource {
    fn fetch(&self) -> FetchFuture<'_> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        let result = if self.fail.load(Ordering::SeqCst) {
            Err(AuthError::jwks_unavailable_msg("test source down"))
        } else {
            Ok(self.json.lock().unwrap().clone())
        };
        Box::pin(async move { result })
    }
}

fn verifier_with(cfg: VerifierConfig) -> (Verifier, Arc<CountingSource>) {
    let source = CountingSource::new(jwks_json(&[rsa_jwk("rsa-1"), ec_jwk("ec-1")]));
    let v = Verifier::new(cfg, Arc::clone(&source)).unwrap();
    (v, source)
}

fn verifier() -> (Verifier, Arc<CountingSource>) {
    verifier_with(VerifierConfig::new(ISSUER))
}

fn rs(claims: &Value) -> String {
    sign(Algorithm::RS256, "rsa-1", claims, &rsa_key())
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
}

/// Claims with one field changed (`null` removes it).
fn with(mut c: Value, key: &str, value: Value) -> Value {
    if value.is_null() {
        c.as_object_mut().unwrap().remove(key);
    } else {
        c[key] = value;
    }
    c
}

fn assert_no_token(text: &str, token: &str) {
    assert!(!text.contains(token), "token leaked: {text}");
    for segment in token.split('.').filter(|s| s.len() > 8) {
        assert!(!text.contains(segment), "token segment leaked: {text}");
    }
}

#[tokio::test]
async fn valid_rs256_token_gives_identity() {
    let (v, source) = verifier();
    let c = claims(ISSUER);
    let verified = v.verify_token(&rs(&c)).await.unwrap();
    assert_eq!(
        verified.identity,
        Identity {
            namespace: "team-a".into(),
            service_account: "app".into(),
            pod_name: Some("app-0".into()),
            pod_uid: Some("5a3c2f0e-1b7d-4e6a-9c8b-7d6e5f4a3b21".into()),
        }
    );
    assert_eq!(
        verified.service_account_uid,
        "9e8d7c6b-5a4f-4e3d-8c2b-1a0f9e8d7c63"
    );
    assert_eq!(verified.key_id, "rsa-1");
    assert_eq!(
        verified.expires_at,
        UNIX_EPOCH + Duration::from_secs(c["exp"].as_u64().unwrap())
    );
    // The key set was loaded lazily by the first token.
    assert_eq!(source.fetches(), 1);
}

#[tokio::test]
async fn valid_es256_token_without_pod_gives_identity() {
    let (v, _) = verifier();
    let mut c = claims(ISSUER);
    c["kubernetes.io"].as_object_mut().unwrap().remove("pod");
    let identity = v
        .verify(&sign(Algorithm::ES256, "ec-1", &c, &ec_key()))
        .await
        .unwrap();
    assert_eq!(identity.subject(), "team-a/app");
    assert_eq!(identity.pod_name, None);
    assert_eq!(identity.pod_uid, None);
}

#[tokio::test]
async fn any_configured_audience_and_a_string_aud_are_accepted() {
    let mut cfg = VerifierConfig::new(ISSUER);
    cfg.audiences = vec!["vault".into(), "keyhaven".into()];
    let (v, _) = verifier_with(cfg);
    v.verify(&rs(&with(claims(ISSUER), "aud", json!("keyhaven"))))
        .await
        .unwrap();
    v.verify(&rs(&with(claims(ISSUER), "aud", json!(["x", "vault"]))))
        .await
        .unwrap();
}

#[tokio::test]
async fn leeway_covers_small_clock_skew() {
    let (v, _) = verifier();
    let n = now();
    let c = with(claims(ISSUER), "exp", json!(n - 10));
    let c = with(c, "iat", json!(n - 600));
    v.verify(&rs(&c)).await.unwrap();
    let c = with(claims(ISSUER), "nbf", json!(n + 10));
    let c = with(c, "iat", json!(n + 10));
    v.verify(&rs(&c)).await.unwrap();
}

/// The token table of the issue, plus the other ways a token is refused. Each case checks
/// the reason and that neither `Display` nor `Debug` of the error shows the token.
#[tokio::test]
async fn token_table_gives_each_reason_and_never_shows_the_token() {
    let (v, _) = verifier();
    let n = now();
    let good = claims(ISSUER);

    let none_header = b64(&json!({"alg": "none", "kid": "rsa-1"}));
    let alg_none = format!("{none_header}.{}.", b64(&good));
    let alg_none_no_kid = format!("{}.{}.", b64(&json!({"alg": "none"})), b64(&good));
    let hs256_with_public_key = sign(
        Algorithm::HS256,
        "rsa-1",
        &good,
        &EncodingKey::from_secret(test_keys::RSA_PUBLIC_PEM.as_bytes()),
    );
    let mut bad_signature = rs(&good).into_bytes();
    let i = bad_signature.len() - 20; // well inside the signature segment
    bad_signature[i] = if bad_signature[i] == b'A' { b'B' } else { b'A' };
    let bad_signature = String::from_utf8(bad_signature).unwrap();
    let tampered_payload = {
        let token = rs(&good);
        let parts: Vec<&str> = token.split('.').collect();
        let forged = with(
            good.clone(),
            "sub",
            json!("system:serviceaccount:kube-system:admin"),
        );
        format!("{}.{}.{}", parts[0], b64(&forged), parts[2])
    };
    let mut sub_mismatch = good.clone();
    sub_mismatch["sub"] = json!("system:serviceaccount:team-b:app");
    let mut sa_mismatch = good.clone();
    sa_mismatch["kubernetes.io"]["serviceaccount"]["name"] = json!("other");
    let mut pod_without_uid = good.clone();
    pod_without_uid["kubernetes.io"]["pod"]
        .as_object_mut()
        .unwrap()
        .remove("uid");
    let with_crit = format!(
        "{}.{}.{}",
        b64(&json!({"alg": "RS256", "kid": "rsa-1", "crit": ["exp"]})),
        b64(&good),
        "c2ln"
    );

    let cases: Vec<(&str, String, &str)> = vec![
        (
            "expired",
            rs(&with(
                with(good.clone(), "exp", json!(n - 120)),
                "iat",
                json!(n - 720),
            )),
            "expired",
        ),
        (
            "not yet valid (nbf)",
            rs(&with(good.clone(), "nbf", json!(n + 600))),
            "not_yet_valid",
        ),
        (
            "not yet valid (iat)",
            rs(&with(good.clone(), "iat", json!(n + 600))),
            "not_yet_valid",
        ),
        (
            "wrong audience",
            rs(&with(good.clone(), "aud", json!(["kubernetes"]))),
            "bad_audience",
        ),
        (
            "empty audience",
            rs(&with(good.clone(), "aud", json!([]))),
            "bad_audience",
        ),
        (
            "no audience",
            rs(&with(good.clone(), "aud", Value::Null)),
            "bad_audience",
        ),
        (
            "wrong issuer",
            rs(&with(good.clone(), "iss", json!("https://evil.example"))),
            "bad_issuer",
        ),
        (
            "no issuer",
            rs(&with(good.clone(), "iss", Value::Null)),
            "bad_issuer",
        ),
        ("alg none", alg_none, "bad_algorithm"),
        ("alg none, no kid", alg_none_no_kid, "bad_algorithm"),
        (
            "HS256 keyed with the RSA public key",
            hs256_with_public_key,
            "bad_algorithm",
        ),
        (
            "RSA key, ES256 token",
            sign(Algorithm::ES256, "rsa-1", &good, &ec_key()),
            "bad_algorithm",
        ),
        (
            "EC key, RS256 token",
            sign(Algorithm::RS256, "ec-1", &good, &rsa_key()),
            "bad_algorithm",
        ),
        (
            "PS256",
            sign(Algorithm::PS256, "rsa-1", &good, &rsa_key()),
            "bad_algorithm",
        ),
        (
            "unknown kid",
            sign(Algorithm::RS256, "rotated-away", &good, &rsa_key()),
            "unknown_kid",
        ),
        (
            "no kid",
            jsonwebtoken::encode(
                &jsonwebtoken::Header::new(Algorithm::RS256),
                &good,
                &rsa_key(),
            )
            .unwrap(),
            "unknown_kid",
        ),
        ("bad signature", bad_signature, "bad_signature"),
        ("tampered payload", tampered_payload, "bad_signature"),
        (
            "no exp",
            rs(&with(good.clone(), "exp", Value::Null)),
            "missing_exp",
        ),
        (
            "too old",
            rs(&with(
                with(good.clone(), "iat", json!(n - 25 * 3600)),
                "nbf",
                json!(n - 25 * 3600),
            )),
            "too_old",
        ),
        (
            "lifetime too long",
            rs(&with(good.clone(), "exp", json!(n + 25 * 3600))),
            "too_old",
        ),
        (
            "no iat",
            rs(&with(good.clone(), "iat", Value::Null)),
            "malformed",
        ),
        (
            "exp before iat",
            rs(&with(
                with(good.clone(), "iat", json!(n)),
                "exp",
                json!(n - 5),
            )),
            "malformed",
        ),
        // An `exp` that is not a NumericDate is no usable `exp` at all.
        (
            "exp not a number",
            rs(&with(good.clone(), "exp", json!("soon"))),
            "missing_exp",
        ),
        (
            "nbf not a number",
            rs(&with(good.clone(), "nbf", json!("soon"))),
            "malformed",
        ),
        (
            "iat not a number",
            rs(&with(good.clone(), "iat", json!("soon"))),
            "malformed",
        ),
        (
            "aud not a string",
            rs(&with(good.clone(), "aud", json!(5))),
            "malformed",
        ),
        ("garbage", "not-a-token".to_string(), "malformed"),
        ("four segments", format!("{}.x", rs(&good)), "malformed"),
        (
            "header not json",
            format!("{}.{}.c2ln", URL_SAFE_NO_PAD.encode("nope"), b64(&good)),
            "malformed",
        ),
        ("crit header", with_crit, "malformed"),
        ("huge", "a".repeat(MAX_TOKEN_BYTES + 1), "malformed"),
        (
            "sub not a service account",
            rs(&with(good.clone(), "sub", json!("alice"))),
            "bad_subject",
        ),
        (
            "sub with extra colon",
            rs(&with(
                good.clone(),
                "sub",
                json!("system:serviceaccount:team-a:app:x"),
            )),
            "bad_subject",
        ),
        (
            "no sub",
            rs(&with(good.clone(), "sub", Value::Null)),
            "bad_subject",
        ),
        ("sub namespace disagrees", rs(&sub_mismatch), "bad_subject"),
        ("sa name disagrees", rs(&sa_mismatch), "bad_subject"),
        (
            "no kubernetes.io",
            rs(&with(good.clone(), "kubernetes.io", Value::Null)),
            "bad_subject",
        ),
        ("pod without uid", rs(&pod_without_uid), "bad_subject"),
    ];

    for (name, token, reason) in cases {
        let err = v.verify(&token).await.expect_err(name);
        assert_eq!(err.reason(), reason, "{name}: {err}");
        assert!(!err.is_unavailable(), "{name}");
        assert_no_token(&err.to_string(), &token);
        assert_no_token(&format!("{err:?}"), &token);
        let mut source = std::error::Error::source(&err);
        while let Some(s) = source {
            assert_no_token(&s.to_string(), &token);
            source = s.source();
        }
    }
    // The verifier itself never holds a token either.
    let token = rs(&good);
    v.verify(&token).await.unwrap();
    let debug = format!("{v:?}");
    assert_no_token(&debug, &token);
    assert!(debug.contains("rsa-1") && debug.contains(ISSUER), "{debug}");
}

#[tokio::test]
async fn unknown_kid_refetches_at_most_once_per_interval() {
    let source = CountingSource::new(jwks_json(&[rsa_jwk("rsa-1")]));
    let mut cfg = VerifierConfig::new(ISSUER);
    cfg.jwks_refetch_interval = Duration::from_millis(300);
    let v = Verifier::new(cfg, Arc::clone(&source)).unwrap();
    assert_eq!(v.refresh().await.unwrap(), 1);
    assert_eq!(source.fetches(), 1);

    // The refresh just happened, so an unknown kid right now is rate limited.
    let new_key = sign(Algorithm::ES256, "new-ec", &claims(ISSUER), &ec_key());
    assert_eq!(
        v.verify(&new_key).await.unwrap_err().reason(),
        "unknown_kid"
    );
    assert_eq!(source.fetches(), 1);

    tokio::time::sleep(Duration::from_millis(350)).await;
    // Refetched once; still unknown.
    assert_eq!(
        v.verify(&new_key).await.unwrap_err().reason(),
        "unknown_kid"
    );
    assert_eq!(source.fetches(), 2);
    // Immediately again: rate limited, no fetch.
    assert_eq!(
        v.verify(&new_key).await.unwrap_err().reason(),
        "unknown_kid"
    );
    assert_eq!(source.fetches(), 2);

    // The apiserver now publishes the new key; it is found once the interval has passed.
    source.set(jwks_json(&[rsa_jwk("rsa-1"), ec_jwk("new-ec")]));
    assert_eq!(
        v.verify(&new_key).await.unwrap_err().reason(),
        "unknown_kid"
    );
    assert_eq!(source.fetches(), 2);
    tokio::time::sleep(Duration::from_millis(350)).await;
    v.verify(&new_key).await.unwrap();
    assert_eq!(source.fetches(), 3);
    v.verify(&new_key).await.unwrap();
    v.verify(&rs(&claims(ISSUER))).await.unwrap();
    assert_eq!(source.fetches(), 3);
}

#[tokio::test]
async fn concurrent_unknown_kids_share_one_fetch() {
    let (v, source) = verifier();
    let v = Arc::new(v);
    let token = Arc::new(sign(Algorithm::RS256, "nope", &claims(ISSUER), &rsa_key()));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let (v, token) = (Arc::clone(&v), Arc::clone(&token));
        tasks.spawn(async move { v.verify(&token).await.unwrap_err().reason() });
    }
    while let Some(reason) = tasks.join_next().await {
        assert_eq!(reason.unwrap(), "unknown_kid");
    }
    assert_eq!(source.fetches(), 1);
}

#[tokio::test]
async fn refresh_failure_or_empty_set_keeps_old_keys_and_rotation_drops_them() {
    let (v, source) = verifier();
    v.refresh().await.unwrap();
    let token = rs(&claims(ISSUER));

    source.fail.store(true, Ordering::SeqCst);
    assert_eq!(v.refresh().await.unwrap_err().reason(), "jwks_unavailable");
    v.verify(&token).await.unwrap();

    source.fail.store(false, Ordering::SeqCst);
    source.set(jwks_json(&[
        json!({"kty": "oct", "kid": "h", "k": "c2VjcmV0"}),
    ]));
    assert_eq!(v.refresh().await.unwrap_err().reason(), "jwks_unavailable");
    v.verify(&token).await.unwrap();

    // A key no longer published stops being trusted after the next refresh.
    source.set(jwks_json(&[ec_jwk("ec-1")]));
    assert_eq!(v.refresh().await.unwrap(), 1);
    assert_eq!(v.verify(&token).await.unwrap_err().reason(), "unknown_kid");
}

#[tokio::test]
async fn a_changed_key_set_forgets_remembered_verdicts() {
    let (v, source) = verifier();
    v.refresh().await.unwrap();
    let token = rs(&claims(ISSUER));
    v.verify(&token).await.unwrap();
    // An unchanged document keeps the verdict.
    v.refresh().await.unwrap();
    v.verify(&token).await.unwrap();
    // The kid is still published, but for another key: the token is checked again (and the
    // key's own algorithm refuses it), not answered from memory.
    source.set(jwks_json(&[ec_jwk("rsa-1")]));
    assert_eq!(v.refresh().await.unwrap(), 1);
    assert_eq!(
        v.verify(&token).await.unwrap_err().reason(),
        "bad_algorithm"
    );
}

#[tokio::test]
async fn a_remembered_verdict_never_outlives_the_token() {
    let mut cfg = VerifierConfig::new(ISSUER);
    cfg.leeway = Duration::ZERO;
    let (v, _) = verifier_with(cfg);
    let c = with(claims(ISSUER), "exp", json!(now() + 1));
    let token = rs(&c);
    v.verify(&token).await.unwrap();
    // Remembered: the same token again is fine while it is valid.
    v.verify(&token).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(v.verify(&token).await.unwrap_err().reason(), "expired");
}

#[tokio::test]
async fn source_down_at_first_use_is_jwks_unavailable() {
    let (v, source) = verifier();
    source.fail.store(true, Ordering::SeqCst);
    let token = rs(&claims(ISSUER));
    let err = v.verify(&token).await.unwrap_err();
    assert_eq!(err.reason(), "jwks_unavailable");
    assert!(err.is_unavailable());
    // Within the refetch interval with no keys at all: still unavailable, not unknown_kid.
    assert_eq!(
        v.verify(&token).await.unwrap_err().reason(),
        "jwks_unavailable"
    );
    assert_eq!(source.fetches(), 1);
}

#[tokio::test]
async fn refresh_task_picks_up_new_keys_and_ends_with_the_verifier() {
    let (v, source) = verifier();
    let v = Arc::new(v);
    v.refresh().await.unwrap();
    let task = v.spawn_refresh_task(Duration::from_secs(1));
    source.set(jwks_json(&[rsa_jwk("rsa-2")]));
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(v.jwks().key_ids(), vec!["rsa-2".to_string()]);
    drop(v);
    tokio::time::timeout(Duration::from_secs(3), task)
        .await
        .expect("refresh task should end once the verifier is dropped")
        .unwrap();
}

#[tokio::test]
async fn file_source_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, jwks_json(&[rsa_jwk("rsa-1")])).unwrap();
    let v = Verifier::new(
        VerifierConfig::new(ISSUER),
        super::super::FileJwks::new(&path),
    )
    .unwrap();
    v.verify(&rs(&claims(ISSUER))).await.unwrap();
}

#[test]
fn unusable_configuration_is_refused() {
    let source = || CountingSource::new(Vec::new());
    let mut cases = Vec::new();
    cases.push(VerifierConfig::new(" "));
    let mut c = VerifierConfig::new(ISSUER);
    c.audiences.clear();
    cases.push(c);
    let mut c = VerifierConfig::new(ISSUER);
    c.audiences = vec![String::new()];
    cases.push(c);
    let mut c = VerifierConfig::new(ISSUER);
    c.leeway = Duration::from_secs(600);
    cases.push(c);
    let mut c = VerifierConfig::new(ISSUER);
    c.max_token_age = Duration::ZERO;
    cases.push(c);
    for cfg in cases {
        let err = Verifier::new(cfg.clone(), source()).unwrap_err();
        assert!(
            matches!(err, SetupError::InvalidConfig(_)),
            "{cfg:?}: {err}"
        );
    }
    let d = VerifierConfig::new(ISSUER);
    assert_eq!(d.audiences, vec!["keyhaven".to_string()]);
    assert_eq!(d.leeway, Duration::from_secs(30));
    assert_eq!(d.max_token_age, Duration::from_secs(86_400));
}

#[test]
fn subjects_and_names() {
    assert_eq!(
        parse_subject("system:serviceaccount:ns:my.sa-1").unwrap(),
        ("ns", "my.sa-1")
    );
    for bad in [
        "system:serviceaccount:ns",
        "system:serviceaccount::sa",
        "system:serviceaccount:ns:",
        "system:serviceaccount:NS:sa",
        "system:serviceaccount:ns:sa/x",
        "system:serviceaccount:ns.x:sa",
        "system:node:n1",
    ] {
        assert_eq!(
            parse_subject(bad).unwrap_err().reason(),
            "bad_subject",
            "{bad}"
        );
    }
    assert!(is_dns_label("a-1") && !is_dns_label("-a") && !is_dns_label(&"a".repeat(64)));
    assert!(is_dns_subdomain("a.b-c") && !is_dns_subdomain("a..b"));
}
