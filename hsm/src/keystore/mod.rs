//! The keystore: one loaded PKCS#11 module, one token, a fixed pool of sessions that
//! rebuilds itself when the HSM drops them, and the operations Keyhaven needs.
//!
//! Locking: one mutex guards the pool state (module, idle sessions, handle cache); HSM
//! operations run outside it, each on a session checked out of the pool. A `Session` is
//! `Send` but not `Sync`, so a session is only ever used by the thread that checked it out.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Semaphore;
use zeroize::Zeroizing;

use crate::classify::{classify, Recovery};
use crate::config::{Config, TokenSelector};
use crate::error::Op;
use crate::error::{Cause, Error, Result};
use crate::kek::{self, KekId, KekInfo, KEK_ID_LEN};

/// Length of the AES-GCM IV (96 bits).
pub const GCM_IV_LEN: usize = 12;
/// Length of the AES-GCM tag (128 bits), appended to the ciphertext.
pub const GCM_TAG_LEN: usize = 16;
/// Largest plaintext accepted in one call (single-part HSM operation).
pub const MAX_PLAINTEXT_LEN: usize = 64 * 1024;
/// Largest AAD accepted in one call.
pub const MAX_AAD_LEN: usize = 4 * 1024;

/// Login attempts made by every keystore in this process (tests use it to prove a wrong PIN
/// is not retried).
static PROCESS_LOGIN_ATTEMPTS: AtomicU64 = AtomicU64::new(0);

/// Number of `C_Login` calls made by all keystores of this process so far.
pub fn process_login_attempts() -> u64 {
    PROCESS_LOGIN_ATTEMPTS.load(Ordering::Relaxed)
}

/// The result of an in-HSM AES-GCM encryption: the IV and `ciphertext ‖ tag`.
#[derive(Clone, PartialEq, Eq)]
pub struct Sealed {
    /// The 96-bit IV, drawn from a CSPRNG for every encryption.
    pub iv: [u8; GCM_IV_LEN],
    /// Ciphertext followed by the 16-byte tag.
    pub ciphertext: Vec<u8>,
}

impl std::fmt::Debug for Sealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealed")
            .field("iv_len", &self.iv.len())
            .field("ciphertext_len", &self.ciphertext.len())
            .finish()
    }
}

/// One item of [`Keystore::reencrypt_many`]: something encrypted under one KEK, to be
/// encrypted under another with the same AAD.
#[derive(Debug, Clone)]
pub struct Reencrypt {
    /// The KEK it is encrypted with now.
    pub from: KekId,
    /// Its additional authenticated data.
    pub aad: Vec<u8>,
    /// Its IV.
    pub iv: Vec<u8>,
    /// `ciphertext ‖ tag`.
    pub ciphertext: Vec<u8>,
}

/// Outcome of a passed [`BlockingKeystore::self_test`].
#[derive(Debug, Clone)]
pub struct SelfTestReport {
    /// The KEK used for the encrypt/decrypt probe, if the token holds one.
    pub kek: Option<KekId>,
    /// How long the whole probe took.
    pub latency: Duration,
}

/// Counters describing the pool, for metrics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// `C_Login` calls made by this keystore.
    pub login_attempts: u64,
    /// Successful pool rebuilds after the first connection.
    pub rebuilds: u64,
    /// Pool generation: bumps every time the sessions are thrown away.
    pub generation: u64,
    /// Whether the pool currently holds a logged-in module.
    pub connected: bool,
    /// Sessions currently open in the pool (idle + in use), not counting the login session.
    pub open_sessions: usize,
}

/// A failure inside an operation: either a PKCS#11 error to classify, or one of ours.
pub(crate) enum Failure {
    Ck(CkError, Op),
    Ours(Error),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Ours(e)
    }
}

struct Module {
    slot: Slot,
    /// Kept open for the whole generation so the login state lasts.
    login_session: Session,
}

struct PoolState {
    module: Option<Module>,
    generation: u64,
    idle: Vec<Session>,
    /// Pool sessions of the current generation (idle + checked out).
    open: usize,
    next_attempt: Option<Instant>,
    backoff: Duration,
    last_error: Option<Error>,
    /// The PIN the token last refused: never offered again until the source changes.
    failed_pin: Option<SecretString>,
    handles: HashMap<KekId, ObjectHandle>,
}

struct Checkout {
    session: Session,
    generation: u64,
}

/// The synchronous keystore. Every method blocks the calling thread on the HSM; use
/// [`Keystore`] from async code.
pub struct BlockingKeystore {
    cfg: Config,
    token_name: String,
    pkcs11: Pkcs11,
    state: Mutex<PoolState>,
    returned: Condvar,
    login_attempts: AtomicU64,
    rebuilds: AtomicU64,
}

mod crypt;
mod keks;
mod keystore_async;
mod pool;

pub use keystore_async::Keystore;
use pool::*;
