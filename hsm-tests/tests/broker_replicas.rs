//! Several real `broker` processes on one real PostgreSQL (and one on SQLite): a policy change
//! made through any replica is enforced by every replica within the documented bound, ends
//! the leases it no longer allows (each with its record, in the change's transaction), and
//! every replica reports its policy generation in the registry.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use hsm_tests::broker::{authed, broker_token, BrokerProc, BOOTSTRAP};
use hsm_tests::broker_client::BrokerClient;
use hsm_tests::process::runtime;
use keyhaven_broker::auth::DevIssuer;
use keyhaven_broker::service::{POLICY_BOUND, REVOKED_BY_POLICY};
use keyhaven_broker::store::{ReplicaRow, Store};
use keyhaven_proto::broker::v1::*;
use testkit::postgres::Postgres;
use tonic::Code;

const GRANT: &str = r#"
policies:
- name: web
  subjects: [{namespace: shop, serviceaccount: web}]
  paths: ["shop/*"]
  capabilities: [read]
  ttl: 5m
  max_ttl: 1h
"#;

/// `shop/web` keeps nothing; `shop/batch` gets `shop/*`.
const NO_GRANT: &str = r#"
policies:
- name: batch
  subjects: [{namespace: shop, serviceaccount: batch}]
  paths: ["shop/*"]
  capabilities: [read]
  ttl: 5m
  max_ttl: 1h
"#;

fn ids(leases: &[LeaseInfo]) -> Vec<String> {
    let mut v: Vec<String> = leases.iter().map(|l| l.lease_id.clone()).collect();
    v.sort();
    v
}

