//! Bodies of the fuzz targets over what reaches the broker from the network: JWKS documents,
//! bearer tokens, and the gRPC request messages (`fuzz/` runs them under libFuzzer;
//! `hsm-tests/tests/fuzz_corpus.rs` replays the committed corpora through them on stable).
//! Arbitrary bytes in, never a panic; a broken invariant panics so the fuzzer reports it.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{EncodingKey, Header};
use prost::Message as _;

use crate::api as pb;
use crate::auth::{dev_jwks_source, dev_verifier_config, AuthError, DevIssuer, Jwks, Verifier};
use crate::policy::{validate_secret_path, PolicySet, DEFAULT_MAX_TTL_CAP};
use keyhaven_broker_core::lease_ttl;

/// A JWKS document: parsed without panicking; every key kept is listed once.
pub fn jwks(data: &[u8]) {
    if let Ok(set) = Jwks::from_json(data) {
        let ids = set.key_ids();
        assert_eq!(ids.len(), set.len());
        for kid in &ids {
            assert!(
                set.algorithm(kid).is_some(),
                "listed key {kid:?} has no algorithm"
            );
        }
    }
}

struct JwtHarness {
    rt: tokio::runtime::Runtime,
    verifier: Verifier,
    signer: EncodingKey,
    kid: String,
}

fn jwt_harness() -> Option<&'static JwtHarness> {
    static H: OnceLock<Option<JwtHarness>> = OnceLock::new();
    H.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .ok()?;
        let dev = DevIssuer::generate().ok()?;
        let signer = EncodingKey::from_ec_pem(dev.private_key_pem().as_bytes()).ok()?;
        let verifier = Verifier::new(dev_verifier_config(), dev_jwks_source(&dev)).ok()?;
        rt.block_on(verifier.refresh()).ok()?;
        Some(JwtHarness {
            rt,
            verifier,
            signer,
            kid: dev.kid().to_owned(),
        })
    })
    .as_ref()
}

/// A bearer token through the verifier. An even first byte: the rest is the token as sent.
/// An odd one: the rest is a claims document, signed with a trusted key (so the claim checks
/// are reached); the identity of a token that passes must match its `sub`.
pub fn jwt(data: &[u8]) {
    let Some(h) = jwt_harness() else {
        panic!("the JWT harness could not start");
    };
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let token = if mode % 2 == 0 {
        String::from_utf8_lossy(rest).into_owned()
    } else {
        let Ok(claims) = serde_json::from_slice::<serde_json::Value>(rest) else {
            return;
        };
        let mut header = Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(h.kid.clone());
        let Ok(t) = jsonwebtoken::encode(&header, &claims, &h.signer) else {
            return;
        };
        t
    };
    match h.rt.block_on(h.verifier.verify_uncached(&token)) {
        Ok(v) => {
            let sub = format!(
                "system:serviceaccount:{}:{}",
                v.identity.namespace, v.identity.service_account
            );
            assert!(token.split('.').count() == 3);
            assert!(!v.identity.namespace.is_empty() && !v.identity.service_account.is_empty());
            assert!(v.expires_at > v.issued_at, "{sub}: expires before issued");
        }
        Err(AuthError::JwksUnavailable { .. }) => panic!("the static key set became unavailable"),
        Err(_) => {}
    }
}

/// A gRPC request message: the first byte picks the method, the rest is its wire-format
/// request, decoded as the server decodes it and put through the checks that need no store.
pub fn broker_request(data: &[u8]) {
    let Some((&which, msg)) = data.split_first() else {
        return;
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, lease_ttl::millis);
    match which % 6 {
        0 => {
            let Ok(r) = pb::LeaseRequest::decode(msg) else {
                return;
            };
            check_path(&r.path);
            let ttl = Duration::from_secs(r.ttl_seconds);
            let (exp, max) = lease_ttl::grant(now, ttl, DEFAULT_MAX_TTL_CAP);
            assert!(now <= exp && exp <= max);
        }
        1 => {
            let Ok(r) = pb::RenewRequest::decode(msg) else {
                return;
            };
            let max = now.saturating_add(lease_ttl::millis(DEFAULT_MAX_TTL_CAP));
            let exp = lease_ttl::renewal(now, Duration::from_secs(r.increment_seconds), max);
            assert!(now <= exp && exp <= max);
        }
        2 => {
            let Ok(r) = pb::PutSecretRequest::decode(msg) else {
                return;
            };
            check_path(&r.path);
        }
        3 => {
            let Ok(r) = pb::ApplyPoliciesRequest::decode(msg) else {
                return;
            };
            if let Ok(set) = PolicySet::from_yaml(&r.yaml, DEFAULT_MAX_TTL_CAP) {
                assert!(set.to_yaml().is_ok());
            }
        }
        4 => {
            let Ok(r) = pb::DeleteSecretRequest::decode(msg) else {
                return;
            };
            check_path(&r.path);
        }
        _ => {
            let Ok(r) = pb::RevokeLeasesRequest::decode(msg) else {
                return;
            };
            if let Some(s) = r.selector {
                if !s.path_prefix.is_empty() {
                    check_path(s.path_prefix.trim_end_matches('/'));
                }
            }
        }
    }
}

/// A path the validator accepts is plain: no empty, `.` or `..` segment.
fn check_path(path: &str) {
    if validate_secret_path(path).is_ok() {
        assert!(
            !path
                .split('/')
                .any(|s| s.is_empty() || s == "." || s == ".."),
            "accepted {path:?}"
        );
    }
}
