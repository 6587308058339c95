//! The broker under hostile input, as a real process over TLS: a flood of invalid tokens from
//! many concurrent clients, and oversized fields on every RPC. What must hold: a valid
//! workload keeps leasing, memory and the audit log grow by a bounded amount, every audit
//! record and every error message stays under its fixed maximum, and the chain verifies.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hsm_tests::broker::{authed, broker_token, BrokerProc, BOOTSTRAP};
use hsm_tests::broker_client::BrokerClient;
use hsm_tests::process::runtime;
use keyhaven_broker::audit::{verify_jsonl, AuditRecord, EventKind, MAX_RECORD_JSON_BYTES};
use keyhaven_broker::auth::DevIssuer;
use keyhaven_broker::grpc::{MAX_ERROR_MESSAGE_BYTES, MAX_LEASES_MESSAGE_BYTES};
use keyhaven_proto::broker::v1::*;
use testkit::pki::DevPki;
use testkit::softhsm::SoftHsm;
use tonic::Code;

const POLICY: &str = r#"
policies:
- name: app
  subjects: [{namespace: shop, serviceaccount: web}]
  paths: ["shop/*"]
  capabilities: [read]
  ttl: 30s
  max_ttl: 2m
"#;

/// Resident memory of process `pid`, in KiB.
fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn audit_lines(file: &Path) -> Vec<AuditRecord> {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .map(|l| {
            assert!(l.len() <= MAX_RECORD_JSON_BYTES, "{} bytes", l.len());
            AuditRecord::from_json_line(l).unwrap()
        })
        .collect()
}

/// Bytes of the broker's SQLite database and its write-ahead log.
fn db_bytes(dir: &Path) -> u64 {
    ["broker.db", "broker.db-wal"]
        .iter()
        .map(|f| std::fs::metadata(dir.join(f)).map_or(0, |m| m.len()))
        .sum()
}

fn failures(recs: &[AuditRecord]) -> Vec<&AuditRecord> {
    recs.iter()
        .filter(|r| matches!(r.event.kind, EventKind::AuthFailures(_)))
        .collect()
}

fn count(r: &AuditRecord) -> u64 {
    match r.event.kind {
        EventKind::AuthFailures(n) => n,
        _ => 0,
    }
}

fn setup(extra: &[&str]) -> (SoftHsm, DevPki, BrokerProc) {
    let (hsm, pki) = broker_token();
    let b = BrokerProc::start(&hsm, &pki, extra);
    (hsm, pki, b)
}

#[test]
fn a_flood_of_invalid_tokens_is_limited_and_audited_in_aggregate() {
    // One flush, at shutdown: every failure of the flood lands in one record per reason.
    // (No per-identity limit: the valid workload leases as fast as it can.)
    let (hsm, pki, mut b) = setup(&[
        "--auth-failure-audit-interval",
        "1h",
        "--rate-limit",
        "0",
        "--auth-refusal-delay",
        "100ms",
    ]);
    let dev = DevIssuer::load_or_generate(&hsm.dir().join("dev.pem")).unwrap();
    let stranger = DevIssuer::generate().unwrap();
    let rt = runtime();
    let (failed, valid, rss_growth) = rt.block_on(async {
        let mut c = BrokerClient::connect(&b, &pki).await;
        c.apply(POLICY, false).await;
        c.put("shop/db").await;
        let token = dev
            .mint("shop", "web", Some("web-1"), Duration::from_secs(600))
            .unwrap();
        // Verified once before the flood: remembered, so not limited by it.
        c.lease(&token, "shop/db").await.unwrap();
        let rss0 = rss_kib(b.pid());

        // The valid workload leases throughout the flood.
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let workload = {
            let mut vc = BrokerClient::connect(&b, &pki).await;
            let (done, token) = (done.clone(), token.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while !done.load(std::sync::atomic::Ordering::SeqCst) {
                    vc.lease(&token, "shop/db")
                        .await
                        .expect("a valid Lease during the flood");
                    n += 1;
                }
                n
            })
        };
        const FLOODERS: usize = 64;
        const ATTEMPTS: usize = 40;
        let mut flood = tokio::task::JoinSet::new();
        for i in 0..FLOODERS {
            let mut fc = BrokerClient::connect(&b, &pki).await;
            let forged = stranger
                .mint("shop", "web", None, Duration::from_secs(600))
                .unwrap();
            flood.spawn(async move {
                let mut codes = Vec::new();
                for j in 0..ATTEMPTS {
                    let req = LeaseRequest {
                        path: "shop/db".into(),
                        ttl_seconds: 0,
                    };
                    let req = match (i + j) % 4 {
                        0 => tonic::Request::new(req),
                        1 => authed(req, &forged),
                        2 => authed(req, &format!("garbage.{i}.{j}")),
                        _ => authed(req, &format!("{forged}x")),
                    };
                    codes.push(fc.leases.lease(req).await.unwrap_err().code());
                }
                codes
            });
        }
        let mut codes = Vec::new();
        while let Some(r) = flood.join_next().await {
            codes.extend(r.unwrap());
        }
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        let valid = workload.await.unwrap();
        assert!(valid > 0);
        assert_eq!(codes.len(), FLOODERS * ATTEMPTS);
        assert!(codes
            .iter()
            .all(|c| matches!(c, Code::Unauthenticated | Code::ResourceExhausted)));
        let limited = codes
            .iter()
            .filter(|c| **c == Code::ResourceExhausted)
            .count();
        assert!(limited > 0, "the per-peer limit never refused");
        c.lease(&token, "shop/db")
            .await
            .expect("a valid Lease after the flood");
        let rss1 = rss_kib(b.pid());
        // Nothing of the flood is written yet: its counts wait for the flush.
        c.audit_verifies().await;
        (codes.len() as u64, valid, rss1.saturating_sub(rss0))
    });
    // Memory: a bounded table of peers and of counts, nothing per attempt.
    assert!(rss_growth < 64 * 1024, "RSS grew by {rss_growth} KiB");
    assert!(b.terminate().is_some_and(|s| s.success()));
    let file: PathBuf = b.dir.join("audit.jsonl");
    let recs = audit_lines(&file);
    let agg = failures(&recs);
    assert_eq!(agg.iter().map(|r| count(r)).sum::<u64>(), failed);
    // One record per (peer, reason, outcome): missing_credential, the token refusals and
    // the per-peer limit — a handful for 2,560 attempts.
    let mut keys: Vec<_> = agg
        .iter()
        .map(|r| {
            (
                r.event.identity.clone(),
                r.event.reason.clone(),
                r.event.outcome,
            )
        })
        .collect();
    let n = keys.len();
    keys.sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
    keys.dedup();
    assert_eq!(keys.len(), n, "{keys:?}");
    assert!(n <= 6, "{keys:?}");
    assert!(agg
        .iter()
        .all(|r| r.event.identity.as_deref() == Some("peer:127.0.0.1")));
    assert!(agg
        .iter()
        .any(|r| r.event.reason.as_deref() == Some("missing_credential")));
    assert!(agg
        .iter()
        .any(|r| r.event.reason.as_deref() == Some("peer_rate_limited")));
    // Every other record belongs to the valid workload (two per Lease: its authentication's
    // and its own) or to the three admin calls of the setup (two each).
    let other = (recs.len() - n) as u64;
    assert_eq!(
        other,
        2 * (valid + 2) + 6,
        "{other} records for {valid} leases"
    );
    assert!(verify_jsonl(&file).is_ok());
}