#[test]
fn a_policy_change_on_one_replica_holds_on_every_replica_and_ends_the_leases_it_forbids() {
    let pg = Postgres::start().unwrap();
    let (hsm, pki) = broker_token();
    let a = BrokerProc::start_on(&hsm, &pki, &pg.url(), &[]);
    let mut b = BrokerProc::start_on(&hsm, &pki, &pg.url(), &[]);
    let rt = runtime();
    let dev = DevIssuer::load_or_generate(&hsm.dir().join("dev.pem")).unwrap();
    let web = dev
        .mint("shop", "web", Some("web-0"), Duration::from_secs(600))
        .unwrap();
    let batch = dev
        .mint("shop", "batch", Some("batch-0"), Duration::from_secs(600))
        .unwrap();

    let (mut ra, mut rb) = rt.block_on(async {
        let mut ra = BrokerClient::connect(&a, &pki).await;
        let rb = BrokerClient::connect(&b, &pki).await;
        let applied = ra.apply(GRANT, false).await;
        assert_eq!(applied.generation, 1);
        assert!(applied.ended.is_empty());
        ra.put("shop/db").await;
        (ra, rb)
    });
    // A replica started after the apply enforces it from its first request.
    let c = BrokerProc::start_on(&hsm, &pki, &pg.url(), &[]);
    rt.block_on(async {
        let mut rc = BrokerClient::connect(&c, &pki).await;
        // B, started before, within the bound.
        tokio::time::sleep(POLICY_BOUND).await;
        let on_b = rb
            .lease(&web, "shop/db")
            .await
            .unwrap_or_else(|e| panic!("{e:?}\n{}", b.log_text()));
        let on_c = rc.lease(&web, "shop/db").await.unwrap();
        assert_eq!(on_c.data["password"], b"s3cret-value");
        let batch_lease = rc.lease(&batch, "shop/db").await.unwrap_err();
        assert_eq!(batch_lease.code(), Code::PermissionDenied);

        // Dry run: lists the leases the new set would end, changes nothing.
        let plan = ra.apply(NO_GRANT, true).await;
        assert_eq!(plan.generation, 1);
        let mut expected = vec![on_b.lease_id.clone(), on_c.lease_id.clone()];
        expected.sort();
        assert_eq!(ids(&plan.ended), expected);
        tokio::time::sleep(POLICY_BOUND).await;
        rb.renew(&web, &on_b.lease_id).await.unwrap();
        assert_eq!(rc.lease_info(&on_c.lease_id).await.ended_unix_ms, 0);

        // The change, through A: both leases end with it.
        let applied = ra.apply(NO_GRANT, false).await;
        assert_eq!(applied.generation, 2);
        assert_eq!(ids(&applied.ended), expected);
        for id in &expected {
            let l = rb.lease_info(id).await;
            assert_ne!(l.ended_unix_ms, 0, "{l:?}");
            assert_eq!(l.end_reason, REVOKED_BY_POLICY);
        }
        // Once the bound has passed, B and C refuse web and grant batch.
        tokio::time::sleep(POLICY_BOUND).await;
        for r in [&mut rb, &mut rc] {
            let e = r.lease(&web, "shop/db").await.unwrap_err();
            assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
            r.lease(&batch, "shop/db").await.unwrap();
        }
        // An ended lease stays ended, even when the grant comes back.
        let e = rb.renew(&web, &on_b.lease_id).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert_eq!(ra.apply(GRANT, false).await.generation, 3);
        tokio::time::sleep(POLICY_BOUND).await;
        let e = rc.renew(&web, &on_c.lease_id).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        rc.lease(&web, "shop/db").await.unwrap();

        // Every replica reports the stored generation (after a heartbeat).
        tokio::time::sleep(keyhaven_broker::service::HEARTBEAT_EVERY * 2).await;
        let list = rc.replicas().await;
        assert_eq!(list.policy_generation, 3);
        assert_eq!(list.policy_bound_ms, POLICY_BOUND.as_millis() as i64);
        assert_eq!(list.replicas.len(), 3, "{list:?}");
        for r in &list.replicas {
            assert_eq!(r.policy_generation, 3, "{r:?}");
            assert!(!r.stale, "{r:?}");
            assert_eq!(r.primary_kek_id.len(), 32, "{r:?}");
        }
        for p in [a.pid(), b.pid(), c.pid()] {
            assert!(
                list.replicas
                    .iter()
                    .any(|r| r.name.ends_with(&format!("/{p}"))),
                "no row for pid {p}: {list:?}"
            );
        }
        // A replica silent for longer than the stale bound is shown as stale.
        let store = Store::connect(&pg.url()).await.unwrap();
        let now = keyhaven_broker::audit::now_ms();
        store
            .heartbeat(&ReplicaRow {
                name: "gone-host/1".into(),
                version: "0.0.0".into(),
                started_ms: now - 120_000,
                heartbeat_ms: now - 60_000,
                policy_generation: 1,
                primary_kek: None,
            })
            .await
            .unwrap();
        let list = ra.replicas().await;
        let gone = list
            .replicas
            .iter()
            .find(|r| r.name == "gone-host/1")
            .unwrap();
        assert!(gone.stale);

        for r in [&mut ra, &mut rb, &mut rc] {
            r.audit_verifies().await;
        }
    });

    // The operator's view through brokerctl.
    let ctl = |args: &[&str]| {
        let out = b.ctl_admin(&hsm, &pki.ca, args);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{args:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let status = ctl(&["policy", "status"]);
    assert!(status.contains("stored policy generation: 3"), "{status}");
    assert_eq!(status.matches(" ok\n").count(), 3, "{status}");
    assert!(status.contains("gone-host/1"), "{status}");
    let json: serde_json::Value =
        serde_json::from_str(&ctl(&["--output", "json", "replicas"])).unwrap();
    let states: Vec<&str> = json["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["state"].as_str().unwrap())
        .collect();
    assert_eq!(states.iter().filter(|s| **s == "ok").count(), 3, "{json}");
    assert_eq!(
        states.iter().filter(|s| **s == "stale").count(),
        1,
        "{json}"
    );
    let file = hsm.dir().join("no-grant.yaml");
    std::fs::write(&file, NO_GRANT).unwrap();
    let plan = ctl(&["policy", "apply", "-f", file.to_str().unwrap(), "--dry-run"]);
    assert!(
        plan.contains("would end 1 active lease(s)") && plan.contains("generation stays 3"),
        "{plan}"
    );
    let applied = ctl(&["policy", "apply", "-f", file.to_str().unwrap()]);
    assert!(
        applied.contains("policy generation 4")
            && applied.contains("1 active lease(s) it no longer allows ended"),
        "{applied}"
    );

    // A replica down during a change (killed) enforces the stored set from its first request
    // after the restart.
    b.kill();
    rt.block_on(async {
        assert_eq!(ra.apply(GRANT, false).await.generation, 5);
    });
    b.restart();
    rt.block_on(async {
        rb.lease(&web, "shop/db").await.unwrap();
        let e = rb.lease(&batch, "shop/db").await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        rb.audit_verifies().await;
    });
    drop((a, b, c));
}

/// Writes `yaml` as the policy set behind the brokers' backs (as a replica that crashed after
/// its apply committed leaves it), dated `applied_ms`, ending no lease.
async fn apply_behind_their_backs(store: &Store, yaml: &str, applied_ms: i64) -> i64 {
    use keyhaven_broker::audit::{AuditEvent, EventKind, Outcome};
    let applied = store
        .apply_policies(yaml, &[], REVOKED_BY_POLICY, applied_ms, |_, _| {
            vec![AuditEvent::new(
                applied_ms,
                EventKind::Admin("policy_apply".into()),
                Outcome::Ok,
            )
            .with_identity("test")]
        })
        .await
        .unwrap();
    assert!(applied.ended.is_empty());
    applied.generation
}

/// A replica that reloads a new set ends the leases it forbids that were granted shortly
/// before it (its sweep), and a renewal refused for lack of a grant ends its lease. One
/// replica on SQLite.
#[test]
fn a_replica_that_reloads_ends_the_leases_the_new_set_forbids() {
    let (hsm, pki) = broker_token();
    let b = BrokerProc::start(&hsm, &pki, &[]);
    let url = format!("sqlite://{}", hsm.dir().join("broker.db").display());
    let rt = runtime();
    let dev = DevIssuer::load_or_generate(&hsm.dir().join("dev.pem")).unwrap();
    let web = dev
        .mint("shop", "web", Some("web-0"), Duration::from_secs(600))
        .unwrap();
    rt.block_on(async {
        let now = keyhaven_broker::audit::now_ms;
        let mut r = BrokerClient::connect(&b, &pki).await;
        r.apply(GRANT, false).await;
        r.put("shop/db").await;
        let store = Store::connect(&url).await.unwrap();

        // The sweep: a lease granted just before the new set is ended by the replica's
        // reload, with no call from its holder.
        let l = r.lease(&web, "shop/db").await.unwrap();
        assert_eq!(apply_behind_their_backs(&store, NO_GRANT, now()).await, 2);
        tokio::time::sleep(POLICY_BOUND).await;
        let info = r.lease_info(&l.lease_id).await;
        assert_eq!(
            info.end_reason,
            REVOKED_BY_POLICY,
            "{info:?}\n{}",
            b.log_text()
        );
        let e = r.renew(&web, &l.lease_id).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        let e = r.lease(&web, "shop/db").await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        let recs = store.audit_records(0, 10_000).await.unwrap();
        let ended: Vec<_> = recs
            .iter()
            .filter(|r| r.event.lease_id.as_deref() == Some(l.lease_id.as_str()))
            .filter(|r| r.event.reason.as_deref() == Some(REVOKED_BY_POLICY))
            .collect();
        assert_eq!(ended.len(), 1, "{ended:?}");
        assert_eq!(
            ended[0].event.identity.as_deref(),
            Some("shop/web"),
            "recorded in the holder's name"
        );

        // The renewal: a set dated a minute ahead leaves this lease outside the sweep's
        // window, so the refused renewal is what ends it.
        r.apply(GRANT, false).await;
        tokio::time::sleep(POLICY_BOUND).await;
        let l = r.lease(&web, "shop/db").await.unwrap();
        assert_eq!(
            apply_behind_their_backs(&store, NO_GRANT, now() + 60_000).await,
            4
        );
        tokio::time::sleep(POLICY_BOUND).await;
        assert_eq!(
            r.lease_info(&l.lease_id).await.ended_unix_ms,
            0,
            "not swept"
        );
        let e = r.renew(&web, &l.lease_id).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains("has ended"), "{e:?}");
        let info = r.lease_info(&l.lease_id).await;
        assert_eq!(info.end_reason, REVOKED_BY_POLICY, "{info:?}");
        r.audit_verifies().await;
    });
}

#[test]
fn renewals_on_two_replicas_each_extend_their_lease_once_with_their_record() {
    let pg = Postgres::start().unwrap();
    let (hsm, pki) = broker_token();
    let a = BrokerProc::start_on(&hsm, &pki, &pg.url(), &[]);
    let b = BrokerProc::start_on(&hsm, &pki, &pg.url(), &[]);
    let rt = runtime();
    let dev = DevIssuer::load_or_generate(&hsm.dir().join("dev.pem")).unwrap();
    let web = dev
        .mint("shop", "web", Some("web-0"), Duration::from_secs(600))
        .unwrap();
    rt.block_on(async {
        let mut ra = BrokerClient::connect(&a, &pki).await;
        let mut rb = BrokerClient::connect(&b, &pki).await;
        ra.apply(GRANT, false).await;
        ra.put("shop/db").await;
        tokio::time::sleep(POLICY_BOUND).await;
        // Eight leases, four made on each replica; then every lease renewed ten times, on
        // both replicas at once (their appends alternate on the one chain), while both keep
        // leasing.
        let mut ids = Vec::new();
        for r in [&mut ra, &mut rb] {
            for _ in 0..4 {
                ids.push(r.lease(&web, "shop/db").await.unwrap().lease_id);
            }
        }
        let work = |mut r: BrokerClient, ids: Vec<String>, web: String| async move {
            for _ in 0..RENEWALS {
                for id in &ids {
                    let got = r.renew(&web, id).await.unwrap();
                    assert_eq!(got.ttl_seconds, 300, "{got:?}");
                    assert!(!got.newer_version);
                }
                r.lease(&web, "shop/db").await.unwrap();
            }
            r
        };
        let (x, y) = ids.split_at(4);
        let (ra2, rb2) = tokio::join!(
            work(ra, y.to_vec(), web.clone()),
            work(rb, x.to_vec(), web.clone())
        );
        let (mut ra, mut rb) = (ra2, rb2);
        for id in &ids {
            assert_eq!(ra.lease_info(id).await.renewals, RENEWALS, "{id}");
        }
        // A lease revoked on one replica is not renewed on the other, and says so.
        rb.admin
            .revoke_leases(authed(
                RevokeLeasesRequest {
                    selector: Some(LeaseSelector {
                        lease_id: ids[0].clone(),
                        ..Default::default()
                    }),
                },
                BOOTSTRAP,
            ))
            .await
            .unwrap();
        let e = ra.renew(&web, &ids[0]).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert_eq!(ra.lease_info(&ids[0]).await.renewals, RENEWALS);
        ra.audit_verifies().await;
        rb.audit_verifies().await;
    });
    // One `renew ok` record per renewal, one refusal, in the shared chain.
    let store = rt.block_on(Store::connect(&pg.url())).unwrap();
    let recs = rt.block_on(store.audit_records(0, 100_000)).unwrap();
    let renews = |outcome: &str| {
        recs.iter()
            .filter(|r| r.event.kind.as_text() == "renew" && r.event.outcome.as_str() == outcome)
            .count() as u64
    };
    assert_eq!(renews("ok"), 8 * RENEWALS);
    assert_eq!(
        renews("ok") + renews("denied") + renews("error"),
        8 * RENEWALS + 1
    );
}

/// Renewals per lease in [`renewals_on_two_replicas_each_extend_their_lease_once_with_their_record`].
const RENEWALS: u64 = 10;
