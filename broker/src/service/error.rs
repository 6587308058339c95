//! [`BrokerError`]: what a request failed with, by what the caller should do.

use super::*;

/// The underlying cause of an unavailable or internal failure: kept typed for the log, never
/// sent to a client.
pub type Cause = std::sync::Arc<dyn std::error::Error + Send + Sync>;

/// What a request failed with, by what the caller should do. The client-error variants carry
/// our own text about the request (paths, lease ids), never values or tokens; `Unavailable`
/// and `Internal` carry a fixed description and keep the cause typed for the log.
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
    /// A cap is reached (the cap is named); retry after something is released.
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),
    /// Database, HSM or key source unavailable; retry later.
    #[error("unavailable: {what}")]
    Unavailable {
        /// What is unavailable, in words fit for the client (`database`, `audit log`, ...).
        what: &'static str,
        /// Why, for the log.
        #[source]
        source: Option<Cause>,
    },
    /// Stored data failed its integrity check, or another internal failure.
    #[error("internal: {what}")]
    Internal {
        /// What failed, in words fit for the log and the audit reason.
        what: &'static str,
        /// Why, for the log.
        #[source]
        source: Option<Cause>,
    },
}

impl BrokerError {
    /// Unavailable, with no underlying error.
    pub fn unavailable(what: &'static str) -> Self {
        BrokerError::Unavailable { what, source: None }
    }

    /// Unavailable because of `source`.
    pub fn unavailable_by(
        what: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        BrokerError::Unavailable {
            what,
            source: Some(std::sync::Arc::new(source)),
        }
    }

    /// Internal, with no underlying error.
    pub fn internal(what: &'static str) -> Self {
        BrokerError::Internal { what, source: None }
    }

    /// Internal because of `source`.
    pub fn internal_by(
        what: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        BrokerError::Internal {
            what,
            source: Some(std::sync::Arc::new(source)),
        }
    }

    /// The error and every cause under it, `: `-separated (for the log only).
    pub fn chain(&self) -> String {
        keyhaven_hsm::error_chain(self)
    }
}

impl From<StoreError> for BrokerError {
    fn from(e: StoreError) -> Self {
        match e {
            e @ StoreError::Unavailable(_) => BrokerError::unavailable_by("database", e),
            other => BrokerError::internal_by("database", other),
        }
    }
}

impl From<CryptoError> for BrokerError {
    fn from(e: CryptoError) -> Self {
        match &e {
            CryptoError::Hsm(h) if h.is_retryable() => BrokerError::unavailable_by("HSM", e),
            _ => BrokerError::internal_by("secret encryption", e),
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
            BrokerError::ResourceExhausted(_) => "resource_exhausted",
            BrokerError::Unavailable { .. } => "unavailable",
            BrokerError::Internal { .. } => "internal",
        }
    }

    pub(super) fn outcome(&self) -> Outcome {
        match self {
            BrokerError::Unavailable { .. } | BrokerError::Internal { .. } => Outcome::Error,
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
            WriteError::Lost => BrokerError::internal_by("audit writer", e),
            WriteError::File => BrokerError::unavailable_by("audit file", e),
            WriteError::Log | WriteError::Gone => BrokerError::unavailable_by("audit log", e),
        }
    }
}

impl From<crate::audit::writer::ChangeError> for BrokerError {
    fn from(e: crate::audit::writer::ChangeError) -> Self {
        use crate::audit::writer::ChangeError;
        match e {
            ChangeError::Store(e) => e.into(),
            e @ ChangeError::File(_) => BrokerError::unavailable_by("audit file", e),
            e @ ChangeError::Gone => BrokerError::unavailable_by("audit log", e),
        }
    }
}
