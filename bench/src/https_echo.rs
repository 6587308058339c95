//! Baseline of `keyhaven-bench injector`: a bare HTTPS echo on the injector's stack (rustls with
//! ring, hyper HTTP/1.1 with keep-alive, a tokio runtime) that answers every request with its
//! own body. Run as a child process of the bench, like the injector, so both pay the same
//! cross-process costs; the difference is the admission work itself.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use testkit::process::ChildProcess;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// `keyhaven-bench https-echo-server`: serves until killed.
pub fn serve_process(args: &crate::cli::HttpsEchoArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    rt.block_on(serve(args.listen, &args.cert, &args.key))
}

async fn serve(addr: SocketAddr, cert: &Path, key: &Path) -> anyhow::Result<()> {
    let chain = CertificateDer::pem_file_iter(cert)
        .context("read the certificate")?
        .collect::<Result<Vec<_>, _>>()
        .context("parse the certificate")?;
    let key = PrivateKeyDer::from_pem_file(key).context("read the key")?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let svc = hyper::service::service_fn(|req: hyper::Request<Incoming>| async move {
                let body = req.into_body().collect().await?.to_bytes();
                let resp = hyper::Response::builder()
                    .header("content-type", "application/json")
                    .body(Full::<Bytes>::new(body))
                    .unwrap_or_default();
                Ok::<_, hyper::Error>(resp)
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        });
    }
}

/// The echo server as a child process (this binary, `https-echo-server`), stopped on drop.
#[derive(Debug)]
pub struct HttpsEchoProcess {
    _process: ChildProcess,
}

impl HttpsEchoProcess {
    /// Starts it on `addr` with the given certificate and key.
    pub fn start(addr: SocketAddr, cert: &Path, key: &Path, log: &Path) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("find this binary")?;
        let process = ChildProcess::spawn_logged(
            std::process::Command::new(exe)
                .arg("https-echo-server")
                .arg("--listen")
                .arg(addr.to_string())
                .arg("--cert")
                .arg(cert)
                .arg("--key")
                .arg(key),
            "the HTTPS echo server",
            log,
        )?;
        Ok(Self { _process: process })
    }
}
