//! The trusted key set ([`Jwks`]) and where it comes from ([`JwksSource`]).
//!
//! Each usable JWK is turned into a key *with its algorithm fixed*: an RSA key (2048 to 4096
//! bits) verifies RS256 only, an EC P-256 key verifies ES256 only. Symmetric (`oct`) keys,
//! other curves, keys marked for encryption, keys without a `kid` and keys whose declared
//! `alg` disagrees with their type are skipped with a warning, never trusted.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey};
use tokio::io::AsyncReadExt as _;

use super::error::{sanitize, AuthError};

/// Largest JWKS document accepted from any source.
pub const MAX_JWKS_BYTES: u64 = 1024 * 1024;

/// RSA moduli shorter than this are refused.
const MIN_RSA_BITS: usize = 2048;
/// RSA moduli longer than this are refused (the RSA backend refuses them at verify time).
const MAX_RSA_BITS: usize = 4096;

/// A public key trusted for exactly one algorithm.
pub(crate) struct TrustedKey {
    pub(crate) algorithm: Algorithm,
    pub(crate) key: DecodingKey,
}

/// The trusted verification keys, by `kid`.
#[derive(Clone, Default)]
pub struct Jwks {
    keys: HashMap<String, Arc<TrustedKey>>,
}

impl fmt::Debug for Jwks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut kids: Vec<(&str, Algorithm)> = self
            .keys
            .iter()
            .map(|(kid, k)| (kid.as_str(), k.algorithm))
            .collect();
        kids.sort_by_key(|(kid, _)| *kid);
        f.debug_struct("Jwks").field("keys", &kids).finish()
    }
}

impl Jwks {
    /// Parses a JWKS document (`{"keys": [...]}`), keeping every usable key and skipping (with
    /// a warning) the others. Fails only if the document itself is not a JWKS.
    pub fn from_json(bytes: &[u8]) -> Result<Self, AuthError> {
        #[derive(serde::Deserialize)]
        struct Doc {
            keys: Vec<serde_json::Value>,
        }
        if bytes.len() as u64 > MAX_JWKS_BYTES {
            return Err(AuthError::jwks_unavailable_msg("JWKS document too large"));
        }
        let doc: Doc = serde_json::from_slice(bytes)
            .map_err(|e| AuthError::jwks_unavailable("JWKS document is not a key set", e))?;
        let mut jwks = Vec::with_capacity(doc.keys.len());
        for value in doc.keys {
            // One key we cannot parse (an unknown `kty`, say) must not hide the others.
            let kid = value
                .get("kid")
                .and_then(|k| k.as_str())
                .map(|k| sanitize(k, 64));
            match serde_json::from_value::<Jwk>(value) {
                Ok(jwk) => jwks.push(jwk),
                Err(_) => tracing::warn!(kid = ?kid, "skipping JWK that cannot be parsed"),
            }
        }
        Ok(Self::from_jwks(&jwks))
    }

    /// Builds from an already parsed key set, with the same rules as [`Jwks::from_json`].
    pub fn from_jwk_set(set: &JwkSet) -> Self {
        Self::from_jwks(&set.keys)
    }

    fn from_jwks(jwks: &[Jwk]) -> Self {
        let mut keys: HashMap<String, Arc<TrustedKey>> = HashMap::new();
        let mut duplicated: Vec<String> = Vec::new();
        for jwk in jwks {
            let kid = jwk.common.key_id.as_deref().map(|k| sanitize(k, 64));
            match trusted_key(jwk) {
                Ok((kid, key)) => {
                    if keys.insert(kid.clone(), Arc::new(key)).is_some() {
                        duplicated.push(kid);
                    }
                }
                Err(why) => tracing::warn!(kid = ?kid, why, "skipping JWK"),
            }
        }
        // Two different keys under one kid: we cannot tell which one a token means.
        for kid in duplicated {
            if keys.remove(&kid).is_some() {
                tracing::warn!(kid = %sanitize(&kid, 64), "skipping JWKs with a duplicated kid");
            }
        }
        Jwks { keys }
    }

    /// Number of usable keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when no key is usable.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The key ids, sorted.
    pub fn key_ids(&self) -> Vec<String> {
        let mut kids: Vec<String> = self.keys.keys().cloned().collect();
        kids.sort();
        kids
    }

    /// The one algorithm the key `kid` verifies, if the key is known.
    pub fn algorithm(&self, kid: &str) -> Option<Algorithm> {
        self.keys.get(kid).map(|k| k.algorithm)
    }

    pub(crate) fn get(&self, kid: &str) -> Option<Arc<TrustedKey>> {
        self.keys.get(kid).cloned()
    }
}

