//! The plugin: KEK ring, cached health, the KMS v2 service, and the background self-test and
//! rescan loops. Status only reads cached state; Encrypt and Decrypt go to the HSM with a
//! deadline.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use keyhaven_hsm::{KekInfo, Keystore};
use keyhaven_proto::kms::v2::key_management_service_server::KeyManagementService;
use keyhaven_proto::kms::v2::{
    DecryptRequest, DecryptResponse, EncryptRequest, EncryptResponse, StatusRequest, StatusResponse,
};
use serde::Serialize;
use tonic::{Request, Response, Status};

use crate::envelope::{self, EnvelopeError};
use crate::error::KmsError;
use crate::metrics::{key_id_hash, KeyMetrics, Metrics};

/// One KEK as the plugin sees it.
#[derive(Debug, Clone)]
pub struct KeyEntry {
    /// Public key_id (what the apiserver stores).
    pub key_id: String,
    /// The KEK on the token.
    pub kek: KekInfo,
    /// Its operation counters (registered by a running plugin's rescan).
    pub metrics: KeyMetrics,
}

/// The KEKs on the token, oldest first; the newest is the primary.
#[derive(Debug, Clone, Default)]
pub struct Keyring {
    /// Oldest first.
    pub keys: Vec<KeyEntry>,
}

impl Keyring {
    /// Builds the ring from the token's KEK list (oldest first).
    pub fn from_keks(keks: Vec<KekInfo>) -> Self {
        Keyring {
            keys: keks
                .into_iter()
                .map(|kek| KeyEntry {
                    key_id: envelope::key_id(&kek.id),
                    kek,
                    metrics: KeyMetrics::default(),
                })
                .collect(),
        }
    }

    /// The KEK new encryptions use: the newest.
    pub fn primary(&self) -> Option<&KeyEntry> {
        self.keys.last()
    }

    /// The KEK a key_id names.
    pub fn get(&self, key_id: &str) -> Option<&KeyEntry> {
        self.keys.iter().find(|k| k.key_id == key_id)
    }
}

/// Timing knobs of a running plugin.
#[derive(Debug, Clone)]
pub struct Timing {
    /// Background self-test interval.
    pub self_test_interval: Duration,
    /// KEK list re-read interval.
    pub rescan_interval: Duration,
    /// Deadline of one HSM operation.
    pub hsm_timeout: Duration,
}

#[derive(Debug, Default)]
struct Health {
    last_ok: Option<Instant>,
    last_failure: Option<(Instant, String)>,
}

/// What `/keys` reports (and `kms-plugin keys list --plugin-addr` reads).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct KeyReport {
    /// Current primary key_id.
    pub primary: Option<String>,
    /// One line per KEK.
    pub keys: Vec<KeyReportEntry>,
}

/// One KEK in [`KeyReport`].
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct KeyReportEntry {
    /// Public key_id.
    pub key_id: String,
    /// HSM label.
    pub label: String,
    /// Unix seconds of the last successful Decrypt with this KEK since the plugin started.
    pub last_decrypt_unix: Option<u64>,
}

/// Shared state of a running plugin.
pub struct Plugin {
    keystore: Keystore,
    timing: Timing,
    keyring: RwLock<Arc<Keyring>>,
    health: RwLock<Health>,
    last_decrypt: Mutex<HashMap<String, SystemTime>>,
    last_rescan: tokio::sync::Mutex<Option<Instant>>,
    rescan_now: tokio::sync::Notify,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("keystore", &self.keystore)
            .finish_non_exhaustive()
    }
}

impl Plugin {
    /// A plugin over an open keystore. Call [`Plugin::rescan`] and [`Plugin::self_test`]
    /// once before serving.
    pub fn new(keystore: Keystore, timing: Timing) -> Arc<Self> {
        Self::with_metrics(keystore, timing, Arc::new(Metrics::new()))
    }

