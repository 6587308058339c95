//! [`TokenReviewer`]: optional TokenReview mode. After a ServiceAccount token has been verified
//! locally, the broker also asks the apiserver (`POST
//! /apis/authentication.k8s.io/v1/tokenreviews`) whether the token is still good, and so also
//! refuses tokens whose pod or service account has been deleted since they were issued.
//!
//! - The request carries the broker's own token (`Authorization: Bearer`, a sensitive header),
//!   read from a file on every call because the kubelet rotates it; the broker's service
//!   account needs the `system:auth-delegator` cluster role (or `create` on `tokenreviews`).
//! - The connection obeys the same rules as [`HttpsJwks`](super::HttpsJwks): rustls trusting
//!   only the given CA bundle (no system roots), `https://` or `http://` to a loopback host
//!   only, no redirects, no proxy, a timeout on the whole request and a cap on the answer.
//! - A review is accepted only if the apiserver says `authenticated`, names the same service
//!   account (`system:serviceaccount:<ns>:<sa>`) as the locally verified token, lists one of
//!   our audiences (when it lists any), and, when the token names a pod, binds it to the same
//!   pod (name and uid, when the apiserver reports them).
//! - Verdicts are cached by [`token_fingerprint`] (never the token) for a few seconds (default
//!   5 s, at most 60 s), never past the token's `exp`, in a bounded cache that drops expired
//!   entries first and then the oldest. Both kinds of *definite* answer are cached: an accepted
//!   token, and a token the apiserver says is not authenticated (or that names someone else).
//!   Caching refusals is safe — a token refused because its pod or service account is gone
//!   never becomes valid again, and a re-created pod gets a new token with a new key — and it
//!   keeps a client replaying a revoked token from turning every request into an apiserver
//!   call. Failures (network, TLS, non-2xx, unparsable answers) are never cached: the next
//!   request asks again.
//! - [`TokenReviewError`] separates a refusal (`token_review_denied`: answer UNAUTHENTICATED)
//!   from "could not ask" (`token_review_unavailable`: answer UNAVAILABLE, the client retries).
//!   No error, log line or `Debug` output contains a token: text the apiserver sends back is cut
//!   short, stripped of control characters, and any copy of the reviewed token is blanked.
//!
//! Concurrent first requests with the same token each ask the apiserver (there is no
//! single-flight); the cache serves the ones that follow.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use reqwest::{Client, Url};
use secrecy::{ExposeSecret as _, SecretString};
use zeroize::Zeroizing;

use super::error::SetupError;
use super::https::apiserver_client;
use super::token_fingerprint;
use crate::identity::Identity;

/// The TokenReview endpoint, relative to the apiserver URL.
pub const TOKEN_REVIEW_PATH: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

/// Default time a verdict stays cached.
pub const DEFAULT_REVIEW_CACHE_TTL: Duration = Duration::from_secs(5);

/// Longest cache time a configuration may ask for: TokenReview results are cached for seconds.
pub const MAX_REVIEW_CACHE_TTL: Duration = Duration::from_secs(60);

/// Default number of cached verdicts.
pub const DEFAULT_REVIEW_CACHE_CAPACITY: usize = 10_000;

/// Largest TokenReview answer accepted.
pub const MAX_REVIEW_BYTES: u64 = 64 * 1024;

/// Longest piece of apiserver-supplied text kept in an error message.
const MAX_DETAIL_CHARS: usize = 200;

const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";

/// Where and how to ask the apiserver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenReviewConfig {
    /// The apiserver, e.g. `https://kubernetes.default.svc`; [`TOKEN_REVIEW_PATH`] is appended.
    pub apiserver_url: String,
    /// PEM bundle of the CAs trusted for the apiserver's certificate: required for `https://`,
    /// ignored for `http://` (loopback only). Read once, at construction. In a pod:
    /// `/var/run/secrets/kubernetes.io/serviceaccount/ca.crt`.
    pub ca_file: Option<PathBuf>,
    /// File holding the broker's own token, re-read on every review. In a pod:
    /// `/var/run/secrets/kubernetes.io/serviceaccount/token`.
    pub token_file: PathBuf,
    /// Sent as `spec.audiences`; the answer must list one of them when it lists any.
    /// Default `["keyhaven"]`; use the verifier's audiences.
    pub audiences: Vec<String>,
    /// How long a verdict stays cached (never past the token's `exp`). Default 5 s, at most
    /// [`MAX_REVIEW_CACHE_TTL`]; zero disables the cache.
    pub cache_ttl: Duration,
    /// Most verdicts cached at once. Default 10,000; zero disables the cache.
    pub cache_capacity: usize,
    /// Limit on one whole request (connect, TLS, answer, body). Default 5 s: a review is on
    /// the path of a client's request.
    pub timeout: Duration,
}

