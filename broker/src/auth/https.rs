//! [`HttpsJwks`]: the apiserver's JWKS fetched over HTTPS (`/openid/v1/jwks`), trusting only a
//! given CA bundle, optionally authenticated with a bearer token read from a file.
//!
//! - TLS is rustls (ring provider); the only trust anchors are the certificates in the CA
//!   bundle, read once at construction. There is no system or built-in root store.
//! - The bearer token file is re-read on every fetch, because the kubelet rotates projected
//!   tokens. The token is held as a [`SecretString`] and sent as a sensitive header; it is never
//!   logged and never appears in an error or a `Debug` output.
//! - `http://` is accepted only for a loopback host (`127.0.0.0/8`, `::1`, `localhost`): tests
//!   and development. Anything else must be `https://`.
//! - No redirects are followed (a bearer token must not travel to another place), no proxy is
//!   used (the environment's `HTTPS_PROXY` is ignored), the body is capped at
//!   [`MAX_JWKS_BYTES`], the whole request at the configured timeout, and any non-2xx answer is
//!   an [`AuthError::JwksUnavailable`] naming the status code only, never echoing the body.
//! - [`HttpsJwks::via_discovery`] starts from the issuer instead: each fetch reads
//!   `<issuer>/.well-known/openid-configuration` and then its `jwks_uri`, which must be on the
//!   issuer's host (so the token is only ever sent there) and obey the same scheme rule. In a
//!   cluster the apiserver usually advertises a `jwks_uri` on its own external address, not on
//!   `kubernetes.default.svc`; there, give the JWKS URL directly with [`HttpsJwks::new`].

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION};
use reqwest::{Client, Url};
use secrecy::{ExposeSecret as _, SecretString};
use tokio::io::AsyncReadExt as _;
use zeroize::Zeroizing;

use super::error::{AuthError, SetupError};
use super::jwks::{FetchFuture, JwksSource, MAX_JWKS_BYTES};

/// Largest bearer token file accepted (projected tokens are about 1 KiB).
const MAX_BEARER_TOKEN_BYTES: u64 = 64 * 1024;

/// Largest OpenID discovery document accepted.
const MAX_DISCOVERY_BYTES: u64 = 64 * 1024;

/// Where and how to fetch a JWKS over HTTPS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpsJwksConfig {
    /// The JWKS URL, e.g. `https://kubernetes.default.svc/openid/v1/jwks`; for
    /// [`HttpsJwks::via_discovery`], the issuer URL instead.
    pub url: String,
    /// PEM bundle of the CAs trusted for the server's certificate: required for `https://`,
    /// ignored for `http://` (loopback only). Read once, at construction. In a pod:
    /// `/var/run/secrets/kubernetes.io/serviceaccount/ca.crt`.
    pub ca_file: Option<PathBuf>,
    /// File holding a bearer token sent as `Authorization: Bearer ...`, re-read on every
    /// fetch. In a pod: `/var/run/secrets/kubernetes.io/serviceaccount/token` (the default
    /// RBAC lets every service account read the issuer discovery endpoints).
    pub token_file: Option<PathBuf>,
    /// Limit on one whole request (connect, TLS, answer, body). Default 10 s.
    pub timeout: Duration,
}

