//! The `broker` binary as workloads meet it: a real process, gRPC over TLS (rustls) with a
//! throwaway CA, a real SoftHSM2 KEK, a real SQLite file, dev-mode tokens.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use hsm_tests::broker::{
    authed, broker_keys_init, broker_token, tls_channel, BrokerProc, BOOTSTRAP,
};
use hsm_tests::process::{bin_path, http_get, runtime};
use keyhaven_broker::auth::DevIssuer;
use keyhaven_proto::broker::v1::admin_client::AdminClient;
use keyhaven_proto::broker::v1::leases_client::LeasesClient;
use keyhaven_proto::broker::v1::*;
use testkit::pki::DevPki;
use testkit::softhsm::SoftHsm;
use tonic::transport::Channel;
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

#[test]
fn leases_over_tls_with_a_real_broker_process() {
    let (hsm, pki) = broker_token();
    let b = BrokerProc::start(&hsm, &pki, &[]);
    let rt = runtime();
    rt.block_on(async {
        let ch = tls_channel(&b.addr, &pki.ca).await;
        let mut admin = AdminClient::new(ch.clone());
        let mut leases = LeasesClient::new(ch.clone());
        admin
            .apply_policies(authed(
                ApplyPoliciesRequest {
                    yaml: POLICY.into(),
                    ..Default::default()
                },
                BOOTSTRAP,
            ))
            .await
            .unwrap();
        let v = admin
            .put_secret(authed(
                PutSecretRequest {
                    path: "shop/db".into(),
                    data: [("password".to_string(), b"s3cret-value".to_vec())].into(),
                },
                BOOTSTRAP,
            ))
            .await
            .unwrap()
            .into_inner()
            .version;
        assert_eq!(v, 1);

        let dev = DevIssuer::load_or_generate(&hsm.dir().join("dev.pem")).unwrap();
        let token = dev
            .mint("shop", "web", Some("web-0"), Duration::from_secs(300))
            .unwrap();
        let l = leases
            .lease(authed(
                LeaseRequest {
                    path: "shop/db".into(),
                    ttl_seconds: 0,
                },
                &token,
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(l.data["password"], b"s3cret-value");
        assert_eq!(l.ttl_seconds, 30);
        assert!(l.lease_id.starts_with("shop/web/shop/db/"));
        let r = leases
            .renew(authed(
                RenewRequest {
                    lease_id: l.lease_id.clone(),
                    increment_seconds: 60,
                },
                &token,
            ))
            .await
            .unwrap()
            .into_inner();
        assert!(!r.newer_version && r.ttl_seconds <= 60);

        // Denied path, other identity, no token, garbage token, bootstrap cannot lease.
        let e = leases
            .lease(authed(
                LeaseRequest {
                    path: "other/x".into(),
                    ttl_seconds: 0,
                },
                &token,
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
        let other = dev
            .mint("shop", "batch", None, Duration::from_secs(300))
            .unwrap();
        let e = leases
            .lease(authed(
                LeaseRequest {
                    path: "shop/db".into(),
                    ttl_seconds: 0,
                },
                &other,
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
        let e = leases
            .lease(tonic::Request::new(LeaseRequest {
                path: "shop/db".into(),
                ttl_seconds: 0,
            }))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
        let e = leases
            .lease(authed(
                LeaseRequest {
                    path: "shop/db".into(),
                    ttl_seconds: 0,
                },
                "garbage.token.here",
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
        // A workload is no admin.
        let e = admin
            .put_secret(authed(
                PutSecretRequest {
                    path: "shop/db".into(),
                    data: Default::default(),
                },
                &token,
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);

        // Operator views and revocation, then the holder cannot renew.
        let list = admin
            .list_leases(authed(
                ListLeasesRequest {
                    selector: None,
                    include_ended: false,
                },
                BOOTSTRAP,
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(list.leases.len(), 1);
        assert_eq!(list.leases[0].pod, "web-0");
        let revoked = admin
            .revoke_leases(authed(
                RevokeLeasesRequest {
                    selector: Some(LeaseSelector {
                        namespace: "shop".into(),
                        pod: "web-0".into(),
                        ..Default::default()
                    }),
                },
                BOOTSTRAP,
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(revoked.lease_ids, vec![l.lease_id.clone()]);
        let e = leases
            .renew(authed(
                RenewRequest {
                    lease_id: l.lease_id.clone(),
                    increment_seconds: 0,
                },
                &token,
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition);

        // Audit verifies, in the database and in the JSON-lines file.
        let v = admin
            .audit_verify(authed(
                AuditVerifyRequest {
                    anchor: String::new(),
                },
                BOOTSTRAP,
            ))
            .await
            .unwrap()
            .into_inner();
        assert!(v.ok, "{}", v.error);
        assert!(v.records >= 10);
        let ks = admin
            .key_status(authed(KeyStatusRequest {}, BOOTSTRAP))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(ks.keks.len(), 1);
        assert_eq!((ks.keks[0].role.as_str(), ks.keks[0].deks), ("primary", 1));

        // gRPC health.
        let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
        let s = h
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(s.status, 1, "SERVING");
    });
    let report = keyhaven_broker::audit::verify_jsonl(hsm.dir().join("audit.jsonl")).unwrap();
    assert!(report.records >= 10);
    assert_eq!(http_get(&b.metrics, "/readyz").0, 200);
    let (_, m) = http_get(&b.metrics, "/metrics");
    for needle in [
        "keyhaven_broker_active_leases 0",
        "keyhaven_broker_requests_total{method=\"Lease\",code=\"Ok\"} 1",
        "keyhaven_broker_requests_total{method=\"Lease\",code=\"PermissionDenied\"} 2",
        "keyhaven_broker_request_duration_seconds_bucket",
        "keyhaven_broker_auth_failures_total{reason=\"malformed\"}",
        "keyhaven_broker_envelope_duration_seconds_count{op=\"seal\"} 1",
        "keyhaven_broker_hsm_operation_duration_seconds_count{op=\"wrap\"} 1",
        "keyhaven_broker_dek_cache_hits",
        "keyhaven_broker_audit_commit_duration_seconds_bucket",
        "keyhaven_broker_audit_wait_duration_seconds_bucket",
    ] {
        assert!(m.contains(needle), "missing {needle} in:\n{m}");
    }
    // Every record this broker wrote went through a group commit, counted once.
    let metric = |name: &str| -> f64 {
        m.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in:\n{m}"))
    };
    let batched = metric("keyhaven_broker_audit_batch_records_sum");
    let commits = metric("keyhaven_broker_audit_commit_duration_seconds_count");
    assert!(
        batched >= 10.0 && commits >= 1.0 && commits <= batched,
        "{batched} records in {commits} commits"
    );
    assert!(
        batched <= metric("keyhaven_broker_audit_records"),
        "more records batched than in the log"
    );

    // Nothing secret in the broker's log or the audit file.
    let log = b.log_text();
    let audit = std::fs::read_to_string(hsm.dir().join("audit.jsonl")).unwrap();
    for text in [&log, &audit] {
        assert!(!text.contains("s3cret-value"));
        assert!(!text.contains(BOOTSTRAP));
        assert!(!text.contains("eyJ"), "a JWT leaked");
        assert!(!text.contains(testkit::softhsm::USER_PIN));
    }
}

#[test]
fn plaintext_is_refused_off_loopback_and_tls_is_required() {
    let hsm = SoftHsm::new().unwrap();
    broker_keys_init(&hsm);
    let out = Command::new(bin_path("broker"))
        .env("SOFTHSM2_CONF", &hsm.conf)
        .args(["--listen", "0.0.0.0:0", "--insecure-plaintext", "--dev"])
        .args(["--database-url", "sqlite::memory:"])
        .args(["--token-label", &hsm.label])
        .arg("--pin-file")
        .arg(&hsm.pin_file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
    // No TLS files and no plaintext flag: refused with a clear message.
    let out = Command::new(bin_path("broker"))
        .env("SOFTHSM2_CONF", &hsm.conf)
        .args(["--listen", "127.0.0.1:0", "--dev"])
        .args(["--database-url", "sqlite::memory:"])
        .args(["--token-label", &hsm.label])
        .arg("--pin-file")
        .arg(&hsm.pin_file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-cert"));

    // A plaintext client cannot talk to the TLS port.
    let pki = DevPki::write(hsm.dir()).unwrap();
    let b = BrokerProc::start(&hsm, &pki, &[]);
    let rt = runtime();
    let plain = b.addr.replace("https://", "http://");
    let r = rt.block_on(async {
        let ch = Channel::from_shared(plain).unwrap().connect().await;
        match ch {
            Err(_) => None,
            Ok(ch) => Some(
                LeasesClient::new(ch)
                    .lease(tonic::Request::new(LeaseRequest {
                        path: "a".into(),
                        ttl_seconds: 0,
                    }))
                    .await,
            ),
        }
    });
    if let Some(r) = r {
        assert!(r.is_err());
    }
}

fn ctl(hsm: &SoftHsm, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin_path("brokerctl"))
        .env("SOFTHSM2_CONF", &hsm.conf)
        .env_remove("KEYHAVEN_BROKER_ADDR")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn brokerctl_drives_a_real_broker() {
    let hsm = SoftHsm::new().unwrap();
    let dir = hsm.dir().to_path_buf();
    let d = |p: &str| dir.join(p).display().to_string();
    let (module, pin_file) = (
        hsm.module.display().to_string(),
        hsm.pin_file.display().to_string(),
    );
    let keys_init = [
        "keys",
        "init",
        "--pkcs11-module",
        &module,
        "--token-label",
        &hsm.label,
        "--pin-file",
        &pin_file,
    ];
    let (ok, out, err) = ctl(&hsm, &keys_init);
    assert!(ok, "{out}{err}");
    let (ok, again, _) = ctl(&hsm, &keys_init);
    assert!(ok);
    let kek_line = |s: &str| {
        s.split_whitespace()
            .find(|w| w.len() == 32 && w.bytes().all(|b| b.is_ascii_hexdigit()))
            .map(str::to_owned)
    };
    assert_eq!(
        kek_line(&out),
        kek_line(&again),
        "keys init is idempotent: {out} / {again}"
    );

    let (ok, out, err) = ctl(&hsm, &["dev-ca", "--out", &d("pki")]);
    assert!(ok, "{out}{err}");
    let pki = DevPki {
        ca: dir.join("pki/ca.pem"),
        server_cert: dir.join("pki/server.pem"),
        server_key: dir.join("pki/server-key.pem"),
        client_cert: dir.join("pki/client.pem"),
        client_key: dir.join("pki/client-key.pem"),
    };
    let b = BrokerProc::start(&hsm, &pki, &[]);
    let conn = ["--addr", &b.addr, "--ca-file", &d("pki/ca.pem")];
    let admin = |extra: &[&str]| {
        let mut a: Vec<&str> = conn.to_vec();
        let bf = d("bootstrap");
        a.extend(["--bootstrap-file", &bf]);
        a.extend_from_slice(extra);
        ctl(&hsm, &a)
    };
    std::fs::write(dir.join("policies.yaml"), POLICY).unwrap();
    let (ok, out, err) = admin(&["policy", "apply", "-f", &d("policies.yaml")]);
    assert!(ok, "{out}{err}");
    std::fs::write(dir.join("pw"), "from-a-file-value").unwrap();
    let (ok, out, err) = admin(&[
        "secrets",
        "put",
        "shop/db",
        "--from-file",
        &format!("password={}", d("pw")),
    ]);
    assert!(ok, "{out}{err}");
    let (ok, out, _) = admin(&["secrets", "list"]);
    assert!(ok && out.contains("shop/db"), "{out}");
    // Keys that would escape the sidecar's directory are refused by the broker.
    let (ok, _, _) = admin(&["secrets", "put", "shop/db", "--from-literal", "../x=1"]);
    assert!(!ok);

    let (ok, token, err) = ctl(
        &hsm,
        &[
            "dev-token",
            "--namespace",
            "shop",
            "--serviceaccount",
            "web",
            "--pod",
            "web-7",
            "--dev-key",
            &d("dev.pem"),
        ],
    );
    assert!(ok, "{err}");
    std::fs::write(dir.join("token"), token.trim()).unwrap();
    let mut w: Vec<&str> = conn.to_vec();
    let tf = d("token");
    w.extend(["--token-file", &tf, "lease", "shop/db"]);
    let (ok, out, err) = ctl(&hsm, &w);
    assert!(ok, "{out}{err}");
    assert!(out.contains("shop/web/shop/db/"), "{out}");
    assert!(
        !out.contains("from-a-file-value"),
        "values only with --show-values: {out}"
    );

    let (ok, out, _) = admin(&["leases", "list", "--namespace", "shop", "--pod", "web-7"]);
    assert!(ok && out.contains("shop/web/shop/db/"), "{out}");
    let (ok, out, err) = admin(&["leases", "revoke", "--namespace", "shop", "--pod", "web-7"]);
    assert!(ok, "{out}{err}");
    let (ok, out, _) = admin(&["leases", "list"]);
    assert!(ok && !out.contains("shop/web/shop/db/"), "{out}");

    let (ok, out, err) = admin(&["audit", "verify"]);
    assert!(ok, "{out}{err}");
    let (ok, out, _) = admin(&["keys", "status"]);
    assert!(ok && out.contains("primary"), "{out}");

    // Tamper with one audit row behind the broker's back: verify must fail.
    let rt = runtime();
    rt.block_on(async {
        let store = keyhaven_broker::store::Store::connect(&format!("sqlite://{}", d("broker.db")))
            .await
            .unwrap();
        if let keyhaven_broker::store::Pool::Sqlite(p) = store.pool() {
            sqlx::query("UPDATE audit SET path = 'shop/elsewhere' WHERE seq = 3")
                .execute(p)
                .await
                .unwrap();
        }
    });
    let (ok, out, err) = admin(&["audit", "verify"]);
    assert!(!ok, "tampering went unnoticed: {out}");
    assert!(format!("{out}{err}").contains("FAILED"), "{out}{err}");
    // Nothing secret on any output.
    assert!(!b.log.as_os_str().is_empty());
}