impl TokenReviewConfig {
    /// Review at `apiserver_url`, trusting `ca_file`, authenticated with the token in
    /// `token_file`; audience `keyhaven`, the default cache and a 5 s timeout.
    pub fn new(
        apiserver_url: impl Into<String>,
        ca_file: Option<PathBuf>,
        token_file: impl Into<PathBuf>,
    ) -> Self {
        TokenReviewConfig {
            apiserver_url: apiserver_url.into(),
            ca_file,
            token_file: token_file.into(),
            audiences: vec!["keyhaven".to_string()],
            cache_ttl: DEFAULT_REVIEW_CACHE_TTL,
            cache_capacity: DEFAULT_REVIEW_CACHE_CAPACITY,
            timeout: Duration::from_secs(5),
        }
    }
}

/// Why a review did not accept a token. Neither the `Display` text nor the `Debug` output ever
/// contains a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenReviewError {
    /// The apiserver gave a definite answer against the token: not authenticated (pod or
    /// service account deleted, token invalidated), another user, another audience or another
    /// pod. Answer UNAUTHENTICATED.
    #[error("TokenReview refused the token: {0}")]
    Denied(String),
    /// The apiserver could not be asked or gave no usable answer (network, TLS, timeout,
    /// non-2xx, malformed body, the broker's own token unreadable). Answer UNAVAILABLE.
    #[error("TokenReview unavailable: {0}")]
    Unavailable(String),
}

impl TokenReviewError {
    /// A short, stable machine label for metrics and audit records: `token_review_denied` or
    /// `token_review_unavailable`.
    pub fn reason(&self) -> &'static str {
        match self {
            TokenReviewError::Denied(_) => "token_review_denied",
            TokenReviewError::Unavailable(_) => "token_review_unavailable",
        }
    }

    /// True when the token could not be reviewed (answer UNAVAILABLE); false for a refusal.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, TokenReviewError::Unavailable(_))
    }
}

/// What the apiserver said about one token, as kept in the cache: only what the verdict needs.
/// Names are kept as sent (compared exactly); `error` is already cut and stripped for logs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ReviewStatus {
    authenticated: bool,
    username: Option<String>,
    /// `None` when the answer has no `audiences` (or an empty list).
    audiences: Option<Vec<String>>,
    pod_names: Option<Vec<String>>,
    pod_uids: Option<Vec<String>>,
    error: Option<String>,
}

/// Asks the apiserver's TokenReview API about tokens the broker has already verified locally,
/// with a short cache of verdicts keyed by token fingerprint.
///
/// Its `Debug` shows the endpoint, the file paths and the cache settings, never a token.
pub struct TokenReviewer {
    url: Url,
    client: Client,
    ca_file: Option<PathBuf>,
    token_file: PathBuf,
    audiences: Vec<String>,
    cache_ttl: Duration,
    timeout: Duration,
    cache: Mutex<VerdictCache>,
}

