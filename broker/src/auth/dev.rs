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

use super::error::SetupError;
use super::jwks::StaticJwks;
use super::verifier::{is_dns_label, is_dns_subdomain, VerifierConfig};

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
    pub fn generate() -> Result<Self, SetupError> {
        // An out-of-range scalar has probability about 2^-32; retry a few times anyway.
        for _ in 0..4 {
            let mut der = Zeroizing::new(Vec::with_capacity(P256_PKCS8_PREFIX.len() + 32));
            der.extend_from_slice(&P256_PKCS8_PREFIX);
            let mut scalar = Zeroizing::new([0u8; 32]);
            getrandom::fill(&mut scalar[..]).map_err(SetupError::Random)?;
            der.extend_from_slice(&scalar[..]);
            if let Ok(issuer) = Self::from_key(EncodingKey::from_ec_der(&der)) {
                return Ok(issuer);
            }
        }
        Err(SetupError::InvalidKey("could not generate a P-256 key"))
    }

    /// Loads a P-256 private key from PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`).
    pub fn from_pkcs8_pem(pem: &[u8]) -> Result<Self, SetupError> {
        let key = EncodingKey::from_ec_pem(pem)
            .map_err(|_| SetupError::InvalidKey("not a PKCS#8 PEM EC private key"))?;
        Self::from_key(key)
    }

    /// Loads [`DevIssuer::from_pkcs8_pem`] from a file.
    pub fn from_pem_file(path: &Path) -> Result<Self, SetupError> {
        let pem = Zeroizing::new(std::fs::read(path).map_err(|source| SetupError::Io {
            path: path.to_path_buf(),
            source,
        })?);
        Self::from_pkcs8_pem(&pem)
    }

    /// Loads the key at `path`, or, if there is no file, generates one and writes it there
    /// (mode 0600, never overwriting a file that appeared meanwhile).
    pub fn load_or_generate(path: &Path) -> Result<Self, SetupError> {
        match Self::from_pem_file(path) {
            Err(SetupError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            }
            other => return other,
        }
        let issuer = Self::generate()?;
        let io = |source| SetupError::Io {
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

    fn from_key(key: EncodingKey) -> Result<Self, SetupError> {
        if key.family() != jsonwebtoken::AlgorithmFamily::Ec {
            return Err(SetupError::InvalidKey("not an EC key"));
        }
        let mut public = Jwk::from_encoding_key(&key, Algorithm::ES256)
            .map_err(|_| SetupError::InvalidKey("not a P-256 private key"))?;
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

    /// [`DevIssuer::jwks`] as a verifier source.
    pub fn jwks_source(&self) -> StaticJwks {
        StaticJwks::from_jwk_set(&self.jwks())
    }

    /// The configuration of a verifier for dev tokens.
    pub fn verifier_config() -> VerifierConfig {
        VerifierConfig::new(DEV_ISSUER)
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
    ) -> Result<String, SetupError> {
        if !is_dns_label(namespace) {
            return Err(SetupError::InvalidInput(format!(
                "namespace {namespace:?} is not a DNS label"
            )));
        }
        if !is_dns_subdomain(service_account) {
            return Err(SetupError::InvalidInput(format!(
                "service account {service_account:?} is not a DNS subdomain"
            )));
        }
        if let Some(p) = pod {
            if !is_dns_subdomain(p) {
                return Err(SetupError::InvalidInput(format!(
                    "pod {p:?} is not a DNS subdomain"
                )));
            }
        }
        if ttl < Duration::from_secs(1) || ttl > DEV_MAX_TTL {
            return Err(SetupError::InvalidInput(
                "ttl must be between 1 second and 24 hours".to_string(),
            ));
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut jti = [0u8; 16];
        getrandom::fill(&mut jti).map_err(SetupError::Random)?;

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
        jsonwebtoken::encode(&header, &claims, &self.key).map_err(SetupError::Signing)
    }
}

/// A UUID-shaped id derived from the object's kind, namespace and name.
fn dev_uid(kind: &str, namespace: &str, name: &str) -> String {
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

#[cfg(test)]
mod tests {
    use super::super::{test_keys, Verifier};
    use super::*;

    #[tokio::test]
    async fn minted_token_verifies_with_dev_jwks() {
        let dev = DevIssuer::generate().unwrap();
        let v = Verifier::new(DevIssuer::verifier_config(), dev.jwks_source()).unwrap();
        let token = dev
            .mint("team-a", "app", Some("app-7d9f"), Duration::from_secs(600))
            .unwrap();
        let verified = v.verify_token(&token).await.unwrap();
        assert_eq!(verified.identity.namespace, "team-a");
        assert_eq!(verified.identity.service_account, "app");
        assert_eq!(verified.identity.pod_name.as_deref(), Some("app-7d9f"));
        assert_eq!(
            verified.identity.pod_uid,
            Some(dev_uid("pod", "team-a", "app-7d9f"))
        );
        assert_eq!(verified.key_id, dev.kid());
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(header.alg, Algorithm::ES256);
        assert_eq!(header.kid.as_deref(), Some(dev.kid()));
    }

    #[test]
    fn generated_keys_differ_and_round_trip_through_pem() {
        let a = DevIssuer::generate().unwrap();
        let b = DevIssuer::generate().unwrap();
        assert_ne!(a.kid(), b.kid());
        let pem = a.private_key_pem();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        let again = DevIssuer::from_pkcs8_pem(pem.as_bytes()).unwrap();
        assert_eq!(again.kid(), a.kid());
        assert_eq!(again.jwks(), a.jwks());
    }

    #[test]
    fn loads_an_openssl_pkcs8_key_and_refuses_others() {
        let dev = DevIssuer::from_pkcs8_pem(test_keys::EC_P256_PKCS8_PEM.as_bytes()).unwrap();
        assert_eq!(dev.jwks().keys.len(), 1);
        let err = DevIssuer::from_pkcs8_pem(test_keys::RSA_PKCS8_PEM.as_bytes()).unwrap_err();
        assert!(matches!(err, SetupError::InvalidKey(_)), "{err:?}");
        let err = DevIssuer::from_pkcs8_pem(b"not a pem").unwrap_err();
        assert!(matches!(err, SetupError::InvalidKey(_)), "{err:?}");
    }

    #[test]
    fn load_or_generate_creates_once_then_reuses() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev-key.pem");
        let first = DevIssuer::load_or_generate(&path).unwrap();
        let second = DevIssuer::load_or_generate(&path).unwrap();
        assert_eq!(first.kid(), second.kid());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(&path, b"garbage").unwrap();
        assert!(matches!(
            DevIssuer::load_or_generate(&path).unwrap_err(),
            SetupError::InvalidKey(_)
        ));
    }

    #[test]
    fn mint_refuses_bad_names_and_ttls() {
        let dev = DevIssuer::generate().unwrap();
        let day = Duration::from_secs(3600);
        for (ns, sa, pod, ttl) in [
            ("Team", "app", None, day),
            ("ns", "a:b", None, day),
            ("ns", "app", Some("Pod/x"), day),
            ("ns", "app", None, Duration::ZERO),
            ("ns", "app", None, DEV_MAX_TTL + Duration::from_secs(1)),
        ] {
            let err = dev.mint(ns, sa, pod, ttl).unwrap_err();
            assert!(matches!(err, SetupError::InvalidInput(_)), "{err:?}");
        }
    }

    #[test]
    fn debug_shows_no_key_material() {
        let dev = DevIssuer::generate().unwrap();
        let debug = format!("{dev:?}");
        assert!(debug.contains(dev.kid()));
        let pem = dev.private_key_pem();
        let body: String = pem.lines().nth(1).unwrap().chars().take(20).collect();
        assert!(!debug.contains(&body));
    }
}
