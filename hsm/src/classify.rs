//! The one place that decides what a PKCS#11 return value means for us: which error kind
//! the caller sees, and what the session pool must do to recover.

use cryptoki::error::{Error as CkError, RvError};

use crate::error::{Error, Op};

/// What the session pool must do before the operation can be tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Recovery {
    /// Nothing: the error is about the request, not the session.
    None,
    /// Cached object handles may be stale: look keys up again.
    RefreshHandles,
    /// The token logged us out: log in again (sessions are still valid).
    Relogin,
    /// Sessions are gone (device removed, handles invalid): open new ones and log in.
    Reopen,
    /// The module was finalised under us: `C_Initialize` again, then reopen.
    Reinitialize,
}

/// The outcome of [`classify`]: the error to report and the recovery to attempt.
#[derive(Debug, Clone)]
pub(crate) struct Classified {
    pub(crate) error: Error,
    pub(crate) recovery: Recovery,
    /// A failed tag check is `CKR_GENERAL_ERROR` on some modules (SoftHSM2 2.6): the caller
    /// must check the session is healthy before reporting it as invalid ciphertext.
    pub(crate) ambiguous_decrypt_failure: bool,
}

/// Classifies a `cryptoki` error raised during `op`. `token` names the token for PIN errors.
pub(crate) fn classify(err: &CkError, op: Op, token: &str) -> Classified {
    let rv = match err {
        CkError::Pkcs11(rv, _) => *rv,
        CkError::LibraryLoading(e) => {
            return plain(Error::Config(format!("cannot load PKCS#11 module: {e}")))
        }
        CkError::NullFunctionPointer | CkError::MissingSymbol(_) | CkError::NotSupported => {
            return plain(Error::UnsupportedMechanism {
                op,
                reason: err.to_string(),
            })
        }
        other => return plain(Error::internal(op, other.to_string())),
    };
    classify_rv(rv, op, token)
}

fn plain(error: Error) -> Classified {
    Classified {
        error,
        recovery: Recovery::None,
        ambiguous_decrypt_failure: false,
    }
}

fn unavailable(op: Op, rv: RvError, recovery: Recovery) -> Classified {
    Classified {
        error: Error::unavailable(op, rv_name(rv)),
        recovery,
        ambiguous_decrypt_failure: false,
    }
}

pub(crate) fn classify_rv(rv: RvError, op: Op, token: &str) -> Classified {
    use RvError as R;
    match rv {
        R::CryptokiNotInitialized => unavailable(op, rv, Recovery::Reinitialize),
        R::SessionHandleInvalid
        | R::SessionClosed
        | R::DeviceRemoved
        | R::DeviceError
        | R::DeviceMemory
        | R::TokenNotPresent
        | R::TokenNotRecognized
        | R::SlotIdInvalid => unavailable(op, rv, Recovery::Reopen),
        R::UserNotLoggedIn => unavailable(op, rv, Recovery::Relogin),
        R::KeyHandleInvalid | R::ObjectHandleInvalid => {
            unavailable(op, rv, Recovery::RefreshHandles)
        }
        R::FunctionCanceled | R::HostMemory | R::FunctionFailed | R::CantLock | R::SessionCount => {
            unavailable(op, rv, Recovery::None)
        }
        R::EncryptedDataInvalid | R::EncryptedDataLenRange if op == Op::Decrypt => {
            plain(Error::InvalidCiphertext)
        }
        R::GeneralError if op == Op::Decrypt => Classified {
            error: Error::InvalidCiphertext,
            recovery: Recovery::None,
            ambiguous_decrypt_failure: true,
        },
        R::GeneralError => unavailable(op, rv, Recovery::Reopen),
        R::PinIncorrect | R::PinInvalid | R::PinLenRange => plain(Error::PinIncorrect {
            token: token.to_owned(),
        }),
        R::PinLocked | R::PinExpired => plain(Error::PinLocked {
            token: token.to_owned(),
        }),
        R::MechanismInvalid
        | R::MechanismParamInvalid
        | R::FunctionNotSupported
        | R::KeySizeRange
        | R::KeyTypeInconsistent
        | R::KeyFunctionNotPermitted
        | R::TemplateInconsistent
        | R::AttributeValueInvalid
        | R::AttributeTypeInvalid => plain(Error::UnsupportedMechanism {
            op,
            reason: rv_name(rv),
        }),
        R::DataLenRange | R::DataInvalid | R::ArgumentsBad => {
            plain(Error::InvalidInput(format!("{op}: {}", rv_name(rv))))
        }
        _ => plain(Error::internal(op, rv_name(rv))),
    }
}

/// `CKR_*`-style name of a return value, for messages.
pub(crate) fn rv_name(rv: RvError) -> String {
    format!("{rv:?}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    fn kind(rv: RvError, op: Op) -> (ErrorKind, Recovery) {
        let c = classify_rv(rv, op, "t");
        (c.error.kind(), c.recovery)
    }

    #[test]
    fn session_problems_are_retryable_with_the_right_recovery() {
        use ErrorKind::Unavailable as U;
        assert_eq!(
            kind(RvError::SessionHandleInvalid, Op::Encrypt),
            (U, Recovery::Reopen)
        );
        assert_eq!(
            kind(RvError::DeviceRemoved, Op::Decrypt),
            (U, Recovery::Reopen)
        );
        assert_eq!(
            kind(RvError::TokenNotPresent, Op::FindKey),
            (U, Recovery::Reopen)
        );
        assert_eq!(
            kind(RvError::UserNotLoggedIn, Op::Encrypt),
            (U, Recovery::Relogin)
        );
        assert_eq!(
            kind(RvError::CryptokiNotInitialized, Op::Random),
            (U, Recovery::Reinitialize)
        );
        assert_eq!(
            kind(RvError::KeyHandleInvalid, Op::Encrypt),
            (U, Recovery::RefreshHandles)
        );
    }

    #[test]
    fn tag_failures_are_invalid_ciphertext_only_when_decrypting() {
        assert_eq!(
            kind(RvError::EncryptedDataInvalid, Op::Decrypt),
            (ErrorKind::InvalidCiphertext, Recovery::None)
        );
        let c = classify_rv(RvError::GeneralError, Op::Decrypt, "t");
        assert_eq!(c.error.kind(), ErrorKind::InvalidCiphertext);
        assert!(c.ambiguous_decrypt_failure);
        assert_eq!(
            kind(RvError::GeneralError, Op::Encrypt),
            (ErrorKind::Unavailable, Recovery::Reopen)
        );
    }

    #[test]
    fn pin_errors_are_never_retryable() {
        for rv in [
            RvError::PinIncorrect,
            RvError::PinInvalid,
            RvError::PinLenRange,
        ] {
            let c = classify_rv(rv, Op::Login, "tok");
            assert_eq!(c.error.kind(), ErrorKind::PinIncorrect);
            assert_eq!(c.recovery, Recovery::None);
            assert!(!c.error.is_retryable());
        }
        assert_eq!(kind(RvError::PinLocked, Op::Login).0, ErrorKind::PinLocked);
    }

    #[test]
    fn other_classes() {
        assert_eq!(
            kind(RvError::MechanismInvalid, Op::Encrypt).0,
            ErrorKind::UnsupportedMechanism
        );
        assert_eq!(
            kind(RvError::DataLenRange, Op::Encrypt).0,
            ErrorKind::InvalidInput
        );
        assert_eq!(
            kind(RvError::AttributeSensitive, Op::FindKey).0,
            ErrorKind::Internal
        );
    }
}
