//! `kms-plugin serve`: health and metrics first, then the HSM login (a refused PIN is never
//! offered twice: see `keyhaven_hsm::login`), the KEK ring, the socket; serve until told to
//! stop, then clean up the socket file.

use std::future::Future;
use std::sync::Arc;

use keyhaven_proto::kms::v2::key_management_service_server::KeyManagementServiceServer;
use tokio_stream::wrappers::UnixListenerStream;

use crate::cli::ServeArgs;
use crate::error::PluginError;
use crate::health::Readiness;
use crate::metrics::Metrics;
use crate::plugin::{KmsService, Plugin, Timing};
use crate::socket::{self, ListenAddr};

/// Runs the plugin until `shutdown` resolves (SIGTERM/SIGINT in the binary). SIGHUP makes
/// it re-read the KEK list at once.
pub async fn serve(
    args: ServeArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), PluginError> {
    let addr = ListenAddr::parse(&args.listen)?;
    socket::check_guarded(&addr, &args.allow_uid)?;
    let owner = args
        .socket_owner
        .as_deref()
        .map(socket::parse_owner)
        .transpose()?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
    });
    // Health and metrics first: they answer (unready, with the reason) while the login waits.
    let ready = Readiness::new(Arc::default(), Arc::new(Metrics::new()));
    let metrics_task = match args.metrics_addr {
        Some(maddr) => {
            let l = tokio::net::TcpListener::bind(maddr)
                .await
                .map_err(PluginError::io(format!("bind metrics address {maddr}")))?;
            tracing::info!(addr = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(), "metrics listening");
            Some(tokio::spawn(crate::http::serve_http(
                l,
                ready.clone(),
                stop(stop_rx.clone()),
            )))
        }
        None => None,
    };
    // SIGHUP: before the login, read the PIN source again now; after it, re-read the KEKs.
    let mut sighup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(PluginError::io("install SIGHUP handler"))?;
    {
        let ready = Arc::downgrade(&ready);
        tokio::spawn(async move {
            while sighup.recv().await.is_some() {
                let Some(r) = ready.upgrade() else { return };
                match r.plugin() {
                    Some(p) => p.request_rescan(),
                    None => r.login.recheck_now(),
                }
            }
        });
    }

    let keystore = keyhaven_hsm::login::open_when_pin_accepted(
        args.hsm.config(),
        &ready.login,
        stop(stop_rx.clone()),
    )
    .await?;
    let Some(keystore) = keystore else {
        if let Some(t) = metrics_task {
            let _ = t.await;
        }
        return Ok(());
    };
    let plugin = Plugin::with_metrics(
        keystore,
        Timing {
            self_test_interval: args.self_test_interval,
            rescan_interval: args.rescan_interval,
            hsm_timeout: args.hsm_timeout,
        },
        ready.metrics.clone(),
    );
    plugin.rescan().await?;
    plugin.self_test().await;
    plugin.spawn_background();
    ready.set_plugin(plugin.clone());
    let health = crate::health::grpc_health(&plugin, args.self_test_interval).await;

    // Bound last, so a failure above never leaves a socket file behind.
    let listener = socket::bind(&addr, args.socket_mode, owner)?;

    let allow = args.allow_uid.clone();
    let refusals = plugin.clone();
    let interceptor = move |req: tonic::Request<()>| -> Result<tonic::Request<()>, tonic::Status> {
        if allow.is_empty() {
            return Ok(req);
        }
        let uid = req
            .extensions()
            .get::<tonic::transport::server::UdsConnectInfo>()
            .and_then(|i| i.peer_cred)
            .map(|c| c.uid());
        match uid {
            Some(u) if allow.contains(&u) => Ok(req),
            other => {
                tracing::warn!(peer_uid = ?other, "refused connection from a UID not in --allow-uid");
                refusals.metrics().refused_peers.inc();
                Err(tonic::Status::permission_denied(
                    "this peer UID may not use the KMS plugin",
                ))
            }
        }
    };

    tracing::info!(
        listen = %addr,
        primary = plugin.keyring().primary().map(|k| k.key_id.as_str()).unwrap_or("<none>"),
        healthz = %plugin.healthz(),
        "kms-plugin serving"
    );
    let svc = tonic::service::interceptor::InterceptedService::new(
        KeyManagementServiceServer::new(KmsService::new(plugin.clone()))
            .max_decoding_message_size(crate::limits::MAX_REQUEST_MESSAGE),
        interceptor,
    );
    let grpc = tonic::transport::Server::builder()
        .layer(crate::limits::oversized_as_invalid_argument())
        .add_service(health)
        .add_service(svc)
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), stop(stop_rx));
    let result = grpc.await;
    if let Some(t) = metrics_task {
        let _ = t.await;
    }
    if let ListenAddr::Path(p) = &addr {
        let _ = std::fs::remove_file(p);
    }
    result.map_err(PluginError::from)
}

async fn stop(mut rx: tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