/// Turns one JWK into a trusted key, or says why not.
fn trusted_key(jwk: &Jwk) -> Result<(String, TrustedKey), &'static str> {
    let kid = match jwk.common.key_id.as_deref() {
        Some(kid) if !kid.is_empty() => kid.to_owned(),
        _ => return Err("no kid"),
    };
    match &jwk.common.public_key_use {
        None | Some(PublicKeyUse::Signature) => {}
        Some(_) => return Err("key is not for signatures"),
    }
    let (algorithm, declared_ok) = match &jwk.algorithm {
        AlgorithmParameters::RSA(rsa) => {
            let n = URL_SAFE_NO_PAD
                .decode(rsa.n.trim_end_matches('='))
                .map_err(|_| "RSA modulus is not base64url")?;
            let bits = bit_len(&n);
            if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) {
                return Err("RSA modulus size out of range");
            }
            (
                Algorithm::RS256,
                matches!(jwk.common.key_algorithm, None | Some(KeyAlgorithm::RS256)),
            )
        }
        AlgorithmParameters::EllipticCurve(ec) => {
            if ec.curve != EllipticCurve::P256 {
                return Err("unsupported elliptic curve");
            }
            (
                Algorithm::ES256,
                matches!(jwk.common.key_algorithm, None | Some(KeyAlgorithm::ES256)),
            )
        }
        AlgorithmParameters::OctetKey(_) => return Err("symmetric keys are never trusted"),
        AlgorithmParameters::OctetKeyPair(_) => return Err("unsupported key type"),
    };
    if !declared_ok {
        return Err("declared alg does not match the key type");
    }
    let key = DecodingKey::from_jwk(jwk).map_err(|_| "key parameters are not valid")?;
    if algorithm == Algorithm::ES256 {
        // The ES256 verifier parses the point when it is built: build one now (on an empty
        // signature, which cannot verify) so an off-curve point is refused at load time, not
        // reported as a bad token later.
        jsonwebtoken::crypto::verify("", b"", &key, algorithm)
            .map_err(|_| "EC point is not on P-256")?;
    }
    Ok((kid, TrustedKey { algorithm, key }))
}

fn bit_len(be: &[u8]) -> usize {
    match be.iter().position(|b| *b != 0) {
        Some(i) => (be.len() - i) * 8 - be[i].leading_zeros() as usize,
        None => 0,
    }
}

/// The future a [`JwksSource`] returns: the raw JWKS document.
pub type FetchFuture<'a> = Pin<Box<dyn Future<Output = Result<Vec<u8>, AuthError>> + Send + 'a>>;

/// Where the JWKS document comes from. Asynchronous, so an HTTPS fetch from the apiserver's
/// `/openid/v1/jwks` can be plugged in without blocking the reactor.
///
/// A source returns the raw document; the verifier parses it leniently (a key it cannot use
/// does not hide the others). Every failure is an [`AuthError::JwksUnavailable`].
pub trait JwksSource: fmt::Debug + Send + Sync {
    /// Fetches the current JWKS document.
    fn fetch(&self) -> FetchFuture<'_>;
}

impl<T: JwksSource + ?Sized> JwksSource for Arc<T> {
    fn fetch(&self) -> FetchFuture<'_> {
        (**self).fetch()
    }
}

/// A JWKS document in a file, re-read on every fetch (so a rotated file is picked up).
#[derive(Debug, Clone)]
pub struct FileJwks {
    path: PathBuf,
}

impl FileJwks {
    /// A source reading `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        FileJwks { path: path.into() }
    }

    /// The file read.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl JwksSource for FileJwks {
    fn fetch(&self) -> FetchFuture<'_> {
        Box::pin(async move {
            let detail = || format!("cannot read JWKS file {}", self.path.display());
            let file = tokio::fs::File::open(&self.path)
                .await
                .map_err(|e| AuthError::jwks_unavailable(detail(), e))?;
            let mut bytes = Vec::new();
            file.take(MAX_JWKS_BYTES + 1)
                .read_to_end(&mut bytes)
                .await
                .map_err(|e| AuthError::jwks_unavailable(detail(), e))?;
            if bytes.len() as u64 > MAX_JWKS_BYTES {
                return Err(AuthError::jwks_unavailable_msg(format!(
                    "JWKS file {} is larger than {MAX_JWKS_BYTES} bytes",
                    self.path.display()
                )));
            }
            Ok(bytes)
        })
    }
}

/// A fixed key set held in memory: for tests and for dev mode.
#[derive(Clone)]
pub struct StaticJwks {
    json: Vec<u8>,
}

impl fmt::Debug for StaticJwks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticJwks")
            .field("bytes", &self.json.len())
            .finish()
    }
}

