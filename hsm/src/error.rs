//! The one error type of this crate. An error's message says which operation failed and,
//! in a few words, what went wrong; the PKCS#11 detail (function and `CKR_*` return value)
//! is its typed [`Cause`], reachable through [`std::error::Error::source`] for the log.
//! Neither ever carries a PIN, a plaintext or key bytes.

use std::fmt;
use std::sync::Arc;

use cryptoki::error::{Error as CkError, RvError};

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, in the terms a caller acts on. See [`Error::kind`].
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The HSM, token or session is not usable right now; retrying later may succeed.
    #[error("HSM unavailable during {op}: {what}")]
    Unavailable {
        /// The operation that failed.
        op: Op,
        /// What happened, in a few fixed words.
        what: &'static str,
        /// The underlying failure, for the log.
        #[source]
        cause: Option<Cause>,
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
    /// The PIN is locked, expired or not initialised on the token; an operator must reset it.
    #[error("PIN locked, expired or not initialised for token {token}")]
    PinLocked {
        /// Token label or serial as configured.
        token: String,
    },
    /// The token does not support a mechanism or parameter we need.
    #[error("unsupported by the HSM during {op}: {what}")]
    UnsupportedMechanism {
        /// The operation that failed.
        op: Op,
        /// What happened, in a few fixed words.
        what: &'static str,
        /// The underlying failure, for the log.
        #[source]
        cause: Option<Cause>,
    },
    /// The caller's input was rejected before or by the HSM (size, format).
    #[error("invalid input: {what}")]
    InvalidInput {
        /// What was wrong with it (sizes, labels; never the data).
        what: String,
        /// The HSM's answer, when it was the HSM that refused.
        #[source]
        cause: Option<Cause>,
    },
    /// The configuration cannot work (missing PIN file, empty PIN, bad module path...).
    #[error("configuration error: {what}")]
    Config {
        /// What is wrong (paths and variable names; never a PIN).
        what: String,
        /// The underlying failure (an I/O error, the module loader's), for the log.
        #[source]
        cause: Option<Cause>,
    },
    /// Anything else: a bug or an HSM answer we do not understand.
    #[error("HSM internal error during {op}: {what}")]
    Internal {
        /// The operation that failed.
        op: Op,
        /// What happened, in a few fixed words.
        what: &'static str,
        /// The underlying failure, for the log.
        #[source]
        cause: Option<Cause>,
    },
}

/// The underlying failure of an [`Error`], kept typed for the log. Shared (`Arc`) so that
/// [`Error`] stays `Clone` (the pool hands its last reconnect error to every waiting call).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Cause {
    /// A PKCS#11 function failed (its `CKR_*` return value), or `cryptoki` failed around
    /// it (loading the module, converting a value).
    Pkcs11(Arc<CkError>),
    /// Reading a file (the PIN file).
    Io(Arc<std::io::Error>),
    /// The operating system's random number generator.
    Random(getrandom::Error),
    /// A blocking task that panicked or was cancelled.
    Task(Arc<tokio::task::JoinError>),
    /// No slot holds the configured token (named as configured: label or serial).
    NoSuchToken(crate::TokenSelector),
}

impl Cause {
    /// The `CKR_*` name of the PKCS#11 return value, when the cause is one.
    pub fn return_value(&self) -> Option<String> {
        match self {
            Cause::Pkcs11(e) => match &**e {
                CkError::Pkcs11(rv, _) => Some(ckr_name(*rv)),
                _ => None,
            },
            _ => None,
        }
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cause::Pkcs11(e) => match &**e {
                CkError::Pkcs11(rv, function) => {
                    write!(f, "C_{function:?} returned {}", ckr_name(*rv))
                }
                other => write!(f, "cryptoki: {other}"),
            },
            Cause::Io(e) => write!(f, "{e}"),
            Cause::Random(e) => write!(f, "OS CSPRNG: {e}"),
            Cause::Task(e) => write!(f, "blocking task: {e}"),
            Cause::NoSuchToken(t) => write!(f, "no token with {t} is present"),
        }
    }
}

impl std::error::Error for Cause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        // Each variant's Display already says what its inner error says.
        None
    }
}

impl From<CkError> for Cause {
    fn from(e: CkError) -> Self {
        Cause::Pkcs11(Arc::new(e))
    }
}

impl From<std::io::Error> for Cause {
    fn from(e: std::io::Error) -> Self {
        Cause::Io(Arc::new(e))
    }
}

