//! How to reach the HSM: module, token, PIN source, pool size, KEK label prefix, and how
//! hard to try when sessions die. Holds no secret itself: the PIN is read from its source
//! at each login, so a rotated PIN file is picked up without a restart.

use std::path::PathBuf;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use crate::error::{Error, Result};

/// Which token to use. Never a slot number: SoftHSM2 and others renumber slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSelector {
    /// `CKA_LABEL` of the token (trailing blanks ignored).
    Label(String),
    /// Serial number of the token.
    Serial(String),
}

impl std::fmt::Display for TokenSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenSelector::Label(l) => write!(f, "label '{l}'"),
            TokenSelector::Serial(s) => write!(f, "serial '{s}'"),
        }
    }
}

/// Where the user PIN comes from. Never argv.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinSource {
    /// A file holding the PIN (one trailing newline is ignored). Re-read at every login.
    File(PathBuf),
    /// The name of an environment variable holding the PIN.
    Env(String),
}

impl PinSource {
    /// Reads the PIN now. Errors name the source, never the content.
    pub fn read(&self) -> Result<SecretString> {
        let raw = match self {
            PinSource::File(path) => std::fs::read_to_string(path).map_err(|e| {
                Error::config_by(format!("cannot read PIN file {}", path.display()), e)
            })?,
            PinSource::Env(var) => std::env::var(var)
                .map_err(|_| Error::config(format!("PIN environment variable {var} is not set")))?,
        };
        let secret = SecretString::from(raw);
        let trimmed = secret.expose_secret().trim_end_matches(['\n', '\r']);
        if trimmed.is_empty() {
            return Err(Error::config(format!("PIN from {self} is empty")));
        }
        Ok(SecretString::from(trimmed.to_owned()))
    }
}

impl std::fmt::Display for PinSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PinSource::File(p) => write!(f, "file {}", p.display()),
            PinSource::Env(v) => write!(f, "environment variable {v}"),
        }
    }
}

/// How the session pool behaves when the HSM misbehaves.
#[derive(Debug, Clone)]
pub struct RecoveryPolicy {
    /// First wait before rebuilding the pool again after a failed rebuild.
    pub initial_backoff: Duration,
    /// Upper bound of the (doubling) wait between rebuild attempts.
    pub max_backoff: Duration,
    /// How many times one call retries after a recoverable session error.
    pub max_retries: u32,
    /// How long one call waits for a free session before failing as unavailable.
    pub checkout_timeout: Duration,
}

impl Default for RecoveryPolicy {
    fn default() -> Self {
        RecoveryPolicy {
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(5),
            max_retries: 3,
            checkout_timeout: Duration::from_secs(2),
        }
    }
}

/// Everything needed to open a [`crate::Keystore`].
#[derive(Debug, Clone)]
pub struct Config {
    /// Path of the PKCS#11 module (e.g. `/usr/lib/softhsm/libsofthsm2.so`).
    pub module: PathBuf,
    /// The token to use.
    pub token: TokenSelector,
    /// Where the user PIN is read from.
    pub pin: PinSource,
    /// Number of sessions in the pool (also the number of HSM calls in flight). At least 1.
    pub pool_size: usize,
    /// Label prefix of the KEKs this keystore manages; other objects are ignored.
    pub kek_label_prefix: String,
    /// Retry and backoff behaviour.
    pub recovery: RecoveryPolicy,
}

impl Config {
    /// Default KEK label prefix.
    pub const DEFAULT_KEK_PREFIX: &'static str = "keyhaven-kek-";
    /// Default pool size.
    pub const DEFAULT_POOL_SIZE: usize = 8;

    /// A config with defaults for everything but module, token and PIN source.
    pub fn new(module: impl Into<PathBuf>, token: TokenSelector, pin: PinSource) -> Self {
        Config {
            module: module.into(),
            token,
            pin,
            pool_size: Self::DEFAULT_POOL_SIZE,
            kek_label_prefix: Self::DEFAULT_KEK_PREFIX.to_owned(),
            recovery: RecoveryPolicy::default(),
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.pool_size == 0 {
            return Err(Error::config("session pool size must be at least 1"));
        }
        if self.kek_label_prefix.is_empty() {
            return Err(Error::config("KEK label prefix must not be empty"));
        }
        if !self.module.exists() {
            return Err(Error::config(format!(
                "PKCS#11 module {} does not exist",
                self.module.display()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_file_trailing_newline_is_trimmed_and_errors_do_not_leak() {
        let dir = std::env::temp_dir().join(format!("kh-pin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("pin");
        std::fs::write(&f, "s3cr3t-pin\n").unwrap();
        let pin = PinSource::File(f.clone()).read().unwrap();
        assert_eq!(pin.expose_secret(), "s3cr3t-pin");
        assert!(!format!("{pin:?}").contains("s3cr3t"));
        std::fs::write(&f, "\n").unwrap();
        let err = PinSource::File(f).read().unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Config);
        let missing = PinSource::File(dir.join("nope")).read().unwrap_err();
        assert_eq!(missing.kind(), crate::ErrorKind::Config);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn missing_env_pin_is_a_config_error() {
        let err = PinSource::Env("KEYHAVEN_TEST_SURELY_UNSET_PIN".into())
            .read()
            .unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Config);
        assert!(err.to_string().contains("KEYHAVEN_TEST_SURELY_UNSET_PIN"));
    }
}