impl fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenReviewer")
            .field("url", &self.url.as_str())
            .field("ca_file", &self.ca_file)
            .field("token_file", &self.token_file)
            .field("audiences", &self.audiences)
            .field("cache_ttl", &self.cache_ttl)
            .field("cache_capacity", &self.lock_cache().capacity)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl TokenReviewer {
    /// A reviewer for `config`.
    ///
    /// Fails if the URL is not `https://` (or `http://` on a loopback host), carries
    /// credentials, a query or a fragment; if the CA bundle cannot be read or holds no
    /// certificate; if no audience is given; if the timeout is zero or the cache time longer
    /// than [`MAX_REVIEW_CACHE_TTL`]. The token file is not read here.
    pub fn new(config: &TokenReviewConfig) -> Result<Self, SetupError> {
        let base = parse_url(&config.apiserver_url)?;
        if base.query().is_some() || base.fragment().is_some() {
            return Err(SetupError::InvalidConfig(format!(
                "apiserver URL {base} must not have a query or fragment"
            )));
        }
        let url = format!("{}{TOKEN_REVIEW_PATH}", base.as_str().trim_end_matches('/'));
        let url = Url::parse(&url).map_err(|e| {
            SetupError::InvalidConfig(format!(
                "apiserver URL {base} gives no TokenReview URL: {e}"
            ))
        })?;
        if config.timeout.is_zero() {
            return Err(SetupError::InvalidConfig(
                "TokenReview timeout must not be zero".into(),
            ));
        }
        if config.cache_ttl > MAX_REVIEW_CACHE_TTL {
            return Err(SetupError::InvalidConfig(format!(
                "TokenReview cache time {} is longer than {}: verdicts are cached for seconds only",
                humantime::format_duration(config.cache_ttl),
                humantime::format_duration(MAX_REVIEW_CACHE_TTL)
            )));
        }
        if config.audiences.is_empty() || config.audiences.iter().any(|a| a.trim().is_empty()) {
            return Err(SetupError::InvalidConfig(
                "TokenReview needs at least one non-empty audience".into(),
            ));
        }
        let (client, ca_file) =
            apiserver_client(&url, config.ca_file.as_ref(), config.timeout, "TokenReview")?;
        Ok(TokenReviewer {
            url,
            client,
            ca_file,
            token_file: config.token_file.clone(),
            audiences: config.audiences.clone(),
            cache_ttl: config.cache_ttl,
            timeout: config.timeout,
            cache: Mutex::new(VerdictCache::new(config.cache_capacity)),
        })
    }

    /// The TokenReview endpoint this reviewer posts to.
    pub fn url(&self) -> &str {
        self.url.as_str()
    }

    /// Number of verdicts cached now (expired ones included until they are swept).
    pub fn cached(&self) -> usize {
        self.lock_cache().map.len()
    }

    /// Asks the apiserver (or the cache) about `token`, which the broker has already verified
    /// locally as belonging to `expected`. `Ok(())` accepts it.
    ///
    /// The token's `exp` is read from its payload (already verified) only to stop a cached
    /// verdict from outliving the token; a token whose `exp` cannot be read is not cached.
    pub async fn review(&self, token: &str, expected: &Identity) -> Result<(), TokenReviewError> {
        let key = token_fingerprint(token);
        let cached = self.lock_cache().get(&key, Instant::now());
        if let Some(status) = cached {
            tracing::debug!(identity = %expected, "TokenReview verdict from cache");
            return self.judge(&status, expected, token);
        }
        let status = Arc::new(self.ask(token).await?);
        let verdict = self.judge(&status, expected, token);
        let keep = self.cache_ttl.min(remaining_life(token));
        if !keep.is_zero() {
            let now = Instant::now();
            self.lock_cache().insert(key, status, now, now + keep);
        }
        match &verdict {
            Ok(()) => tracing::debug!(identity = %expected, "TokenReview accepted the token"),
            Err(e) => {
                tracing::debug!(identity = %expected, error = %e, "TokenReview refused the token")
            }
        }
        verdict
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, VerdictCache> {
        // Every operation leaves the cache whole, so a poisoned lock still holds a usable one.
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Accepts or refuses `status` for `token`, which names `expected`.
    fn judge(
        &self,
        status: &ReviewStatus,
        expected: &Identity,
        token: &str,
    ) -> Result<(), TokenReviewError> {
        let denied = |why: String| Err(TokenReviewError::Denied(why));
        let clean = |s: &str| clean_text(s, token);
        if !status.authenticated {
            return match &status.error {
                Some(e) => denied(format!("not authenticated ({e})")),
                None => denied("not authenticated".into()),
            };
        }
        let want = format!(
            "system:serviceaccount:{}:{}",
            expected.namespace, expected.service_account
        );
        match &status.username {
            Some(user) if *user == want => {}
            Some(user) => {
                return denied(format!(
                    "the apiserver names {:?}, the token {want}",
                    clean(user)
                ))
            }
            None => return denied("the apiserver names no user".into()),
        }
        if let Some(listed) = &status.audiences {
            if !listed.iter().any(|a| self.audiences.contains(a)) {
                let listed: Vec<String> = listed.iter().map(|a| clean(a)).collect();
                return denied(format!(
                    "the apiserver's audiences {listed:?} include none of {:?}",
                    self.audiences
                ));
            }
        }
        let same = |reported: &Option<Vec<String>>, ours: &Option<String>| match (reported, ours) {
            (Some(values), Some(ours)) => values.iter().all(|v| v == ours),
            _ => true,
        };
        if !same(&status.pod_names, &expected.pod_name) {
            let reported: Vec<String> = status
                .pod_names
                .iter()
                .flatten()
                .map(|p| clean(p))
                .collect();
            return denied(format!(
                "the apiserver binds the token to pod {reported:?}, the token names pod {:?}",
                expected.pod_name.as_deref().unwrap_or_default()
            ));
        }
        if !same(&status.pod_uids, &expected.pod_uid) {
            return denied("the apiserver binds the token to another pod uid".into());
        }
        Ok(())
    }

    /// One TokenReview round trip.
    async fn ask(&self, token: &str) -> Result<ReviewStatus, TokenReviewError> {
        let authorization = self.authorization().await?;
        let body = serde_json::to_vec(&serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": self.audiences},
        }))
        .map_err(|e| unavailable(format!("cannot encode the TokenReview request: {e}")))?;
        let url = &self.url;
        let mut response = self
            .client
            .post(url.clone())
            .header(ACCEPT, "application/json")
            .header(CONTENT_TYPE, "application/json")
            .header(AUTHORIZATION, authorization)
            .body(body)
            .send()
            .await
            .map_err(|e| with_causes(format!("cannot post to {url}"), &e.without_url()))?;
        let status = response.status();
        if !status.is_success() {
            // The body is not read: it is not ours to echo into logs.
            let hint = match status.as_u16() {
                401 => " (the broker's own token was refused)",
                403 => " (the broker's service account may not create tokenreviews: bind it to system:auth-delegator)",
                _ => "",
            };
            return Err(unavailable(format!(
                "{url} answered HTTP {}{hint}",
                status.as_u16()
            )));
        }
        let too_large = || {
            unavailable(format!(
                "answer of {url} is larger than {MAX_REVIEW_BYTES} bytes"
            ))
        };
        if response
            .content_length()
            .is_some_and(|len| len > MAX_REVIEW_BYTES)
        {
            return Err(too_large());
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| {
            with_causes(format!("cannot read the answer of {url}"), &e.without_url())
        })? {
            if (bytes.len() + chunk.len()) as u64 > MAX_REVIEW_BYTES {
                return Err(too_large());
            }
            bytes.extend_from_slice(&chunk);
        }
        parse_review(&bytes, token).map_err(|why| unavailable(format!("answer of {url} {why}")))
    }

    /// The `Authorization` header value, built from the broker's token file read now.
    async fn authorization(&self) -> Result<HeaderValue, TokenReviewError> {
        let path = &self.token_file;
        let token = read_bearer_token(path).await?;
        let mut value = Zeroizing::new(String::with_capacity(7 + token.expose_secret().len()));
        value.push_str("Bearer ");
        value.push_str(token.expose_secret());
        let mut header = HeaderValue::from_str(&value).map_err(|_| {
            unavailable(format!(
                "token file {} holds characters not allowed in a header",
                path.display()
            ))
        })?;
        header.set_sensitive(true);
        Ok(header)
    }
}