    /// [`Plugin::new`] counting into `metrics` (made before the HSM login, so `/metrics`
    /// answers while the plugin waits for a PIN).
    pub fn with_metrics(keystore: Keystore, timing: Timing, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Plugin {
            keystore,
            timing,
            keyring: RwLock::default(),
            health: RwLock::default(),
            last_decrypt: Mutex::default(),
            last_rescan: tokio::sync::Mutex::new(None),
            rescan_now: tokio::sync::Notify::new(),
            metrics,
        })
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The current KEK ring.
    pub fn keyring(&self) -> Arc<Keyring> {
        self.keyring
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Asks the rescan loop to re-read the KEK list now (SIGHUP).
    pub fn request_rescan(&self) {
        self.rescan_now.notify_one();
    }

    async fn hsm_call<T>(
        &self,
        op: &'static str,
        fut: impl std::future::Future<Output = keyhaven_hsm::Result<T>>,
    ) -> Result<keyhaven_hsm::Result<T>, Duration> {
        let t0 = Instant::now();
        let r = tokio::time::timeout(self.timing.hsm_timeout, fut).await;
        self.metrics.hsm(op, t0.elapsed());
        r.map_err(|_| self.timing.hsm_timeout)
    }

    /// Re-reads the KEK list from the token. On failure the old ring stays (a flaky HSM must
    /// not make known keys disappear).
    pub async fn rescan(&self) -> keyhaven_hsm::Result<()> {
        let mut last = self.last_rescan.lock().await;
        let keks = match self.hsm_call("list", self.keystore.list_keks()).await {
            Ok(r) => r?,
            Err(t) => {
                tracing::warn!(timeout = ?t, "the HSM did not list the KEKs in time");
                return Err(keyhaven_hsm::Error::unavailable(
                    keyhaven_hsm::Op::FindKey,
                    "no answer within the HSM timeout",
                ));
            }
        };
        *last = Some(Instant::now());
        let mut ring = Keyring::from_keks(keks);
        for k in &mut ring.keys {
            k.metrics = self.metrics.for_key(&k.key_id);
        }
        let old = self.keyring();
        let (old_p, new_p) = (
            old.primary().map(|k| k.key_id.clone()),
            ring.primary().map(|k| k.key_id.clone()),
        );
        if old_p != new_p {
            match &new_p {
                Some(k) => tracing::info!(key_id = %k, "primary KEK is now {k}"),
                None => tracing::warn!("no KEK on the token: run `kms-plugin keys init`"),
            }
        }
        self.metrics
            .key_id_hash
            .set(new_p.as_deref().map(key_id_hash).unwrap_or(0));
        self.metrics.keks.set(ring.keys.len() as i64);
        *self.keyring.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(ring);
        Ok(())
    }

    /// Rescans unless one happened within the last second (Decrypt of an unknown key_id).
    async fn rescan_if_stale(&self) {
        {
            let last = self.last_rescan.lock().await;
            if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                return;
            }
        }
        if let Err(e) = self.rescan().await {
            tracing::warn!(error = %e.chain(), "KEK rescan failed");
        }
    }

