//! Dev mode on the verifier's side: trusting the tokens a [`DevIssuer`] mints (the issuer itself
//! lives in `keyhaven-broker-core`, shared with `brokerctl dev-token`).

pub use keyhaven_broker_core::dev_token::{
    DevIssuer, DevTokenError, DEV_AUDIENCE, DEV_ISSUER, DEV_MAX_TTL,
};

use super::jwks::StaticJwks;
use super::verifier::VerifierConfig;

/// The configuration of a verifier for dev tokens.
pub fn dev_verifier_config() -> VerifierConfig {
    VerifierConfig::new(DEV_ISSUER)
}

/// A dev issuer's public keys as a verifier source.
pub fn dev_jwks_source(dev: &DevIssuer) -> StaticJwks {
    StaticJwks::from_jwk_set(&dev.jwks())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use jsonwebtoken::Algorithm;
    use keyhaven_broker_core::dev_token::dev_uid;

    use super::super::{test_keys, Verifier};
    use super::*;

    #[tokio::test]
    async fn minted_token_verifies_with_dev_jwks() {
        let dev = DevIssuer::generate().unwrap();
        let v = Verifier::new(dev_verifier_config(), dev_jwks_source(&dev)).unwrap();
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

    #[tokio::test]
    async fn a_token_for_a_pod_uid_carries_that_uid() {
        let dev = DevIssuer::generate().unwrap();
        let v = Verifier::new(dev_verifier_config(), dev_jwks_source(&dev)).unwrap();
        let token = dev
            .mint_for_pod_uid("team-a", "app", "app-0", "uid-b", Duration::from_secs(60))
            .unwrap();
        let verified = v.verify_token(&token).await.unwrap();
        assert_eq!(verified.identity.pod_name.as_deref(), Some("app-0"));
        assert_eq!(verified.identity.pod_uid.as_deref(), Some("uid-b"));
        let err = dev
            .mint_for_pod_uid("team-a", "app", "app-0", "", Duration::from_secs(60))
            .unwrap_err();
        assert!(matches!(err, DevTokenError::InvalidInput(_)), "{err:?}");
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
        assert!(matches!(err, DevTokenError::InvalidKey(_)), "{err:?}");
        let err = DevIssuer::from_pkcs8_pem(b"not a pem").unwrap_err();
        assert!(matches!(err, DevTokenError::InvalidKey(_)), "{err:?}");
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
            DevTokenError::InvalidKey(_)
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
            assert!(matches!(err, DevTokenError::InvalidInput(_)), "{err:?}");
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
