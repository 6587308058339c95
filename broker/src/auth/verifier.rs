//! [`Verifier`]: checks a Kubernetes ServiceAccount token against a trusted key set and turns
//! it into an [`Identity`].
//!
//! Order of checks (the first failure is the reason given):
//! 1. shape: three segments, at most [`MAX_TOKEN_BYTES`], a JSON header without `crit`;
//! 2. header `alg` is RS256 or ES256 (`none`, HS*, PS*, ... are refused before any key lookup);
//! 3. `kid` names a trusted key, refetching the JWKS at most once per
//!    [`VerifierConfig::jwks_refetch_interval`] when it does not;
//! 4. the key's own algorithm equals the header's (the key decides, never the token);
//! 5. signature, then `exp` (required) and `nbf` with leeway, `iss`, `aud` — by `jsonwebtoken`;
//! 6. strict presence and type of `iss`/`aud`, which the library skips when they are absent;
//! 7. `iat` required, not in the future, not older than the maximum age, `exp - iat` within it;
//! 8. `sub` = `system:serviceaccount:<ns>:<name>`, agreeing with the `kubernetes.io` claim.
//!
//! A token that passed is remembered by its SHA-256 (never the token) for at most
//! [`VERDICT_CACHE_TTL`], so a workload that calls again with the same token skips the
//! signature check. A remembered verdict is used only while the token is unexpired (no
//! leeway), within the maximum age, and its signing key is still in the current key set.

use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;
use tokio::time::Instant;

use super::error::{sanitize, AuthError, SetupError};
use super::jwks::{Jwks, JwksSource, TrustedKey};
use crate::identity::Identity;

/// How long a successful verification is remembered (bounded further by the token's `exp`).
pub const VERDICT_CACHE_TTL: Duration = Duration::from_secs(60);
/// Most verdicts remembered at once.
const VERDICT_CACHE_MAX: usize = 10_000;

/// Successful verdicts by SHA-256 of the token.
#[derive(Default)]
struct VerdictCache {
    entries: std::collections::HashMap<[u8; 32], (VerifiedToken, Instant)>,
}

/// Longest token accepted (Kubernetes tokens are about 1 KiB).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Largest leeway a configuration may ask for: leeway is for clock skew, not for policy.
const MAX_LEEWAY: Duration = Duration::from_secs(300);

/// What the verifier accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifierConfig {
    /// The only accepted `iss` (the apiserver's `--service-account-issuer`).
    pub issuer: String,
    /// A token is accepted if its `aud` contains any of these. Default `["keyhaven"]`.
    pub audiences: Vec<String>,
    /// Clock skew allowed on `exp`, `nbf` and `iat`. Default 30 s, at most 5 min.
    pub leeway: Duration,
    /// Tokens issued longer ago than this, or living longer than this (`exp - iat`), are
    /// refused. Default 24 h.
    pub max_token_age: Duration,
    /// An unknown `kid` triggers a JWKS refetch at most this often. Default 10 s.
    pub jwks_refetch_interval: Duration,
    /// A JWKS fetch taking longer than this fails. Default 10 s.
    pub jwks_fetch_timeout: Duration,
}

impl VerifierConfig {
    /// The defaults, trusting `issuer`.
    pub fn new(issuer: impl Into<String>) -> Self {
        VerifierConfig {
            issuer: issuer.into(),
            audiences: vec!["keyhaven".to_string()],
            leeway: Duration::from_secs(30),
            max_token_age: Duration::from_secs(24 * 60 * 60),
            jwks_refetch_interval: Duration::from_secs(10),
            jwks_fetch_timeout: Duration::from_secs(10),
        }
    }

    fn validate(&self) -> Result<(), SetupError> {
        let bad = |m: &str| Err(SetupError::InvalidConfig(m.to_string()));
        if self.issuer.trim().is_empty() {
            return bad("issuer must not be empty");
        }
        if self.audiences.is_empty() || self.audiences.iter().any(|a| a.trim().is_empty()) {
            return bad("audiences must be non-empty strings, at least one");
        }
        if self.leeway > MAX_LEEWAY {
            return bad("leeway must be at most 5 minutes");
        }
        if self.max_token_age.as_secs() == 0 {
            return bad("max token age must be at least one second");
        }
        if self.jwks_fetch_timeout.is_zero() {
            return bad("JWKS fetch timeout must not be zero");
        }
        Ok(())
    }
}

