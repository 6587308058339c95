//! Token administration for development and tests (SoftHSM2): initialise a token in a free
//! slot, read a token's serial number. Production HSMs are initialised with their vendor's
//! tools.

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

/// The serial number of the initialised token labelled `label`, as the module reports it
/// (`CK_TOKEN_INFO.serialNumber`, padding trimmed).
///
/// If the module was not initialised in this process, it is initialised for the lookup and
/// finalised again, so the process is left as it was. SoftHSM2 reads `SOFTHSM2_CONF` at
/// that initialisation: the answer comes from the token directory that variable names then.
pub fn token_serial(module: &Path, label: &str) -> Result<String> {
    let name = format!("label '{label}'");
    let p = Pkcs11::new(module).map_err(|e| cannot_load(module, e))?;
    let ours = match p.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) => true,
        Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => false,
        Err(e) => return Err(classify(e, Op::Initialize, &name).error),
    };
    let serial = find_serial(&p, label, &name);
    if ours {
        if let Err(e) = p.finalize() {
            tracing::debug!(error = %e, "C_Finalize after reading a token serial failed");
        }
    }
    serial
}

fn find_serial(p: &Pkcs11, label: &str, name: &str) -> Result<String> {
    let ck = |e: CkError| classify(e, Op::OpenSession, name).error;
    for slot in p.get_slots_with_token().map_err(ck)? {
        let info = p.get_token_info(slot).map_err(ck)?;
        if info.token_initialized() && info.label().trim_end() == label {
            return Ok(info.serial_number().trim().to_owned());
        }
    }
    Err(Error::KeyNotFound(format!("token {name}")))
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
