//! `keyhaven-hsm`: the one Keyhaven crate that talks PKCS#11 (through `cryptoki`).
//!
//! It loads a PKCS#11 module, selects a token by label or serial (never by slot number),
//! logs in with a PIN read from a file or an environment variable, and keeps a fixed pool
//! of sessions. On top of that it offers what the rest of Keyhaven needs from an HSM:
//! AES-256 key-encryption keys (KEKs) that never leave the token, AES-GCM encryption and
//! decryption *inside* the HSM, random bytes, and a health self-test. When sessions die
//! (device removed, module re-initialised, token logged out) the pool rebuilds itself and
//! logs in again with backoff; a PIN the token refused is never offered again ([`login`]).
//!
//! It is not a general PKCS#11 wrapper: no asymmetric keys, no key export.
//!
//! With the `cli` feature, `cli::HsmAccessArgs` is the one definition of the module, token and
//! PIN flags of the binaries.
//!
//! [`Keystore`] is the async face (calls run on tokio's blocking pool, bounded by the
//! session-pool size); [`BlockingKeystore`] is the same thing for threads and CLIs.
#![forbid(unsafe_code)]

mod admin;
mod classify;
#[cfg(feature = "cli")]
pub mod cli;
mod config;
mod error;
mod kek;
mod keystore;
pub mod login;
pub mod login_metrics;
#[cfg(feature = "testing")]
pub mod testing;

pub use admin::{init_token, token_serial};
pub use config::{Config, PinSource, RecoveryPolicy, TokenSelector};
pub use error::Op;
pub use error::{error_chain, Cause, Error, ErrorKind, Result};
pub use kek::KEK_ID_LEN;
pub use kek::{KekId, KekInfo};
pub use keystore::{
    process_login_attempts, BlockingKeystore, Keystore, Reencrypt, Sealed, SelfTestReport, Stats,
    GCM_IV_LEN, GCM_TAG_LEN, MAX_AAD_LEN, MAX_PLAINTEXT_LEN,
};
