//! Token administration for development and tests (SoftHSM2): initialise a token in a free
//! slot. Production HSMs are initialised with their vendor's tools.

use std::path::Path;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::UserType;
use secrecy::SecretString;

use crate::classify::classify;
use crate::error::Op;
use crate::error::{Error, Result};

/// Initialises the first uninitialised token of `module` with `label`, sets its SO PIN and
/// user PIN. Fails if a token with that label already exists.
pub fn init_token(
    module: &Path,
    label: &str,
    so_pin: &SecretString,
    user_pin: &SecretString,
) -> Result<()> {
    let name = format!("label '{label}'");
    let ck = |e: CkError, op: Op| classify(e, op, &name).error;
    let p = load(module, &name)?;
    let slots = p
        .get_slots_with_token()
        .map_err(|e| ck(e, Op::OpenSession))?;
    let mut free = None;
    for slot in slots {
        let info = p.get_token_info(slot).map_err(|e| ck(e, Op::OpenSession))?;
        if info.token_initialized() && info.label().trim_end() == label {
            return Err(Error::invalid_input(format!(
                "a token labelled '{label}' already exists"
            )));
        }
        if !info.token_initialized() && free.is_none() {
            free = Some(slot);
        }
    }
    let slot = free.ok_or_else(|| {
        Error::unavailable(Op::OpenSession, "no slot with an uninitialised token")
    })?;
    p.init_token(slot, so_pin, label)
        .map_err(|e| ck(e, Op::Initialize))?;
    // SoftHSM2 moves a freshly initialised token to a new slot: find it again by label.
    let slot = p
        .get_slots_with_token()
        .map_err(|e| ck(e, Op::OpenSession))?
        .into_iter()
        .find(|s| {
            p.get_token_info(*s)
                .map(|i| i.token_initialized() && i.label().trim_end() == label)
                .unwrap_or(false)
        })
        .ok_or_else(|| Error::internal(Op::Initialize, "initialised token not found"))?;
    let session = p
        .open_rw_session(slot)
        .map_err(|e| ck(e, Op::OpenSession))?;
    session
        .login(UserType::So, Some(so_pin))
        .map_err(|e| ck(e, Op::Login))?;
    session.init_pin(user_pin).map_err(|e| ck(e, Op::Login))?;
    session.logout().map_err(|e| ck(e, Op::Login))?;
    Ok(())
}

/// Loads `module` and initialises it for this process (`CKR_CRYPTOKI_ALREADY_INITIALIZED`
/// is fine: another handle of the process got there first).
fn load(module: &Path, token: &str) -> Result<Pkcs11> {
    let p = Pkcs11::new(module).map_err(|e| cannot_load(module, e))?;
    match p.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(p),
        Err(e) => Err(classify(e, Op::Initialize, token).error),
    }
}

fn cannot_load(module: &Path, e: CkError) -> Error {
    Error::config_by(
        format!("cannot load the PKCS#11 module {}", module.display()),
        e,
    )
}
