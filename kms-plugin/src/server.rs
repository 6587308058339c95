//! `kms-plugin serve`: open the HSM, load the KEK ring, bind the socket, serve until told
//! to stop, then clean up the socket file.

use std::future::Future;
use std::sync::Arc;

use keyhaven_proto::kms::v2::key_management_service_server::KeyManagementServiceServer;
use tokio_stream::wrappers::UnixListenerStream;

use crate::cli::ServeArgs;
use crate::error::PluginError;
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
    let Some(keystore) = open_keystore(args.hsm.config(), stop_rx.clone()).await? else {
        return Ok(());
    };
    let plugin = Plugin::new(
        keystore,
        Timing {
            self_test_interval: args.self_test_interval,
            rescan_interval: args.rescan_interval,
            hsm_timeout: args.hsm_timeout,
        },
    );
    plugin.rescan().await?;
    plugin.self_test().await;
    plugin.spawn_background();

    let mut sighup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(PluginError::io("install SIGHUP handler"))?;
    {
        let plugin = Arc::downgrade(&plugin);
        tokio::spawn(async move {
            while sighup.recv().await.is_some() {
                match plugin.upgrade() {
                    Some(p) => p.request_rescan(),
                    None => return,
                }
            }
        });
    }

    let metrics_task = match args.metrics_addr {
        Some(maddr) => {
            let l = tokio::net::TcpListener::bind(maddr)
                .await
                .map_err(PluginError::io(format!("bind metrics address {maddr}")))?;
            tracing::info!(addr = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(), "metrics listening");
            Some(tokio::spawn(crate::http::serve_http(
                l,
                plugin.clone(),
                stop(stop_rx.clone()),
            )))
        }
        None => None,
    };

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

/// Opens the keystore. A refused PIN is not retried until the PIN source changes: the
/// process stays up (unhealthy, no socket) instead of exiting, because every restart by a
/// supervisor would be one more failed login, and real HSMs lock the PIN after a few.
/// Returns `None` if told to stop while waiting.
async fn open_keystore(
    cfg: keyhaven_hsm::Config,
    stop_rx: tokio::sync::watch::Receiver<bool>,
) -> Result<Option<keyhaven_hsm::Keystore>, PluginError> {
    use keyhaven_hsm::ErrorKind;
    use secrecy::ExposeSecret;
    loop {
        let tried = cfg.pin.read().ok();
        match keyhaven_hsm::Keystore::open(cfg.clone()).await {
            Ok(ks) => return Ok(Some(ks)),
            Err(e) if matches!(e.kind(), ErrorKind::PinIncorrect | ErrorKind::PinLocked) => {
                tracing::error!(
                    error = %e,
                    pin_source = %cfg.pin,
                    "the HSM refused the PIN; waiting for the PIN source to change before trying again"
                );
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                        _ = stop(stop_rx.clone()) => return Ok(None),
                    }
                    let now = cfg.pin.read().ok();
                    let same = match (&now, &tried) {
                        (Some(a), Some(b)) => a.expose_secret() == b.expose_secret(),
                        (None, None) => true,
                        _ => false,
                    };
                    if !same {
                        tracing::info!("PIN source changed; logging in again");
                        break;
                    }
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}