/// Parses a TokenReview answer. `token` is the reviewed token, blanked out of any text kept.
/// The error says what is wrong with the answer, without quoting it.
fn parse_review(bytes: &[u8], token: &str) -> Result<ReviewStatus, String> {
    #[derive(serde::Deserialize)]
    struct Review {
        status: Option<Status>,
    }
    #[derive(serde::Deserialize)]
    struct Status {
        #[serde(default)]
        authenticated: bool,
        user: Option<User>,
        audiences: Option<Vec<String>>,
        error: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct User {
        username: Option<String>,
        #[serde(default)]
        extra: HashMap<String, Vec<String>>,
    }
    // serde_json's message names a position and an expected type, never the input's text.
    let review: Review =
        serde_json::from_slice(bytes).map_err(|e| format!("is not a TokenReview: {e}"))?;
    let status = review.status.ok_or("has no status")?;
    let (username, mut extra) = match status.user {
        Some(u) => (u.username, u.extra),
        None => (None, HashMap::new()),
    };
    Ok(ReviewStatus {
        authenticated: status.authenticated,
        username,
        audiences: status.audiences.filter(|a| !a.is_empty()),
        pod_names: extra.remove(POD_NAME_EXTRA),
        pod_uids: extra.remove(POD_UID_EXTRA),
        error: status
            .error
            .as_deref()
            .filter(|e| !e.is_empty())
            .map(|e| clean_text(e, token)),
    })
}

/// Text from the apiserver made safe for a log line: any copy of the reviewed token blanked,
/// control characters replaced, cut to [`MAX_DETAIL_CHARS`].
fn clean_text(text: &str, token: &str) -> String {
    let blanked;
    let text = if !token.is_empty() && text.contains(token) {
        blanked = text.replace(token, "[token]");
        blanked.as_str()
    } else {
        text
    };
    let mut out: String = text
        .chars()
        .take(MAX_DETAIL_CHARS)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if text.chars().count() > MAX_DETAIL_CHARS {
        out.push('…');
    }
    out
}

/// How long `token` (already verified) has left before its `exp`; zero if it cannot be read.
fn remaining_life(token: &str) -> Duration {
    #[derive(serde::Deserialize)]
    struct Exp {
        exp: Option<serde_json::Value>,
    }
    let Ok(data) = jsonwebtoken::dangerous::insecure_decode::<Exp>(token) else {
        return Duration::ZERO;
    };
    let exp = match data.claims.exp {
        Some(serde_json::Value::Number(n)) => n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.is_finite() && *f >= 0.0)
                .map(|f| f as u64)
        }),
        _ => None,
    };
    let Some(exp) = exp else {
        return Duration::ZERO;
    };
    UNIX_EPOCH
        .checked_add(Duration::from_secs(exp))
        .and_then(|at| at.duration_since(SystemTime::now()).ok())
        .unwrap_or(Duration::ZERO)
}

