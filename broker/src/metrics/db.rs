//! Metrics of dynamic database credentials (`keyhaven_broker_db_`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Connection, role and an outcome (`ok`, `error`), cap or state.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabel {
    /// Connection name.
    pub connection: String,
    /// Role name.
    pub role: String,
    /// Outcome, cap or state.
    pub kind: String,
}

/// Connection and what a reconciliation found (`orphan_role`, `missing_role`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Finding {
    /// Connection name.
    pub connection: String,
    /// What was found.
    pub finding: &'static str,
}

/// The credential metrics.
#[derive(Debug, Default)]
pub struct DbMetrics {
    created: Family<RoleLabel, Counter>,
    revoked: Family<RoleLabel, Counter>,
    capped: Family<RoleLabel, Counter>,
    findings: Family<Finding, Counter>,
    /// Live credentials by state (`pending`, `active`, `dropping`; set at scrape time).
    credentials: Family<RoleLabel, Gauge>,
    /// Credentials whose role is still to be dropped (set at scrape time).
    pub pending_drops: Gauge,
}

fn label(connection: &str, role: &str, kind: &str) -> RoleLabel {
    RoleLabel {
        connection: connection.to_owned(),
        role: role.to_owned(),
        kind: kind.to_owned(),
    }
}

impl DbMetrics {
    /// Registers them under `db_`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("db");
        r.register(
            "credentials_created",
            "Database roles created for leases, by connection, role and outcome (kind)",
            self.created.clone(),
        );
        r.register(
            "credentials_revoked",
            "Database roles dropped, by connection, role and outcome (kind); errors are retried",
            self.revoked.clone(),
        );
        r.register(
            "credentials_capped",
            "Credential requests refused by a cap (kind: max_per_identity, max_total)",
            self.capped.clone(),
        );
        r.register(
            "reconcile_findings",
            "Roles dropped (orphan_role) and leases ended (missing_role) by reconciliation",
            self.findings.clone(),
        );
        r.register(
            "credentials",
            "Live credentials by connection, role and state (kind)",
            self.credentials.clone(),
        );
        r.register(
            "pending_drops",
            "Credentials whose lease ended and whose role is not dropped yet",
            self.pending_drops.clone(),
        );
    }

    /// The live credentials by state (label sets with none left disappear).
    pub fn set_credentials(&self, counts: &[crate::store::DbCredentialCount]) {
        self.credentials.clear();
        for c in counts {
            self.credentials
                .get_or_create(&label(&c.connection, &c.role, &c.state))
                .set(c.count);
        }
    }

    /// A creation, by outcome.
    pub fn created(&self, connection: &str, role: &str, outcome: &str) {
        self.created
            .get_or_create(&label(connection, role, outcome))
            .inc();
    }

    /// A drop attempt, by outcome.
    pub fn revoked(&self, connection: &str, role: &str, outcome: &str) {
        self.revoked
            .get_or_create(&label(connection, role, outcome))
            .inc();
    }

    /// A request over a cap.
    pub fn capped(&self, connection: &str, role: &str, cap: &str) {
        self.capped
            .get_or_create(&label(connection, role, cap))
            .inc();
    }

    /// One reconciliation's findings.
    pub fn reconciled(&self, connection: &str, orphans: usize, missing: usize) {
        for (finding, n) in [("orphan_role", orphans), ("missing_role", missing)] {
            self.findings
                .get_or_create(&Finding {
                    connection: connection.to_owned(),
                    finding,
                })
                .inc_by(n as u64);
        }
    }
}
