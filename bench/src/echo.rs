//! Baseline (b): the RPC stack alone. A bare tonic server implementing the same
//! `KeyManagementService`, served by a child process of the bench (like the plugin, so both
//! pay the same cross-process scheduling) on its own Unix socket and driven by the same client
//! code as the plugin. No HSM, no checks beyond parsing; the messages have the
//! plugin's sizes: Encrypt wraps the seed in the plugin's envelope layout (format byte, an
//! all-zero "IV", the seed, an all-zero "tag") under the plugin's key_id and annotations,
//! and Decrypt hands back the ciphertext's body bytes, i.e. the seed.

use std::path::Path;

use anyhow::Context;
use keyhaven_hsm::{GCM_IV_LEN, GCM_TAG_LEN};
use keyhaven_proto::kms::v2::key_management_service_server::{
    KeyManagementService, KeyManagementServiceServer,
};
use keyhaven_proto::kms::v2::{
    DecryptRequest, DecryptResponse, EncryptRequest, EncryptResponse, StatusRequest, StatusResponse,
};
use kms_plugin::envelope;
use testkit::process::ChildProcess;
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

#[derive(Debug)]
struct Echo {
    key_id: String,
}

#[tonic::async_trait]
impl KeyManagementService for Echo {
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(StatusResponse {
            version: "v2".into(),
            healthz: "ok".into(),
            key_id: self.key_id.clone(),
        }))
    }

    async fn decrypt(
        &self,
        req: Request<DecryptRequest>,
    ) -> Result<Response<DecryptResponse>, Status> {
        let req = req.into_inner();
        let (_iv, body) = envelope::decode(&req.ciphertext)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let plaintext = body[..body.len() - GCM_TAG_LEN].to_vec();
        Ok(Response::new(DecryptResponse { plaintext }))
    }

    async fn encrypt(
        &self,
        req: Request<EncryptRequest>,
    ) -> Result<Response<EncryptResponse>, Status> {
        let mut body = req.into_inner().plaintext;
        body.extend_from_slice(&[0; GCM_TAG_LEN]);
        Ok(Response::new(EncryptResponse {
            ciphertext: envelope::encode(&[0; GCM_IV_LEN], &body),
            key_id: self.key_id.clone(),
            annotations: envelope::annotations(),
        }))
    }
}

/// The echo server, stopped on drop.
#[derive(Debug)]
pub struct EchoServer {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl EchoServer {
    /// Binds `socket` and serves on the current runtime. `key_id` is what it answers with
    /// (pass the plugin's, so the sizes match).
    pub fn start(socket: &Path, key_id: String) -> anyhow::Result<EchoServer> {
        let listener = tokio::net::UnixListener::bind(socket)
            .with_context(|| format!("bind {}", socket.display()))?;
        let (stop, stopped) = oneshot::channel::<()>();
        // Same decoding limit as the plugin's server.
        let svc =
            KeyManagementServiceServer::new(Echo { key_id }).max_decoding_message_size(64 * 1024);
        let task = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::UnixListenerStream::new(listener),
                    async {
                        let _ = stopped.await;
                    },
                ),
        );
        Ok(EchoServer {
            stop: Some(stop),
            task,
        })
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}

/// `keyhaven-bench echo-server`: serves until SIGTERM/SIGINT (run by [`EchoProcess`]).
pub fn serve_process(args: &crate::cli::EchoArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    rt.block_on(async {
        let _server = EchoServer::start(&args.socket, args.key_id.clone())?;
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        Ok(())
    })
}

/// The echo server as a child process (this binary, `echo-server`), stopped on drop.
#[derive(Debug)]
pub struct EchoProcess {
    _process: ChildProcess,
}

impl EchoProcess {
    /// Starts it and waits until the socket accepts connections.
    pub fn start(socket: &Path, key_id: &str) -> anyhow::Result<EchoProcess> {
        let exe = std::env::current_exe().context("find this binary")?;
        let mut process = ChildProcess::spawn(
            std::process::Command::new(exe)
                .arg("echo-server")
                .arg("--socket")
                .arg(socket)
                .args(["--key-id", key_id])
                .stdout(std::process::Stdio::null()),
            "the echo server",
        )?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            process.ensure_running()?;
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "echo server did not come up"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Ok(EchoProcess { _process: process })
    }
}