impl HttpsJwksConfig {
    /// Fetch `url` with no CA bundle, no token and a 10 s timeout.
    pub fn new(url: impl Into<String>) -> Self {
        HttpsJwksConfig {
            url: url.into(),
            ca_file: None,
            token_file: None,
            timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone)]
enum Target {
    /// Fetch the JWKS at this URL.
    Jwks(Url),
    /// Read the discovery document of this issuer, then fetch its `jwks_uri`.
    Discovery { issuer: Url, document: Url },
}

/// A [`JwksSource`] that GETs the JWKS from the apiserver (or any OIDC issuer) over HTTPS.
///
/// Its `Debug` shows the URL and the file paths, never the token.
pub struct HttpsJwks {
    target: Target,
    client: Client,
    ca_file: Option<PathBuf>,
    token_file: Option<PathBuf>,
    timeout: Duration,
}

impl fmt::Debug for HttpsJwks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("HttpsJwks");
        match &self.target {
            Target::Jwks(url) => d.field("url", &url.as_str()),
            Target::Discovery { issuer, .. } => d.field("issuer", &issuer.as_str()),
        };
        d.field("ca_file", &self.ca_file)
            .field("token_file", &self.token_file)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl HttpsJwks {
    /// A source fetching the JWKS at `config.url`.
    ///
    /// Fails if the URL is not `https://` (or `http://` on a loopback host), carries
    /// credentials, or if the CA bundle cannot be read or holds no certificate.
    pub fn new(config: &HttpsJwksConfig) -> Result<Self, SetupError> {
        let url = parse_url(&config.url, "JWKS URL")?;
        Self::build(Target::Jwks(url), config)
    }

    /// A source that finds the JWKS through OpenID discovery: every fetch reads
    /// `<config.url>/.well-known/openid-configuration` and then its `jwks_uri`, which must be
    /// on the same host as the issuer and obey the same scheme rule as [`HttpsJwks::new`].
    pub fn via_discovery(config: &HttpsJwksConfig) -> Result<Self, SetupError> {
        let issuer = parse_url(&config.url, "issuer URL")?;
        if issuer.query().is_some() || issuer.fragment().is_some() {
            return Err(SetupError::InvalidConfig(format!(
                "issuer URL {issuer} must not have a query or fragment"
            )));
        }
        let document = format!(
            "{}/.well-known/openid-configuration",
            issuer.as_str().trim_end_matches('/')
        );
        let document = Url::parse(&document).map_err(|e| {
            SetupError::InvalidConfig(format!("issuer URL {issuer} gives no discovery URL: {e}"))
        })?;
        Self::build(Target::Discovery { issuer, document }, config)
    }

    fn build(target: Target, config: &HttpsJwksConfig) -> Result<Self, SetupError> {
        if config.timeout.is_zero() {
            return Err(SetupError::InvalidConfig(
                "JWKS fetch timeout must not be zero".into(),
            ));
        }
        let url = match &target {
            Target::Jwks(url) | Target::Discovery { issuer: url, .. } => url,
        };
        let (client, ca_file) =
            apiserver_client(url, config.ca_file.as_ref(), config.timeout, "JWKS")?;
        Ok(HttpsJwks {
            target,
            client,
            ca_file,
            token_file: config.token_file.clone(),
            timeout: config.timeout,
        })
    }

    /// One GET of `url`, with the bearer token if any; the body, at most `max` bytes.
    async fn get(
        &self,
        url: &Url,
        token: Option<&HeaderValue>,
        what: &str,
        max: u64,
    ) -> Result<Vec<u8>, AuthError> {
        let mut request = self
            .client
            .get(url.clone())
            .header(ACCEPT, "application/json, application/jwk-set+json");
        if let Some(token) = token {
            request = request.header(AUTHORIZATION, token.clone());
        }
        let mut response = request
            .send()
            .await
            .map_err(|e| with_causes(format!("cannot fetch {what} {url}"), &e.without_url()))?;
        let status = response.status();
        if !status.is_success() {
            // The body is not read: it is not ours to echo into logs.
            return Err(AuthError::jwks_unavailable_msg(format!(
                "{what} {url} answered HTTP {}",
                status.as_u16()
            )));
        }
        let too_large =
            || AuthError::jwks_unavailable_msg(format!("{what} {url} is larger than {max} bytes"));
        if response.content_length().is_some_and(|len| len > max) {
            return Err(too_large());
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| with_causes(format!("cannot read {what} {url}"), &e.without_url()))?
        {
            if (body.len() + chunk.len()) as u64 > max {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        tracing::debug!(url = %url, bytes = body.len(), "{what} fetched");
        Ok(body)
    }

    /// The `Authorization` header value, built from the token file read now.
    async fn authorization(&self) -> Result<Option<HeaderValue>, AuthError> {
        let Some(path) = &self.token_file else {
            return Ok(None);
        };
        let token = read_bearer_token(path).await?;
        let mut value = Zeroizing::new(String::with_capacity(7 + token.expose_secret().len()));
        value.push_str("Bearer ");
        value.push_str(token.expose_secret());
        let mut header = HeaderValue::from_str(&value).map_err(|_| {
            AuthError::jwks_unavailable_msg(format!(
                "bearer token file {} holds characters not allowed in a header",
                path.display()
            ))
        })?;
        header.set_sensitive(true);
        Ok(Some(header))
    }

    /// The JWKS URL named by the issuer's discovery document.
    async fn discover(
        &self,
        issuer: &Url,
        document: &Url,
        token: Option<&HeaderValue>,
    ) -> Result<Url, AuthError> {
        #[derive(serde::Deserialize)]
        struct Discovery {
            jwks_uri: String,
        }
        let bytes = self
            .get(
                document,
                token,
                "OpenID discovery document",
                MAX_DISCOVERY_BYTES,
            )
            .await?;
        let doc: Discovery = serde_json::from_slice(&bytes).map_err(|e| {
            with_causes(
                format!("OpenID discovery document {document} has no jwks_uri"),
                &e,
            )
        })?;
        let refused = |why: &str| {
            AuthError::jwks_unavailable_msg(format!(
                "jwks_uri in the discovery document of {issuer} refused: {why}"
            ))
        };
        let jwks = parse_url(&doc.jwks_uri, "jwks_uri").map_err(|e| match e {
            SetupError::InvalidConfig(why) => refused(&why),
            _ => refused("not a usable URL"),
        })?;
        let same_host = jwks.host_str() == issuer.host_str();
        let both_loopback = is_loopback_host(&jwks) && is_loopback_host(issuer);
        if !same_host && !both_loopback {
            return Err(refused(&format!("{jwks} is not on the issuer's host")));
        }
        Ok(jwks)
    }
}

impl JwksSource for HttpsJwks {
    fn fetch(&self) -> FetchFuture<'_> {
        Box::pin(async move {
            let token = self.authorization().await?;
            match &self.target {
                Target::Jwks(url) => {
                    self.get(url, token.as_ref(), "JWKS endpoint", MAX_JWKS_BYTES)
                        .await
                }
                Target::Discovery { issuer, document } => {
                    let url = self.discover(issuer, document, token.as_ref()).await?;
                    self.get(&url, token.as_ref(), "JWKS endpoint", MAX_JWKS_BYTES)
                        .await
                }
            }
        })
    }
}

/// A [`AuthError::JwksUnavailable`] whose text carries the whole cause chain (connection
/// refused, unknown issuer, timed out...): the verifier logs the text only. No cause here
/// holds a header, so the token cannot appear.
fn with_causes(detail: String, err: &(dyn std::error::Error + 'static)) -> AuthError {
    AuthError::jwks_unavailable_msg(cause_chain(detail, err))
}

/// `detail: cause: inner cause...`, skipping a cause whose text the previous one already ends
/// with (hyper and reqwest often repeat the inner error's text in the outer one).
/// The HTTPS client every apiserver call uses (JWKS, TokenReview): rustls trusting exactly
/// `ca_file` (required for https), TLS 1.2+, no redirects, no proxy, `timeout` for connect and
/// for the whole request. Returns the client and the CA file it trusts. `what` names the
/// client in errors.
pub(crate) fn apiserver_client(
    url: &Url,
    ca_file: Option<&PathBuf>,
    timeout: Duration,
    what: &str,
) -> Result<(Client, Option<PathBuf>), SetupError> {
    let mut builder = Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .min_tls_version(reqwest::tls::Version::TLS_1_2)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(timeout)
        .connect_timeout(timeout)
        .user_agent(concat!("keyhaven-broker/", env!("CARGO_PKG_VERSION")));
    let mut trusted = None;
    if url.scheme() == "https" {
        let path = ca_file.ok_or_else(|| {
            SetupError::InvalidConfig(format!("{url} is https but no CA bundle was given"))
        })?;
        let pem = std::fs::read(path).map_err(|e| {
            SetupError::InvalidConfig(format!("cannot read CA bundle {}: {e}", path.display()))
        })?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| SetupError::InvalidConfig(format!("CA bundle {}: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(SetupError::InvalidConfig(format!(
                "CA bundle {} holds no PEM certificate",
                path.display()
            )));
        }
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
        trusted = Some(path.clone());
    }
    let client = builder.build().map_err(|e| {
        SetupError::InvalidConfig(format!("cannot build the {what} HTTPS client: {e}"))
    })?;
    Ok((client, trusted))
}

pub(crate) fn cause_chain(detail: String, err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = detail;
    let mut cause = Some(err);
    while let Some(e) = cause {
        let part = e.to_string();
        if !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = e.source();
    }
    text
}

/// Parses `raw` and applies the rules every fetched URL obeys: `https://`, or `http://` on a
/// loopback host; a host; no credentials in the URL.
pub(crate) fn parse_url(raw: &str, what: &str) -> Result<Url, SetupError> {
    let url = Url::parse(raw.trim())
        .map_err(|e| SetupError::InvalidConfig(format!("{what} {raw:?} is not a URL: {e}")))?;
    if url.host_str().is_none_or(str::is_empty) {
        return Err(SetupError::InvalidConfig(format!(
            "{what} {url} has no host"
        )));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(SetupError::InvalidConfig(format!(
            "{what} must not carry credentials; use a token file"
        )));
    }
    match url.scheme() {
        "https" => Ok(url),
        "http" if is_loopback_host(&url) => Ok(url),
        "http" => Err(SetupError::InvalidConfig(format!(
            "{what} {url} is plain http on a host that is not loopback; use https"
        ))),
        other => Err(SetupError::InvalidConfig(format!(
            "{what} {url}: scheme {other:?} is not https"
        ))),
    }
}

/// True for `localhost` and for loopback IP literals (`127.0.0.0/8`, `[::1]`).
pub(crate) fn is_loopback_host(url: &Url) -> bool {
    match url.host_str() {
        Some("localhost") => true,
        Some(host) => host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()),
        None => false,
    }
}

