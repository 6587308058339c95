//! Unwrapped DEKs leave the broker's memory on time: real `broker` processes, their cache
//! observed through `keyhaven_broker_dek_cache_entries` on `/metrics`. Expired entries are
//! swept without a lookup; a destroyed secret's DEKs are purged on the replica that destroyed
//! it at once and on another replica (same PostgreSQL) within the documented bound.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use hsm_tests::broker::{authed, broker_token, BrokerProc, BOOTSTRAP};
use hsm_tests::broker_client::BrokerClient;
use hsm_tests::process::{http_get, runtime};
use keyhaven_broker::auth::DevIssuer;
use keyhaven_broker::service::DEK_POLL;
use keyhaven_proto::broker::v1::DeleteSecretRequest;
use testkit::postgres::Postgres;
use testkit::softhsm::SoftHsm;

const POLICY: &str = r#"
policies:
- name: web
  subjects: [{namespace: shop, serviceaccount: web}]
  paths: ["shop/*"]
  capabilities: [read]
  ttl: 5m
  max_ttl: 1h
"#;

/// Longest wait here for what the broker bounds by [`DEK_POLL`] or by a sweep interval, with
/// room for a loaded machine.
const WAIT: Duration = Duration::from_secs(10);

fn dek_entries(b: &BrokerProc) -> i64 {
    let (status, text) = http_get(&b.metrics, "/metrics");
    assert_eq!(status, 200);
    text.lines()
        .find_map(|l| l.strip_prefix("keyhaven_broker_dek_cache_entries "))
        .expect("dek cache metric")
        .trim()
        .parse()
        .unwrap()
}

/// Waits until `b` holds `n` DEKs; at most [`WAIT`].
async fn wait_entries(b: &BrokerProc, n: i64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let now = dek_entries(b);
        if now == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{now} DEKs cached, want {n}\n{}",
            b.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn web_token(hsm: &SoftHsm) -> String {
    DevIssuer::load_or_generate(&hsm.dir().join("dev.pem"))
        .unwrap()
        .mint("shop", "web", None, Duration::from_secs(600))
        .unwrap()
}

#[test]
fn expired_deks_are_swept_without_a_lookup() {
    let (hsm, pki) = broker_token();
    let b = BrokerProc::start(&hsm, &pki, &["--dek-cache-ttl", "2s"]);
    let token = web_token(&hsm);
    runtime().block_on(async {
        let mut c = BrokerClient::connect(&b, &pki).await;
        c.apply(POLICY, false).await;
        c.put("shop/db").await;
        c.put("shop/api").await;
        c.lease(&token, "shop/db").await.unwrap();
        assert!(
            dek_entries(&b) >= 1,
            "the put's or the lease's DEK is cached"
        );
        // No lookup after this: only the sweep can empty the cache.
        wait_entries(&b, 0).await;
        // And the cache still works afterwards.
        c.lease(&token, "shop/db").await.unwrap();
        assert_eq!(dek_entries(&b), 1);
    });
}

#[test]
fn a_destroyed_secrets_deks_leave_every_replica() {
    let pg = Postgres::start().unwrap();
    let (hsm, pki) = broker_token();
    let a = BrokerProc::start_on(&hsm, &pki, &pg.url(), &[]);
    let b = BrokerProc::start_on(&hsm, &pki, &pg.url(), &[]);
    let token = web_token(&hsm);
    runtime().block_on(async {
        let mut ca = BrokerClient::connect(&a, &pki).await;
        let mut cb = BrokerClient::connect(&b, &pki).await;
        ca.apply(POLICY, false).await;
        ca.put("shop/db").await;
        ca.put("shop/api").await;
        // Give B's first generation check time to pass before it caches anything.
        tokio::time::sleep(2 * DEK_POLL).await;
        for path in ["shop/db", "shop/api"] {
            ca.lease(&token, path).await.unwrap();
            cb.lease(&token, path).await.unwrap();
        }
        assert_eq!(dek_entries(&a), 2);
        assert_eq!(dek_entries(&b), 2);

        ca.admin
            .delete_secret(authed(
                DeleteSecretRequest {
                    path: "shop/db".into(),
                    destroy: true,
                },
                BOOTSTRAP,
            ))
            .await
            .unwrap();
        assert_eq!(dek_entries(&a), 1, "purged at once where it was destroyed");
        wait_entries(&b, 1).await;
        // The other secret's DEK stayed: a lease of it on B is still a cache hit.
        cb.lease(&token, "shop/api").await.unwrap();
        assert_eq!(dek_entries(&b), 1);
        ca.audit_verifies().await;
    });
}
