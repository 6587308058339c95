//! A small blocking HTTP/1.0 `GET`, enough for `/healthz`, `/readyz` and `/metrics`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::{Error, Result};

/// GET `http://addr/path`; returns (status, body). Reads and writes time out after 5 s.
pub fn get(addr: &str, path: &str) -> Result<(u16, String)> {
    let io = |e| Error::io(format!("GET http://{addr}{path}"), e);
    let mut s = TcpStream::connect(addr).map_err(io)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(io)?;
    s.set_write_timeout(Some(Duration::from_secs(5)))
        .map_err(io)?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(io)?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).map_err(io)?;
    Ok(parse_response(&resp))
}

/// The status code (0 when unreadable) and body of a whole HTTP/1.x response.
fn parse_response(resp: &str) -> (u16, String) {
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp.split_once("\r\n\r\n").map_or("", |x| x.1).to_owned();
    (status, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_and_body() {
        assert_eq!(
            parse_response("HTTP/1.0 503 Service Unavailable\r\nA: b\r\n\r\nnot ready\n"),
            (503, "not ready\n".to_owned())
        );
        assert_eq!(parse_response("garbage"), (0, String::new()));
    }
}
