//! Opening a keystore in a long-running process without ever offering a refused PIN twice.
//!
//! Real HSMs lock the user PIN after a few failed `C_Login`s, and a token is often shared (the
//! KMS plugin and the broker in the shipped manifests). A process that exits on a refused PIN
//! and is restarted by its supervisor makes one failed login per restart until the token
//! locks. [`open_when_pin_accepted`] instead keeps the process up: it reports why it is not
//! ready in a [`LoginStatus`] (for `/readyz`, gRPC health and metrics) and tries again only
//! when the PIN source holds a *different* PIN: the PIN file is read every
//! [`PIN_SOURCE_POLL`] (content compared, so a Kubernetes Secret volume's symlink swap is
//! seen), or at once on [`LoginStatus::recheck_now`] (the binaries call it on SIGHUP). The
//! refused PIN is handed to the keystore itself, which refuses to offer it, so even a PIN
//! file that changes back to the refused PIN between two reads is never offered again.
//!
//! An environment variable cannot change inside a running process: with a PIN from the
//! environment, a refused PIN needs a restart with a corrected variable (one login per
//! restart an operator makes, not a loop).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use crate::config::Config;
use crate::error::{Error, Op, Result};
use crate::keystore::{BlockingKeystore, Keystore};

/// How often the PIN source is read again while the token refuses its PIN.
pub const PIN_SOURCE_POLL: Duration = Duration::from_secs(1);
/// Longest wait between two attempts while the HSM is unreachable at start.
pub const MAX_START_BACKOFF: Duration = Duration::from_secs(30);

/// Where a process stands in logging in to its token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginState {
    /// Logging in (not tried yet, or trying now).
    Starting,
    /// The token refused the PIN; waiting for the PIN source to change.
    PinRefused {
        /// The refusal in a few words (never the PIN).
        reason: String,
    },
    /// The PIN source cannot be read (missing file, empty PIN); waiting for it.
    PinUnreadable {
        /// Why, naming the source (never the PIN).
        reason: String,
    },
    /// The HSM cannot be reached; trying again with back-off.
    Unavailable {
        /// Why.
        reason: String,
    },
    /// Logged in: the keystore is open.
    LoggedIn,
}

/// The login state of a process, shared between the login task and the health endpoints.
#[derive(Debug)]
pub struct LoginStatus {
    state: RwLock<LoginState>,
    pin_source_checks: AtomicU64,
    recheck: tokio::sync::Notify,
}

impl Default for LoginStatus {
    fn default() -> Self {
        LoginStatus {
            state: RwLock::new(LoginState::Starting),
            pin_source_checks: AtomicU64::new(0),
            recheck: tokio::sync::Notify::new(),
        }
    }
}

impl LoginStatus {
    /// The current state.
    pub fn state(&self) -> LoginState {
        self.state.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// `None` once logged in, else why not, for `/readyz` and logs.
    pub fn not_ready_reason(&self) -> Option<String> {
        match self.state() {
            LoginState::LoggedIn => None,
            LoginState::Starting => Some("logging in to the HSM token".into()),
            LoginState::PinRefused { reason } => Some(format!(
                "{reason}; not offering this PIN again: waiting for the PIN source to change"
            )),
            LoginState::PinUnreadable { reason } => Some(format!("HSM PIN unavailable: {reason}")),
            LoginState::Unavailable { reason } => Some(format!("cannot log in yet: {reason}")),
        }
    }

    /// 1 while the token's refusal of the PIN holds the process back, else 0 (a metric).
    pub fn pin_refused(&self) -> i64 {
        i64::from(matches!(self.state(), LoginState::PinRefused { .. }))
    }

    /// How many times the PIN source was read again while waiting for it to change (a metric;
    /// tests use it to wait for several polls without a clock).
    pub fn pin_source_checks(&self) -> u64 {
        self.pin_source_checks.load(Ordering::Relaxed)
    }

    /// Reads the PIN source again now instead of at the next poll (SIGHUP).
    pub fn recheck_now(&self) {
        self.recheck.notify_one();
    }

    fn set(&self, s: LoginState) {
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = s;
    }

    /// Waits one poll interval, a [`LoginStatus::recheck_now`], or `stop`; false on `stop`.
    async fn pause(&self, d: Duration, stop: &mut (impl Future<Output = ()> + Unpin)) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = self.recheck.notified() => true,
            _ = stop => false,
        }
    }
}

