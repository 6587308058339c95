//! Who is asking: verification of Kubernetes ServiceAccount tokens (projected JWTs) against
//! the cluster's JWKS, giving a workload [`Identity`](crate::identity::Identity).
//!
//! - [`Authenticator`] turns a bearer credential (token, dev token, bootstrap credential)
//!   into a [`Caller`] and the audit event recording the attempt.
//! - [`Verifier`] checks signature, issuer, audience, expiry, age and subject; the algorithm is
//!   fixed by the key (RSA → RS256, EC P-256 → ES256), never taken from the token.
//! - [`Jwks`] is the trusted key set; a [`JwksSource`] supplies it ([`FileJwks`],
//!   [`StaticJwks`], and [`HttpsJwks`], which fetches the apiserver's `/openid/v1/jwks` over
//!   HTTPS trusting only a given CA bundle).
//! - [`AuthError::reason`] gives stable labels for metrics and audit.
//! - [`token_fingerprint`] keys any cache by a hash of the token, never the token.
//! - [`DevIssuer`] mints dev-mode tokens with its own ES256 key.
//! - [`TokenReviewer`] (optional TokenReview mode) asks the apiserver about a token already
//!   verified here, so that tokens whose pod or service account was deleted are refused; its
//!   verdicts are cached for seconds, by fingerprint.
//!
//! Not here: policy (see `policy`), and the gRPC edge that maps [`AuthError`] and
//! [`TokenReviewError`] to a status. No function here logs or returns a token.

mod authenticator;
mod dev;
mod error;
mod https;
mod jwks;
#[cfg(test)]
mod test_keys;
#[cfg(test)]
mod test_pki;
mod tokenreview;
mod verifier;

pub use authenticator::{Attempt, Authenticator, Caller, Refusal};
pub use dev::{
    dev_jwks_source, dev_verifier_config, DevIssuer, DevTokenError, DEV_AUDIENCE, DEV_ISSUER,
    DEV_MAX_TTL,
};
pub use error::{AuthError, SetupError};
pub use https::{HttpsJwks, HttpsJwksConfig};
pub use jwks::{FetchFuture, FileJwks, Jwks, JwksSource, StaticJwks, MAX_JWKS_BYTES};
pub use tokenreview::{
    TokenReviewConfig, TokenReviewError, TokenReviewer, DEFAULT_REVIEW_CACHE_CAPACITY,
    DEFAULT_REVIEW_CACHE_TTL, MAX_REVIEW_BYTES, MAX_REVIEW_CACHE_TTL, TOKEN_REVIEW_PATH,
};
pub use verifier::{VerifiedToken, Verifier, VerifierConfig, MAX_TOKEN_BYTES};

use sha2::{Digest, Sha256};

/// The key under which a token (or a verdict on it) may be cached or recorded: lowercase hex
/// SHA-256 of the token's bytes. Caches and logs hold this, never the token.
pub fn token_fingerprint(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_is_hex_sha256() {
        assert_eq!(
            token_fingerprint("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_ne!(token_fingerprint("a.b.c"), token_fingerprint("a.b.d"));
    }
}