    /// One HSM self-test: a real encrypt + decrypt probe with the primary KEK.
    pub async fn self_test(&self) {
        let primary = self.keyring().primary().map(|k| k.kek.id);
        let result = match self
            .hsm_call("self_test", self.keystore.self_test(primary))
            .await
        {
            Ok(Ok(_)) => Ok(()),
            // The reason goes into Status.healthz (to the apiserver): the error's own words,
            // never its PKCS#11 cause, which only the log gets.
            Ok(Err(e)) => Err((e.to_string(), e.chain())),
            Err(t) => {
                let reason = format!("HSM did not answer within {t:?}");
                Err((reason.clone(), reason))
            }
        };
        let mut h = self.health.write().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(()) => {
                h.last_ok = Some(Instant::now());
                h.last_failure = None;
                self.metrics.self_test_ok.set(1);
                self.metrics.self_test_last_success.set(
                    SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map(|d| d.as_secs_f64())
                        .unwrap_or_default(),
                );
            }
            Err((reason, detail)) => {
                if h.last_failure.is_none() {
                    tracing::error!(error = %detail, "HSM self-test failed");
                }
                h.last_failure = Some((Instant::now(), reason));
                self.metrics.self_test_ok.set(0);
            }
        }
    }

    /// `"ok"`, or a short reason an operator can act on. Never touches the HSM.
    pub fn healthz(&self) -> String {
        if self.keyring().primary().is_none() {
            return "no KEK on the HSM token: run `kms-plugin keys init`".into();
        }
        let h = self.health.read().unwrap_or_else(|p| p.into_inner());
        if let Some((_, reason)) = &h.last_failure {
            return format!("HSM self-test failing: {reason}");
        }
        let stale_after = self.timing.self_test_interval * 3 + self.timing.hsm_timeout;
        match h.last_ok {
            None => "HSM self-test has not passed yet".into(),
            Some(t) if t.elapsed() > stale_after => format!(
                "HSM self-test has not passed for {}s",
                t.elapsed().as_secs()
            ),
            Some(_) => "ok".into(),
        }
    }

    /// What `/keys` shows.
    pub fn key_report(&self) -> KeyReport {
        let ring = self.keyring();
        let last = self.last_decrypt.lock().unwrap_or_else(|p| p.into_inner());
        KeyReport {
            primary: ring.primary().map(|k| k.key_id.clone()),
            keys: ring
                .keys
                .iter()
                .map(|k| KeyReportEntry {
                    key_id: k.key_id.clone(),
                    label: k.kek.label.clone(),
                    last_decrypt_unix: last.get(&k.key_id).and_then(|t| {
                        t.duration_since(SystemTime::UNIX_EPOCH)
                            .ok()
                            .map(|d| d.as_secs())
                    }),
                })
                .collect(),
        }
    }

    /// Runs the self-test and rescan loops until the plugin is dropped by everyone else.
    pub fn spawn_background(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let every = self.timing.self_test_interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(p) = weak.upgrade() else { return };
                p.self_test().await;
            }
        });
        let weak = Arc::downgrade(self);
        let every = self.timing.rescan_interval;
        tokio::spawn(async move {
            loop {
                let Some(p) = weak.upgrade() else { return };
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = p.rescan_now.notified() => {
                        tracing::info!("rescanning KEKs on request (SIGHUP or a KEK gone missing)");
                    }
                }
                let before = p.keyring().primary().map(|k| k.key_id.clone());
                if let Err(e) = p.rescan().await {
                    tracing::warn!(error = %e.chain(), "KEK rescan failed");
                }
                if before != p.keyring().primary().map(|k| k.key_id.clone()) {
                    // Report on the new primary at once rather than at the next tick.
                    p.self_test().await;
                }
            }
        });
    }

    async fn encrypt_inner(&self, req: EncryptRequest) -> Result<EncryptResponse, KmsError> {
        let pt = zeroize::Zeroizing::new(req.plaintext);
        if pt.is_empty() {
            return Err(KmsError::invalid("plaintext is empty"));
        }
        if pt.len() > envelope::MAX_PLAINTEXT_LEN {
            return Err(KmsError::invalid(format!(
                "plaintext of {} bytes exceeds the {}-byte limit",
                pt.len(),
                envelope::MAX_PLAINTEXT_LEN
            )));
        }
        let ring = self.keyring();
        let primary = ring
            .primary()
            .ok_or_else(|| KmsError::unavailable(crate::error::NO_KEK))?;
        let sealed = match self
            .hsm_call(
                "encrypt",
                self.keystore
                    .encrypt(primary.kek.id, primary.key_id.as_bytes(), &pt),
            )
            .await
        {
            Ok(r) => r.map_err(|e| KmsError::from_hsm(&e, &primary.key_id))?,
            Err(t) => {
                tracing::warn!(timeout = ?t, "the HSM did not answer in time");
                return Err(KmsError::unavailable(crate::error::HSM_TIMEOUT));
            }
        };
        primary.metrics.encrypted();
        Ok(EncryptResponse {
            ciphertext: envelope::encode(&sealed.iv, &sealed.ciphertext),
            key_id: primary.key_id.clone(),
            annotations: envelope::annotations(),
        })
    }

    async fn decrypt_inner(&self, req: DecryptRequest) -> Result<DecryptResponse, KmsError> {
        let (iv, body) = check_decrypt_request(&req)?;
        let unknown = || {
            KmsError::NotFound(format!(
                "unknown key_id {}: no such KEK on the HSM token (retired, or made by another plugin)",
                req.key_id
            ))
        };
        if envelope::parse_key_id(&req.key_id).is_none() {
            return Err(unknown());
        }
        let entry = match self.keyring().get(&req.key_id) {
            Some(e) => e.clone(),
            None => {
                // Perhaps rotated by `keys rotate` since our last scan.
                self.rescan_if_stale().await;
                self.keyring()
                    .get(&req.key_id)
                    .cloned()
                    .ok_or_else(unknown)?
            }
        };
        let pt = match self
            .hsm_call(
                "decrypt",
                self.keystore
                    .decrypt(entry.kek.id, entry.key_id.as_bytes(), iv, body),
            )
            .await
        {
            Ok(Ok(pt)) => pt,
            Ok(Err(e)) => {
                if e.kind() == keyhaven_hsm::ErrorKind::KeyNotFound {
                    self.request_rescan();
                }
                return Err(KmsError::from_hsm(&e, &entry.key_id));
            }
            Err(t) => {
                tracing::warn!(timeout = ?t, "the HSM did not answer in time");
                return Err(KmsError::unavailable(crate::error::HSM_TIMEOUT));
            }
        };
        entry.metrics.decrypted();
        self.last_decrypt
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(entry.key_id, SystemTime::now());
        // The response owns the bytes from here; the apiserver needs them in clear.
        Ok(DecryptResponse {
            plaintext: pt.to_vec(),
        })
    }
}

