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
pub(crate) async fn read_token_file(
    path: &Path,
    what: &'static str,
) -> Result<SecretString, String> {
    use keyhaven_process::secret_file::{read_async, Rules};
    let rules = Rules {
        max_bytes: MAX_BEARER_TOKEN_BYTES,
        ..Rules::bearer(what)
    };
    match read_async(path, rules).await {
        Ok(v) => Ok(SecretString::from(v.as_str())),
        Err(e) => Err(match std::error::Error::source(&e) {
            Some(cause) => cause_chain(e.to_string(), cause),
            None => e.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests;
