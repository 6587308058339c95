//! The one place that decides what a PKCS#11 return value means for us: which error kind
//! the caller sees, and what the session pool must do to recover.

use cryptoki::error::{Error as CkError, RvError};

use crate::error::{Cause, Error, Op};

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
/// The error keeps `err` as its [`Cause`] (see [`Error::source`](std::error::Error::source)).
pub(crate) fn classify(err: CkError, op: Op, token: &str) -> Classified {
    let mut c = match &err {
        CkError::Pkcs11(rv, _) => classify_rv(*rv, op, token),
        CkError::LibraryLoading(_) => plain(Error::config("cannot load the PKCS#11 module")),
        CkError::NullFunctionPointer | CkError::MissingSymbol(_) | CkError::NotSupported => {
            plain(Error::UnsupportedMechanism {
                op,
                what: "function not provided by the PKCS#11 module",
                cause: None,
            })
        }
        _ => plain(Error::internal(
            op,
            "unexpected failure in the PKCS#11 layer",
        )),
    };
    c.error = c.error.with_cause(Cause::from(err));
    c
}

fn plain(error: Error) -> Classified {
    Classified {
        error,
        recovery: Recovery::None,
        ambiguous_decrypt_failure: false,
    }
}

fn unavailable(op: Op, what: &'static str, recovery: Recovery) -> Classified {
    Classified {
        error: Error::unavailable(op, what),
        recovery,
        ambiguous_decrypt_failure: false,
    }
}

/// The error kind and recovery a return value means; the caller attaches the cause.
fn classify_rv(rv: RvError, op: Op, token: &str) -> Classified {
    use RvError as R;
    match rv {
        R::CryptokiNotInitialized => {
            unavailable(op, "PKCS#11 module not initialised", Recovery::Reinitialize)
        }
        R::SessionHandleInvalid
        | R::SessionClosed
        | R::DeviceRemoved
        | R::DeviceError
        | R::DeviceMemory
        | R::TokenNotPresent
        | R::TokenNotRecognized
        | R::SlotIdInvalid => unavailable(op, "session, device or token lost", Recovery::Reopen),
        R::UserNotLoggedIn => unavailable(op, "token logged out", Recovery::Relogin),
        R::KeyHandleInvalid | R::ObjectHandleInvalid => {
            unavailable(op, "stale object handle", Recovery::RefreshHandles)
        }
        R::FunctionCanceled | R::HostMemory | R::FunctionFailed | R::CantLock | R::SessionCount => {
            unavailable(op, "the HSM could not serve the call", Recovery::None)
        }
        R::EncryptedDataInvalid | R::EncryptedDataLenRange if op == Op::Decrypt => {
            plain(Error::InvalidCiphertext)
        }
        R::GeneralError if op == Op::Decrypt => Classified {
            error: Error::InvalidCiphertext,
            recovery: Recovery::None,
            ambiguous_decrypt_failure: true,
        },
        R::GeneralError => unavailable(op, "general error in the HSM", Recovery::Reopen),
        R::PinIncorrect | R::PinInvalid | R::PinLenRange => plain(Error::PinIncorrect {
            token: token.to_owned(),
        }),
        R::PinLocked | R::PinExpired | R::UserPinNotInitialized => plain(Error::PinLocked {
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
            what: "mechanism, key type or attribute not supported",
            cause: None,
        }),
        R::DataLenRange | R::DataInvalid | R::ArgumentsBad => plain(Error::invalid_input(format!(
            "{op}: the HSM refused the data's size or format"
        ))),
        _ => plain(Error::internal(op, "unexpected PKCS#11 return value")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use cryptoki::context::Function;
    use std::error::Error as _;

    fn ck(rv: RvError) -> CkError {
        CkError::Pkcs11(rv, Function::Encrypt)
    }

    fn kind(rv: RvError, op: Op) -> (ErrorKind, Recovery) {
        let c = classify(ck(rv), op, "t");
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
        let c = classify(ck(RvError::GeneralError), Op::Decrypt, "t");
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
            let c = classify(ck(rv), Op::Login, "tok");
            assert_eq!(c.error.kind(), ErrorKind::PinIncorrect);
            assert_eq!(c.recovery, Recovery::None);
            assert!(!c.error.is_retryable());
        }
        for rv in [
            RvError::PinLocked,
            RvError::PinExpired,
            RvError::UserPinNotInitialized,
        ] {
            let c = classify(ck(rv), Op::Login, "tok");
            assert_eq!(c.error.kind(), ErrorKind::PinLocked);
            assert!(c.error.is_pin_refusal());
            assert_eq!(c.recovery, Recovery::None);
        }
        assert!(!classify(ck(RvError::DeviceError), Op::Login, "t")
            .error
            .is_pin_refusal());
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

    #[test]
    fn the_message_says_what_and_the_cause_says_which_return_value() {
        let c = classify(ck(RvError::DeviceError), Op::Encrypt, "t");
        let e = c.error;
        assert_eq!(
            e.to_string(),
            "HSM unavailable during encrypt: session, device or token lost"
        );
        let cause = e.source().expect("a cause");
        assert_eq!(cause.to_string(), "C_Encrypt returned CKR_DEVICE_ERROR");
        assert_eq!(
            e.cause().and_then(Cause::return_value).as_deref(),
            Some("CKR_DEVICE_ERROR")
        );
        // Clone keeps the cause (the pool hands its last error to every waiting call).
        assert_eq!(
            e.clone().source().map(|c| c.to_string()),
            Some(cause.to_string())
        );

        let e = classify(ck(RvError::DataLenRange), Op::Encrypt, "t").error;
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(!e.to_string().contains("CKR_"), "{e}");
        assert!(e.source().is_some());
    }

    #[test]
    fn return_value_names_are_the_specs() {
        use crate::error::ckr_name;
        assert_eq!(ckr_name(RvError::UserNotLoggedIn), "CKR_USER_NOT_LOGGED_IN");
        assert_eq!(
            ckr_name(RvError::CryptokiNotInitialized),
            "CKR_CRYPTOKI_NOT_INITIALIZED"
        );
        assert_eq!(ckr_name(RvError::PinLenRange), "CKR_PIN_LEN_RANGE");
        assert_eq!(
            ckr_name(RvError::VendorDefined(0x8000_0001)),
            "CKR_VENDOR_DEFINED(0x80000001)"
        );
    }
}
