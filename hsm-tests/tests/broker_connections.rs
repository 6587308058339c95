//! The broker's connection limits on a real process: TCP connections that never start TLS
//! and stalled handshakes are closed after `--tls-handshake-timeout`, idle connections after
//! `--max-connection-age`, and no more than `--max-connections` are open at once; the
//! metrics listener closes an idle connection too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use hsm_tests::broker::{broker_token, tls_channel, BrokerProc};
use hsm_tests::process::{eventually, grpc_health, metric, runtime};

const OPEN: &str = "keyhaven_broker_connections_open";

/// Reads until the broker closes the connection (EOF or reset); false if it is still open
/// after `patience` (a bound for a hung test, not a measurement).
fn closed_by_peer(mut s: &TcpStream, patience: Duration) -> bool {
    s.set_read_timeout(Some(patience)).unwrap();
    let mut buf = [0u8; 512];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

#[test]
fn silent_connections_stalled_handshakes_and_idle_connections_are_closed() {
    let (hsm, pki) = broker_token();
    let b = BrokerProc::start(
        &hsm,
        &pki,
        &[
            "--tls-handshake-timeout",
            "1s",
            "--max-connection-age",
            "2s",
        ],
    );
    let rt = runtime();
    // The metrics listener's idle bound (10 s, keyhaven_process::http::Limits::HEALTH) runs
    // while the rest of the test does.
    let metrics_idle = TcpStream::connect(&b.metrics).unwrap();
    // A TCP connection that never sends a byte.
    let silent = TcpStream::connect(("127.0.0.1", b.port)).unwrap();
    // A handshake that stops after the first bytes of a ClientHello record.
    let stalled = TcpStream::connect(("127.0.0.1", b.port)).unwrap();
    (&stalled)
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .unwrap();
    assert!(
        closed_by_peer(&silent, Duration::from_secs(20)),
        "silent connection left open"
    );
    assert!(
        closed_by_peer(&stalled, Duration::from_secs(20)),
        "stalled handshake left open"
    );

    // A good client's connection, idle after one call, is closed at its maximum age.
    let ch = rt.block_on(tls_channel(&b.addr, &pki.ca));
    assert_eq!(rt.block_on(grpc_health(ch.clone(), "")), Ok(1));
    assert!(metric(&b.metrics, OPEN) >= 1.0);
    assert!(
        eventually(Duration::from_secs(30), || metric(&b.metrics, OPEN) == 0.0),
        "an idle connection outlived --max-connection-age"
    );
    // And the client simply reconnects.
    assert_eq!(rt.block_on(grpc_health(ch, "")), Ok(1));
    assert!(
        closed_by_peer(&metrics_idle, Duration::from_secs(30)),
        "an idle connection to the metrics listener was kept open"
    );
}

#[test]
fn no_more_than_max_connections_are_open_and_the_rest_wait() {
    let (hsm, pki) = broker_token();
    let b = BrokerProc::start(
        &hsm,
        &pki,
        &["--max-connections", "2", "--tls-handshake-timeout", "60s"],
    );
    let rt = runtime();
    let held: Vec<TcpStream> = (0..6)
        .map(|_| TcpStream::connect(("127.0.0.1", b.port)).unwrap())
        .collect();
    assert!(eventually(Duration::from_secs(10), || metric(
        &b.metrics, OPEN
    ) == 2.0));
    for _ in 0..10 {
        assert_eq!(
            metric(&b.metrics, OPEN),
            2.0,
            "more connections than --max-connections"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Once they go, waiting connections are served.
    drop(held);
    let ch = rt.block_on(tls_channel(&b.addr, &pki.ca));
    assert_eq!(rt.block_on(grpc_health(ch, "")), Ok(1));
}