/// The checks of a Decrypt request that need no HSM: a key_id of 1 to 1024 bytes, exactly
/// our annotations, a well-formed ciphertext. Gives the ciphertext's IV and body.
pub fn check_decrypt_request(req: &DecryptRequest) -> Result<(&[u8], &[u8]), KmsError> {
    if req.key_id.is_empty() {
        return Err(KmsError::invalid("key_id is empty"));
    }
    if req.key_id.len() > 1024 {
        return Err(KmsError::invalid("key_id longer than 1 KiB"));
    }
    envelope::check_annotations(&req.annotations).map_err(bad_envelope)?;
    envelope::decode(&req.ciphertext).map_err(bad_envelope)
}

fn bad_envelope(e: EnvelopeError) -> KmsError {
    KmsError::invalid(e.to_string())
}

/// The gRPC face of a [`Plugin`].
#[derive(Debug, Clone)]
pub struct KmsService {
    plugin: Arc<Plugin>,
}

impl KmsService {
    /// Wraps a plugin.
    pub fn new(plugin: Arc<Plugin>) -> Self {
        KmsService { plugin }
    }

    fn finish<T>(
        &self,
        method: &'static str,
        t0: Instant,
        r: Result<T, KmsError>,
    ) -> Result<Response<T>, Status> {
        let code = match &r {
            Ok(_) => tonic::Code::Ok,
            Err(e) => e.code(),
        };
        self.plugin.metrics.request(method, code, t0.elapsed());
        r.map(Response::new).map_err(|e| {
            let _method = tracing::info_span!("request", method).entered();
            Status::from(e)
        })
    }
}

#[tonic::async_trait]
impl KeyManagementService for KmsService {
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let t0 = Instant::now();
        let key_id = self
            .plugin
            .keyring()
            .primary()
            .map(|k| k.key_id.clone())
            .unwrap_or_default();
        let r = Ok(StatusResponse {
            version: "v2".into(),
            healthz: self.plugin.healthz(),
            key_id,
        });
        self.finish("Status", t0, r)
    }

    async fn decrypt(
        &self,
        req: Request<DecryptRequest>,
    ) -> Result<Response<DecryptResponse>, Status> {
        let t0 = Instant::now();
        let r = self.plugin.decrypt_inner(req.into_inner()).await;
        self.finish("Decrypt", t0, r)
    }

    async fn encrypt(
        &self,
        req: Request<EncryptRequest>,
    ) -> Result<Response<EncryptResponse>, Status> {
        let t0 = Instant::now();
        let r = self.plugin.encrypt_inner(req.into_inner()).await;
        self.finish("Encrypt", t0, r)
    }
}