/// Reads the bearer token file now (it may have been rotated since the last fetch).
async fn read_bearer_token(path: &Path) -> Result<SecretString, AuthError> {
    read_token_file(path, "bearer token file")
        .await
        .map_err(AuthError::jwks_unavailable_msg)
}

/// Reads a bearer token from `path` (trimmed, printable ASCII, at most 64 KiB). The error
/// names the file (as `what`) and the problem, never the content.
pub(crate) async fn read_token_file(path: &Path, what: &str) -> Result<SecretString, String> {
    let detail = || format!("cannot read {what} {}", path.display());
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| cause_chain(detail(), &e))?;
    let mut bytes = Zeroizing::new(Vec::with_capacity(4096));
    file.take(MAX_BEARER_TOKEN_BYTES + 1)
        .read_to_end(&mut bytes)
        .await
        .map_err(|e| cause_chain(detail(), &e))?;
    let bad = |why: &str| format!("{what} {} {why}", path.display());
    if bytes.len() as u64 > MAX_BEARER_TOKEN_BYTES {
        return Err(bad("is too large"));
    }
    let text = std::str::from_utf8(&bytes).map_err(|_| bad("is not UTF-8"))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(bad("is empty"));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad("holds characters not allowed in a bearer token"));
    }
    Ok(SecretString::from(token.to_owned()))
}

#[cfg(test)]
mod tests {
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

    async fn handle(
        state: Arc<State>,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, Infallible> {
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
            HttpsJwks::via_discovery(&config(issuer.clone(), Some(&ca), Some(&token_file)))
                .unwrap();
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
}
