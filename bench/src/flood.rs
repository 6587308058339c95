//! The flood row of `keyhaven-bench broker`: Lease throughput of [`VALID_CLIENTS`] valid
//! clients alone, then while [`FLOODERS`] clients send Lease with forged tokens back to back
//! (a real key id and a broken signature: each one admitted costs a signature check), against
//! a broker with its default limits before authentication. The target: the flooded
//! throughput is at least [`TARGET_RATIO`] of the one alone.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use keyhaven_broker::auth::DevIssuer;
use keyhaven_proto::broker::v1::leases_client::LeasesClient;
use keyhaven_proto::broker::v1::LeaseRequest;
use tonic::transport::Endpoint;

use crate::cli::Db;
use crate::leases::{self, BenchSecret, ClientId};
use crate::load::{Summary, Window};

/// Valid clients in the row.
pub const VALID_CLIENTS: usize = 16;
/// Clients sending invalid tokens.
pub const FLOODERS: usize = 64;
/// Flooded / alone throughput the row must reach.
pub const TARGET_RATIO: f64 = 0.8;

/// One database's flood row.
#[derive(Debug)]
pub struct FloodRow {
    /// Database.
    pub db: Db,
    /// Valid Lease load alone.
    pub alone: Summary,
    /// The same during the flood.
    pub flooded: Summary,
    /// Invalid attempts per second during the flood.
    pub attempts_per_s: f64,
    /// Share of them refused by the limits before authentication.
    pub limited: f64,
    /// Invalid attempts that did not fail as they should (never expected).
    pub accepted: u64,
}

/// The valid load alone, then under the flood.
pub async fn measure(
    db: Db,
    ep: &Endpoint,
    ids: &[ClientId],
    issuer: &DevIssuer,
    per_channel: usize,
    secrets: &Arc<Vec<BenchSecret>>,
    window: Window,
) -> anyhow::Result<FloodRow> {
    let one = std::slice::from_ref(ep);
    let ids = &ids[..VALID_CLIENTS.min(ids.len())];
    let alone = leases::lease(one, ids, ids.len(), per_channel, secrets, window).await?;

    let good = issuer
        .mint("bench-flood", "attacker", None, Duration::from_secs(3600))
        .context("mint the token to forge")?;
    let forged = format!("{}AAAA", &good[..good.len() - 4]);
    let stop = Arc::new(AtomicBool::new(false));
    let (attempts, limited, accepted) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let mut flood = tokio::task::JoinSet::new();
    for _ in 0..FLOODERS {
        let mut c = LeasesClient::new(ep.connect().await.context("connect a flooder")?);
        let (stop, attempts, limited, accepted) = (
            stop.clone(),
            attempts.clone(),
            limited.clone(),
            accepted.clone(),
        );
        let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {forged}")
            .parse()
            .context("forged token as metadata")?;
        flood.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let mut r = tonic::Request::new(LeaseRequest {
                    path: "bench/secret-0".into(),
                    ttl_seconds: 0,
                });
                r.metadata_mut().insert("authorization", bearer.clone());
                match c.lease(r).await {
                    Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                        limited.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(s) if s.code() == tonic::Code::Unauthenticated => {}
                    _ => {
                        accepted.fetch_add(1, Ordering::Relaxed);
                    }
                }
                attempts.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    let t0 = Instant::now();
    let flooded = leases::lease(one, ids, ids.len(), per_channel, secrets, window).await;
    let secs = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    while flood.join_next().await.is_some() {}
    let flooded = flooded?;
    let n = attempts.load(Ordering::Relaxed);
    Ok(FloodRow {
        db,
        alone,
        flooded,
        attempts_per_s: n as f64 / secs.max(f64::MIN_POSITIVE),
        limited: limited.load(Ordering::Relaxed) as f64 / (n.max(1) as f64),
        accepted: accepted.load(Ordering::Relaxed),
    })
}

/// The flood table and its verdict lines.
pub fn table(rows: &[FloodRow]) -> String {
    let mut out = format!(
        "\nLease at {VALID_CLIENTS} clients while {FLOODERS} clients send forged tokens \
         (broker with its default limits before authentication):\n{:<9} {:>12} {:>12} {:>7} \
         {:>8} {:>8} {:>12} {:>9}\n",
        "db", "alone ops/s", "flood ops/s", "ratio", "errors", "p99 µs", "flood att/s", "limited"
    );
    for r in rows {
        let ratio = r.flooded.throughput / r.alone.throughput.max(f64::MIN_POSITIVE);
        let _ = writeln!(
            out,
            "{:<9} {:>12.0} {:>12.0} {:>7.2} {:>8} {:>8.0} {:>12.0} {:>8.0}%",
            r.db,
            r.alone.throughput,
            r.flooded.throughput,
            ratio,
            r.alone.errors + r.flooded.errors,
            r.flooded.p99.as_secs_f64() * 1e6,
            r.attempts_per_s,
            r.limited * 100.0
        );
        let verdict = if r.accepted > 0 {
            format!("FAIL ({} forged tokens accepted)", r.accepted)
        } else if ratio >= TARGET_RATIO && r.flooded.errors == 0 {
            "ok".to_owned()
        } else {
            "MISSED".to_owned()
        };
        let _ = writeln!(
            out,
            "verdict: {}: valid Lease under a flood of invalid tokens >= {TARGET_RATIO}x alone: \
             {ratio:.2}x, {} errors: {verdict}",
            r.db, r.flooded.errors
        );
    }
    out
}
