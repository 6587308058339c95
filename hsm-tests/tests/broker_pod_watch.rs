//! Leases die with their pod and their service account: real `broker` processes (SQLite, and
//! two on one real PostgreSQL) watching a fake apiserver ([`FakeKube`]) that speaks the list +
//! watch protocol, with dev tokens bound to pods (name and uid).
//!
//! Unverified here, for want of a real apiserver: the exact metadata-only content negotiation
//! and bookmarks of a real apiserver, paginated lists (`limit`/`continue`), and RBAC.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use hsm_tests::broker::{broker_token, BrokerProc};
use hsm_tests::broker_client::BrokerClient;
use hsm_tests::kube_watch::{FakeKube, Kind};
use hsm_tests::process::{http_get, runtime};
use keyhaven_broker::auth::DevIssuer;
use keyhaven_broker::service::{REVOKED_POD_DELETED, REVOKED_SERVICEACCOUNT_DELETED};
use testkit::pki::DevPki;
use testkit::postgres::Postgres;
use testkit::softhsm::SoftHsm;
use tonic::Code;

const POLICY: &str = r#"
policies:
- name: shop
  subjects: [{namespace: shop, serviceaccount: "*"}]
  paths: ["shop/*"]
  capabilities: [read]
  ttl: 5m
  max_ttl: 1h
"#;

/// The broker's own token for the fake apiserver.
const API_TOKEN: &str = "broker-sa-token";

/// How long a deletion may take to end its leases here: the watch event (or the watcher's
/// backoff after a broken watch, 0.8 s then doubling) plus one transaction.
const BOUND: Duration = Duration::from_secs(10);

/// A fake apiserver with the shop's service accounts and pods `web-0` (uid `uid-web-0-a`),
/// `web-1`, `batch-0`.
fn cluster() -> FakeKube {
    let k = FakeKube::start(API_TOKEN);
    k.add(Kind::ServiceAccounts, "shop", "web", "sa-web");
    k.add(Kind::ServiceAccounts, "shop", "batch", "sa-batch");
    k.add(Kind::Pods, "shop", "web-0", "uid-web-0-a");
    k.add(Kind::Pods, "shop", "web-1", "uid-web-1");
    k.add(Kind::Pods, "shop", "batch-0", "uid-batch-0");
    k
}

fn start(hsm: &SoftHsm, pki: &DevPki, db: Option<&str>, kube: &FakeKube) -> BrokerProc {
    let token_file = hsm.dir().join("api-token");
    std::fs::write(&token_file, API_TOKEN).unwrap();
    let args = [
        "--pod-watch",
        "on",
        "--apiserver-url",
        &kube.url,
        "--apiserver-token-file",
        token_file.to_str().unwrap(),
    ];
    match db {
        Some(url) => BrokerProc::start_on(hsm, pki, url, &args),
        None => BrokerProc::start(hsm, pki, &args),
    }
}

