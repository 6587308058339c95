//! The HSM login's metrics, the same in every process that logs in (the plugin, the broker):
//! how many `C_Login` calls it made, whether it waits because the token refused its PIN, and
//! how often it read the PIN source again meanwhile.

use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::login::LoginStatus;

/// `hsm_login_attempts`, `hsm_pin_refused` and `hsm_pin_source_checks`.
#[derive(Debug, Clone, Default)]
pub struct LoginMetrics {
    login_attempts: Gauge<u64, AtomicU64>,
    pin_refused: Gauge,
    pin_source_checks: Gauge<u64, AtomicU64>,
}

impl LoginMetrics {
    /// Registers the gauges in `registry` (under its prefix).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "hsm_login_attempts",
            "C_Login calls this process made (a refused PIN is offered once)",
            self.login_attempts.clone(),
        );
        registry.register(
            "hsm_pin_refused",
            "1 while the token refused the PIN and the process waits for the PIN source to change",
            self.pin_refused.clone(),
        );
        registry.register(
            "hsm_pin_source_checks",
            "Times the PIN source was read again while waiting for a new PIN",
            self.pin_source_checks.clone(),
        );
    }

    /// Copies the figures of `login` (and this process's `C_Login` count) into the gauges.
    pub fn set(&self, login: &LoginStatus) {
        self.login_attempts.set(crate::process_login_attempts());
        self.pin_refused.set(login.pin_refused());
        self.pin_source_checks.set(login.pin_source_checks());
    }
}