/// A bounded map of fingerprint → review status, each entry with its own deadline. When full,
/// expired entries go first, then the oldest.
#[derive(Debug)]
struct VerdictCache {
    capacity: usize,
    map: HashMap<String, CacheEntry>,
    /// Insertion order: `(key, seq)`; an item whose `seq` no longer matches the map's entry
    /// is stale and skipped.
    order: VecDeque<(String, u64)>,
    next_seq: u64,
}

#[derive(Debug)]
struct CacheEntry {
    status: Arc<ReviewStatus>,
    expires: Instant,
    seq: u64,
}

impl VerdictCache {
    fn new(capacity: usize) -> Self {
        VerdictCache {
            capacity,
            map: HashMap::new(),
            order: VecDeque::new(),
            next_seq: 0,
        }
    }

    fn get(&mut self, key: &str, now: Instant) -> Option<Arc<ReviewStatus>> {
        match self.map.get(key) {
            Some(e) if e.expires > now => Some(Arc::clone(&e.status)),
            Some(_) => {
                self.map.remove(key);
                None
            }
            None => None,
        }
    }

    fn insert(&mut self, key: String, status: Arc<ReviewStatus>, now: Instant, expires: Instant) {
        if self.capacity == 0 || expires <= now {
            return;
        }
        self.sweep_front(now);
        if !self.map.contains_key(&key) && self.map.len() >= self.capacity {
            self.map.retain(|_, e| e.expires > now);
            while self.map.len() >= self.capacity {
                let Some((old, seq)) = self.order.pop_front() else {
                    break;
                };
                if self.map.get(&old).is_some_and(|e| e.seq == seq) {
                    self.map.remove(&old);
                }
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.map.insert(
            key.clone(),
            CacheEntry {
                status,
                expires,
                seq,
            },
        );
        self.order.push_back((key, seq));
        if self.order.len() > 2 * self.capacity + 16 {
            // Many stale items behind a live one: rebuild the order from the map.
            let mut live: Vec<(String, u64)> =
                self.map.iter().map(|(k, e)| (k.clone(), e.seq)).collect();
            live.sort_by_key(|(_, seq)| *seq);
            self.order = live.into();
        }
    }

    /// Drops stale items and expired entries from the front of the order.
    fn sweep_front(&mut self, now: Instant) {
        while let Some((key, seq)) = self.order.front() {
            match self.map.get(key) {
                Some(e) if e.seq == *seq && e.expires > now => break,
                Some(e) if e.seq == *seq => {
                    self.map.remove(key);
                }
                _ => {}
            }
            self.order.pop_front();
        }
    }
}

fn unavailable(detail: String) -> TokenReviewError {
    TokenReviewError::Unavailable(detail)
}

/// A [`TokenReviewError::Unavailable`] whose text carries the whole cause chain (connection
/// refused, unknown issuer, timed out...). No cause here holds a header or a body, so no token
/// can appear.
fn with_causes(detail: String, err: &(dyn std::error::Error + 'static)) -> TokenReviewError {
    unavailable(super::https::cause_chain(detail, err))
}

/// Parses the apiserver URL with the rules of every URL we fetch: `https://`, or `http://` on
/// a loopback host; a host; no credentials.
fn parse_url(raw: &str) -> Result<Url, SetupError> {
    super::https::parse_url(raw, "apiserver URL")
}

/// Reads the broker's token file now (the kubelet may have rotated it since the last call).
async fn read_bearer_token(path: &Path) -> Result<SecretString, TokenReviewError> {
    super::https::read_token_file(path, "token file")
        .await
        .map_err(unavailable)
}

#[cfg(test)]
mod tests;
