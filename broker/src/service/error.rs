//! [`BrokerError`]: what a request failed with, by what the caller should do.

use super::*;

/// What a request failed with, by what the caller should do. Messages carry paths and lease
/// ids, never values or tokens.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    /// No valid credential.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// Authenticated, but no policy allows it.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// No such secret or lease (for this caller).
    #[error("not found: {0}")]
    NotFound(String),
    /// The lease can no longer be renewed (expired, revoked, at its maximum).
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// Malformed request.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Database, HSM or key source unavailable; retry later.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Stored data failed its integrity check, or another internal failure.
    #[error("internal: {0}")]
    Internal(String),
}

impl From<StoreError> for BrokerError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(m) => BrokerError::Unavailable(format!("database: {m}")),
            other => BrokerError::Internal(other.to_string()),
        }
    }
}

impl From<CryptoError> for BrokerError {
    fn from(e: CryptoError) -> Self {
        match &e {
            CryptoError::Hsm(h) if h.is_retryable() => BrokerError::Unavailable(e.to_string()),
            _ => BrokerError::Internal(e.to_string()),
        }
    }
}

impl BrokerError {
    /// Short code for audit records and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            BrokerError::Unauthenticated(_) => "unauthenticated",
            BrokerError::PermissionDenied(_) => "no_policy",
            BrokerError::NotFound(_) => "not_found",
            BrokerError::FailedPrecondition(_) => "not_renewable",
            BrokerError::InvalidArgument(_) => "invalid_argument",
            BrokerError::Unavailable(_) => "unavailable",
            BrokerError::Internal(_) => "internal",
        }
    }

    pub(super) fn outcome(&self) -> Outcome {
        match self {
            BrokerError::Unavailable(_) | BrokerError::Internal(_) => Outcome::Error,
            _ => Outcome::Denied,
        }
    }
}

/// Result alias.
pub type Result<T, E = BrokerError> = std::result::Result<T, E>;

impl From<crate::audit::writer::WriteError> for BrokerError {
    fn from(e: crate::audit::writer::WriteError) -> Self {
        use crate::audit::writer::WriteError;
        match e {
            WriteError::Lost => BrokerError::Internal(e.to_string()),
            WriteError::File => BrokerError::Unavailable("audit file unavailable".into()),
            WriteError::Log | WriteError::Gone => {
                BrokerError::Unavailable("audit log unavailable".into())
            }
        }
    }
}
