//! Prometheus metrics of the agent (served by [`crate::http`]).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// `outcome` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// `ok`, `refused`, `unauthenticated`, `unavailable`.
    pub outcome: String,
}

/// `reason` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    /// What failed.
    pub reason: String,
}

/// `file` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FileLabel {
    /// The file under the output directory.
    pub file: String,
}

/// The agent's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Leases currently held.
    pub leases_held: Gauge,
    /// Lease calls by outcome.
    pub leases: Family<Outcome, Counter>,
    /// Renew calls by outcome.
    pub renewals: Family<Outcome, Counter>,
    /// Failures by reason (lease, renew, render, write, revoke...).
    pub failures: Family<Reason, Counter>,
    /// Files written.
    pub file_writes: Counter,
    /// Leases that ended with none to replace them, by `reason` (`expired`, `revoked`).
    pub lease_ends: Family<Reason, Counter>,
    /// Seconds until each file's lease expires (negative: ended).
    pub expiry_seconds: Family<FileLabel, Gauge>,
    /// 1 when every file is in place.
    pub ready: Gauge,
}

impl Metrics {
    /// Counts one lease call.
    pub fn lease(&self, outcome: &str) {
        self.leases
            .get_or_create(&Outcome {
                outcome: outcome.into(),
            })
            .inc();
    }

    /// Counts one renew call.
    pub fn renewal(&self, outcome: &str) {
        self.renewals
            .get_or_create(&Outcome {
                outcome: outcome.into(),
            })
            .inc();
    }

    /// Counts a lease that ended with none to replace it.
    pub fn lease_end(&self, reason: &str) {
        self.lease_ends
            .get_or_create(&Reason {
                reason: reason.into(),
            })
            .inc();
    }

    /// Counts one failure.
    pub fn failure(&self, reason: &str) {
        self.failures
            .get_or_create(&Reason {
                reason: reason.into(),
            })
            .inc();
    }

    /// A registry holding every metric (built per scrape).
    pub fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("keyhaven_agent");
        r.register(
            "leases_held",
            "Leases currently held",
            self.leases_held.clone(),
        );
        r.register("leases", "Lease calls by outcome", self.leases.clone());
        r.register("renewals", "Renew calls by outcome", self.renewals.clone());
        r.register("failures", "Failures by reason", self.failures.clone());
        r.register(
            "lease_ends",
            "Leases that ended with none to replace them, by reason",
            self.lease_ends.clone(),
        );
        r.register(
            "file_writes",
            "Secret files written",
            self.file_writes.clone(),
        );
        r.register(
            "lease_expiry_seconds",
            "Seconds until the lease behind each file expires",
            self.expiry_seconds.clone(),
        );
        r.register(
            "ready",
            "1 when every secret file is in place under a lease",
            self.ready.clone(),
        );
        r
    }
}
