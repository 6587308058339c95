//! Errors of token verification ([`AuthError`]) and of setting the verifier or the dev issuer
//! up ([`SetupError`]).
//!
//! No message built here ever contains a token, a token segment or key material. Values that
//! come from a token header (`alg`, `kid`) are cut short and stripped to a safe alphabet first.

/// Why a token was refused, or why it could not be checked.
///
/// [`AuthError::reason`] gives a short, stable label for metrics and audit records; the
/// `Display` text is for logs. Neither ever contains the token.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// `exp` is in the past (beyond the leeway).
    #[error("token has expired")]
    Expired,
    /// `nbf` or `iat` is in the future (beyond the leeway).
    #[error("token is not valid yet")]
    NotYetValid,
    /// No `aud` entry is one of the configured audiences.
    #[error("token audience is not accepted")]
    BadAudience,
    /// `iss` is missing or is not the configured issuer.
    #[error("token issuer is not trusted")]
    BadIssuer,
    /// The header's `alg` is not RS256/ES256, or does not match the key's algorithm.
    #[error("token algorithm not allowed: {0}")]
    BadAlgorithm(String),
    /// No key with the header's `kid` is known, even after a (rate-limited) JWKS refetch.
    #[error("token key id not in the JWKS: {0}")]
    UnknownKid(String),
    /// The signature does not verify with the key named by `kid`.
    #[error("token signature does not verify")]
    BadSignature,
    /// The token has no `exp` claim.
    #[error("token has no exp claim")]
    MissingExp,
    /// `iat` is older than the maximum token age, or `exp - iat` exceeds it.
    #[error("token is too old: {0}")]
    TooOld(&'static str),
    /// Not a well-formed JWT with the claims a Kubernetes token has.
    #[error("token is malformed: {0}")]
    Malformed(&'static str),
    /// `sub` is not `system:serviceaccount:<ns>:<name>` or disagrees with `kubernetes.io`.
    #[error("token subject is not a valid service account: {0}")]
    BadSubject(&'static str),
    /// The key set could not be fetched or held no usable key: a server-side problem, not a
    /// verdict on the token.
    #[error("JWKS unavailable: {detail}")]
    JwksUnavailable {
        /// What failed (a path or an endpoint, never a credential).
        detail: String,
        /// The underlying cause, if any.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
    },
}

impl AuthError {
    /// A short, stable machine label for metrics and audit records.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::BadAudience => "bad_audience",
            AuthError::BadIssuer => "bad_issuer",
            AuthError::BadAlgorithm(_) => "bad_algorithm",
            AuthError::UnknownKid(_) => "unknown_kid",
            AuthError::BadSignature => "bad_signature",
            AuthError::MissingExp => "missing_exp",
            AuthError::TooOld(_) => "too_old",
            AuthError::Malformed(_) => "malformed",
            AuthError::BadSubject(_) => "bad_subject",
            AuthError::JwksUnavailable { .. } => "jwks_unavailable",
        }
    }

    /// True when the token could not be checked because the key set is unavailable (answer
    /// UNAVAILABLE, let the client retry); false when the token itself was refused
    /// (UNAUTHENTICATED).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, AuthError::JwksUnavailable { .. })
    }

    /// A [`AuthError::JwksUnavailable`] with a cause.
    pub fn jwks_unavailable(
        detail: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        AuthError::JwksUnavailable {
            detail: detail.into(),
            source: Some(source.into()),
        }
    }

    /// A [`AuthError::JwksUnavailable`] without an underlying cause.
    pub fn jwks_unavailable_msg(detail: impl Into<String>) -> Self {
        AuthError::JwksUnavailable {
            detail: detail.into(),
            source: None,
        }
    }
}

/// Errors building a [`super::Verifier`] or a token reviewer: configuration found at startup
/// rather than per request. (Dev key errors are [`super::DevTokenError`].)
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SetupError {
    /// A configuration value is unusable.
    #[error("invalid token verifier configuration: {0}")]
    InvalidConfig(String),
}

/// Keeps at most `max` characters of a header value from a token, replacing anything outside
/// `[A-Za-z0-9._-]`, so that attacker-chosen text cannot forge log lines or grow them.
pub(crate) fn sanitize(value: &str, max: usize) -> String {
    let mut out: String = value
        .chars()
        .take(max)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '?'
            }
        })
        .collect();
    if value.chars().count() > max {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_the_documented_labels() {
        let all = [
            (AuthError::Expired, "expired"),
            (AuthError::NotYetValid, "not_yet_valid"),
            (AuthError::BadAudience, "bad_audience"),
            (AuthError::BadIssuer, "bad_issuer"),
            (AuthError::BadAlgorithm("none".into()), "bad_algorithm"),
            (AuthError::UnknownKid("k".into()), "unknown_kid"),
            (AuthError::BadSignature, "bad_signature"),
            (AuthError::MissingExp, "missing_exp"),
            (AuthError::TooOld("x"), "too_old"),
            (AuthError::Malformed("x"), "malformed"),
            (AuthError::BadSubject("x"), "bad_subject"),
            (AuthError::jwks_unavailable_msg("x"), "jwks_unavailable"),
        ];
        for (err, label) in all {
            assert_eq!(err.reason(), label);
            assert_eq!(err.is_unavailable(), label == "jwks_unavailable");
        }
    }

    #[test]
    fn sanitize_cuts_and_strips() {
        assert_eq!(sanitize("RS256", 16), "RS256");
        assert_eq!(sanitize("a\nb c", 16), "a?b?c");
        assert_eq!(sanitize("abcdef", 3), "abc…");
    }
}
