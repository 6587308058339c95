//! Credentials shared by the replicas of one workload (`share: per-serviceaccount`), with two
//! real broker processes on one PostgreSQL store and a real target database: the pods of one
//! service account get one role whichever replica they ask, another service account its own;
//! `VALID UNTIL` follows the latest lease; the role outlives every lease but the last and is
//! dropped with it, its sealed password destroyed; a lease never joins a role being dropped.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod db_support;

use std::time::Duration;

use db_support::*;
use hsm_tests::broker::{authed, BrokerProc};
use hsm_tests::broker_client::BrokerClient;
use hsm_tests::process::runtime;
use keyhaven_broker::auth::DevIssuer;
use keyhaven_proto::broker::v1::*;
use sqlx::{Connection, PgConnection};
use tonic::Code;

const SHARED: &str = "ttl: 10m\nmax_ttl: 30m\nmax_per_identity: 2\nmax_total: 4\n\
share: per-serviceaccount\n\
creation: |\n  CREATE ROLE {{name}} LOGIN PASSWORD {{password}} VALID UNTIL {{expiration}};\n  \
GRANT SELECT ON public_data TO {{name}};\n";

/// `web` may lease `db/app/shared` too (`batch` may lease all of `db/app/*`).
const WEB_SHARED: &str = r#"
- name: web-shared
  subjects: [{namespace: shop, serviceaccount: web}]
  paths: ["db/app/shared"]
  capabilities: [read]
  ttl: 5m
  max_ttl: 1h
"#;

async fn lease_for(
    c: &mut BrokerClient,
    token: &str,
    ttl_seconds: u64,
) -> Result<LeaseResponse, tonic::Status> {
    c.leases
        .lease(authed(
            LeaseRequest {
                path: "db/app/shared".into(),
                ttl_seconds,
            },
            token,
        ))
        .await
        .map(tonic::Response::into_inner)
}

async fn logs_in(dsn: &str) -> bool {
    match PgConnection::connect(dsn).await {
        Ok(mut c) => sqlx::query("SELECT x FROM public_data")
            .execute(&mut c)
            .await
            .is_ok(),
        Err(_) => false,
    }
}

/// Versions of shared-credential passwords (of role `user`, or all) still holding sealed
/// data in the store.
async fn sealed_passwords(s: &Setup, user: &str) -> i64 {
    sealed_passwords_on(s, true, user).await
}

async fn sealed_passwords_on(s: &Setup, on_pg: bool, user: &str) -> i64 {
    store_scalar(
        s,
        on_pg,
        &format!(
            "SELECT COUNT(*) FROM secret_versions \
             WHERE path LIKE 'db/app/shared/{user}%' AND ciphertext IS NOT NULL"
        ),
    )
    .await
}