/// A verified token: who is asking, and for how long the answer holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    /// The workload.
    pub identity: Identity,
    /// `kubernetes.io.serviceaccount.uid`: tells a re-created service account from the old one.
    pub service_account_uid: String,
    /// The `kid` of the key that signed the token.
    pub key_id: String,
    /// `iat`.
    pub issued_at: SystemTime,
    /// `exp`: a cache of this verdict must not outlive it.
    pub expires_at: SystemTime,
}

struct RefreshState {
    last_attempt: Option<Instant>,
}

/// Verifies ServiceAccount tokens. Cheap to share behind an `Arc`; all methods take `&self`.
///
/// Never holds a token: its `Debug` shows the configuration, the source and the key ids only.
pub struct Verifier {
    config: VerifierConfig,
    source: Arc<dyn JwksSource>,
    keys: RwLock<Arc<Jwks>>,
    /// Serializes fetches (one in flight) and carries the rate limit.
    refresh: tokio::sync::Mutex<RefreshState>,
    validation_rs256: Validation,
    validation_es256: Validation,
    verdicts: std::sync::Mutex<VerdictCache>,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("config", &self.config)
            .field("source", &self.source)
            .field("keys", &self.snapshot().key_ids())
            .finish()
    }
}

impl Verifier {
    /// A verifier with an empty key set: the first token (or an explicit
    /// [`Verifier::refresh`], which a server should call at startup to fail fast) fetches it.
    pub fn new(
        config: VerifierConfig,
        source: impl JwksSource + 'static,
    ) -> Result<Self, SetupError> {
        config.validate()?;
        let validation = |alg| {
            let mut v = Validation::new(alg);
            v.leeway = config.leeway.as_secs();
            v.validate_exp = true;
            v.validate_nbf = true;
            v.validate_aud = true;
            v.set_required_spec_claims(&["exp"]);
            v.set_issuer(&[config.issuer.as_str()]);
            v.set_audience(&config.audiences);
            v
        };
        Ok(Verifier {
            validation_rs256: validation(Algorithm::RS256),
            validation_es256: validation(Algorithm::ES256),
            config,
            source: Arc::new(source),
            keys: RwLock::new(Arc::new(Jwks::default())),
            refresh: tokio::sync::Mutex::new(RefreshState { last_attempt: None }),
            verdicts: std::sync::Mutex::default(),
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &VerifierConfig {
        &self.config
    }

    /// The key set in use now.
    pub fn jwks(&self) -> Arc<Jwks> {
        self.snapshot()
    }

    /// Verifies `token` and returns the workload identity.
    pub async fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        Ok(self.verify_token(token).await?.identity)
    }

    /// Verifies `token` and returns the identity with the token's lifetime and key id.
    pub async fn verify_token(&self, token: &str) -> Result<VerifiedToken, AuthError> {
        let digest: [u8; 32] = {
            use sha2::Digest as _;
            sha2::Sha256::digest(token.as_bytes()).into()
        };
        if let Some(v) = self.remembered(&digest) {
            return Ok(v);
        }
        let v = self.verify_uncached(token).await?;
        self.remember(digest, &v);
        Ok(v)
    }

    /// A remembered verdict still good now (see the module notes).
    fn remembered(&self, digest: &[u8; 32]) -> Option<VerifiedToken> {
        let hit = {
            let cache = self.verdicts.lock().unwrap_or_else(PoisonError::into_inner);
            cache.entries.get(digest).cloned()
        }?;
        let (v, at) = hit;
        let now = SystemTime::now();
        let age_ok = now
            .duration_since(v.issued_at)
            .map(|age| age <= self.config.max_token_age)
            .unwrap_or(true);
        let fresh = at.elapsed() < VERDICT_CACHE_TTL && now < v.expires_at && age_ok;
        if fresh && self.snapshot().get(&v.key_id).is_some() {
            Some(v)
        } else {
            self.verdicts
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entries
                .remove(digest);
            None
        }
    }

    fn remember(&self, digest: [u8; 32], v: &VerifiedToken) {
        let mut cache = self.verdicts.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.entries.len() >= VERDICT_CACHE_MAX {
            let now = SystemTime::now();
            cache
                .entries
                .retain(|_, (v, at)| at.elapsed() < VERDICT_CACHE_TTL && now < v.expires_at);
            if cache.entries.len() >= VERDICT_CACHE_MAX {
                cache.entries.clear();
            }
        }
        cache.entries.insert(digest, (v.clone(), Instant::now()));
    }

    /// [`Verifier::verify_token`] without the verdict cache: every check, every time (for
    /// benchmarks of the signature check itself).
    pub async fn verify_uncached(&self, token: &str) -> Result<VerifiedToken, AuthError> {
        let header = parse_header(token)?;
        let kid = header
            .kid
            .ok_or_else(|| AuthError::UnknownKid("(no kid in header)".to_string()))?;
        let key = self.key(&kid).await?;
        if key.algorithm != header.alg {
            return Err(AuthError::BadAlgorithm(format!(
                "{:?} token for a {:?} key",
                header.alg, key.algorithm
            )));
        }
        let validation = match key.algorithm {
            Algorithm::RS256 => &self.validation_rs256,
            Algorithm::ES256 => &self.validation_es256,
            other => return Err(AuthError::BadAlgorithm(format!("{other:?}"))),
        };
        let data = jsonwebtoken::decode::<Claims>(token, &key.key, validation)
            .map_err(|e| map_jwt_error(e.kind()))?;
        self.check_claims(data.claims, kid)
    }

    /// Fetches the key set now and installs it. On failure, or if the new set holds no usable
    /// key, the old set stays in use. For a periodic task; see
    /// [`Verifier::spawn_refresh_task`].
    pub async fn refresh(&self) -> Result<usize, AuthError> {
        let mut state = self.refresh.lock().await;
        self.fetch_locked(&mut state).await
    }

    /// Spawns a task that calls [`Verifier::refresh`] every `every` (at least one second). The
    /// task holds only a weak reference and ends when the verifier is dropped.
    pub fn spawn_refresh_task(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        let every = every.max(Duration::from_secs(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await; // the first tick is immediate
            loop {
                tick.tick().await;
                let Some(verifier) = weak.upgrade() else {
                    break;
                };
                // Failures are logged inside; the old keys stay in use.
                let _ = verifier.refresh().await;
            }
        })
    }

    fn snapshot(&self) -> Arc<Jwks> {
        // Only an Arc is swapped under the lock, so a poisoned lock still holds a whole value.
        Arc::clone(&self.keys.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// The key `kid`, refetching the key set (rate limited) when it is unknown.
    async fn key(&self, kid: &str) -> Result<Arc<TrustedKey>, AuthError> {
        if let Some(key) = self.snapshot().get(kid) {
            return Ok(key);
        }
        let mut state = self.refresh.lock().await;
        // Another request may have refreshed while we waited for the lock.
        let jwks = self.snapshot();
        if let Some(key) = jwks.get(kid) {
            return Ok(key);
        }
        let due = state
            .last_attempt
            .is_none_or(|t| t.elapsed() >= self.config.jwks_refetch_interval);
        if !due {
            if jwks.is_empty() {
                return Err(AuthError::jwks_unavailable_msg(
                    "no keys loaded yet and refetch is rate limited",
                ));
            }
            return Err(AuthError::UnknownKid(sanitize(kid, 64)));
        }
        tracing::debug!(kid = %sanitize(kid, 64), "unknown kid: refetching JWKS");
        self.fetch_locked(&mut state).await?;
        self.snapshot()
            .get(kid)
            .ok_or_else(|| AuthError::UnknownKid(sanitize(kid, 64)))
    }

    async fn fetch_locked(&self, state: &mut RefreshState) -> Result<usize, AuthError> {
        state.last_attempt = Some(Instant::now());
        let result =
            match tokio::time::timeout(self.config.jwks_fetch_timeout, self.source.fetch()).await {
                Ok(Ok(bytes)) => Jwks::from_json(&bytes),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(AuthError::jwks_unavailable_msg("JWKS fetch timed out")),
            };
        let jwks = match result {
            Ok(jwks) if jwks.is_empty() => Err(AuthError::jwks_unavailable_msg(
                "JWKS holds no usable key; keeping the previous keys",
            )),
            other => other,
        }
        .inspect_err(
            |e| tracing::warn!(source = ?self.source, error = %e, "JWKS refresh failed"),
        )?;
        let count = jwks.len();
        let mut slot = self.keys.write().unwrap_or_else(PoisonError::into_inner);
        let old = slot.key_ids();
        let new = jwks.key_ids();
        if old != new {
            tracing::info!(keys = ?new, previous = ?old, "JWKS key set changed");
        }
        *slot = Arc::new(jwks);
        Ok(count)
    }

    fn check_claims(&self, claims: Claims, kid: String) -> Result<VerifiedToken, AuthError> {
        let cfg = &self.config;
        // The library checks `iss` and `aud` only when present and of the expected type.
        if claims.iss.as_deref() != Some(cfg.issuer.as_str()) {
            return Err(AuthError::BadIssuer);
        }
        let accepted = match &claims.aud {
            Some(OneOrMany::One(a)) => cfg.audiences.contains(a),
            Some(OneOrMany::Many(list)) => list.iter().any(|a| cfg.audiences.contains(a)),
            None => false,
        };
        if !accepted {
            return Err(AuthError::BadAudience);
        }

        let exp = numeric_date(claims.exp.as_ref())?.ok_or(AuthError::MissingExp)?;
        let iat = numeric_date(claims.iat.as_ref())?.ok_or(AuthError::Malformed("no iat claim"))?;
        let now = unix_now();
        let leeway = secs_i64(cfg.leeway);
        let max_age = secs_i64(cfg.max_token_age);
        if iat > now.saturating_add(leeway) {
            return Err(AuthError::NotYetValid);
        }
        if exp < iat {
            return Err(AuthError::Malformed("exp before iat"));
        }
        if now.saturating_sub(iat) > max_age {
            return Err(AuthError::TooOld(
                "issued longer ago than the maximum token age",
            ));
        }
        if exp - iat > max_age {
            return Err(AuthError::TooOld(
                "lifetime longer than the maximum token age",
            ));
        }

        let sub = claims
            .sub
            .as_deref()
            .ok_or(AuthError::BadSubject("no sub claim"))?;
        let (namespace, name) = parse_subject(sub)?;
        let k8s = claims
            .kubernetes
            .ok_or(AuthError::BadSubject("no kubernetes.io claim"))?;
        if k8s.namespace.as_deref() != Some(namespace) {
            return Err(AuthError::BadSubject(
                "kubernetes.io namespace disagrees with sub",
            ));
        }
        let sa = k8s
            .serviceaccount
            .ok_or(AuthError::BadSubject("no kubernetes.io serviceaccount"))?;
        if sa.name.as_deref() != Some(name) {
            return Err(AuthError::BadSubject(
                "kubernetes.io serviceaccount name disagrees with sub",
            ));
        }
        let sa_uid = sa
            .uid
            .filter(|u| is_uid(u))
            .ok_or(AuthError::BadSubject("no valid serviceaccount uid"))?;
        let (pod_name, pod_uid) = match k8s.pod {
            None => (None, None),
            Some(pod) => match (pod.name, pod.uid) {
                (Some(n), Some(u)) if is_dns_subdomain(&n) && is_uid(&u) => (Some(n), Some(u)),
                _ => return Err(AuthError::BadSubject("incomplete or invalid pod binding")),
            },
        };

        Ok(VerifiedToken {
            identity: Identity {
                namespace: namespace.to_string(),
                service_account: name.to_string(),
                pod_name,
                pod_uid,
            },
            service_account_uid: sa_uid,
            key_id: kid,
            issued_at: to_system_time(iat),
            expires_at: to_system_time(exp),
        })
    }
}

/// The header fields we decide on. Parsed by us (not only by the library) so that `alg: none`
/// and unknown algorithms are reported as `bad_algorithm`, not as an unparseable header.
#[derive(Deserialize)]
struct RawHeader {
    alg: Option<String>,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    crit: Option<serde_json::Value>,
}

struct Header {
    alg: Algorithm,
    kid: Option<String>,
}

fn parse_header(token: &str) -> Result<Header, AuthError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(AuthError::Malformed("token too long"));
    }
    let mut parts = token.split('.');
    let (Some(header), Some(_payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed("not three dot-separated segments"));
    };
    let bytes = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| AuthError::Malformed("header is not base64url"))?;
    let raw: RawHeader =
        serde_json::from_slice(&bytes).map_err(|_| AuthError::Malformed("header is not JSON"))?;
    if raw.crit.is_some() {
        return Err(AuthError::Malformed(
            "critical header extensions are not supported",
        ));
    }
    let alg = match raw.alg.as_deref() {
        Some("RS256") => Algorithm::RS256,
        Some("ES256") => Algorithm::ES256,
        Some(other) => return Err(AuthError::BadAlgorithm(sanitize(other, 16))),
        None => return Err(AuthError::Malformed("header has no alg")),
    };
    Ok(Header { alg, kid: raw.kid })
}

fn map_jwt_error(kind: &ErrorKind) -> AuthError {
    // Deliberately not kept as `source`: a JSON error can quote claim values.
    match kind {
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidIssuer => AuthError::BadIssuer,
        ErrorKind::InvalidAudience => AuthError::BadAudience,
        ErrorKind::InvalidSubject => AuthError::BadSubject("subject rejected"),
        ErrorKind::MissingRequiredClaim(c) if c == "exp" => AuthError::MissingExp,
        ErrorKind::MissingRequiredClaim(_) => AuthError::Malformed("a required claim is missing"),
        ErrorKind::InvalidAlgorithm
        | ErrorKind::MissingAlgorithm
        | ErrorKind::InvalidAlgorithmName => {
            AuthError::BadAlgorithm("algorithm does not match the key".to_string())
        }
        ErrorKind::InvalidClaimFormat(_) => AuthError::Malformed("a time claim is not a number"),
        ErrorKind::InvalidEcdsaKey | ErrorKind::InvalidRsaKey(_) | ErrorKind::InvalidKeyFormat => {
            AuthError::jwks_unavailable_msg("the key named by the token is unusable")
        }
        ErrorKind::Base64(_) => AuthError::Malformed("a segment is not base64url"),
        ErrorKind::Json(_) | ErrorKind::Utf8(_) => {
            AuthError::Malformed("claims are not valid JSON")
        }
        _ => AuthError::Malformed("token cannot be decoded"),
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    iss: Option<String>,
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    aud: Option<OneOrMany>,
    #[serde(default)]
    exp: Option<serde_json::Value>,
    #[serde(default)]
    iat: Option<serde_json::Value>,
    #[serde(rename = "kubernetes.io", default)]
    kubernetes: Option<KubernetesClaims>,
}

#[derive(Deserialize)]
struct KubernetesClaims {
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    serviceaccount: Option<ObjectRef>,
    #[serde(default)]
    pod: Option<ObjectRef>,
}

#[derive(Deserialize)]
struct ObjectRef {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    uid: Option<String>,
}

/// A JWT NumericDate (seconds, integer or fraction) as whole seconds; `None` when absent.
fn numeric_date(value: Option<&serde_json::Value>) -> Result<Option<i64>, AuthError> {
    let Some(value) = value else {
        return Ok(None);
    };
    if value.is_null() {
        return Ok(None);
    }
    if let Some(n) = value.as_i64() {
        return if n >= 0 {
            Ok(Some(n))
        } else {
            Err(AuthError::Malformed("negative time claim"))
        };
    }
    match value.as_f64() {
        // Up to year ~292 billion: anything that fits is accepted and compared as is.
        Some(f) if f.is_finite() && f >= 0.0 && f < i64::MAX as f64 => Ok(Some(f as i64)),
        _ => Err(AuthError::Malformed("time claim is not a number")),
    }
}

fn unix_now() -> i64 {
    // A clock before 1970 is treated as 1970: every token then looks not-yet-valid, which
    // fails closed.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(secs_i64)
        .unwrap_or(0)
}

fn secs_i64(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

fn to_system_time(secs: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0))
}

/// Splits `system:serviceaccount:<namespace>:<name>`.
pub(crate) fn parse_subject(sub: &str) -> Result<(&str, &str), AuthError> {
    let rest = sub
        .strip_prefix("system:serviceaccount:")
        .ok_or(AuthError::BadSubject(
            "sub is not system:serviceaccount:<ns>:<name>",
        ))?;
    let (namespace, name) = rest.split_once(':').ok_or(AuthError::BadSubject(
        "sub is not system:serviceaccount:<ns>:<name>",
    ))?;
    if !is_dns_label(namespace) {
        return Err(AuthError::BadSubject("namespace is not a DNS label"));
    }
    if !is_dns_subdomain(name) {
        return Err(AuthError::BadSubject(
            "service account name is not a DNS subdomain",
        ));
    }
    Ok((namespace, name))
}

pub(crate) use crate::identity::{is_dns_label, is_dns_subdomain};

/// A Kubernetes object UID (a UUID in practice): short, and nothing that could forge a log.
fn is_uid(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

#[cfg(test)]
mod tests {
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
}
