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

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use jsonwebtoken::jwk::{Jwk, JwkSet, PublicKeyUse, ThumbprintHash};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
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

/// DER of a PKCS#8 `PrivateKeyInfo` for an id-ecPublicKey / prime256v1 key, up to the 32-byte
/// private scalar of its SEC1 `ECPrivateKey` (version 1, no optional parameters or public key):
///
/// ```text
/// 30 41                       PrivateKeyInfo, 65 bytes
///    02 01 00                 version 0
///    30 13                    AlgorithmIdentifier
///       06 07 2a8648ce3d0201       id-ecPublicKey
///       06 08 2a8648ce3d030107     prime256v1
///    04 27                    privateKey OCTET STRING, 39 bytes
///       30 25                 ECPrivateKey
///          02 01 01           version 1
///          04 20 <32 bytes>   privateKey
/// ```
///
/// The same fixed-template technique `ring` uses to emit PKCS#8. The scalar comes from the OS
/// CSPRNG; `p256` (inside `jsonwebtoken`) rejects a zero or out-of-range scalar when the key is
/// loaded and derives the public point. Replace with `p256::SecretKey::random` if `p256`
/// becomes a direct dependency.
const P256_PKCS8_PREFIX: [u8; 35] = [
    0x30, 0x41, 0x02, 0x01, 0x00, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01,
    0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x04, 0x27, 0x30, 0x25, 0x02, 0x01,
    0x01, 0x04, 0x20,
];

/// An ES256 (P-256) token issuer for dev mode. Its `Debug` shows the `kid` only.
pub struct DevIssuer {
    key: EncodingKey,
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
        // An out-of-range scalar has probability about 2^-32; retry a few times anyway.
        for _ in 0..4 {
            let mut der = Zeroizing::new(Vec::with_capacity(P256_PKCS8_PREFIX.len() + 32));
            der.extend_from_slice(&P256_PKCS8_PREFIX);
            let mut scalar = Zeroizing::new([0u8; 32]);
            getrandom::fill(&mut scalar[..]).map_err(DevTokenError::Random)?;
            der.extend_from_slice(&scalar[..]);
            if let Ok(issuer) = Self::from_key(EncodingKey::from_ec_der(&der)) {
                return Ok(issuer);
            }
        }
        Err(DevTokenError::InvalidKey("could not generate a P-256 key"))
    }

    /// Loads a P-256 private key from PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`).
    pub fn from_pkcs8_pem(pem: &[u8]) -> Result<Self, DevTokenError> {
        let key = EncodingKey::from_ec_pem(pem)
            .map_err(|_| DevTokenError::InvalidKey("not a PKCS#8 PEM EC private key"))?;
        Self::from_key(key)
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

    fn from_key(key: EncodingKey) -> Result<Self, DevTokenError> {
        if key.family() != jsonwebtoken::AlgorithmFamily::Ec {
            return Err(DevTokenError::InvalidKey("not an EC key"));
        }
        let mut public = Jwk::from_encoding_key(&key, Algorithm::ES256)
            .map_err(|_| DevTokenError::InvalidKey("not a P-256 private key"))?;
        let kid = public.thumbprint(ThumbprintHash::SHA256);
        public.common.key_id = Some(kid.clone());
        public.common.public_key_use = Some(PublicKeyUse::Signature);
        Ok(DevIssuer { key, public, kid })
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
    pub fn private_key_pem(&self) -> Zeroizing<String> {
        let b64 = Zeroizing::new(STANDARD.encode(self.key.inner()));
        let mut pem = Zeroizing::new(String::with_capacity(b64.len() + b64.len() / 64 + 64));
        pem.push_str("-----BEGIN PRIVATE KEY-----\n");
        for line in b64.as_bytes().chunks(64) {
            // base64 output is ASCII, so every chunk is valid UTF-8.
            pem.push_str(std::str::from_utf8(line).unwrap_or_default());
            pem.push('\n');
        }
        pem.push_str("-----END PRIVATE KEY-----\n");
        pem
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
        if let Some(p) = pod {
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
        if let Some(p) = pod {
            k8s["pod"] = serde_json::json!({ "name": p, "uid": dev_uid("pod", namespace, p) });
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
