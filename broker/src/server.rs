//! `broker` serve: flags, assembly (database, HSM, token verifiers, policies), the gRPC
//! listener (TLS unless plaintext is explicitly enabled on loopback), the reaper and KEK
//! refresh loops, and the HTTP listener for `/healthz`, `/readyz` and `/metrics`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use keyhaven_proto::broker::v1::admin_server::AdminServer;
use keyhaven_proto::broker::v1::leases_server::LeasesServer;
use secrecy::SecretString;

use crate::auth::{
    Authenticator, DevIssuer, FileJwks, HttpsJwks, HttpsJwksConfig, TokenReviewConfig,
    TokenReviewer, Verifier, VerifierConfig,
};
use crate::crypto::{DekCache, Envelope};
use crate::grpc::Edge;
use crate::health::Health;
use crate::rate_limit::{PreAuthLimits, RateLimiter};
use crate::service::{Broker, BrokerConfig};
use crate::store::Store;

/// How often a `--jwks-file` is read again by default (a local file: cheap).
const JWKS_FILE_REFRESH: Duration = Duration::from_secs(2);
/// How often the apiserver's JWKS is fetched again by default.
const JWKS_URL_REFRESH: Duration = Duration::from_secs(60);

/// `broker` flags. Every flag also reads an environment variable. Secrets (PIN, database
/// password, bootstrap credential) come from files or the environment, never argv.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// gRPC listen address.
    #[arg(long, env = "KEYHAVEN_BROKER_LISTEN", default_value = "127.0.0.1:8443")]
    pub listen: SocketAddr,
    /// Database URL: `sqlite:///var/lib/keyhaven/broker.db` or `postgres://user@host/db`.
    /// Prefer `--database-url-file` (or the environment) when it holds a password.
    #[arg(
        long,
        env = "KEYHAVEN_DATABASE_URL",
        required_unless_present = "database_url_file"
    )]
    pub database_url: Option<String>,
    /// File holding the database URL.
    #[arg(long, env = "KEYHAVEN_DATABASE_URL_FILE")]
    pub database_url_file: Option<PathBuf>,
    /// PEM certificate chain for TLS.
    #[arg(long, env = "KEYHAVEN_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for TLS.
    #[arg(long, env = "KEYHAVEN_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle: when set, clients must present a certificate it signed (mTLS).
    #[arg(long, env = "KEYHAVEN_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// Serve without TLS. Only allowed on a loopback address.
    #[arg(long, env = "KEYHAVEN_INSECURE_PLAINTEXT")]
    pub insecure_plaintext: bool,
    /// Connection limits of the gRPC listener.
    #[command(flatten)]
    pub connections: crate::listener::ConnectionArgs,
    /// PKCS#11 module, token and PIN.
    #[command(flatten)]
    pub hsm: keyhaven_hsm::cli::HsmAccessArgs,
    /// Label prefix of the broker's KEKs.
    #[arg(
        long,
        env = "KEYHAVEN_KEK_LABEL_PREFIX",
        default_value = "keyhaven-broker-"
    )]
    pub kek_label_prefix: String,
    /// Issuer of ServiceAccount tokens (the apiserver's `--service-account-issuer`).
    #[arg(
        long,
        env = "KEYHAVEN_TOKEN_ISSUER",
        default_value = "https://kubernetes.default.svc.cluster.local"
    )]
    pub issuer: String,
    /// Accepted token audiences.
    #[arg(
        long,
        env = "KEYHAVEN_TOKEN_AUDIENCES",
        value_delimiter = ',',
        default_value = "keyhaven"
    )]
    pub audience: Vec<String>,
    /// JWKS file with the apiserver's service-account signing keys, re-read every
    /// `--jwks-refresh-interval` and on an unknown kid: a key removed from the file is refused
    /// within that interval.
    #[arg(long, env = "KEYHAVEN_JWKS_FILE")]
    pub jwks_file: Option<PathBuf>,
    /// URL of the apiserver's JWKS, fetched at startup, every `--jwks-refresh-interval` and on
    /// an unknown kid; e.g. `https://kubernetes.default.svc/openid/v1/jwks`. `http://` only on
    /// a loopback host.
    #[arg(long, env = "KEYHAVEN_JWKS_URL", conflicts_with = "jwks_file")]
    pub jwks_url: Option<String>,
    /// PEM CA bundle, the only trust anchors for an `https://` `--jwks-url` (unused for http).
    #[arg(
        long,
        env = "KEYHAVEN_JWKS_CA_FILE",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    )]
    pub jwks_ca_file: PathBuf,
    /// File holding a bearer token for `--jwks-url`, re-read on every fetch (in a pod:
    /// `/var/run/secrets/kubernetes.io/serviceaccount/token`).
    #[arg(long, env = "KEYHAVEN_JWKS_TOKEN_FILE")]
    pub jwks_token_file: Option<PathBuf>,
    /// How often the JWKS is read again, so that a key removed from it stops verifying
    /// tokens within this bound [default: 2s for `--jwks-file`, 1m for `--jwks-url`].
    #[arg(long, env = "KEYHAVEN_JWKS_REFRESH_INTERVAL", value_parser = humantime::parse_duration)]
    pub jwks_refresh_interval: Option<Duration>,
    /// TokenReview mode: after a token verifies locally, also ask the apiserver's TokenReview
    /// API, so that tokens whose pod or service account was deleted are refused. The broker's
    /// service account needs the `system:auth-delegator` cluster role.
    #[arg(long, env = "KEYHAVEN_TOKEN_REVIEW")]
    pub token_review: bool,
    /// The apiserver asked in TokenReview mode. `http://` only on a loopback host.
    #[arg(
        long,
        env = "KEYHAVEN_APISERVER_URL",
        default_value = "https://kubernetes.default.svc"
    )]
    pub apiserver_url: String,
    /// PEM CA bundle, the only trust anchors for an `https://` `--apiserver-url`.
    #[arg(
        long,
        env = "KEYHAVEN_APISERVER_CA_FILE",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    )]
    pub apiserver_ca_file: PathBuf,
    /// File holding the broker's own token for TokenReview, re-read on every review.
    #[arg(
        long,
        env = "KEYHAVEN_APISERVER_TOKEN_FILE",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    )]
    pub apiserver_token_file: PathBuf,
    /// How long a TokenReview verdict is cached (by token hash, never past the token's
    /// expiry; at most 60s; 0s disables the cache).
    #[arg(long, env = "KEYHAVEN_TOKEN_REVIEW_CACHE_TTL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub token_review_cache_ttl: Duration,
    /// The pod / service-account watch: ends the leases of deleted pods (matched by name and
    /// uid) and service accounts within seconds. `auto`: on when the broker runs in a pod
    /// (`KUBERNETES_SERVICE_HOST` set) or in TokenReview mode. It reaches the apiserver as
    /// TokenReview does (`--apiserver-url`, `--apiserver-ca-file`, `--apiserver-token-file`)
    /// and needs `get,list,watch` on pods and serviceaccounts. Off: leases of deleted pods
    /// end at their expiry.
    #[arg(long, env = "KEYHAVEN_POD_WATCH", value_enum, default_value_t = PodWatch::Auto)]
    pub pod_watch: PodWatch,
    /// How often the pod / service-account watch lists everything again while healthy (it
    /// also lists after 410 Gone and after a failure to end leases).
    #[arg(long, env = "KEYHAVEN_POD_WATCH_RELIST_INTERVAL", default_value = "5m", value_parser = parse_positive_duration)]
    pub pod_watch_relist_interval: Duration,
    /// Dev mode: also trust tokens minted by `brokerctl dev-token` with this key. Demos and
    /// tests only.
    #[arg(long, env = "KEYHAVEN_DEV")]
    pub dev: bool,
    /// Dev-mode signing key (created if missing).
    #[arg(
        long,
        env = "KEYHAVEN_DEV_KEY",
        default_value = ".keyhaven-dev/dev-issuer.pem"
    )]
    pub dev_key: PathBuf,
    /// File holding the bootstrap admin credential.
    #[arg(long, env = "KEYHAVEN_BOOTSTRAP_FILE")]
    pub bootstrap_file: Option<PathBuf>,
    /// Also append audit records to this JSON-lines file.
    #[arg(long, env = "KEYHAVEN_AUDIT_FILE")]
    pub audit_file: Option<PathBuf>,
    /// HTTP address for /healthz, /readyz and /metrics.
    #[arg(long, env = "KEYHAVEN_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Requests per second allowed per identity (0: unlimited).
    #[arg(long, env = "KEYHAVEN_RATE_LIMIT", default_value_t = 50.0)]
    pub rate_limit: f64,
    /// How long an unwrapped DEK stays in memory (swept within a tenth of this, at most 30 s).
    #[arg(long, env = "KEYHAVEN_DEK_CACHE_TTL", default_value = "5m", value_parser = humantime::parse_duration)]
    pub dek_cache_ttl: Duration,
    /// Most unwrapped DEKs held in memory (0: none; every read unwraps in the HSM).
    #[arg(long, env = "KEYHAVEN_DEK_CACHE_SIZE", default_value_t = 10_000)]
    pub dek_cache_size: usize,
    /// Authentication attempts per second allowed per peer address for tokens not verified
    /// recently (bad tokens among them), twice that at once (0: unlimited).
    #[arg(long, env = "KEYHAVEN_AUTH_ATTEMPTS_PER_PEER", default_value_t = 10.0)]
    pub auth_attempts_per_peer: f64,
    /// The same for the whole replica (0: unlimited).
    #[arg(long, env = "KEYHAVEN_AUTH_ATTEMPTS", default_value_t = 200.0)]
    pub auth_attempts: f64,
    /// How long a refusal by those two limits is held before it is answered (a client that
    /// retries at once then makes one attempt per delay per stream).
    #[arg(long, env = "KEYHAVEN_AUTH_REFUSAL_DELAY", default_value = "1s", value_parser = humantime::parse_duration)]
    pub auth_refusal_delay: Duration,
    /// How often failed authentications without an identity are written, as one audit record
    /// per peer address and reason.
    #[arg(long, env = "KEYHAVEN_AUTH_FAILURE_AUDIT_INTERVAL", default_value = "10s", value_parser = parse_positive_duration)]
    pub auth_failure_audit_interval: Duration,
    /// How often the reaper looks for expired leases.
    #[arg(long, env = "KEYHAVEN_REAP_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub reap_interval: Duration,

    /// How often this replica compares the roles it made in each credential database with the
    /// live credentials (dropped roles, ended leases; see docs/dynamic-credentials.md).
    #[arg(long, env = "KEYHAVEN_DB_RECONCILE_INTERVAL", default_value = "5m", value_parser = humantime::parse_duration)]
    pub db_reconcile_interval: Duration,
    /// How long a credential may stay `pending` (its role being created, its lease not yet
    /// stored) before the revoker takes it for the leftover of a killed broker and drops its
    /// role. Longer than any Lease call takes.
    #[arg(long, env = "KEYHAVEN_DB_PENDING_GRACE", default_value = "60s", value_parser = parse_positive_duration)]
    pub db_pending_grace: Duration,
    /// How often this replica re-reads the KEK list from the HSM (adopting a new primary made
    /// by another replica or `keys rotate`), checks the automatic-rotation rule and looks for
    /// DEKs to re-wrap.
    #[arg(long, env = "KEYHAVEN_KEK_REFRESH_INTERVAL", default_value = "5s", value_parser = parse_positive_duration)]
    pub kek_refresh_interval: Duration,
    /// DEKs re-wrapped per database transaction.
    #[arg(long, env = "KEYHAVEN_REWRAP_BATCH_SIZE", default_value_t = 500, value_parser = clap::value_parser!(i64).range(1..=10_000))]
    pub rewrap_batch_size: i64,
    /// Re-wrap batches in flight at once in this replica on PostgreSQL (each claims its own
    /// rows with SKIP LOCKED, so one's HSM work overlaps another's commit). SQLite has one
    /// writer: always 1 there.
    #[arg(long, env = "KEYHAVEN_REWRAP_WORKERS", default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=16))]
    pub rewrap_workers: u8,
    /// Pause between re-wrap batches, to bound the HSM and database load of a re-wrap
    /// (0s: none).
    #[arg(long, env = "KEYHAVEN_REWRAP_PAUSE", default_value = "0s", value_parser = humantime::parse_duration)]
    pub rewrap_pause: Duration,
    /// Rotate the KEK automatically when the primary is older than this (e.g. `90d`). Off by
    /// default. With several replicas one of them rotates.
    #[arg(long, env = "KEYHAVEN_ROTATE_AFTER", value_parser = parse_positive_duration)]
    pub rotate_after: Option<Duration>,
    /// Rotate the KEK automatically once this many encryptions (DEKs sealed plus DEKs
    /// re-wrapped to it) are recorded under the primary. Off by default. Must stay above the
    /// number of live DEKs.
    #[arg(long, env = "KEYHAVEN_ROTATE_AFTER_ENCRYPTIONS", value_parser = clap::value_parser!(u64).range(1..))]
    pub rotate_after_encryptions: Option<u64>,
}

