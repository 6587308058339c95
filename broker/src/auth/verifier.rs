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
//! leeway), within the maximum age, and its signing key is still in the current key set; a
//! changed key set forgets every verdict.

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
    /// SHA-256 of the document the key set in use was read from.
    document: Option<[u8; 32]>,
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
            refresh: tokio::sync::Mutex::new(RefreshState {
                last_attempt: None,
                document: None,
            }),
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

    /// Whether `token` has a remembered successful verdict still good now: accepting it
    /// again costs a hash and a lookup, no signature check.
    pub fn is_remembered(&self, token: &str) -> bool {
        let digest: [u8; 32] = {
            use sha2::Digest as _;
            sha2::Sha256::digest(token.as_bytes()).into()
        };
        self.remembered(&digest).is_some()
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
    /// key, the old set stays in use. A document that changed also ends every remembered
    /// verdict (a removed key's tokens are checked again, and refused); an unchanged one is
    /// not parsed again. For a periodic task; see
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
        let mut document = None;
        let result =
            match tokio::time::timeout(self.config.jwks_fetch_timeout, self.source.fetch()).await {
                Ok(Ok(bytes)) => {
                    use sha2::Digest as _;
                    let digest: [u8; 32] = sha2::Sha256::digest(&bytes).into();
                    if state.document == Some(digest) {
                        return Ok(self.snapshot().len());
                    }
                    document = Some(digest);
                    Jwks::from_json(&bytes)
                }
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
        drop(slot);
        if state.document.is_some() {
            // A key removed or replaced under the same kid: no verdict made with the old set
            // outlives it.
            self.verdicts
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entries
                .clear();
        }
        state.document = document;
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
mod tests;