/// Checks one call's outcome: the error message under its bound, and the audit file grown by
/// at most `records` records.
struct Probe {
    file: PathBuf,
    size: u64,
}

impl Probe {
    fn new(file: PathBuf) -> Probe {
        let size = std::fs::metadata(&file).map_or(0, |m| m.len());
        Probe { file, size }
    }

    fn check<T: std::fmt::Debug>(&mut self, what: &str, r: Result<T, tonic::Status>) {
        if let Err(s) = &r {
            assert!(
                s.message().len() <= MAX_ERROR_MESSAGE_BYTES,
                "{what}: {} bytes of message",
                s.message().len()
            );
            assert!(!s.message().contains("xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"), "{what}: echoes over 128 bytes of input");
        }
        let size = std::fs::metadata(&self.file).map_or(0, |m| m.len());
        let grown = size - self.size;
        // The authentication record and the call's own.
        assert!(
            grown <= 2 * (MAX_RECORD_JSON_BYTES as u64 + 1),
            "{what}: the audit file grew by {grown} bytes"
        );
        self.size = size;
    }
}

#[test]
fn oversized_fields_on_every_rpc_stay_bounded() {
    let (hsm, pki, b) = setup(&["--auth-failure-audit-interval", "1s"]);
    let dev = DevIssuer::load_or_generate(&hsm.dir().join("dev.pem")).unwrap();
    let file = b.dir.join("audit.jsonl");
    let rt = runtime();
    rt.block_on(async {
        let mut c = BrokerClient::connect(&b, &pki).await;
        c.apply(POLICY, false).await;
        c.put("shop/db").await;
        let with_policy = dev
            .mint("shop", "web", Some("web-1"), Duration::from_secs(600))
            .unwrap();
        let no_policy = dev
            .mint("nobody", "none", Some("n-1"), Duration::from_secs(600))
            .unwrap();
        let head = c.audit_tail(0).await.last().unwrap().seq;
        let mut p = Probe::new(file.clone());

        // Over the Leases message limit: refused by the transport, nothing stored.
        let huge = format!("shop/{}", "x".repeat(1 << 20));
        let e = c
            .leases
            .lease(authed(
                LeaseRequest {
                    path: huge.clone(),
                    ttl_seconds: 0,
                },
                &with_policy,
            ))
            .await
            .unwrap_err();
        assert_ne!(e.code(), Code::Ok);
        p.check("Lease over the message limit", Err::<(), _>(e));

        // Just under it: every field reaches validation and the audit log.
        let long = format!("shop/{}", "x".repeat(MAX_LEASES_MESSAGE_BYTES - 100));
        let big = format!("shop/{}", "x".repeat(3 << 20));
        let db_before = db_bytes(&b.dir);
        let mut requests = 0u64;
        for cred in [BOOTSTRAP, &with_policy, &no_policy, "garbage.token.here"] {
            let who = &cred[..cred.len().min(8)];
            let l = &mut c.leases;
            let r = l
                .lease(authed(
                    LeaseRequest {
                        path: long.clone(),
                        ttl_seconds: 0,
                    },
                    cred,
                ))
                .await;
            p.check(&format!("Lease as {who}"), r);
            let r = l
                .renew(authed(
                    RenewRequest {
                        lease_id: long.clone(),
                        increment_seconds: u64::MAX,
                    },
                    cred,
                ))
                .await;
            p.check(&format!("Renew as {who}"), r);
            let r = l
                .revoke(authed(
                    RevokeRequest {
                        lease_id: long.clone(),
                    },
                    cred,
                ))
                .await;
            p.check(&format!("Revoke as {who}"), r);

            let a = &mut c.admin;
            let r = a
                .put_secret(authed(
                    PutSecretRequest {
                        path: big.clone(),
                        data: Default::default(),
                    },
                    cred,
                ))
                .await;
            p.check(&format!("PutSecret path as {who}"), r);
            let r = a
                .put_secret(authed(
                    PutSecretRequest {
                        path: "shop/other".into(),
                        data: [(big.clone(), b"v".to_vec())].into(),
                    },
                    cred,
                ))
                .await;
            p.check(&format!("PutSecret key as {who}"), r);
            let r = a
                .list_secrets(authed(
                    ListSecretsRequest {
                        prefix: big.clone(),
                    },
                    cred,
                ))
                .await;
            p.check(&format!("ListSecrets as {who}"), r);
            let r = a
                .secret_metadata(authed(SecretMetadataRequest { path: big.clone() }, cred))
                .await;
            p.check(&format!("SecretMetadata as {who}"), r);
            let r = a
                .delete_secret(authed(
                    DeleteSecretRequest {
                        path: big.clone(),
                        destroy: true,
                    },
                    cred,
                ))
                .await;
            p.check(&format!("DeleteSecret as {who}"), r);
            let r = a
                .apply_policies(authed(
                    ApplyPoliciesRequest {
                        yaml: format!("policies: [{{name: \"{big}\"}}]\n{big}"),
                        dry_run: true,
                    },
                    cred,
                ))
                .await;
            p.check(&format!("ApplyPolicies as {who}"), r);
            let selector = |s: LeaseSelector| Some(s);
            let r = a
                .list_leases(authed(
                    ListLeasesRequest {
                        selector: selector(LeaseSelector {
                            path_prefix: big.clone(),
                            ..Default::default()
                        }),
                        include_ended: true,
                    },
                    cred,
                ))
                .await;
            p.check(&format!("ListLeases as {who}"), r);
            let r = a
                .revoke_leases(authed(
                    RevokeLeasesRequest {
                        selector: selector(LeaseSelector {
                            namespace: big.clone(),
                            pod: big.clone(),
                            ..Default::default()
                        }),
                    },
                    cred,
                ))
                .await;
            p.check(&format!("RevokeLeases as {who}"), r);
            let r = a
                .audit_verify(authed(
                    AuditVerifyRequest {
                        anchor: big.clone(),
                    },
                    cred,
                ))
                .await;
            p.check(&format!("AuditVerify as {who}"), r);
            let r = a
                .retire_key(authed(
                    RetireKeyRequest {
                        kek_id: big.clone(),
                    },
                    cred,
                ))
                .await;
            p.check(&format!("RetireKey as {who}"), r);
            requests += 13;
        }
        // The database grew by pages, not by what the requests sent (3 MiB fields): at most
        // two bounded records per request, plus page slack.
        let grown = db_bytes(&b.dir).saturating_sub(db_before);
        assert!(
            grown <= requests * 2 * MAX_RECORD_JSON_BYTES as u64 + (2 << 20),
            "the database grew by {grown} bytes for {requests} requests"
        );
        // The refusals without an identity are written at the next flush (every second).
        let deadline = Instant::now() + Duration::from_secs(30);
        while failures(&audit_lines(&file)).is_empty() {
            assert!(
                Instant::now() < deadline,
                "no aggregated record was written"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Every record, as the database holds it, is under the bound too.
        let stored = c.audit_tail(head).await;
        assert!(stored.len() > 20, "{} records", stored.len());
        for r in &stored {
            let line = r.to_json_line();
            assert!(line.len() <= MAX_RECORD_JSON_BYTES, "{} bytes", line.len());
            assert_eq!(r.computed_hash(), r.hash);
        }
        assert!(stored.iter().any(|r| r
            .event
            .path
            .as_deref()
            .is_some_and(|p| p.contains(&format!("len:{}]", big.len())))));
        c.audit_verifies().await;
    });
    assert!(verify_jsonl(&file).is_ok());
}
