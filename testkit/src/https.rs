//! A small HTTPS/1.1 client over rustls (ring), for servers the tests stand up with a
//! [`crate::pki::DevPki`] certificate: connect trusting one CA, send a request, read one
//! response (`Content-Length` bodies). Kept low-level on purpose, so a test can also send half
//! a request and finish it later.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};

use crate::pki::SERVER_NAME;
use crate::{Error, Result};

/// A client TLS connection.
pub type TlsStream = tokio_rustls::client::TlsStream<TcpStream>;

/// Connects to `addr` and completes a TLS handshake trusting only the PEM CA `ca`, verifying
/// the server as [`SERVER_NAME`]. A refused certificate is an error.
pub async fn connect(addr: SocketAddr, ca: &Path) -> Result<TlsStream> {
    let io = |e| Error::io(format!("TLS connect {addr}"), e);
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca).map_err(|e| io(std::io::Error::other(e)))?;
    for c in certs {
        let c = c.map_err(|e| io(std::io::Error::other(e)))?;
        roots.add(c).map_err(|e| io(std::io::Error::other(e)))?;
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| io(std::io::Error::other(e)))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.map_err(io)?;
    // One request is one write; without this, Nagle holds a second segment for the peer's
    // delayed ACK (~40 ms).
    tcp.set_nodelay(true).map_err(io)?;
    let name = ServerName::try_from(SERVER_NAME).map_err(|e| io(std::io::Error::other(e)))?;
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .map_err(io)
}

/// Writes a request (`Content-Length` set when there is a body).
pub async fn send(s: &mut TlsStream, method: &str, path: &str, body: &[u8]) -> Result<()> {
    let io = |e| Error::io(format!("{method} {path}"), e);
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {SERVER_NAME}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut request = head.into_bytes();
    request.extend_from_slice(body);
    s.write_all(&request).await.map_err(io)?;
    s.flush().await.map_err(io)
}

/// Reads one response; returns its status and body.
pub async fn read_response(s: &mut TlsStream) -> Result<(u16, String)> {
    let io = |e| Error::io("read an HTTPS response".to_owned(), e);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = s.read(&mut chunk).await.map_err(io)?;
        if n == 0 {
            return Err(io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        if buf.len() >= end + 4 + len {
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string();
            return Ok((status, body));
        }
    }
}

/// One request on a new connection; returns the response's status and body.
pub async fn request(
    addr: SocketAddr,
    ca: &Path,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<(u16, String)> {
    let mut s = connect(addr, ca).await?;
    send(&mut s, method, path, body).await?;
    read_response(&mut s).await
}
