//! Fault injection for tests, behind the `testing` feature: a *second* PKCS#11 handle in
//! the same process does to the token what a crashing HSM client, a module reload or an
//! operator would do, under a live keystore. Never enabled by the binaries.

use std::path::Path;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Function, Pkcs11};
use cryptoki::error::{Error as CkError, Rv, RvError};

use crate::classify::classify;
use crate::{Config, Error, Op, Result, TokenSelector};

fn ck(e: CkError, op: Op) -> Error {
    classify(e, op, "testing").error
}

fn load(module: &Path) -> Result<Pkcs11> {
    Pkcs11::new(module).map_err(|e| ck(e, Op::Initialize))
}

fn init(p: &Pkcs11) -> Result<()> {
    match p.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(()),
        Err(e) => Err(ck(e, Op::Initialize)),
    }
}

/// The error this crate reports when `C_Encrypt` returns `ck_rv` (the numeric `CKR_*`
/// value, e.g. `0x30` for `CKR_DEVICE_ERROR`) during `op`: for tests of callers that map
/// errors, with a real PKCS#11 cause under it. `ck_rv` must not be `CKR_OK` (0).
pub fn pkcs11_error(op: Op, ck_rv: u64) -> Error {
    match Rv::from(ck_rv).into_result(Function::Encrypt) {
        Err(e) => ck(e, op),
        Ok(()) => Error::internal(op, "CKR_OK is not an error"),
    }
}

/// `C_Finalize` from another handle: every session of this process dies and the module is
/// left uninitialised (the keystore sees `CKR_CRYPTOKI_NOT_INITIALIZED`).
pub fn finalize_module(module: &Path) -> Result<()> {
    let p = load(module)?;
    p.finalize().map_err(|e| ck(e, Op::Initialize))
}

/// `C_Finalize` then `C_Initialize` from another handle: the module is re-initialised, so
/// the keystore's session handles are invalid (`CKR_SESSION_HANDLE_INVALID`).
pub fn reinitialize_module(module: &Path) -> Result<()> {
    finalize_module(module)?;
    let p = load(module)?;
    init(&p)
}

/// `C_Logout` from another session of this process: the token's login state (shared by all
/// sessions of an application) is dropped under the keystore.
pub fn logout_token(cfg: &Config) -> Result<()> {
    let p = load(&cfg.module)?;
    init(&p)?;
    let slots = p
        .get_slots_with_token()
        .map_err(|e| ck(e, Op::OpenSession))?;
    for slot in slots {
        let info = p.get_token_info(slot).map_err(|e| ck(e, Op::OpenSession))?;
        let hit = match &cfg.token {
            TokenSelector::Label(l) => info.label().trim_end() == l,
            TokenSelector::Serial(s) => info.serial_number().trim() == s,
        };
        if hit {
            let s = p
                .open_ro_session(slot)
                .map_err(|e| ck(e, Op::OpenSession))?;
            return s.logout().map_err(|e| ck(e, Op::Login));
        }
    }
    Err(Error::KeyNotFound(format!("token {}", cfg.token)))
}