impl From<getrandom::Error> for Cause {
    fn from(e: getrandom::Error) -> Self {
        Cause::Random(e)
    }
}

impl From<tokio::task::JoinError> for Cause {
    fn from(e: tokio::task::JoinError) -> Self {
        Cause::Task(Arc::new(e))
    }
}

/// `CKR_DEVICE_ERROR` for `RvError::DeviceError`: the spec's name, as operators and vendor
/// documentation spell it.
pub(crate) fn ckr_name(rv: RvError) -> String {
    if let RvError::VendorDefined(code) = rv {
        return format!("CKR_VENDOR_DEFINED({code:#x})");
    }
    let camel = format!("{rv:?}");
    let mut name = String::with_capacity(camel.len() + 12);
    name.push_str("CKR");
    for c in camel.chars() {
        if c.is_ascii_uppercase() {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
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
            Error::InvalidInput { .. } => ErrorKind::InvalidInput,
            Error::Config { .. } => ErrorKind::Config,
            Error::Internal { .. } => ErrorKind::Internal,
        }
    }

    /// True when the token refused the PIN (incorrect, locked, expired, not initialised):
    /// offering the same PIN again can only count towards locking the token.
    pub fn is_pin_refusal(&self) -> bool {
        matches!(self.kind(), ErrorKind::PinIncorrect | ErrorKind::PinLocked)
    }

    /// True when the same call may succeed later without anyone changing anything.
    pub fn is_retryable(&self) -> bool {
        self.kind() == ErrorKind::Unavailable
    }

    /// [`Error::Unavailable`] with no underlying error (a timeout, a closed keystore).
    pub fn unavailable(op: Op, what: &'static str) -> Self {
        Error::Unavailable {
            op,
            what,
            cause: None,
        }
    }

    /// [`Error::Internal`] with no underlying error.
    pub(crate) fn internal(op: Op, what: &'static str) -> Self {
        Error::Internal {
            op,
            what,
            cause: None,
        }
    }

    /// [`Error::Internal`] because of `cause`.
    pub(crate) fn internal_by(op: Op, what: &'static str, cause: impl Into<Cause>) -> Self {
        Error::Internal {
            op,
            what,
            cause: Some(cause.into()),
        }
    }

    /// [`Error::InvalidInput`] found by our own checks.
    pub(crate) fn invalid_input(what: impl Into<String>) -> Self {
        Error::InvalidInput {
            what: what.into(),
            cause: None,
        }
    }

    /// [`Error::Config`] with no underlying error.
    pub(crate) fn config(what: impl Into<String>) -> Self {
        Error::Config {
            what: what.into(),
            cause: None,
        }
    }

    /// [`Error::Config`] because of `cause`.
    pub(crate) fn config_by(what: impl Into<String>, cause: impl Into<Cause>) -> Self {
        Error::Config {
            what: what.into(),
            cause: Some(cause.into()),
        }
    }

    /// Attaches `cause` to a variant that carries one; other variants are returned as they
    /// are (a PIN error, invalid ciphertext: their kind says it all).
    pub(crate) fn with_cause(mut self, c: Cause) -> Self {
        match &mut self {
            Error::Unavailable { cause, .. }
            | Error::UnsupportedMechanism { cause, .. }
            | Error::InvalidInput { cause, .. }
            | Error::Config { cause, .. }
            | Error::Internal { cause, .. } => *cause = Some(c),
            _ => {}
        }
        self
    }

    /// This error and every cause under it, `: `-separated: for logs and operators, never
    /// for a remote client (it names `CKR_*` return values and module paths).
    pub fn chain(&self) -> String {
        error_chain(self)
    }

    /// The underlying failure of this error, if there is one (also its `source()`).
    pub fn cause(&self) -> Option<&Cause> {
        match self {
            Error::Unavailable { cause, .. }
            | Error::UnsupportedMechanism { cause, .. }
            | Error::InvalidInput { cause, .. }
            | Error::Config { cause, .. }
            | Error::Internal { cause, .. } => cause.as_ref(),
            _ => None,
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

/// `e` and every cause under it, `: `-separated: for logs, never for a remote client. Shared
/// by the error types of the crates above this one.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut next = e.source();
    while let Some(c) = next {
        s.push_str(": ");
        s.push_str(&c.to_string());
        next = c.source();
    }
    s
}