/// `--pod-watch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PodWatch {
    /// On in a pod or in TokenReview mode.
    Auto,
    /// On (the broker does not start without a usable apiserver configuration).
    On,
    /// Off.
    Off,
}

fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(d)
}

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Bad flags.
    #[error("{0}")]
    Config(String),
    /// A part failed to start.
    #[error("{0}")]
    Start(String),
}

fn read_secret_file(p: &std::path::Path, what: &'static str) -> Result<SecretString, ServeError> {
    use keyhaven_process::secret_file::{read, Rules};
    let v = read(p, Rules::text(what)).map_err(|e| {
        ServeError::Config(match std::error::Error::source(&e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        })
    })?;
    Ok(SecretString::from(v.as_str()))
}

/// Builds the broker from flags. The HSM login goes through `login` (a refused PIN is never
/// offered twice: see `keyhaven_hsm::login`); `Ok(None)` when `stop` resolved while waiting.
pub async fn assemble(
    args: &ServeArgs,
    login: &keyhaven_hsm::login::LoginStatus,
    stop: impl std::future::Future<Output = ()>,
) -> Result<Option<Arc<Broker>>, ServeError> {
    use secrecy::ExposeSecret;
    let url = match (&args.database_url, &args.database_url_file) {
        (_, Some(f)) => read_secret_file(f, "database URL file")?,
        (Some(u), None) => SecretString::from(u.clone()),
        (None, None) => {
            return Err(ServeError::Config(
                "give --database-url or --database-url-file".into(),
            ))
        }
    };
    let store = Store::connect(url.expose_secret())
        .await
        .map_err(|e| ServeError::Start(format!("database: {e}")))?;
    let mut cfg = args.hsm.config();
    cfg.kek_label_prefix = args.kek_label_prefix.clone();
    let Some(ks) = keyhaven_hsm::login::open_when_pin_accepted(cfg, login, stop)
        .await
        .map_err(|e| ServeError::Start(format!("HSM: {}", e.chain())))?
    else {
        return Ok(None);
    };
    let envelope = Envelope::new(ks, DekCache::new(args.dek_cache_size, args.dek_cache_ttl));

    let dev = if args.dev {
        if let Some(dir) = args.dev_key.parent().filter(|d| !d.as_os_str().is_empty()) {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| {
                    ServeError::Start(format!("dev key directory {}: {e}", dir.display()))
                })?;
        }
        let issuer = DevIssuer::load_or_generate(&args.dev_key)
            .map_err(|e| ServeError::Start(format!("dev key: {e}")))?;
        Some(Arc::new(
            Verifier::new(
                crate::auth::dev_verifier_config(),
                crate::auth::dev_jwks_source(&issuer),
            )
            .map_err(|e| ServeError::Start(format!("dev verifier: {e}")))?,
        ))
    } else {
        None
    };
    let cluster_config = || {
        let mut vc = VerifierConfig::new(args.issuer.clone());
        vc.audiences = args.audience.clone();
        vc
    };
    let cluster = if let Some(url) = &args.jwks_url {
        // clap refuses --jwks-url together with --jwks-file.
        let vc = cluster_config();
        let mut hc = HttpsJwksConfig::new(url.clone());
        hc.ca_file = Some(args.jwks_ca_file.clone());
        hc.token_file = args.jwks_token_file.clone();
        hc.timeout = vc.jwks_fetch_timeout;
        let source =
            HttpsJwks::new(&hc).map_err(|e| ServeError::Config(format!("--jwks-url: {e}")))?;
        let v = Arc::new(
            Verifier::new(vc, source)
                .map_err(|e| ServeError::Config(format!("token verifier: {e}")))?,
        );
        // A failed first fetch does not stop the broker: tokens are answered UNAVAILABLE
        // until the periodic refresh or an unknown-kid refetch succeeds, so the broker can
        // start while the apiserver is briefly unreachable.
        match v.refresh().await {
            Ok(keys) => tracing::info!(url = %url, keys, "JWKS loaded"),
            Err(e) => tracing::warn!(
                url = %url,
                error = %e,
                "initial JWKS fetch failed; tokens cannot be verified until a later fetch succeeds"
            ),
        }
        drop(v.spawn_refresh_task(args.jwks_refresh_interval.unwrap_or(JWKS_URL_REFRESH)));
        Some(v)
    } else if let Some(f) = &args.jwks_file {
        let v = Arc::new(
            Verifier::new(cluster_config(), FileJwks::new(f.clone()))
                .map_err(|e| ServeError::Config(format!("token verifier: {e}")))?,
        );
        match v.refresh().await {
            Ok(keys) => tracing::info!(file = %f.display(), keys, "JWKS loaded"),
            Err(e) => tracing::warn!(
                file = %f.display(),
                error = %e,
                "JWKS file not readable yet; tokens cannot be verified until it is"
            ),
        }
        drop(v.spawn_refresh_task(args.jwks_refresh_interval.unwrap_or(JWKS_FILE_REFRESH)));
        Some(v)
    } else {
        None
    };
    let has_cluster = cluster.is_some();
    let verifier = match (cluster, &dev) {
        (Some(v), _) => v,
        (None, Some(d)) => d.clone(),
        (None, None) => return Err(ServeError::Config(
            "no way to verify tokens: give --jwks-url or --jwks-file (the apiserver's JWKS), or --dev for demos"
                .into(),
        )),
    };
    let config = BrokerConfig {
        auto_rotation: crate::rotation::AutoRotation {
            after: args.rotate_after,
            after_encryptions: args.rotate_after_encryptions,
        },
        db_pending_grace: args.db_pending_grace,
        ..BrokerConfig::default()
    };
    let mut authenticator = Authenticator::new(verifier);
    if let (Some(d), true) = (dev, has_cluster) {
        authenticator = authenticator.with_dev_verifier(d);
    } else if args.dev {
        tracing::warn!(
            "DEV MODE: trusting tokens minted with the dev key — never use this in production"
        );
    }
    if args.token_review {
        let mut rc = TokenReviewConfig::new(
            args.apiserver_url.clone(),
            Some(args.apiserver_ca_file.clone()),
            args.apiserver_token_file.clone(),
        );
        rc.audiences = args.audience.clone();
        rc.cache_ttl = args.token_review_cache_ttl;
        let reviewer = TokenReviewer::new(&rc)
            .map_err(|e| ServeError::Config(format!("--token-review: {e}")))?;
        if !args.apiserver_token_file.is_file() {
            tracing::warn!(
                token_file = %args.apiserver_token_file.display(),
                "TokenReview token file does not exist yet; every review fails until it does"
            );
        }
        if args.dev {
            tracing::warn!(
                "--dev with --token-review: dev tokens are also sent to TokenReview, which a real apiserver refuses"
            );
        }
        tracing::info!(url = reviewer.url(), cache_ttl = ?args.token_review_cache_ttl, "TokenReview mode on");
        authenticator = authenticator.with_token_review(Arc::new(reviewer));
    }
    if let Some(f) = &args.bootstrap_file {
        authenticator =
            authenticator.with_bootstrap_admin(read_secret_file(f, "bootstrap credential file")?);
    }
    let mut broker = Broker::new(store, envelope, authenticator, config)
        .await
        .map_err(|e| ServeError::Start(e.to_string()))?;
    if let Some(f) = &args.audit_file {
        let sink = crate::audit::JsonlSink::open(f)
            .map_err(|e| ServeError::Start(format!("audit file {}: {e}", f.display())))?;
        broker = broker.with_audit_file(sink);
    }
    Ok(Some(Arc::new(broker)))
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    args: ServeArgs,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    if args.insecure_plaintext && !args.listen.ip().is_loopback() {
        return Err(ServeError::Config(format!(
            "--insecure-plaintext is only allowed on a loopback address, not {}",
            args.listen
        )));
    }
    let tls = if args.insecure_plaintext {
        tracing::warn!(listen = %args.listen, "serving gRPC WITHOUT TLS (loopback only)");
        None
    } else {
        let (Some(c), Some(k)) = (&args.tls_cert, &args.tls_key) else {
            return Err(ServeError::Config(
                "TLS needs --tls-cert and --tls-key (or --insecure-plaintext on loopback)".into(),
            ));
        };
        let read = |p: &PathBuf| {
            std::fs::read(p)
                .map_err(|e| ServeError::Config(format!("cannot read {}: {e}", p.display())))
        };
        let mut t = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(read(c)?, read(k)?))
            .timeout(args.connections.tls_handshake_timeout);
        if let Some(ca) = &args.tls_client_ca {
            t = t.client_ca_root(tonic::transport::Certificate::from_pem(read(ca)?));
        }
        Some(t)
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
    });
    let stop = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    // Health first: `/readyz`, `/metrics` and gRPC health (NOT_SERVING) answer while the
    // database connects and the HSM login waits (see crate::health).
    let (health, health_service) = Health::new().await;
    // SIGHUP: read the PIN source again now (while the login waits for a new PIN).
    let mut sighup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| ServeError::Start(format!("install SIGHUP handler: {e}")))?;
    let login = Arc::downgrade(&health.login);
    tokio::spawn(async move {
        while sighup.recv().await.is_some() {
            let Some(l) = login.upgrade() else { return };
            l.recheck_now();
        }
    });
    let metrics_task = match args.metrics_addr {
        Some(maddr) => {
            let l = tokio::net::TcpListener::bind(maddr)
                .await
                .map_err(|e| ServeError::Start(format!("bind {maddr}: {e}")))?;
            Some(tokio::spawn(crate::http::serve_http(
                l,
                health.clone(),
                stop(stop_rx.clone()),
            )))
        }
        None => None,
    };
    let listener = crate::listener::Listener::bind(args.listen, args.connections.max_connections)
        .map_err(|e| ServeError::Start(format!("bind {}: {e}", args.listen)))?;
    health.count_connections(listener.open_connections());
    let incoming = |l: &crate::listener::Listener| {
        l.incoming()
            .map_err(|e| ServeError::Start(format!("listener {}: {e}", args.listen)))
    };
    let grpc_builder = || -> Result<tonic::transport::Server, ServeError> {
        let mut builder = args.connections.server();
        if let Some(t) = tls.clone() {
            builder = builder
                .tls_config(t)
                .map_err(|e| ServeError::Config(format!("TLS: {e}")))?;
        }
        Ok(builder)
    };
    // Until the broker is assembled the listener serves the health service, and UNAVAILABLE.
    let (assembled_tx, mut assembled_rx) = tokio::sync::watch::channel(false);
    let early = {
        let server = grpc_builder()?
            .add_service(health_service.clone())
            .add_service(crate::health::Starting::<LeasesServer<Edge>>::new())
            .add_service(crate::health::Starting::<AdminServer<Edge>>::new())
            .serve_with_incoming_shutdown(incoming(&listener)?, async move {
                let _ = assembled_rx.wait_for(|a| *a).await;
            });
        tokio::spawn(server)
    };
    let broker = assemble(&args, &health.login, stop(stop_rx.clone())).await;
    let _ = assembled_tx.send(true);
    let _ = early.await;
    let Some(broker) = broker? else {
        if let Some(t) = metrics_task {
            let _ = t.await;
        }
        return Ok(());
    };
    health.start_probing(broker.clone());
    let edge = Edge::new(
        broker.clone(),
        Arc::new(RateLimiter::new(args.rate_limit, args.rate_limit * 2.0)),
        Arc::new(PreAuthLimits::new(
            args.auth_attempts_per_peer,
            args.auth_attempts,
        )),
        args.auth_refusal_delay.min(Duration::from_secs(10)),
    );
    crate::service::spawn_auth_failure_flush(&broker, args.auth_failure_audit_interval);

    crate::background::spawn_all(&broker, &args);

    // Pod / service-account watch: every replica with a Kubernetes API runs it.
    if let Some(client) = pod_watch_client(&args).await? {
        tracing::info!(
            url = %args.apiserver_url,
            relist_every = ?args.pod_watch_relist_interval,
            "pod / service-account watch on: leases of deleted pods and service accounts end within seconds"
        );
        crate::service::spawn_holder_watch(
            &broker,
            client,
            crate::service::HolderWatchConfig {
                relist_every: args.pod_watch_relist_interval,
            },
        );
    }

    tracing::info!(listen = %args.listen, store = broker.store().kind(), tls = !args.insecure_plaintext, "broker serving");
    let served = grpc_builder()?
        .add_service(health_service)
        .add_service(
            LeasesServer::new(edge.clone())
                .max_decoding_message_size(crate::grpc::MAX_LEASES_MESSAGE_BYTES),
        )
        .add_service(
            AdminServer::new(edge).max_decoding_message_size(crate::grpc::MAX_ADMIN_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(incoming(&listener)?, stop(stop_rx))
        .await
        .map_err(|e| ServeError::Start(format!("gRPC server: {e}")));
    // The failed authentications counted since the last flush.
    if let Err(e) = broker.flush_auth_failures().await {
        tracing::warn!(error = %e.chain(), "failed-authentication records not written at shutdown");
    }
    if let Some(t) = metrics_task {
        let _ = t.await;
    }
    served
}

/// The Kubernetes client of the pod / service-account watch, when it is on: the apiserver
/// TokenReview asks (`--apiserver-url`), trusting `--apiserver-ca-file`, with the token in
/// `--apiserver-token-file` (re-read as the kubelet rotates it).
async fn pod_watch_client(args: &ServeArgs) -> Result<Option<kube::Client>, ServeError> {
    let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
    let on = match args.pod_watch {
        PodWatch::On => true,
        PodWatch::Off => false,
        PodWatch::Auto => in_cluster || args.token_review,
    };
    if !on {
        tracing::info!(
            "pod / service-account watch off (no Kubernetes API configured: --pod-watch); leases of deleted pods and service accounts end at their expiry"
        );
        return Ok(None);
    }
    let fail = |e: String| ServeError::Config(format!("--pod-watch: {e}"));
    let uri = reqwest::Url::parse(&args.apiserver_url)
        .map_err(|e| fail(format!("--apiserver-url: {e}")))?;
    let mut cluster = serde_json::json!({ "server": args.apiserver_url });
    match uri.scheme() {
        "https" => {
            cluster["certificate-authority"] = args.apiserver_ca_file.display().to_string().into();
        }
        "http" if is_loopback_host(uri.host_str().unwrap_or_default()) => {}
        _ => {
            return Err(fail(format!(
                "--apiserver-url {} must be https:// (http:// only on a loopback host)",
                args.apiserver_url
            )))
        }
    }
    let kubeconfig = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{ "name": "apiserver", "cluster": cluster }],
        "users": [{ "name": "broker", "user": {
            "tokenFile": args.apiserver_token_file.display().to_string(),
        } }],
        "contexts": [{ "name": "broker", "context": { "cluster": "apiserver", "user": "broker" } }],
        "current-context": "broker",
    });
    let kc: kube::config::Kubeconfig =
        serde_json::from_value(kubeconfig).map_err(|e| fail(e.to_string()))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .map_err(|e| fail(keyhaven_hsm::error_chain(&e)))?;
    let client = kube::Client::try_from(config).map_err(|e| fail(keyhaven_hsm::error_chain(&e)))?;
    Ok(Some(client))
}

fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}
