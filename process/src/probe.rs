//! A server's readiness asked from inside its container: `GET /readyz` on its health listener,
//! over plain HTTP/1.0. The `probe` subcommands of `broker` and `broker-agent` use it as the
//! Compose healthcheck of images that have no shell and no HTTP client. Blocking std I/O: no
//! runtime, no HTTP library.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

/// The most of the answer that is read: the status line and the reason `/readyz` gives.
const MAX_ANSWER: u64 = 4096;
/// The bound of [`run`]'s connect, send and read (a Compose healthcheck's `timeout` is a few
/// seconds).
const TIMEOUT: Duration = Duration::from_secs(2);

/// Why the server is not ready.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// Nothing answered: not listening, or no answer within the timeout.
    #[error("no answer from http://{addr}/readyz")]
    Unavailable {
        /// The address dialled.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The server answered, but not 200.
    #[error("http://{addr}/readyz answered {status_line:?}: {reason}")]
    NotReady {
        /// The address dialled.
        addr: SocketAddr,
        /// The answer's status line (`HTTP/1.1 503 Service Unavailable`).
        status_line: String,
        /// The body: the server's reason for not being ready.
        reason: String,
    },
}

/// The address to dial for a listener bound to `addr`: an unspecified address (`0.0.0.0`,
/// `::`) is reached on loopback.
pub fn dial_addr(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, addr.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, addr.port()).into(),
        _ => addr,
    }
}

/// `GET /readyz` on the health listener bound to `listen`; `Ok` with the status line when it
/// answers 200. Connecting, sending and reading are each bounded by `timeout`.
pub fn readyz(listen: SocketAddr, timeout: Duration) -> Result<String, ProbeError> {
    let addr = dial_addr(listen);
    let unavailable = |source| ProbeError::Unavailable { addr, source };
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(unavailable)?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(unavailable)?;
    let request = format!("GET /readyz HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    stream.write_all(request.as_bytes()).map_err(unavailable)?;
    let mut answer = Vec::new();
    stream
        .take(MAX_ANSWER)
        .read_to_end(&mut answer)
        .map_err(unavailable)?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status_line = head.lines().next().unwrap_or_default().to_owned();
    if status_line.split_whitespace().nth(1) == Some("200") {
        Ok(status_line)
    } else {
        Err(ProbeError::NotReady {
            addr,
            status_line,
            reason: body.trim().to_owned(),
        })
    }
}

/// What a `probe` subcommand does: [`readyz`] of the listener bound to `listen`, a line on
/// stdout and exit 0 when ready, else the reason on stderr and exit 1. `program` names the
/// binary in the message.
pub fn run(program: &str, listen: SocketAddr) -> std::process::ExitCode {
    match readyz(listen, TIMEOUT) {
        Ok(status_line) => {
            println!("{program} probe: ready ({status_line})");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            match std::error::Error::source(&e) {
                Some(cause) => eprintln!("{program} probe: {e}: {cause}"),
                None => eprintln!("{program} probe: {e}"),
            }
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A listener that answers one connection with `answer`, after reading the request (to
    /// its blank line; it must be a GET of /readyz).
    fn serve_once(answer: &'static str) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 256];
            while !request.ends_with(b"\r\n\r\n") {
                let n = conn.read(&mut buf).unwrap();
                assert!(n > 0, "the request ended early: {request:?}");
                request.extend_from_slice(&buf[..n]);
            }
            if request.starts_with(b"GET /readyz HTTP/1.0\r\n") {
                conn.write_all(answer.as_bytes()).unwrap();
            }
        });
        addr
    }

    #[test]
    fn ready_is_a_200() {
        let addr = serve_once("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nready");
        assert_eq!(readyz(addr, TIMEOUT).unwrap(), "HTTP/1.1 200 OK");
    }

    #[test]
    fn not_ready_carries_the_reason() {
        let addr = serve_once("HTTP/1.1 503 Service Unavailable\r\n\r\ndatabase: timed out\n");
        match readyz(addr, TIMEOUT).unwrap_err() {
            ProbeError::NotReady {
                status_line,
                reason,
                ..
            } => {
                assert_eq!(status_line, "HTTP/1.1 503 Service Unavailable");
                assert_eq!(reason, "database: timed out");
            }
            e => panic!("want NotReady, got {e:?}"),
        }
    }

    #[test]
    fn nothing_listening_is_unavailable() {
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        // The listener is dropped: the port refuses connections.
        let e = readyz(addr, TIMEOUT).unwrap_err();
        assert!(matches!(e, ProbeError::Unavailable { .. }), "{e:?}");
    }

    #[test]
    fn an_unspecified_address_is_dialled_on_loopback() {
        assert_eq!(
            dial_addr("0.0.0.0:9465".parse().unwrap()),
            "127.0.0.1:9465".parse().unwrap()
        );
        assert_eq!(
            dial_addr("[::]:9466".parse().unwrap()),
            "[::1]:9466".parse().unwrap()
        );
        assert_eq!(
            dial_addr("10.0.0.1:9465".parse().unwrap()),
            "10.0.0.1:9465".parse().unwrap()
        );
    }
}