#[test]
fn replicas_of_a_workload_share_one_credential_dropped_with_its_last_lease() {
    let s = setup_on(&["--db-pending-grace", "3s"], true);
    let b2 = BrokerProc::start_on(&s.hsm, &s.pki, &s.pg.url(), &["--db-pending-grace", "3s"]);
    put_role(&s, "app/shared", SHARED);
    let dev = DevIssuer::load_or_generate(&s.hsm.dir().join("dev.pem")).unwrap();
    let pod = |sa: &str, name: &str| {
        dev.mint("shop", sa, Some(name), Duration::from_secs(600))
            .unwrap()
    };
    let (batch0, batch1, batch2) = (
        pod("batch", "batch-0"),
        pod("batch", "batch-1"),
        pod("batch", "batch-2"),
    );
    let rt = runtime();
    rt.block_on(async {
        let mut c1 = BrokerClient::connect(&s.broker, &s.pki).await;
        c1.apply(&format!("{POLICY}{WEB_SHARED}"), false).await;
        let mut c2 = BrokerClient::connect(&b2, &s.pki).await;

        // Pod batch-0 on replica 1 creates the credential; batch-1 on replica 2 joins it.
        let l0 = lease_for(&mut c1, &batch0, 60).await.expect("lease 0");
        let l1 = loop {
            // Replica 2 enforces the new policy within its bound.
            match lease_for(&mut c2, &batch1, 300).await {
                Err(e) if e.code() == Code::PermissionDenied => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                r => break r.expect("lease 1"),
            }
        };
        let user = field(&l0, "username");
        assert_eq!(
            field(&l1, "username"),
            user,
            "a second credential for one workload"
        );
        assert_eq!(field(&l1, "password"), field(&l0, "password"));
        assert_ne!(l0.lease_id, l1.lease_id);
        assert!(logs_in(&field(&l1, "dsn")).await);
        assert_eq!(marked_roles(&s.pg).await, vec![user.clone()]);
        // VALID UNTIL is the latest of its leases' expiries: the joining lease's 300 s.
        let vu = valid_until_s(&s.pg, &user).await;
        assert!((vu - (now_s() + 300)).abs() <= 2, "valid until {vu}");
        // Its password is a sealed secret version (covered by key rotation and retirement).
        assert_eq!(sealed_passwords(&s, &user).await, 1);

        // Another service account gets its own.
        let w = lease_for(&mut c1, &s.web, 0).await.expect("web lease");
        assert_ne!(field(&w, "username"), user);
        assert!(logs_in(&field(&w, "dsn")).await);

        // The first lease ends: the role stays for the other (revoker passes run meanwhile),
        // and a renewal of the shorter lease never moves VALID UNTIL back.
        c1.revoke(&batch0, &l0.lease_id)
            .await
            .expect("revoke lease 0");
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(
            role_exists(&s.pg, &user).await,
            "dropped while a lease lives"
        );
        assert!(logs_in(&field(&l1, "dsn")).await);
        c2.leases
            .renew(authed(
                RenewRequest {
                    lease_id: l1.lease_id.clone(),
                    increment_seconds: 600,
                },
                &batch1,
            ))
            .await
            .expect("renew lease 1");
        let vu = valid_until_s(&s.pg, &user).await;
        assert!(
            (vu - (now_s() + 600)).abs() <= 2,
            "renewed valid until {vu}"
        );

        // The last lease ends: the role is dropped, its password destroyed, audited.
        c2.revoke(&batch1, &l1.lease_id)
            .await
            .expect("revoke lease 1");
        assert!(
            until(Duration::from_secs(30), || async {
                !role_exists(&s.pg, &user).await
            })
            .await,
            "the role outlived its last lease"
        );
        assert!(!logs_in(&field(&l1, "dsn")).await);
        assert!(
            until(Duration::from_secs(10), || async {
                sealed_passwords(&s, &user).await == 0
            })
            .await,
            "the sealed password outlived its role"
        );
        let records = c1.audit_tail(0).await;
        for kind in ["admin:db_credential_share", "admin:db_role_drop"] {
            assert!(
                records.iter().any(|r| r.event.kind.as_text() == kind),
                "no {kind} record"
            );
        }
        c1.audit_verifies().await;

        // The next lease creates a new credential.
        let l2 = lease_for(&mut c1, &batch2, 60).await.expect("lease 2");
        assert_ne!(field(&l2, "username"), user);
        assert!(logs_in(&field(&l2, "dsn")).await);

        // Leases ending and joining around the revoker's passes, on both replicas: whatever a
        // lease is given keeps logging in while it lives (it never joined a role being
        // dropped), and one service account never holds more than max_per_identity roles.
        let mut held = l2;
        for round in 0..16u64 {
            let (c_old, c_new) = if round % 2 == 0 {
                (&mut c1, &mut c2)
            } else {
                (&mut c2, &mut c1)
            };
            c_old.revoke(&batch2, &held.lease_id).await.expect("revoke");
            // Spread over a revoker period (2 s on each replica).
            tokio::time::sleep(Duration::from_millis(round * 130 % 2000)).await;
            held = loop {
                match lease_for(c_new, &batch2, 60).await {
                    Ok(l) => break l,
                    // The cap counts roles until they are dropped.
                    Err(e) if e.code() == Code::ResourceExhausted => {
                        tokio::time::sleep(Duration::from_millis(200)).await
                    }
                    Err(e) => panic!("round {round}: {e:?}"),
                }
            };
            tokio::time::sleep(Duration::from_millis(2500)).await;
            assert!(
                logs_in(&field(&held, "dsn")).await,
                "round {round}: a live lease's credential was dropped"
            );
            let batch_roles = marked_roles(&s.pg)
                .await
                .into_iter()
                .filter(|r| r.starts_with("kh_shop_batch_"))
                .count();
            assert!(batch_roles <= 2, "round {round}: {batch_roles} roles");
        }

        // Everything revoked: nothing marked and nothing sealed stays behind.
        let (ok, out) = ctl(&s, &["leases", "revoke", "--prefix", "db/app"]);
        assert!(ok, "{out}");
        assert!(
            until(Duration::from_secs(30), || async {
                marked_roles(&s.pg).await.is_empty() && sealed_passwords(&s, "").await == 0
            })
            .await,
            "left behind: {:?}",
            marked_roles(&s.pg).await
        );
    });
    drop(b2);
}

#[test]
fn a_shared_credential_on_a_sqlite_store() {
    let s = setup(&[]);
    put_role(&s, "app/shared", SHARED);
    let dev = DevIssuer::load_or_generate(&s.hsm.dir().join("dev.pem")).unwrap();
    let pods: Vec<String> = (0..3)
        .map(|i| {
            dev.mint(
                "shop",
                "batch",
                Some(&format!("batch-{i}")),
                Duration::from_secs(600),
            )
            .unwrap()
        })
        .collect();
    let rt = runtime();
    rt.block_on(async {
        let mut c = BrokerClient::connect(&s.broker, &s.pki).await;
        let mut leases = Vec::new();
        for (pod, ttl) in pods.iter().zip([60, 120, 90]) {
            leases.push(lease_for(&mut c, pod, ttl).await.expect("lease"));
        }
        let user = field(&leases[0], "username");
        assert!(leases.iter().all(|l| field(l, "username") == user));
        assert_eq!(marked_roles(&s.pg).await, vec![user.clone()]);
        let vu = valid_until_s(&s.pg, &user).await;
        assert!((vu - (now_s() + 120)).abs() <= 2, "valid until {vu}");
        assert_eq!(sealed_passwords_on(&s, false, &user).await, 1);
        for (l, pod) in leases.iter().zip(&pods) {
            assert!(logs_in(&field(l, "dsn")).await);
            c.revoke(pod, &l.lease_id).await.expect("revoke");
        }
        assert!(
            until(Duration::from_secs(30), || async {
                !role_exists(&s.pg, &user).await && sealed_passwords_on(&s, false, &user).await == 0
            })
            .await,
            "the role or its sealed password outlived its last lease"
        );
    });
}
