//! Errors of the plugin, and the one place they become gRPC statuses. Client errors tell the
//! client what it can act on (key ids, limits); an unavailable or internal failure sends a
//! fixed message and keeps its HSM error as a typed `source`, which only the log sees —
//! never plaintext, PINs, `CKR_*` return values or paths.

use keyhaven_hsm::ErrorKind;

/// What an unavailable HSM tells the client.
pub const HSM_UNAVAILABLE: &str =
    "HSM unavailable: retry with back-off (the plugin's log has the cause)";
/// What an HSM that does not answer in time tells the client.
pub const HSM_TIMEOUT: &str =
    "the HSM did not answer within the plugin's --hsm-timeout: retry with back-off";
/// What a refused or locked PIN tells the client.
pub const HSM_LOGIN: &str =
    "the plugin cannot log in to the HSM (PIN refused or locked): an operator must fix the PIN";
/// What a token without a KEK tells the client.
pub const NO_KEK: &str = "no KEK on the HSM token: run `kms-plugin keys init`";
/// What an internal failure tells the client.
pub const INTERNAL: &str =
    "internal error in the KMS plugin or its HSM: the plugin's log has the details";
/// What a ciphertext that fails authentication tells the client.
pub const BAD_CIPHERTEXT: &str =
    "ciphertext failed authentication (tampered, truncated, or not made with this key_id)";
/// What data the HSM refused tells the client.
pub const HSM_REFUSED_INPUT: &str = "the HSM refused the request's data (size or format)";

/// A request failure, by what the client should do about it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum KmsError {
    /// The request is malformed or the ciphertext fails authentication.
    #[error("{message}")]
    InvalidArgument {
        /// Our text about the request, sent to the client.
        message: String,
        /// The HSM's refusal, when it was the HSM that refused (for the log).
        #[source]
        source: Option<keyhaven_hsm::Error>,
    },
    /// The key_id names no KEK this plugin has (unknown or retired).
    #[error("{0}")]
    NotFound(String),
    /// The HSM is unusable right now; retry later.
    #[error("{what}")]
    Unavailable {
        /// A fixed message, sent to the client.
        what: &'static str,
        /// Why, for the log.
        #[source]
        source: Option<keyhaven_hsm::Error>,
    },
    /// The caller's UID is not allowed on this socket.
    #[error("{0}")]
    PermissionDenied(String),
    /// A bug or an unexpected HSM answer.
    #[error("{what}")]
    Internal {
        /// A fixed message, sent to the client.
        what: &'static str,
        /// Why, for the log.
        #[source]
        source: Option<keyhaven_hsm::Error>,
    },
}

impl KmsError {
    /// A malformed request, in our own words.
    pub fn invalid(message: impl Into<String>) -> Self {
        KmsError::InvalidArgument {
            message: message.into(),
            source: None,
        }
    }

    /// Unavailable with no HSM error under it (no KEK yet, a timeout).
    pub fn unavailable(what: &'static str) -> Self {
        KmsError::Unavailable { what, source: None }
    }

    /// Maps an HSM error met while serving a request.
    pub fn from_hsm(e: &keyhaven_hsm::Error, key_id: &str) -> Self {
        let source = Some(e.clone());
        match e.kind() {
            ErrorKind::InvalidCiphertext => KmsError::InvalidArgument {
                message: BAD_CIPHERTEXT.into(),
                source,
            },
            ErrorKind::KeyNotFound => KmsError::NotFound(format!(
                "key_id {key_id} is not on the HSM token (retired or never created here)"
            )),
            ErrorKind::InvalidInput => KmsError::InvalidArgument {
                message: HSM_REFUSED_INPUT.into(),
                source,
            },
            ErrorKind::Unavailable => KmsError::Unavailable {
                what: HSM_UNAVAILABLE,
                source,
            },
            ErrorKind::PinIncorrect | ErrorKind::PinLocked => KmsError::Unavailable {
                what: HSM_LOGIN,
                source,
            },
            ErrorKind::UnsupportedMechanism | ErrorKind::Config | ErrorKind::Internal => {
                KmsError::Internal {
                    what: INTERNAL,
                    source,
                }
            }
        }
    }

    /// The gRPC code name, for metrics.
    pub fn code(&self) -> tonic::Code {
        match self {
            KmsError::InvalidArgument { .. } => tonic::Code::InvalidArgument,
            KmsError::NotFound(_) => tonic::Code::NotFound,
            KmsError::Unavailable { .. } => tonic::Code::Unavailable,
            KmsError::PermissionDenied(_) => tonic::Code::PermissionDenied,
            KmsError::Internal { .. } => tonic::Code::Internal,
        }
    }

    /// The error and every cause under it, `: `-separated (for the log only).
    pub fn chain(&self) -> String {
        keyhaven_hsm::error_chain(self)
    }
}

