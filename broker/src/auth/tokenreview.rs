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
mod tests {
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
    fn authenticated(
        user: &str,
        pod: Option<&str>,
        audiences: Option<serde_json::Value>,
    ) -> String {
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
}
