//! The broker's health as a load balancer and an operator see it, on real processes: a wrong
//! PIN keeps the process up and unready and is offered to the token once; PostgreSQL or the
//! HSM gone turns gRPC health NOT_SERVING and `/readyz` 503 within seconds, and back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hsm_tests::broker::{authed, broker_token, tls_channel, BrokerProc, BOOTSTRAP};
use hsm_tests::process::{eventually, grpc_health, http_get, metric, runtime};
use keyhaven_broker::auth::DevIssuer;
use keyhaven_proto::broker::v1::admin_client::AdminClient;
use keyhaven_proto::broker::v1::leases_client::LeasesClient;
use keyhaven_proto::broker::v1::*;
use testkit::pki::DevPki;
use testkit::postgres::Postgres;
use testkit::softhsm::{SoftHsm, USER_PIN};

const POLICY: &str = r#"
policies:
- name: app
  subjects: [{namespace: shop, serviceaccount: web}]
  paths: ["shop/*"]
  capabilities: [read]
  ttl: 5m
  max_ttl: 10m
"#;
const LEASES: &str = "keyhaven.broker.v1.Leases";
const SERVING: Result<i32, tonic::Code> = Ok(1);
const NOT_SERVING: Result<i32, tonic::Code> = Ok(2);

/// gRPC health of `service` on the broker.
fn health(
    rt: &tokio::runtime::Runtime,
    b: &BrokerProc,
    pki: &DevPki,
    service: &str,
) -> Result<i32, tonic::Code> {
    rt.block_on(async { grpc_health(tls_channel(&b.addr, &pki.ca).await, service).await })
}

fn ready(b: &BrokerProc) -> (u16, String) {
    http_get(&b.metrics, "/readyz")
}

/// Applies [`POLICY`], stores `shop/db`, and mints a token of `shop/web`.
fn setup(rt: &tokio::runtime::Runtime, b: &BrokerProc, pki: &DevPki, hsm: &SoftHsm) -> String {
    rt.block_on(async {
        let mut admin = AdminClient::new(tls_channel(&b.addr, &pki.ca).await);
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
        admin
            .put_secret(authed(
                PutSecretRequest {
                    path: "shop/db".into(),
                    data: [("password".to_string(), b"pw".to_vec())].into(),
                },
                BOOTSTRAP,
            ))
            .await
            .unwrap();
    });
    DevIssuer::load_or_generate(&hsm.dir().join("dev.pem"))
        .unwrap()
        .mint("shop", "web", Some("web-0"), Duration::from_secs(600))
        .unwrap()
}

#[test]
fn a_wrong_pin_keeps_the_broker_up_and_unready_and_is_offered_once() {
    let (hsm, pki) = broker_token();
    hsm.write_pin("0000-wrong-pin").unwrap();
    let b = BrokerProc::start_unready(&hsm, &pki, &[]);
    let rt = runtime();
    let m = b.metrics.clone();
    assert!(
        eventually(Duration::from_secs(20), || {
            testkit::http::get(&m, "/metrics").is_ok()
                && metric(&m, "keyhaven_broker_hsm_pin_source_checks") >= 3.0
        }),
        "the PIN source was not polled; log:\n{}",
        b.log_text()
    );
    assert_eq!(metric(&m, "keyhaven_broker_hsm_login_attempts"), 1.0);
    assert_eq!(metric(&m, "keyhaven_broker_hsm_pin_refused"), 1.0);
    assert_eq!(http_get(&m, "/healthz").0, 200);
    let (code, why) = ready(&b);
    assert_eq!(code, 503);
    assert!(why.contains("PIN incorrect"), "{why}");
    assert!(!why.contains("0000-wrong-pin"));
    assert_eq!(health(&rt, &b, &pki, ""), NOT_SERVING);
    assert_eq!(health(&rt, &b, &pki, LEASES), NOT_SERVING);
    // The broker's own services answer UNAVAILABLE (clients retry), not UNIMPLEMENTED.
    let code = rt.block_on(async {
        let mut leases = LeasesClient::new(tls_channel(&b.addr, &pki.ca).await);
        let req = LeaseRequest {
            path: "shop/db".into(),
            ttl_seconds: 0,
        };
        leases.lease(authed(req, "x")).await.unwrap_err().code()
    });
    assert_eq!(code, tonic::Code::Unavailable);
    assert!(
        !b.log_text().contains("0000-wrong-pin"),
        "log leaks the PIN"
    );

    // The same refused PIN written again, and SIGHUP (read the source now): nothing offered,
    // and the process is still there.
    hsm.write_pin("0000-wrong-pin").unwrap();
    let checks = metric(&m, "keyhaven_broker_hsm_pin_source_checks");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(b.pid()),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    assert!(eventually(Duration::from_secs(20), || metric(
        &m,
        "keyhaven_broker_hsm_pin_source_checks"
    ) >= checks + 2.0));
    assert_eq!(metric(&m, "keyhaven_broker_hsm_login_attempts"), 1.0);
    assert_eq!(http_get(&m, "/healthz").0, 200);

    hsm.write_pin(USER_PIN).unwrap();
    assert!(
        eventually(Duration::from_secs(30), || ready(&b).0 == 200),
        "not ready after the PIN was fixed; log:\n{}",
        b.log_text()
    );
    assert!(eventually(Duration::from_secs(10), || health(
        &rt, &b, &pki, ""
    ) == SERVING));
    assert_eq!(health(&rt, &b, &pki, LEASES), SERVING);
    assert_eq!(metric(&m, "keyhaven_broker_hsm_login_attempts"), 2.0);
    assert_eq!(metric(&m, "keyhaven_broker_hsm_pin_refused"), 0.0);
    // And it serves.
    let token = setup(&rt, &b, &pki, &hsm);
    rt.block_on(async {
        let mut leases = LeasesClient::new(tls_channel(&b.addr, &pki.ca).await);
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
        assert_eq!(l.data["password"], b"pw");
    });
}