/// The one mapping from a plugin failure to what the client sees. The whole cause chain goes
/// to the log here; the client gets our own text about its request, or for an unavailable or
/// internal failure a fixed message that says what to do — never the cause.
impl From<KmsError> for tonic::Status {
    fn from(e: KmsError) -> Self {
        let code = e.code();
        match &e {
            KmsError::Unavailable { .. } => {
                tracing::warn!(?code, error = %e.chain(), "request failed: unavailable");
            }
            KmsError::Internal { .. } => {
                tracing::error!(?code, error = %e.chain(), "request failed: internal error");
            }
            _ => tracing::debug!(?code, error = %e.chain(), "request refused"),
        }
        tonic::Status::new(code, e.to_string())
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
    /// An abstract socket without a peer-UID allow-list: it has no file permissions, so any
    /// process in the network namespace could call the plugin.
    #[error(
        "--listen {0} is an abstract socket, which has no file permissions: every process in \
         the node's network namespace (every hostNetwork pod) could call Decrypt. Set \
         --allow-uid (KEYHAVEN_ALLOW_UIDS) to the kube-apiserver's UID (0 with kubeadm), or \
         listen on a socket file (unix:///path/kms.sock)"
    )]
    AbstractSocketWithoutAllowList(String),
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

#[cfg(test)]
mod tests {
    use super::*;
    use keyhaven_hsm::testing::pkcs11_error;
    use keyhaven_hsm::Op;
    use tonic::Code;

    // Numeric CKR_* values (PKCS#11 v2.40, pkcs11t.h).
    const CKR_DEVICE_ERROR: u64 = 0x30;
    const CKR_DATA_LEN_RANGE: u64 = 0x21;
    const CKR_MECHANISM_INVALID: u64 = 0x70;
    const CKR_PIN_INCORRECT: u64 = 0xA0;
    const CKR_ATTRIBUTE_SENSITIVE: u64 = 0x11;
    const CKR_ENCRYPTED_DATA_INVALID: u64 = 0x40;

    /// The status the client gets for an HSM error whose cause is `ck_rv`, after checking
    /// the cause is really there (in the log's chain) and nowhere in the client's message.
    fn status(op: Op, ck_rv: u64) -> tonic::Status {
        let hsm = pkcs11_error(op, ck_rv);
        let cause = std::error::Error::source(&hsm)
            .map(|c| c.to_string())
            .unwrap_or_default();
        let e = KmsError::from_hsm(&hsm, "keyhaven-kek-v1-00");
        if !cause.is_empty() {
            assert!(e.chain().contains(&cause), "the log chain keeps the cause");
        }
        let st = tonic::Status::from(e);
        assert!(!st.message().contains("CKR_"), "{}", st.message());
        assert!(!st.message().contains("C_Encrypt"), "{}", st.message());
        assert!(cause.is_empty() || !st.message().contains(&cause));
        st
    }

    #[test]
    fn unavailable_hsm_sends_the_fixed_message() {
        let st = status(Op::Encrypt, CKR_DEVICE_ERROR);
        assert_eq!(st.code(), Code::Unavailable);
        assert_eq!(st.message(), HSM_UNAVAILABLE);
    }

    #[test]
    fn refused_pin_is_unavailable_with_the_login_message() {
        let st = status(Op::Encrypt, CKR_PIN_INCORRECT);
        assert_eq!(st.code(), Code::Unavailable);
        assert_eq!(st.message(), HSM_LOGIN);
    }

    #[test]
    fn internal_and_unsupported_send_the_fixed_message() {
        for rv in [CKR_MECHANISM_INVALID, CKR_ATTRIBUTE_SENSITIVE] {
            let st = status(Op::Encrypt, rv);
            assert_eq!(st.code(), Code::Internal);
            assert_eq!(st.message(), INTERNAL);
        }
    }

    #[test]
    fn refused_data_and_bad_ciphertext_are_invalid_argument() {
        let st = status(Op::Encrypt, CKR_DATA_LEN_RANGE);
        assert_eq!(st.code(), Code::InvalidArgument);
        assert_eq!(st.message(), HSM_REFUSED_INPUT);
        let st = status(Op::Decrypt, CKR_ENCRYPTED_DATA_INVALID);
        assert_eq!(st.code(), Code::InvalidArgument);
        assert_eq!(st.message(), BAD_CIPHERTEXT);
    }

    #[test]
    fn missing_key_names_the_key_id_only() {
        let e = KmsError::from_hsm(
            &keyhaven_hsm::Error::KeyNotFound("KEK id 00".into()),
            "keyhaven-kek-v1-00",
        );
        let st = tonic::Status::from(e);
        assert_eq!(st.code(), Code::NotFound);
        assert_eq!(
            st.message(),
            "key_id keyhaven-kek-v1-00 is not on the HSM token (retired or never created here)"
        );
    }

    #[test]
    fn a_timeout_sends_the_fixed_message() {
        let st = tonic::Status::from(KmsError::unavailable(HSM_TIMEOUT));
        assert_eq!(st.code(), Code::Unavailable);
        assert_eq!(st.message(), HSM_TIMEOUT);
    }
}