/// Waits until the broker watches both resources.
fn wait_watching(kube: &FakeKube, n: usize) {
    let deadline = Instant::now() + BOUND;
    while kube.watching(Kind::Pods) < n || kube.watching(Kind::ServiceAccounts) < n {
        assert!(Instant::now() < deadline, "{:?}", kube.requests());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A [`BrokerClient`] with this file's policy and secret.
struct Client(BrokerClient);

impl std::ops::Deref for Client {
    type Target = BrokerClient;
    fn deref(&self) -> &BrokerClient {
        &self.0
    }
}

impl std::ops::DerefMut for Client {
    fn deref_mut(&mut self) -> &mut BrokerClient {
        &mut self.0
    }
}

impl Client {
    async fn connect(b: &BrokerProc, pki: &DevPki) -> Client {
        Client(BrokerClient::connect(b, pki).await)
    }

    async fn setup(&mut self) {
        self.apply(POLICY, false).await;
        self.put("shop/db").await;
    }

    /// Leases `shop/db` with `token`; the lease id.
    async fn lease_db(&mut self, token: &str) -> String {
        self.lease(token, "shop/db").await.unwrap().lease_id
    }

    /// Waits up to [`BOUND`] for lease `id` to end; returns its end reason.
    async fn ended(&mut self, id: &str, log: impl Fn() -> String) -> String {
        let deadline = Instant::now() + BOUND;
        loop {
            let l = self.lease_info(id).await;
            if l.ended_unix_ms != 0 {
                return l.end_reason;
            }
            assert!(Instant::now() < deadline, "lease {id} not ended\n{}", log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn active(&mut self, id: &str) -> bool {
        self.lease_info(id).await.ended_unix_ms == 0
    }
}

/// The `revoke` records in the broker's audit file for lease `id` with `reason`.
fn revoke_records(b: &BrokerProc, id: &str, reason: &str) -> usize {
    std::fs::read_to_string(b.dir.join("audit.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["kind"] == "revoke" && r["lease_id"] == id && r["reason"] == reason)
        .count()
}

fn mint(hsm: &SoftHsm, sa: &str, pod: &str, uid: &str) -> String {
    DevIssuer::load_or_generate(&hsm.dir().join("dev.pem"))
        .unwrap()
        .mint_for_pod_uid("shop", sa, pod, uid, Duration::from_secs(600))
        .unwrap()
}

#[test]
fn a_deleted_pod_loses_its_leases_and_a_namesake_pod_keeps_its_own() {
    let (hsm, pki) = broker_token();
    let kube = cluster();
    let b = start(&hsm, &pki, None, &kube);
    wait_watching(&kube, 1);
    let web0 = mint(&hsm, "web", "web-0", "uid-web-0-a");
    let web1 = mint(&hsm, "web", "web-1", "uid-web-1");
    let rt = runtime();
    rt.block_on(async {
        let mut c = Client::connect(&b, &pki).await;
        c.setup().await;
        let gone = [c.lease_db(&web0).await, c.lease_db(&web0).await];
        let other = c.lease_db(&web1).await;

        kube.delete(Kind::Pods, "shop", "web-0");
        for id in &gone {
            assert_eq!(c.ended(id, || b.log_text()).await, REVOKED_POD_DELETED);
            assert_eq!(revoke_records(&b, id, REVOKED_POD_DELETED), 1);
        }
        assert!(c.active(&other).await);
        // Renewing a lease of the deleted pod is refused.
        let e = c.renew(&web0, &gone[0]).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

        // The StatefulSet makes web-0 again: another uid, its own leases (that a late
        // deletion event of the old web-0 does not touch is tested with a broken watch below).
        kube.add(Kind::Pods, "shop", "web-0", "uid-web-0-b");
        let web0b = mint(&hsm, "web", "web-0", "uid-web-0-b");
        let again = c.lease_db(&web0b).await;
        // Deleting a pod that holds no lease changes nothing.
        kube.add(Kind::Pods, "shop", "web-9", "uid-web-9");
        kube.delete(Kind::Pods, "shop", "web-9");
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(c.active(&again).await);
        assert!(c.active(&other).await);
        c.renew(&web0b, &again).await.unwrap();
        c.audit_verifies().await;
    });
    let (_, m) = http_get(&b.metrics, "/metrics");
    assert!(
        m.contains(
            r#"keyhaven_broker_holder_gone_ended_leases_total{reason="revoked:pod_deleted"} 2"#
        ),
        "{m}"
    );
}

#[test]
fn a_deleted_service_account_loses_its_leases() {
    let (hsm, pki) = broker_token();
    let kube = cluster();
    let b = start(&hsm, &pki, None, &kube);
    wait_watching(&kube, 1);
    let batch = mint(&hsm, "batch", "batch-0", "uid-batch-0");
    let web = mint(&hsm, "web", "web-1", "uid-web-1");
    runtime().block_on(async {
        let mut c = Client::connect(&b, &pki).await;
        c.setup().await;
        let gone = c.lease_db(&batch).await;
        let kept = c.lease_db(&web).await;
        kube.delete(Kind::ServiceAccounts, "shop", "batch");
        assert_eq!(
            c.ended(&gone, || b.log_text()).await,
            REVOKED_SERVICEACCOUNT_DELETED
        );
        assert_eq!(revoke_records(&b, &gone, REVOKED_SERVICEACCOUNT_DELETED), 1);
        assert!(c.active(&kept).await);
        c.audit_verifies().await;
    });
    // Without a Kubernetes API the broker says at start that leases then end at expiry.
    drop(b);
    let plain = BrokerProc::start(&hsm, &pki, &[]);
    let deadline = Instant::now() + BOUND;
    while !plain.log_text().contains("watch off") {
        assert!(Instant::now() < deadline, "{}", plain.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_watch_broken_by_a_dropped_connection_or_410_gone_misses_no_deletion() {
    let (hsm, pki) = broker_token();
    let kube = cluster();
    kube.add(Kind::Pods, "shop", "web-2", "uid-web-2");
    let b = start(&hsm, &pki, None, &kube);
    wait_watching(&kube, 1);
    let web0 = mint(&hsm, "web", "web-0", "uid-web-0-a");
    let web1 = mint(&hsm, "web", "web-1", "uid-web-1");
    let web2 = mint(&hsm, "web", "web-2", "uid-web-2");
    let lists = |k: &FakeKube| k.requests().iter().filter(|r| *r == "list pods").count();
    runtime().block_on(async {
        let mut c = Client::connect(&b, &pki).await;
        c.setup().await;
        let l0 = c.lease_db(&web0).await;
        let l1 = c.lease_db(&web1).await;
        let l2 = c.lease_db(&web2).await;
        assert_eq!(lists(&kube), 1);

        // The connection drops and the apiserver is away while web-0 is deleted (and made
        // again under another uid): the watch resumes from its resourceVersion and the
        // apiserver replays the deletion.
        kube.set_down(true);
        kube.delete(Kind::Pods, "shop", "web-0");
        kube.add(Kind::Pods, "shop", "web-0", "uid-web-0-b");
        let web0b = mint(&hsm, "web", "web-0", "uid-web-0-b");
        let l0b = c.lease_db(&web0b).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(c.active(&l0).await, "acted while the apiserver was away");
        kube.set_down(false);
        assert_eq!(c.ended(&l0, || b.log_text()).await, REVOKED_POD_DELETED);
        assert!(c.active(&l0b).await);
        assert_eq!(lists(&kube), 1, "{:?}", kube.requests());

        // The watch expires (410 Gone) and the apiserver is away while web-1 is deleted: no
        // event will ever tell; the new list does.
        kube.expire_watches();
        kube.set_down(true);
        kube.delete(Kind::Pods, "shop", "web-1");
        tokio::time::sleep(Duration::from_secs(1)).await;
        kube.set_down(false);
        assert_eq!(c.ended(&l1, || b.log_text()).await, REVOKED_POD_DELETED);
        assert!(lists(&kube) >= 2, "{:?}", kube.requests());
        assert_eq!(revoke_records(&b, &l1, REVOKED_POD_DELETED), 1);
        // The pods still listed keep their leases (web-0 under its new uid too).
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(c.active(&l2).await);
        assert!(c.active(&l0b).await);
        c.renew(&web2, &l2).await.unwrap();
        c.audit_verifies().await;
    });
}

#[test]
fn two_replicas_watching_the_same_apiserver_end_each_lease_once() {
    let pg = Postgres::start().unwrap();
    let (hsm, pki) = broker_token();
    let kube = cluster();
    const PODS: usize = 6;
    for i in 0..PODS {
        kube.add(
            Kind::Pods,
            "shop",
            &format!("app-{i}"),
            &format!("uid-app-{i}"),
        );
    }
    let a = start(&hsm, &pki, Some(&pg.url()), &kube);
    let b = start(&hsm, &pki, Some(&pg.url()), &kube);
    wait_watching(&kube, 2);
    let rt = runtime();
    let ids = rt.block_on(async {
        let mut ca = Client::connect(&a, &pki).await;
        let mut cb = Client::connect(&b, &pki).await;
        ca.setup().await;
        tokio::time::sleep(keyhaven_broker::service::POLICY_BOUND).await;
        let mut ids = Vec::new();
        for i in 0..PODS {
            let t = mint(&hsm, "web", &format!("app-{i}"), &format!("uid-app-{i}"));
            ids.push(ca.lease_db(&t).await);
            ids.push(cb.lease_db(&t).await);
        }
        let batch = mint(&hsm, "batch", "batch-0", "uid-batch-0");
        let by_sa = ca.lease_db(&batch).await;
        for i in 0..PODS {
            kube.delete(Kind::Pods, "shop", &format!("app-{i}"));
        }
        kube.delete(Kind::ServiceAccounts, "shop", "batch");
        for id in &ids {
            assert_eq!(ca.ended(id, || a.log_text()).await, REVOKED_POD_DELETED);
        }
        assert_eq!(
            cb.ended(&by_sa, || b.log_text()).await,
            REVOKED_SERVICEACCOUNT_DELETED
        );
        // Both replicas have acted by now (or found nothing left to end).
        tokio::time::sleep(Duration::from_secs(2)).await;
        ca.audit_verifies().await;
        cb.audit_verifies().await;
        ids.push(by_sa);
        ids
    });
    // One record per ended lease, whichever replica ended it.
    let counts: Vec<(String, String, i64)> = rt.block_on(async {
        let pool = sqlx::PgPool::connect(&pg.url()).await.unwrap();
        sqlx::query_as(
            "SELECT lease_id, reason, COUNT(*) FROM audit WHERE kind = 'revoke' \
             AND reason LIKE 'revoked:%deleted' GROUP BY lease_id, reason",
        )
        .fetch_all(&pool)
        .await
        .unwrap()
    });
    assert_eq!(counts.len(), ids.len(), "{counts:?}");
    for (id, _, n) in &counts {
        assert!(ids.contains(id), "{id}");
        assert_eq!(*n, 1, "{counts:?}");
    }
}