impl StaticJwks {
    /// From a JWKS document.
    pub fn from_json(json: impl Into<Vec<u8>>) -> Self {
        StaticJwks { json: json.into() }
    }

    /// From a parsed key set.
    pub fn from_jwk_set(set: &JwkSet) -> Self {
        // A JwkSet holds only strings and enums, which always serialize; were it ever to fail,
        // the empty document would surface as `jwks_unavailable` on fetch.
        StaticJwks {
            json: serde_json::to_vec(set).unwrap_or_default(),
        }
    }
}

impl JwksSource for StaticJwks {
    fn fetch(&self) -> FetchFuture<'_> {
        let json = self.json.clone();
        Box::pin(async move { Ok(json) })
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_keys;
    use super::*;
    use serde_json::json;

    #[test]
    fn rsa_and_ec_keys_get_fixed_algorithms() {
        let rsa = test_keys::rsa_jwk("rsa-1");
        let ec = test_keys::ec_jwk("ec-1");
        let jwks =
            Jwks::from_json(&serde_json::to_vec(&json!({ "keys": [rsa, ec] })).unwrap()).unwrap();
        assert_eq!(jwks.len(), 2);
        assert_eq!(jwks.algorithm("rsa-1"), Some(Algorithm::RS256));
        assert_eq!(jwks.algorithm("ec-1"), Some(Algorithm::ES256));
        assert_eq!(
            jwks.key_ids(),
            vec!["ec-1".to_string(), "rsa-1".to_string()]
        );
    }

    #[test]
    fn unusable_keys_are_skipped_not_trusted() {
        let mut rsa_ps = test_keys::rsa_jwk("rsa-ps");
        rsa_ps["alg"] = json!("PS256");
        let mut rsa_enc = test_keys::rsa_jwk("rsa-enc");
        rsa_enc["use"] = json!("enc");
        let mut no_kid = test_keys::rsa_jwk("x");
        no_kid.as_object_mut().unwrap().remove("kid");
        let mut ec_claims_rs = test_keys::ec_jwk("ec-rs");
        ec_claims_rs["alg"] = json!("RS256");
        let mut off_curve = test_keys::ec_jwk("ec-bad");
        off_curve["y"] = off_curve["x"].clone();
        let small_rsa = json!({"kty": "RSA", "kid": "small", "n": URL_SAFE_NO_PAD.encode([0xff_u8; 128]), "e": "AQAB"});
        let doc = json!({ "keys": [
            {"kty": "oct", "kid": "hmac", "alg": "HS256", "k": "c2VjcmV0"},
            {"kty": "EC", "kid": "p384", "crv": "P-384", "x": "AA", "y": "AA"},
            {"kty": "weird", "kid": "weird"},
            rsa_ps, rsa_enc, no_kid, ec_claims_rs, off_curve, small_rsa,
            test_keys::rsa_jwk("good"),
        ]});
        let jwks = Jwks::from_json(&serde_json::to_vec(&doc).unwrap()).unwrap();
        assert_eq!(jwks.key_ids(), vec!["good".to_string()]);
    }

    #[test]
    fn duplicated_kid_is_dropped() {
        let doc = json!({ "keys": [test_keys::rsa_jwk("same"), test_keys::ec_jwk("same"), test_keys::ec_jwk("other")] });
        let jwks = Jwks::from_json(&serde_json::to_vec(&doc).unwrap()).unwrap();
        assert_eq!(jwks.key_ids(), vec!["other".to_string()]);
    }

    #[test]
    fn not_a_key_set_is_jwks_unavailable() {
        for doc in [&b"not json"[..], b"{}", b"{\"keys\": 3}"] {
            let err = Jwks::from_json(doc).unwrap_err();
            assert_eq!(err.reason(), "jwks_unavailable");
        }
    }

    #[tokio::test]
    async fn file_source_rereads_and_reports_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        let source = FileJwks::new(&path);
        let err = source.fetch().await.unwrap_err();
        assert_eq!(err.reason(), "jwks_unavailable");
        assert!(err.to_string().contains("jwks.json"));

        std::fs::write(&path, b"{\"keys\": []}").unwrap();
        assert_eq!(source.fetch().await.unwrap(), b"{\"keys\": []}");
        std::fs::write(&path, b"{\"keys\": [1]}").unwrap();
        assert_eq!(source.fetch().await.unwrap(), b"{\"keys\": [1]}");

        std::fs::write(&path, vec![b' '; MAX_JWKS_BYTES as usize + 1]).unwrap();
        assert_eq!(
            source.fetch().await.unwrap_err().reason(),
            "jwks_unavailable"
        );
    }
}