/// Opens the keystore for a long-running process, keeping `status` up to date. A PIN the
/// token refuses is never offered again: the next `C_Login` waits until the PIN source holds
/// another PIN. An unreachable HSM is tried again with back-off (up to [`MAX_START_BACKOFF`]).
/// Other errors (a module that does not load, a bad configuration) are returned. `Ok(None)`
/// when `stop` resolved first.
pub async fn open_when_pin_accepted(
    cfg: Config,
    status: &LoginStatus,
    stop: impl Future<Output = ()>,
) -> Result<Option<Keystore>> {
    let mut stop = std::pin::pin!(stop);
    let mut refused: Option<SecretString> = None;
    let mut backoff = cfg.recovery.initial_backoff.max(Duration::from_millis(100));
    loop {
        if let Err(e) = cfg.pin.read() {
            status.set(LoginState::PinUnreadable {
                reason: e.to_string(),
            });
            tracing::warn!(error = %e.chain(), "cannot read the HSM PIN; waiting for its source");
            if !wait_for_new_pin(&cfg, status, refused.as_ref(), &mut stop).await {
                return Ok(None);
            }
        }
        status.set(LoginState::Starting);
        let attempt_cfg = cfg.clone();
        let attempt_refused = refused.take();
        let opened = tokio::task::spawn_blocking(move || {
            BlockingKeystore::open_refusing(attempt_cfg, attempt_refused)
        })
        .await
        .map_err(|e| Error::internal_by(Op::Initialize, "open task failed", e))?;
        match opened {
            Ok(ks) => {
                status.set(LoginState::LoggedIn);
                return Ok(Some(Keystore::from_blocking(ks)));
            }
            Err((e, pin)) if e.is_pin_refusal() => {
                refused = pin;
                status.set(LoginState::PinRefused {
                    reason: e.to_string(),
                });
                tracing::error!(
                    error = %e,
                    pin_source = %cfg.pin,
                    poll = ?PIN_SOURCE_POLL,
                    "the HSM refused the PIN; waiting for the PIN source to change before logging in again"
                );
                if !wait_for_new_pin(&cfg, status, refused.as_ref(), &mut stop).await {
                    return Ok(None);
                }
                tracing::info!(pin_source = %cfg.pin, "the PIN source changed; logging in again");
            }
            Err((e, pin)) if e.is_retryable() => {
                refused = pin;
                status.set(LoginState::Unavailable {
                    reason: e.to_string(),
                });
                tracing::warn!(error = %e.chain(), backoff = ?backoff, "cannot reach the HSM; trying again");
                if !status.pause(backoff, &mut stop).await {
                    return Ok(None);
                }
                backoff = (backoff * 2).min(MAX_START_BACKOFF);
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// Polls the PIN source until it reads and differs from `refused`; false on `stop`.
async fn wait_for_new_pin(
    cfg: &Config,
    status: &LoginStatus,
    refused: Option<&SecretString>,
    stop: &mut (impl Future<Output = ()> + Unpin),
) -> bool {
    loop {
        if !status.pause(PIN_SOURCE_POLL, stop).await {
            return false;
        }
        status.pin_source_checks.fetch_add(1, Ordering::Relaxed);
        match (cfg.pin.read(), refused) {
            (Ok(now), Some(old)) if now.expose_secret() == old.expose_secret() => {}
            (Ok(_), _) => return true,
            (Err(e), _) => {
                if !matches!(status.state(), LoginState::PinRefused { .. }) {
                    status.set(LoginState::PinUnreadable {
                        reason: e.to_string(),
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_say_what_to_do_and_never_hold_a_pin() {
        let s = LoginStatus::default();
        assert!(s.not_ready_reason().unwrap().contains("logging in"));
        s.set(LoginState::PinRefused {
            reason: "PIN incorrect for token label 't'".into(),
        });
        assert_eq!(s.pin_refused(), 1);
        let r = s.not_ready_reason().unwrap();
        assert!(
            r.contains("PIN incorrect") && r.contains("PIN source to change"),
            "{r}"
        );
        s.set(LoginState::LoggedIn);
        assert_eq!(s.not_ready_reason(), None);
        assert_eq!(s.pin_refused(), 0);
    }
}
