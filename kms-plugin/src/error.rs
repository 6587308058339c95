//! Errors of the plugin, and the one place they become gRPC statuses. Messages tell the
//! client what it can act on (key ids, limits) — never plaintext, PINs or HSM internals.

use keyhaven_hsm::ErrorKind;

/// A request failure, by what the client should do about it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum KmsError {
    /// The request is malformed or the ciphertext fails authentication.
    #[error("{0}")]
    InvalidArgument(String),
    /// The key_id names no KEK this plugin has (unknown or retired).
    #[error("{0}")]
    NotFound(String),
    /// The HSM is unusable right now; retry later.
    #[error("{0}")]
    Unavailable(String),
    /// The caller's UID is not allowed on this socket.
    #[error("{0}")]
    PermissionDenied(String),
    /// A bug or an unexpected HSM answer.
    #[error("{0}")]
    Internal(String),
}

impl KmsError {
    /// Maps an HSM error met while serving a request.
    pub fn from_hsm(e: &keyhaven_hsm::Error, key_id: &str) -> Self {
        match e.kind() {
            ErrorKind::InvalidCiphertext => KmsError::InvalidArgument(
                "ciphertext failed authentication (tampered, truncated, or not made with this key_id)"
                    .into(),
            ),
            ErrorKind::KeyNotFound => KmsError::NotFound(format!(
                "key_id {key_id} is not on the HSM token (retired or never created here)"
            )),
            ErrorKind::InvalidInput => KmsError::InvalidArgument(e.to_string()),
            ErrorKind::Unavailable => KmsError::Unavailable(format!("HSM unavailable: {e}")),
            ErrorKind::PinIncorrect | ErrorKind::PinLocked => {
                KmsError::Unavailable(format!("HSM login failed: {e}"))
            }
            ErrorKind::UnsupportedMechanism | ErrorKind::Config | ErrorKind::Internal => {
                KmsError::Internal(format!("HSM error: {e}"))
            }
        }
    }

    /// The gRPC code name, for metrics.
    pub fn code(&self) -> tonic::Code {
        match self {
            KmsError::InvalidArgument(_) => tonic::Code::InvalidArgument,
            KmsError::NotFound(_) => tonic::Code::NotFound,
            KmsError::Unavailable(_) => tonic::Code::Unavailable,
            KmsError::PermissionDenied(_) => tonic::Code::PermissionDenied,
            KmsError::Internal(_) => tonic::Code::Internal,
        }
    }
}

impl From<KmsError> for tonic::Status {
    fn from(e: KmsError) -> Self {
        tonic::Status::new(e.code(), e.to_string())
    }
}

/// Why the plugin could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The HSM could not be opened.
    #[error("HSM: {0}")]
    Hsm(#[from] keyhaven_hsm::Error),
    /// The listen address is malformed.
    #[error("bad --listen address '{0}': use unix:///path/kms.sock or unix:///@name")]
    ListenAddr(String),
    /// Another plugin answers on the socket.
    #[error("another process is serving on {0}; refusing to take its socket")]
    SocketInUse(String),
    /// Socket or listener I/O.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

impl PluginError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| PluginError::Io { context, source }
    }
}