#[test]
fn postgres_stopped_under_load_turns_health_not_serving_and_back_without_losing_a_lease() {
    let mut pg = Postgres::start().unwrap();
    let (hsm, pki) = broker_token();
    let b = BrokerProc::start_on(&hsm, &pki, &pg.url(), &[]);
    let rt = runtime();
    assert!(
        eventually(Duration::from_secs(20), || ready(&b).0 == 200),
        "{}",
        b.log_text()
    );
    let token = setup(&rt, &b, &pki, &hsm);

    // Load: leases one after another until told to stop; every granted lease id kept.
    let granted = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (granted, stop, token) = (granted.clone(), stop.clone(), token.clone());
        let ch = rt.block_on(tls_channel(&b.addr, &pki.ca));
        rt.spawn(async move {
            let mut leases = LeasesClient::new(ch);
            let mut refused = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let r = leases
                    .lease(authed(
                        LeaseRequest {
                            path: "shop/db".into(),
                            ttl_seconds: 0,
                        },
                        &token,
                    ))
                    .await;
                match r {
                    Ok(l) => granted.lock().unwrap().push(l.into_inner().lease_id),
                    Err(_) => {
                        refused += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            refused
        })
    };
    assert!(eventually(Duration::from_secs(10), || granted
        .lock()
        .unwrap()
        .len()
        >= 5));

    pg.stop();
    assert!(
        eventually(Duration::from_secs(15), || health(&rt, &b, &pki, "")
            == NOT_SERVING
            && health(&rt, &b, &pki, LEASES) == NOT_SERVING),
        "gRPC health stayed SERVING with PostgreSQL gone; log:\n{}",
        b.log_text()
    );
    let (code, why) = ready(&b);
    assert_eq!(code, 503);
    assert!(why.contains("database"), "{why}");
    assert_eq!(metric(&b.metrics, "keyhaven_broker_ready"), 0.0);

    pg.resume().unwrap();
    assert!(
        eventually(Duration::from_secs(20), || health(&rt, &b, &pki, "")
            == SERVING),
        "gRPC health did not return to SERVING; log:\n{}",
        b.log_text()
    );
    assert_eq!(ready(&b).0, 200);
    let before = granted.lock().unwrap().len();
    assert!(eventually(Duration::from_secs(20), || granted
        .lock()
        .unwrap()
        .len()
        >= before + 5));
    stop.store(true, Ordering::Relaxed);
    let refused = rt.block_on(load).unwrap();
    assert!(
        refused > 0,
        "the outage refused no lease: the test did not test an outage"
    );

    // Every lease granted is there once: each renews, and no id was handed out twice.
    let ids = granted.lock().unwrap().clone();
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "a lease id was granted twice");
    rt.block_on(async {
        let mut leases = LeasesClient::new(tls_channel(&b.addr, &pki.ca).await);
        for id in &ids {
            leases
                .renew(authed(
                    RenewRequest {
                        lease_id: id.clone(),
                        increment_seconds: 60,
                    },
                    &token,
                ))
                .await
                .unwrap_or_else(|e| panic!("lease {id} lost: {e:?}"));
        }
    });
}

#[test]
fn hsm_gone_turns_broker_health_not_serving_and_back() {
    let (hsm, pki) = broker_token();
    let b = BrokerProc::start(&hsm, &pki, &[]);
    let rt = runtime();
    assert!(eventually(Duration::from_secs(20), || health(
        &rt, &b, &pki, ""
    ) == SERVING));
    let pid = b.pid();

    let away = hsm.remove_token().unwrap();
    assert!(
        eventually(Duration::from_secs(15), || health(&rt, &b, &pki, "")
            == NOT_SERVING),
        "gRPC health stayed SERVING with the token gone; log:\n{}",
        b.log_text()
    );
    let (code, why) = ready(&b);
    assert_eq!(code, 503);
    assert!(why.contains("HSM"), "{why}");

    hsm.restore_token(away).unwrap();
    assert!(
        eventually(Duration::from_secs(30), || health(&rt, &b, &pki, "")
            == SERVING),
        "gRPC health did not return to SERVING; log:\n{}",
        b.log_text()
    );
    assert_eq!(ready(&b).0, 200);
    assert_eq!(b.pid(), pid);
}
