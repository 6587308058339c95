//! The one error type of this crate. Messages carry operation names, key labels/ids and
//! PKCS#11 return-value names — never PINs, plaintexts or key bytes.

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, in the terms a caller acts on. See [`Error::kind`].
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The HSM, token or session is not usable right now; retrying later may succeed.
    #[error("HSM unavailable during {op}: {reason}")]
    Unavailable {
        /// The operation that failed.
        op: Op,
        /// What happened (PKCS#11 return value name or a short description).
        reason: String,
    },
    /// No KEK with that label or id on the token.
    #[error("key not found: {0}")]
    KeyNotFound(String),
    /// Authentication of the ciphertext failed (tampered IV, ciphertext, tag or AAD, or the
    /// wrong key), or it is malformed.
    #[error("invalid ciphertext: authentication failed or malformed input")]
    InvalidCiphertext,
    /// The token refused the PIN. Not retried automatically: a retry loop locks real tokens.
    #[error("PIN incorrect for token {token}")]
    PinIncorrect {
        /// Token label or serial as configured.
        token: String,
    },
    /// The PIN is locked or expired on the token; an operator must reset it.
    #[error("PIN locked or expired for token {token}")]
    PinLocked {
        /// Token label or serial as configured.
        token: String,
    },
    /// The token does not support a mechanism or parameter we need.
    #[error("unsupported by the HSM during {op}: {reason}")]
    UnsupportedMechanism {
        /// The operation that failed.
        op: Op,
        /// PKCS#11 return value name.
        reason: String,
    },
    /// The caller's input was rejected before or by the HSM (size, format).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The configuration cannot work (missing PIN file, empty PIN, bad module path...).
    #[error("configuration error: {0}")]
    Config(String),
    /// Anything else: a bug or an HSM answer we do not understand.
    #[error("HSM internal error during {op}: {reason}")]
    Internal {
        /// The operation that failed.
        op: Op,
        /// PKCS#11 return value name or a short description.
        reason: String,
    },
}

/// The kind of an [`Error`], for matching and for mapping to gRPC codes at the edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// See [`Error::Unavailable`].
    Unavailable,
    /// See [`Error::KeyNotFound`].
    KeyNotFound,
    /// See [`Error::InvalidCiphertext`].
    InvalidCiphertext,
    /// See [`Error::PinIncorrect`].
    PinIncorrect,
    /// See [`Error::PinLocked`].
    PinLocked,
    /// See [`Error::UnsupportedMechanism`].
    UnsupportedMechanism,
    /// See [`Error::InvalidInput`].
    InvalidInput,
    /// See [`Error::Config`].
    Config,
    /// See [`Error::Internal`].
    Internal,
}

impl Error {
    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Unavailable { .. } => ErrorKind::Unavailable,
            Error::KeyNotFound(_) => ErrorKind::KeyNotFound,
            Error::InvalidCiphertext => ErrorKind::InvalidCiphertext,
            Error::PinIncorrect { .. } => ErrorKind::PinIncorrect,
            Error::PinLocked { .. } => ErrorKind::PinLocked,
            Error::UnsupportedMechanism { .. } => ErrorKind::UnsupportedMechanism,
            Error::InvalidInput(_) => ErrorKind::InvalidInput,
            Error::Config(_) => ErrorKind::Config,
            Error::Internal { .. } => ErrorKind::Internal,
        }
    }

    /// True when the same call may succeed later without anyone changing anything.
    pub fn is_retryable(&self) -> bool {
        self.kind() == ErrorKind::Unavailable
    }

    pub(crate) fn unavailable(op: Op, reason: impl Into<String>) -> Self {
        Error::Unavailable {
            op,
            reason: reason.into(),
        }
    }

    pub(crate) fn internal(op: Op, reason: impl Into<String>) -> Self {
        Error::Internal {
            op,
            reason: reason.into(),
        }
    }
}

/// The HSM operation an error happened in (for messages and classification).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Loading or initialising the PKCS#11 module.
    Initialize,
    /// Finding the token and opening sessions.
    OpenSession,
    /// `C_Login`.
    Login,
    /// Generating a KEK.
    GenerateKey,
    /// Searching for or reading KEK objects.
    FindKey,
    /// Destroying a KEK.
    DestroyKey,
    /// AES-GCM encryption.
    Encrypt,
    /// AES-GCM decryption.
    Decrypt,
    /// `C_GenerateRandom`.
    Random,
    /// The health self-test.
    SelfTest,
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Op::Initialize => "initialize",
            Op::OpenSession => "open-session",
            Op::Login => "login",
            Op::GenerateKey => "generate-key",
            Op::FindKey => "find-key",
            Op::DestroyKey => "destroy-key",
            Op::Encrypt => "encrypt",
            Op::Decrypt => "decrypt",
            Op::Random => "random",
            Op::SelfTest => "self-test",
        };
        f.write_str(s)
    }
}
