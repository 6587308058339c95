//! What the plugin's health endpoints report, from the first second of the process: the HTTP
//! listener is up before the HSM login, so a refused PIN shows as `/readyz` 503 with its
//! reason (and `hsm_pin_refused` 1) instead of a probe killing and restarting the process
//! into one more failed login. The gRPC health service on the KMS socket follows the same
//! answer as Status `healthz`.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use keyhaven_hsm::login::LoginStatus;
use keyhaven_proto::kms::v2::key_management_service_server::KeyManagementServiceServer;

use crate::metrics::Metrics;
use crate::plugin::{KmsService, Plugin};

/// The state the HTTP endpoints read: the login, then the running plugin.
#[derive(Debug)]
pub struct Readiness {
    /// Where the HSM login stands.
    pub login: Arc<LoginStatus>,
    /// The plugin's metrics (made before the login).
    pub metrics: Arc<Metrics>,
    plugin: OnceLock<Arc<Plugin>>,
}

impl Readiness {
    /// Before the login: no plugin yet.
    pub fn new(login: Arc<LoginStatus>, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Readiness {
            login,
            metrics,
            plugin: OnceLock::new(),
        })
    }

    /// The plugin, once logged in and loaded.
    pub fn plugin(&self) -> Option<&Arc<Plugin>> {
        self.plugin.get()
    }

    /// Records the running plugin (once).
    pub fn set_plugin(&self, p: Arc<Plugin>) {
        let _ = self.plugin.set(p);
    }

    /// `Ok` when ready to serve, else the reason (the login's, then the plugin's `healthz`).
    pub fn check(&self) -> Result<(), String> {
        if let Some(why) = self.login.not_ready_reason() {
            return Err(why);
        }
        let Some(p) = self.plugin() else {
            return Err("loading the KEK list".into());
        };
        match p.healthz() {
            h if h == "ok" => Ok(()),
            h => Err(h),
        }
    }

    /// The metrics text, login figures refreshed.
    pub fn metrics_text(&self) -> String {
        self.metrics.set_login(&self.login);
        self.metrics.encode()
    }
}

/// The `grpc.health.v1.Health` service of the KMS socket, kept in step with `healthz` (both
/// the whole server, `""`, and the KMS service): SERVING while the cached self-test passes,
/// NOT_SERVING otherwise, checked every `every`.
pub async fn grpc_health(
    plugin: &Arc<Plugin>,
    every: Duration,
) -> tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health> {
    let (reporter, service) = tonic_health::server::health_reporter();
    let weak = Arc::downgrade(plugin);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = None;
        loop {
            tick.tick().await;
            let Some(p) = weak.upgrade() else { return };
            let ok = p.healthz() == "ok";
            drop(p);
            if last == Some(ok) {
                continue;
            }
            last = Some(ok);
            let status = if ok {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            reporter.set_service_status("", status).await;
            reporter
                .set_service_status(
                    <KeyManagementServiceServer<KmsService> as tonic::server::NamedService>::NAME,
                    status,
                )
                .await;
        }
    });
    service
}
