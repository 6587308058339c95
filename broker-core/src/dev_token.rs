//! Dev mode only: [`DevIssuer`] mints Kubernetes-shaped tokens with its own ES256 key, for
//! demos and tests on machines without a cluster. A broker trusts these tokens only when it is
//! explicitly started in dev mode with a verifier for [`DEV_ISSUER`] and this issuer's JWKS.
//!
//! The key is either generated in memory or loaded from a PKCS#8 PEM file, so that `brokerctl
//! dev-token` and a `--dev` broker can share it. The `kid` is the key's RFC 7638 thumbprint:
//! random for a new key, and the same in every process that loads the same file.

use std::fmt;
use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::{Jwk, JwkSet, PublicKeyUse, ThumbprintHash};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use p256::pkcs8::{DecodePrivateKey as _, EncodePrivateKey as _, LineEnding};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::identity::{is_dns_label, is_dns_subdomain};

/// Why a dev issuer could not be made, or a dev token minted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DevTokenError {
    /// A key could not be loaded (wrong format, wrong curve...).
    #[error("invalid key: {0}")]
    InvalidKey(&'static str),
    /// A key file could not be read or written.
    #[error("cannot access key file {path}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A dev-token request is unusable (bad name, ttl out of range).
    #[error("invalid dev token request: {0}")]
    InvalidInput(String),
    /// Signing failed.
    #[error("cannot sign dev token")]
    Signing(#[source] jsonwebtoken::errors::Error),
    /// The operating system's random number generator failed.
    #[error("no randomness available: {0}")]
    Random(getrandom::Error),
}

/// The `iss` of dev tokens. Never the issuer of a real cluster.
pub const DEV_ISSUER: &str = "https://keyhaven.dev/dev";
/// The `aud` of dev tokens.
pub const DEV_AUDIENCE: &str = "keyhaven";
/// Longest lifetime a dev token may be minted with.
pub const DEV_MAX_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// An ES256 (P-256) token issuer for dev mode. Its `Debug` shows the `kid` only.
pub struct DevIssuer {
    key: EncodingKey,
    /// The private key as PKCS#8 PEM (zeroized on drop), to share it with another process.
    pem: Zeroizing<String>,
    public: Jwk,
    kid: String,
}

impl fmt::Debug for DevIssuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevIssuer")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl DevIssuer {
    /// A new random P-256 key, in memory only.
    pub fn generate() -> Result<Self, DevTokenError> {
        // A zero or out-of-range scalar has probability about 2^-32; retry a few times anyway.
        for _ in 0..4 {
            let mut scalar = Zeroizing::new([0u8; 32]);
            getrandom::fill(&mut scalar[..]).map_err(DevTokenError::Random)?;
            if let Ok(secret) = p256::SecretKey::from_slice(&scalar[..]) {
                return Self::from_secret(&secret);
            }
        }
        Err(DevTokenError::InvalidKey("could not generate a P-256 key"))
    }

    /// Loads a P-256 private key from PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`).
    pub fn from_pkcs8_pem(pem: &[u8]) -> Result<Self, DevTokenError> {
        const NOT_PKCS8: DevTokenError =
            DevTokenError::InvalidKey("not a PKCS#8 PEM P-256 private key");
        let text = std::str::from_utf8(pem).map_err(|_| NOT_PKCS8)?;
        let secret = p256::SecretKey::from_pkcs8_pem(text.trim()).map_err(|_| NOT_PKCS8)?;
        Self::from_secret(&secret)
    }

    /// Loads [`DevIssuer::from_pkcs8_pem`] from a file.
    pub fn from_pem_file(path: &Path) -> Result<Self, DevTokenError> {
        let pem = Zeroizing::new(std::fs::read(path).map_err(|source| DevTokenError::Io {
            path: path.to_path_buf(),
            source,
        })?);
        Self::from_pkcs8_pem(&pem)
    }

    /// Loads the key at `path`, or, if there is no file, generates one and writes it there
    /// (mode 0600, never overwriting a file that appeared meanwhile).
    pub fn load_or_generate(path: &Path) -> Result<Self, DevTokenError> {
        match Self::from_pem_file(path) {
            Err(DevTokenError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound => {}
            other => return other,
        }
        let issuer = Self::generate()?;
        let io = |source| DevTokenError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        match options.open(path) {
            Ok(mut file) => {
                file.write_all(issuer.private_key_pem().as_bytes())
                    .and_then(|()| file.sync_all())
                    .map_err(io)?;
                Ok(issuer)
            }
            // Another process created it first: use theirs.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Self::from_pem_file(path),
            Err(e) => Err(io(e)),
        }
    }

    fn from_secret(secret: &p256::SecretKey) -> Result<Self, DevTokenError> {
        const UNENCODABLE: DevTokenError = DevTokenError::InvalidKey("cannot encode the key");
        let der = secret.to_pkcs8_der().map_err(|_| UNENCODABLE)?;
        let pem = secret
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|_| UNENCODABLE)?;
        let key = EncodingKey::from_ec_der(der.as_bytes());
        let mut public = Jwk::from_encoding_key(&key, Algorithm::ES256)
            .map_err(|_| DevTokenError::InvalidKey("not a P-256 private key"))?;
        let kid = public.thumbprint(ThumbprintHash::SHA256);
        public.common.key_id = Some(kid.clone());
        public.common.public_key_use = Some(PublicKeyUse::Signature);
        Ok(DevIssuer {
            key,
            pem,
            public,
            kid,
        })
    }

    /// The key id put in minted tokens.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key set a verifier of dev tokens should trust.
    pub fn jwks(&self) -> JwkSet {
        JwkSet {
            keys: vec![self.public.clone()],
        }
    }

    /// The private key as PKCS#8 PEM, to share the key with another process. Zeroized on drop.
    pub fn private_key_pem(&self) -> &Zeroizing<String> {
        &self.pem
    }

    /// Mints a token shaped like a projected ServiceAccount token: `iss` [`DEV_ISSUER`], `aud`
    /// `[keyhaven]`, `sub` `system:serviceaccount:<ns>:<sa>`, `iat`/`nbf` now, `exp` now + ttl,
    /// and the `kubernetes.io` claim (UIDs derived from the names, so they are stable).
    pub fn mint(
        &self,
        namespace: &str,
        service_account: &str,
        pod: Option<&str>,
        ttl: Duration,
    ) -> Result<String, DevTokenError> {
        let pod = pod.map(|p| (p, dev_uid("pod", namespace, p)));
        self.mint_claims(namespace, service_account, pod, ttl)
    }

    /// [`DevIssuer::mint`] for the pod `pod` whose uid is `pod_uid` (a pod re-created under
    /// the same name has another uid).
    pub fn mint_for_pod_uid(
        &self,
        namespace: &str,
        service_account: &str,
        pod: &str,
        pod_uid: &str,
        ttl: Duration,
    ) -> Result<String, DevTokenError> {
        if pod_uid.is_empty() || pod_uid.len() > 64 {
            return Err(DevTokenError::InvalidInput(
                "pod uid must have 1 to 64 characters".to_string(),
            ));
        }
        self.mint_claims(
            namespace,
            service_account,
            Some((pod, pod_uid.to_string())),
            ttl,
        )
    }

    fn mint_claims(
        &self,
        namespace: &str,
        service_account: &str,
        pod: Option<(&str, String)>,
        ttl: Duration,
    ) -> Result<String, DevTokenError> {
        if !is_dns_label(namespace) {
            return Err(DevTokenError::InvalidInput(format!(
                "namespace {namespace:?} is not a DNS label"
            )));
        }
        if !is_dns_subdomain(service_account) {
            return Err(DevTokenError::InvalidInput(format!(
                "service account {service_account:?} is not a DNS subdomain"
            )));
        }
        if let Some((p, _)) = &pod {
            if !is_dns_subdomain(p) {
                return Err(DevTokenError::InvalidInput(format!(
                    "pod {p:?} is not a DNS subdomain"
                )));
            }
        }
        if ttl < Duration::from_secs(1) || ttl > DEV_MAX_TTL {
            return Err(DevTokenError::InvalidInput(
                "ttl must be between 1 second and 24 hours".to_string(),
            ));
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut jti = [0u8; 16];
        getrandom::fill(&mut jti).map_err(DevTokenError::Random)?;

        let mut k8s = serde_json::json!({
            "namespace": namespace,
            "serviceaccount": {
                "name": service_account,
                "uid": dev_uid("serviceaccount", namespace, service_account),
            },
        });
        if let Some((p, uid)) = pod {
            k8s["pod"] = serde_json::json!({ "name": p, "uid": uid });
        }
        let claims = serde_json::json!({
            "iss": DEV_ISSUER,
            "sub": format!("system:serviceaccount:{namespace}:{service_account}"),
            "aud": [DEV_AUDIENCE],
            "iat": now,
            "nbf": now,
            "exp": now + ttl.as_secs(),
            "jti": hex::encode(jti),
            "kubernetes.io": k8s,
        });
        let mut header = Header::new(Algorithm::ES256);
        header.typ = None; // as the apiserver: {"alg", "kid"} only
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.key).map_err(DevTokenError::Signing)
    }
}

/// A UUID-shaped id derived from the object's kind, namespace and name.
pub fn dev_uid(kind: &str, namespace: &str, name: &str) -> String {
    let h = Sha256::digest(format!("keyhaven-dev/{kind}/{namespace}/{name}").as_bytes());
    let x = hex::encode(&h[..16]);
    format!(
        "{}-{}-{}-{}-{}",
        &x[0..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..32]
    )
}
