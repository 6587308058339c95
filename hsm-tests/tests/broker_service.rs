//! The broker's lease logic end to end in one process: real SoftHSM2 KEK, real SQLite file
//! and real PostgreSQL, real signed tokens (dev issuer + a second "cluster" issuer), policy,
//! leases and the audit chain. Each scenario runs on both databases.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hsm_tests::broker::{broker_keystore, test_store};
use keyhaven_broker::audit::{EventKind, Outcome};
use keyhaven_broker::auth::{Authenticator, DevIssuer, Verifier};
use keyhaven_broker::crypto::{DekCache, Envelope, SecretData};
use keyhaven_broker::service::{Broker, BrokerConfig, BrokerError, Caller};
use keyhaven_broker::store::LeaseFilter;
use secrecy::SecretString;
use testkit::postgres::Postgres;
use testkit::softhsm::SoftHsm;

const POLICIES: &str = r#"
policies:
- name: payments-read
  subjects: [{namespace: payments, serviceaccount: api}]
  paths: ["payments/db", "payments/app/*"]
  capabilities: [read]
  ttl: 2s
  max_ttl: 5s
- name: team-wide
  subjects: [{namespace: "team-*", serviceaccount: "*"}]
  paths: ["shared/**"]
  capabilities: [read]
  ttl: 1m
  max_ttl: 10m
- name: operators
  subjects: [{namespace: ops, serviceaccount: admin}]
  paths: ["**"]
  capabilities: [write, delete, destroy, list, revoke, policy, audit]
  ttl: 1m
  max_ttl: 1h
"#;

struct Env {
    broker: Broker,
    dev: DevIssuer,
    admin: Caller,
    _pg: Option<Postgres>,
    _hsm: SoftHsm,
}

impl Env {
    fn token(&self, ns: &str, sa: &str, pod: Option<&str>) -> String {
        self.dev
            .mint(ns, sa, pod, Duration::from_secs(600))
            .unwrap()
    }
    async fn login(&self, ns: &str, sa: &str) -> Caller {
        self.broker
            .authenticate(&self.token(ns, sa, Some("pod-1")))
            .await
            .unwrap()
    }
    async fn put(&self, path: &str, pairs: &[(&str, &str)]) -> i64 {
        let data = SecretData::from_pairs(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())),
        );
        self.broker
            .put_secret(&self.admin, path, data)
            .await
            .unwrap()
    }
}

enum Db {
    Sqlite,
    Postgres,
}

fn run<F, Fut>(db: Db, f: F)
where
    F: FnOnce(Env) -> Fut,
    Fut: Future<Output = ()>,
{
    let hsm = SoftHsm::new().unwrap();
    let pg = matches!(db, Db::Postgres).then(|| Postgres::start().unwrap());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = test_store(&hsm, pg.as_ref()).await;
        let ks = broker_keystore(&hsm).await;
        ks.generate_kek().await.unwrap();
        let envelope = Envelope::new(ks, DekCache::new(1000, Duration::from_secs(60)));
        // The "cluster" issuer the broker trusts in production mode, and the dev issuer.
        let cluster = DevIssuer::generate().unwrap();
        let mut ccfg = keyhaven_broker::auth::dev_verifier_config();
        ccfg.issuer = "https://cluster.example".into();
        let verifier = Arc::new(
            Verifier::new(ccfg, keyhaven_broker::auth::dev_jwks_source(&cluster)).unwrap(),
        );
        let dev = DevIssuer::generate().unwrap();
        let dev_verifier = Arc::new(
            Verifier::new(
                keyhaven_broker::auth::dev_verifier_config(),
                keyhaven_broker::auth::dev_jwks_source(&dev),
            )
            .unwrap(),
        );
        let authenticator = Authenticator::new(verifier)
            .with_dev_verifier(dev_verifier)
            .with_bootstrap_admin(SecretString::from(
                "bootstrap-credential-for-tests".to_string(),
            ));
        let broker = Broker::new(store, envelope, authenticator, BrokerConfig::default())
            .await
            .unwrap();
        let admin = broker
            .authenticate("bootstrap-credential-for-tests")
            .await
            .unwrap();
        assert_eq!(admin, Caller::BootstrapAdmin);
        broker
            .apply_policies(&admin, POLICIES, false)
            .await
            .unwrap();
        f(Env {
            broker,
            dev,
            admin,
            _pg: pg,
            _hsm: hsm,
        })
        .await
    });
}

async fn default_deny_and_least_privilege(env: Env) {
    env.put("payments/db", &[("password", "pw-1")]).await;
    env.put("payments/app/key", &[("k", "v")]).await;
    env.put("payments/app/deep/key", &[("k", "v")]).await;
    env.put("shared/a/b", &[("k", "shared")]).await;
    env.put("other/x", &[("k", "x")]).await;

    let api = env.login("payments", "api").await;
    let g = env.broker.lease(&api, "payments/db", None).await.unwrap();
    assert_eq!(g.version, 1);
    assert_eq!(g.data.0["password"].as_slice(), b"pw-1");
    assert!(
        g.lease_id.starts_with("payments/api/payments/db/"),
        "{}",
        g.lease_id
    );
    assert_eq!(
        g.lease_id.rsplit('/').next().unwrap().len(),
        32,
        "128 random bits"
    );
    assert_eq!(g.ttl, Duration::from_secs(2));
    assert!(env
        .broker
        .lease(&api, "payments/app/key", None)
        .await
        .is_ok());

    let denied = |r: Result<_, BrokerError>| matches!(r, Err(BrokerError::PermissionDenied(_)));
    // Other path, a path one segment deeper than `*`, another SA, another namespace.
    assert!(denied(env.broker.lease(&api, "other/x", None).await));
    assert!(denied(
        env.broker.lease(&api, "payments/app/deep/key", None).await
    ));
    let other_sa = env.login("payments", "worker").await;
    assert!(denied(
        env.broker.lease(&other_sa, "payments/db", None).await
    ));
    let other_ns = env.login("billing", "api").await;
    assert!(denied(
        env.broker.lease(&other_ns, "payments/db", None).await
    ));
    // Glob subject and `**` path.
    let team = env.login("team-blue", "anything").await;
    assert_eq!(
        env.broker
            .lease(&team, "shared/a/b", None)
            .await
            .unwrap()
            .data
            .0["k"]
            .as_slice(),
        b"shared"
    );
    assert!(denied(env.broker.lease(&team, "payments/db", None).await));
    // An admin with write cannot read (no capability implies another).
    let ops = env.login("ops", "admin").await;
    assert!(denied(env.broker.lease(&ops, "payments/db", None).await));
    // Missing secret on an allowed path.
    assert!(matches!(
        env.broker.lease(&api, "payments/app/none", None).await,
        Err(BrokerError::NotFound(_))
    ));
    // Requested TTL is capped by max_ttl.
    let g = env
        .broker
        .lease(&api, "payments/db", Some(Duration::from_secs(3600)))
        .await
        .unwrap();
    assert_eq!(g.ttl, Duration::from_secs(5));
}

async fn bad_tokens_are_unauthenticated_and_audited(env: Env) {
    let good = env.token("payments", "api", None);
    let mut forged = good.clone();
    let n = forged.len();
    forged.replace_range(
        n - 3..n,
        if forged.ends_with("AAA") {
            "BBB"
        } else {
            "AAA"
        },
    );
    let other_issuer = DevIssuer::generate()
        .unwrap()
        .mint("payments", "api", None, Duration::from_secs(60))
        .unwrap();
    let before = env.broker.store().audit_head().await.unwrap().seq;
    for bad in [forged.as_str(), other_issuer.as_str(), "not-a-jwt", ""] {
        let e = env.broker.authenticate(bad).await.unwrap_err();
        assert!(matches!(e, BrokerError::Unauthenticated(_)), "{e:?}");
    }
    // Refusals with no identity are counted, and written as one record per peer and reason
    // when flushed.
    assert_eq!(env.broker.store().audit_head().await.unwrap().seq, before);
    let written = env.broker.flush_auth_failures().await.unwrap();
    let recs = env.broker.store().audit_records(before, 100).await.unwrap();
    assert_eq!(recs.len(), written);
    assert!((1..=4).contains(&written), "{written}");
    let mut total = 0;
    for r in &recs {
        let EventKind::AuthFailures(n) = r.event.kind else {
            panic!("{r:?}")
        };
        total += n;
        assert_eq!(r.event.outcome, Outcome::Denied);
        assert_eq!(r.event.identity.as_deref(), Some("peer:unknown"));
        assert!(r.event.reason.is_some());
        let line = r.to_json_line();
        assert!(!line.contains(&good[..20]), "a token in the audit log");
    }
    assert_eq!(total, 4, "every refusal counted once");
    assert_eq!(env.broker.flush_auth_failures().await.unwrap(), 0);
    assert!(env.broker.store().verify_audit().await.unwrap().is_ok());
}

async fn renew_until_max_then_refused_and_revoke(env: Env) {
    env.put("payments/db", &[("password", "pw-1")]).await;
    let api = env.login("payments", "api").await;
    let g = env.broker.lease(&api, "payments/db", None).await.unwrap();
    let r = env
        .broker
        .renew(&api, &g.lease_id, Some(Duration::from_secs(1)))
        .await
        .unwrap();
    assert!(!r.newer_version);
    assert!(r.ttl <= Duration::from_secs(1));
    // A new version is reported on renewal.
    env.put("payments/db", &[("password", "pw-2")]).await;
    let r = env
        .broker
        .renew(&api, &g.lease_id, Some(Duration::from_secs(100)))
        .await
        .unwrap();
    assert!(r.newer_version);
    assert!(
        r.ttl <= Duration::from_secs(5),
        "never past max_ttl: {:?}",
        r.ttl
    );
    // At max: refused.
    let e = env.broker.renew(&api, &g.lease_id, None).await.unwrap_err();
    assert!(matches!(e, BrokerError::FailedPrecondition(_)), "{e:?}");
    // Every increment, up to ones too large for milliseconds since the epoch, gives an expiry
    // after now and never past the max TTL (5 s): capped, never wrapped into the past.
    let max_ttl = 5;
    let mut g = g;
    for secs in [0, 1, max_ttl, 1 << 53, (1 << 63) / 1000, u64::MAX] {
        g = env.broker.lease(&api, "payments/db", None).await.unwrap();
        let r = env
            .broker
            .renew(&api, &g.lease_id, Some(Duration::from_secs(secs)))
            .await
            .unwrap();
        let l = env
            .broker
            .store()
            .get_lease(&g.lease_id)
            .await
            .unwrap()
            .unwrap();
        assert!(
            r.ttl <= Duration::from_secs(max_ttl),
            "increment {secs} s: {:?}",
            r.ttl
        );
        assert!(
            l.expires_ms > l.created_ms && l.expires_ms <= l.max_expires_ms,
            "increment {secs} s: {l:?}"
        );
        assert_eq!(l.renewals, 1, "increment {secs} s");
        match secs {
            // The policy's default TTL (2 s), or the increment asked for.
            0 => assert!(r.ttl <= Duration::from_secs(2), "{:?}", r.ttl),
            1 => assert!(r.ttl <= Duration::from_secs(1), "{:?}", r.ttl),
            _ => assert_eq!(l.expires_ms, l.max_expires_ms, "increment {secs} s"),
        }
    }
    // The last one is at its max TTL: refused.
    let e = env.broker.renew(&api, &g.lease_id, None).await.unwrap_err();
    assert!(matches!(e, BrokerError::FailedPrecondition(_)), "{e:?}");
    // Someone else cannot renew or revoke it (and cannot tell it exists).
    let team = env.login("team-x", "y").await;
    assert!(matches!(
        env.broker.renew(&team, &g.lease_id, None).await,
        Err(BrokerError::NotFound(_))
    ));
    assert!(matches!(
        env.broker.revoke(&team, &g.lease_id).await,
        Err(BrokerError::NotFound(_))
    ));
    // The holder revokes; then it cannot renew.
    let g2 = env.broker.lease(&api, "payments/db", None).await.unwrap();
    assert_eq!(g2.data.0["password"].as_slice(), b"pw-2");
    env.broker.revoke(&api, &g2.lease_id).await.unwrap();
    assert!(matches!(
        env.broker.renew(&api, &g2.lease_id, None).await,
        Err(BrokerError::FailedPrecondition(_))
    ));
    // Expired leases cannot renew either, and the reaper ends them.
    let g3 = env
        .broker
        .lease(&api, "payments/db", Some(Duration::from_secs(1)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(matches!(
        env.broker.renew(&api, &g3.lease_id, None).await,
        Err(BrokerError::FailedPrecondition(_))
    ));
    tokio::time::sleep(Duration::from_millis(4000)).await;
    let reaped = env.broker.reap(100).await.unwrap();
    assert!(reaped >= 2, "reaped {reaped}");
}

async fn operators_revoke_by_identity_pod_and_prefix(env: Env) {
    env.put("shared/a", &[("k", "1")]).await;
    env.put("shared/b/c", &[("k", "2")]).await;
    let mut ids = Vec::new();
    for (ns, pod) in [("team-a", "p1"), ("team-a", "p2"), ("team-b", "p3")] {
        let c = env
            .broker
            .authenticate(&env.token(ns, "sa", Some(pod)))
            .await
            .unwrap();
        ids.push(
            env.broker
                .lease(&c, "shared/a", None)
                .await
                .unwrap()
                .lease_id,
        );
        ids.push(
            env.broker
                .lease(&c, "shared/b/c", None)
                .await
                .unwrap()
                .lease_id,
        );
    }
    let ops = env.login("ops", "admin").await;
    // A workload without the revoke capability cannot.
    let team = env.login("team-a", "sa").await;
    assert!(matches!(
        env.broker.revoke_leases(&team, &LeaseFilter::All).await,
        Err(BrokerError::PermissionDenied(_))
    ));
    let r = env
        .broker
        .revoke_leases(
            &ops,
            &LeaseFilter::Pod {
                namespace: "team-a".into(),
                pod: "p1".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(r.len(), 2);
    let r = env
        .broker
        .revoke_leases(&ops, &LeaseFilter::PathPrefix("shared/b".into()))
        .await
        .unwrap();
    assert_eq!(r.len(), 2);
    let r = env
        .broker
        .revoke_leases(
            &ops,
            &LeaseFilter::Identity {
                namespace: "team-b".into(),
                service_account: "sa".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(r.len(), 1);
    let now = keyhaven_broker::audit::now_ms();
    assert_eq!(
        env.broker.store().count_active_leases(now).await.unwrap(),
        1
    );
    // Every step is in a verifiable audit chain.
    let report = env.broker.store().verify_audit().await.unwrap().unwrap();
    assert!(report.records > 20);
}

async fn two_hundred_concurrent_clients_stay_consistent(env: Env) {
    env.put("shared/hot", &[("k", "v")]).await;
    let broker = Arc::new(env.broker);
    let mut tasks = Vec::new();
    for i in 0..200 {
        let b = broker.clone();
        let token = env
            .dev
            .mint(
                &format!("team-{}", i % 7),
                "sa",
                Some(&format!("pod-{i}")),
                Duration::from_secs(600),
            )
            .unwrap();
        tasks.push(tokio::spawn(async move {
            let c = b.authenticate(&token).await.unwrap();
            let mut mine = Vec::new();
            for _ in 0..2 {
                let g = b.lease(&c, "shared/hot", None).await.unwrap();
                assert_eq!(g.data.0["k"].as_slice(), b"v");
                let r = b.renew(&c, &g.lease_id, None).await.unwrap();
                mine.push((g.lease_id, r));
            }
            b.revoke(&c, &mine[0].0).await.unwrap();
            mine
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let now = keyhaven_broker::audit::now_ms();
    let store = broker.store();
    assert_eq!(all.len(), 400);
    assert_eq!(store.count_active_leases(now).await.unwrap(), 200);
    for (i, (id, renewal)) in all.iter().enumerate() {
        let l = store
            .get_lease(id)
            .await
            .unwrap()
            .expect("every granted lease is stored");
        assert_eq!(l.renewals, 1, "{id}");
        assert_eq!(
            l.max_expires_ms / 1000,
            renewal.renewable_until_unix,
            "{id}"
        );
        assert_eq!(
            l.ended_ms.is_some(),
            i % 2 == 0,
            "{id}: revoked iff it was the first"
        );
    }
    let report = store.verify_audit().await.unwrap().unwrap();
    // Every call is recorded: 200 authentications, 400 leases, 400 renewals, 200 revocations.
    assert!(report.records >= 1200, "{}", report.records);
}

/// Another broker replica on the same database: its own memory of secret versions and its own
/// audit writer, the same HSM token and issuers.
async fn replica(env: &Env) -> Broker {
    let ks = broker_keystore(&env._hsm).await;
    let envelope = Envelope::new(ks, DekCache::new(1000, Duration::from_secs(60)));
    let dev = Arc::new(
        Verifier::new(
            keyhaven_broker::auth::dev_verifier_config(),
            keyhaven_broker::auth::dev_jwks_source(&env.dev),
        )
        .unwrap(),
    );
    let authenticator = Authenticator::new(dev.clone())
        .with_dev_verifier(dev)
        .with_bootstrap_admin(SecretString::from(
            "bootstrap-credential-for-tests".to_string(),
        ));
    Broker::new(
        env.broker.store().clone(),
        envelope,
        authenticator,
        BrokerConfig::default(),
    )
    .await
    .unwrap()
}

/// A replica remembers the versions it leases; when another replica puts, deletes or
/// destroys the secret, its next lease still hands out exactly what the database holds (the
/// stale attempt is refused by the guarded append and made again, storing nothing twice).
async fn a_lease_never_hands_out_a_version_another_replica_replaced(env: Env) {
    let other = replica(&env).await;
    let put_on_other = |v: &'static str| {
        let other = &other;
        let admin = env.admin.clone();
        async move {
            other
                .put_secret(&admin, "shared/app", SecretData::from_pairs([("k", v)]))
                .await
                .unwrap()
        }
    };
    let reader = env.login("team-a", "sa").await;
    let lease = || env.broker.lease(&reader, "shared/app", None);
    let value = |g: &keyhaven_broker::service::LeaseGrant| {
        String::from_utf8(g.data.0["k"].to_vec()).unwrap()
    };
    let metric = |text: &str, name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics"))
    };
    let mut granted = 0;

    assert_eq!(put_on_other("v1").await, 1);
    for _ in 0..3 {
        let g = lease().await.unwrap();
        assert_eq!((g.version, value(&g).as_str()), (1, "v1"));
        granted += 1;
    }
    let text = env.broker.metrics_text().await;
    assert!(
        metric(&text, "keyhaven_broker_lease_version_memory_hits ") >= 2,
        "{text}"
    );
    assert_eq!(
        metric(&text, "keyhaven_broker_lease_version_memory_stale_total "),
        0
    );

    assert_eq!(put_on_other("v2").await, 2);
    let g = lease().await.unwrap();
    assert_eq!((g.version, value(&g).as_str()), (2, "v2"));
    granted += 1;
    let text = env.broker.metrics_text().await;
    assert_eq!(
        metric(&text, "keyhaven_broker_lease_version_memory_stale_total "),
        1
    );

    other
        .delete_secret(&env.admin, "shared/app", false)
        .await
        .unwrap();
    let e = lease().await.unwrap_err();
    assert!(matches!(e, BrokerError::NotFound(_)), "{e:?}");

    assert_eq!(put_on_other("v3").await, 3);
    let g = lease().await.unwrap();
    assert_eq!((g.version, value(&g).as_str()), (3, "v3"));
    granted += 1;
    other
        .delete_secret(&env.admin, "shared/app", true)
        .await
        .unwrap();
    let e = lease().await.unwrap_err();
    assert!(matches!(e, BrokerError::NotFound(_)), "{e:?}");

    // Exactly the granted leases exist, each with one record; the chain is whole.
    let store = env.broker.store();
    let now = keyhaven_broker::audit::now_ms();
    assert_eq!(store.count_active_leases(now).await.unwrap(), granted);
    let recs = store.audit_records(0, 1000).await.unwrap();
    let leases: Vec<_> = recs
        .iter()
        .filter(|r| r.event.kind == EventKind::Lease)
        .map(|r| r.event.outcome)
        .collect();
    assert_eq!(
        leases.iter().filter(|o| **o == Outcome::Ok).count() as i64,
        granted
    );
    assert_eq!(leases.len() as i64, granted + 2);
    assert!(store.verify_audit().await.unwrap().is_ok());
}

/// Makes every insert into the audit table fail (or, `false`, work again), behind the
/// broker's back: the audit log refuses while the rest of the database works.
async fn refuse_audit(store: &keyhaven_broker::store::Store, refuse: bool) {
    use keyhaven_broker::store::Pool;
    match (store.pool(), refuse) {
        (Pool::Sqlite(p), true) => {
            sqlx::query(
                "CREATE TRIGGER audit_refused BEFORE INSERT ON audit \
                 BEGIN SELECT RAISE(ABORT, 'audit refused by the test'); END",
            )
            .execute(p)
            .await
            .unwrap();
        }
        (Pool::Sqlite(p), false) => {
            sqlx::query("DROP TRIGGER audit_refused")
                .execute(p)
                .await
                .unwrap();
        }
        (Pool::Postgres(p), true) => {
            sqlx::query(
                "CREATE FUNCTION audit_refused() RETURNS trigger LANGUAGE plpgsql AS \
                 $$ BEGIN RAISE EXCEPTION 'audit refused by the test'; END $$",
            )
            .execute(p)
            .await
            .unwrap();
            sqlx::query(
                "CREATE TRIGGER audit_refused BEFORE INSERT ON audit \
                 FOR EACH ROW EXECUTE FUNCTION audit_refused()",
            )
            .execute(p)
            .await
            .unwrap();
        }
        (Pool::Postgres(p), false) => {
            sqlx::query("DROP TRIGGER audit_refused ON audit")
                .execute(p)
                .await
                .unwrap();
            sqlx::query("DROP FUNCTION audit_refused()")
                .execute(p)
                .await
                .unwrap();
        }
    }
}

/// Every change is stored in the same transaction as its audit record: with the audit log
/// refusing, each one fails and leaves nothing changed — secrets put, delete and destroy,
/// policy apply, operator revocation by every selector, the holder's revocation, and the
/// reaper — and once the log works again the chain verifies and the changes go through.
async fn no_change_without_its_audit_record(env: Env) {
    env.put("shared/x", &[("k", "v1")]).await;
    let c = env.login("team-q", "sa").await;
    let g = env.broker.lease(&c, "shared/x", None).await.unwrap();
    let store = env.broker.store().clone();
    // An expired lease for the reaper.
    let now = keyhaven_broker::audit::now_ms();
    let mut expired = store
        .list_leases(&LeaseFilter::Id(g.lease_id.clone()), now, false)
        .await
        .unwrap()
        .remove(0);
    expired.id = format!("{}-expired", g.lease_id);
    expired.expires_ms = now - 1_000;
    store.insert_lease(&expired).await.unwrap();
    let active = |store: keyhaven_broker::store::Store| async move {
        let now = keyhaven_broker::audit::now_ms();
        let mut ids: Vec<String> = store
            .list_leases(&LeaseFilter::All, now, false)
            .await
            .unwrap()
            .into_iter()
            .map(|l| l.id)
            .collect();
        ids.sort();
        ids
    };
    let before = active(store.clone()).await;
    let all_before = store
        .list_leases(&LeaseFilter::All, now, true)
        .await
        .unwrap();
    let generation = store.policy_generation().await.unwrap();
    // A spare KEK that wraps nothing, to retire.
    let keys = env.broker.envelope().keystore().clone();
    env.broker.rotate_key(&env.admin).await.unwrap();
    let spare = env
        .broker
        .rotate_key(&env.admin)
        .await
        .unwrap()
        .previous
        .unwrap()
        .to_string();
    let keks = keys.list_keks().await.unwrap().len();
    let head = store.audit_head().await.unwrap();

    refuse_audit(&store, true).await;
    // Key operations: no record, no HSM call.
    env.broker.rotate_key(&env.admin).await.unwrap_err();
    assert_eq!(
        keys.list_keks().await.unwrap().len(),
        keks,
        "a KEK was made"
    );
    env.broker.retire_key(&env.admin, &spare).await.unwrap_err();
    assert_eq!(
        keys.list_keks().await.unwrap().len(),
        keks,
        "a KEK was destroyed"
    );
    let data = SecretData::from_pairs([("k".to_string(), b"v2".to_vec())]);
    let e = env
        .broker
        .put_secret(&env.admin, "shared/x", data)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            BrokerError::Unavailable { .. } | BrokerError::Internal { .. }
        ),
        "{e:?}"
    );
    assert_eq!(
        store.latest_version("shared/x").await.unwrap(),
        1,
        "put stored a version"
    );
    for destroy in [false, true] {
        env.broker
            .delete_secret(&env.admin, "shared/x", destroy)
            .await
            .unwrap_err();
        let v = store.versions("shared/x").await.unwrap();
        assert!(
            v.iter()
                .all(|v| v.deleted_ms.is_none() && v.sealed.is_some()),
            "delete (destroy: {destroy}) changed a version"
        );
    }
    let no_grant = POLICIES.replace("shared/**", "other/**");
    env.broker
        .apply_policies(&env.admin, &no_grant, false)
        .await
        .unwrap_err();
    assert_eq!(store.policy_generation().await.unwrap(), generation);
    for filter in [
        LeaseFilter::Id(g.lease_id.clone()),
        LeaseFilter::Namespace("team-q".into()),
        LeaseFilter::Identity {
            namespace: "team-q".into(),
            service_account: "sa".into(),
        },
        LeaseFilter::Pod {
            namespace: "team-q".into(),
            pod: "pod-1".into(),
        },
        LeaseFilter::PathPrefix("shared".into()),
        LeaseFilter::All,
    ] {
        env.broker
            .revoke_leases(&env.admin, &filter)
            .await
            .unwrap_err();
        assert_eq!(active(store.clone()).await, before, "revoke {filter:?}");
    }
    env.broker.renew(&c, &g.lease_id, None).await.unwrap_err();
    env.broker.revoke(&c, &g.lease_id).await.unwrap_err();
    env.broker.reap(100).await.unwrap_err();
    assert_eq!(
        store
            .list_leases(&LeaseFilter::All, now, true)
            .await
            .unwrap(),
        all_before,
        "a lease row changed"
    );
    assert_eq!(
        store.audit_head().await.unwrap(),
        head,
        "a record was written"
    );

    // The log works again: the chain is whole, and the same changes go through.
    refuse_audit(&store, false).await;
    assert!(store.verify_audit().await.unwrap().is_ok());
    env.broker.retire_key(&env.admin, &spare).await.unwrap();
    assert_eq!(keys.list_keks().await.unwrap().len(), keks - 1);
    assert_eq!(env.broker.reap(100).await.unwrap(), 1);
    env.broker.renew(&c, &g.lease_id, None).await.unwrap();
    assert_eq!(
        store
            .get_lease(&g.lease_id)
            .await
            .unwrap()
            .unwrap()
            .renewals,
        1
    );
    env.broker.revoke(&c, &g.lease_id).await.unwrap();
    assert!(active(store.clone()).await.is_empty());
    assert_eq!(env.put("shared/x", &[("k", "v2")]).await, 2);
    assert_eq!(
        env.broker
            .delete_secret(&env.admin, "shared/x", true)
            .await
            .unwrap(),
        2
    );
    assert!(store.verify_audit().await.unwrap().is_ok());
}

macro_rules! scenarios {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[test] fn $name() { super::run(super::Db::Sqlite, super::$name) } )*
        }
        mod postgres {
            $( #[test] fn $name() { super::run(super::Db::Postgres, super::$name) } )*
        }
    };
}

scenarios!(
    default_deny_and_least_privilege,
    bad_tokens_are_unauthenticated_and_audited,
    renew_until_max_then_refused_and_revoke,
    operators_revoke_by_identity_pod_and_prefix,
    two_hundred_concurrent_clients_stay_consistent,
    a_lease_never_hands_out_a_version_another_replica_replaced,
    no_change_without_its_audit_record,
);

/// Each record's (kind, outcome), in order.
fn kinds(recs: &[keyhaven_broker::audit::AuditRecord]) -> Vec<(EventKind, Outcome)> {
    recs.iter()
        .map(|r| (r.event.kind.clone(), r.event.outcome))
        .collect()
}

#[test]
fn a_deferred_authentication_is_audited_with_the_request_in_one_transaction() {
    run(Db::Sqlite, |env| async move {
        env.put("shared/x", &[("k", "v")]).await;
        let token = env.token("team-q", "sa", Some("pod-1"));
        let head = env.broker.store().audit_head().await.unwrap();
        let auth = env.broker.authenticate_deferred(&token).await.unwrap();
        // Nothing written yet for the authentication.
        assert_eq!(env.broker.store().audit_head().await.unwrap(), head);
        let g = env
            .broker
            .lease_authenticated(auth, "shared/x", None)
            .await
            .unwrap();
        let recs = env
            .broker
            .store()
            .audit_records(head.seq, 10)
            .await
            .unwrap();
        assert_eq!(
            kinds(&recs),
            vec![
                (EventKind::Authenticate, Outcome::Ok),
                (EventKind::Lease, Outcome::Ok)
            ]
        );
        assert_eq!(recs[0].event.identity, recs[1].event.identity);
        assert_eq!(recs[1].event.lease_id.as_deref(), Some(g.lease_id.as_str()));
        // A refused request carries its authentication record too.
        let auth = env.broker.authenticate_deferred(&token).await.unwrap();
        env.broker
            .lease_authenticated(auth, "payments/db", None)
            .await
            .unwrap_err();
        let recs = env
            .broker
            .store()
            .audit_records(head.seq + 2, 10)
            .await
            .unwrap();
        assert_eq!(
            kinds(&recs),
            vec![
                (EventKind::Authenticate, Outcome::Ok),
                (EventKind::Lease, Outcome::Denied)
            ]
        );
        assert!(env.broker.store().verify_audit().await.unwrap().is_ok());
    });
}

#[test]
fn a_lease_whose_audit_cannot_be_written_fails_and_leaves_no_active_lease() {
    run(Db::Sqlite, |env| async move {
        env.put("shared/x", &[("k", "v")]).await;
        let token = env.token("team-q", "sa", Some("pod-1"));
        // An audit file every write to fails (ENOSPC), as on a full disk.
        let full = env._hsm.dir().join("audit-on-a-full-disk");
        std::os::unix::fs::symlink("/dev/full", &full).unwrap();
        let sink = keyhaven_broker::audit::JsonlSink::open(&full).unwrap();
        let Env { broker, _hsm, .. } = env;
        let broker = broker.with_audit_file(sink);
        let auth = broker.authenticate_deferred(&token).await.unwrap();
        let e = broker
            .lease_authenticated(auth, "shared/x", None)
            .await
            .unwrap_err();
        assert!(matches!(e, BrokerError::Unavailable { .. }), "{e:?}");
        let now = keyhaven_broker::audit::now_ms();
        let active = broker
            .store()
            .list_leases(&LeaseFilter::All, now, false)
            .await
            .unwrap();
        assert!(active.is_empty(), "a refused lease is active: {active:?}");
        let all = broker
            .store()
            .list_leases(&LeaseFilter::All, now, true)
            .await
            .unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].end_reason.as_deref(), Some("revoked:audit_failed"));
    });
}

#[test]
fn database_gone_fails_cleanly_and_recovers_without_losing_leases() {
    run(Db::Postgres, |mut env| async move {
        env.put("shared/x", &[("k", "v")]).await;
        let c = env.login("team-q", "sa").await;
        let before = env.broker.lease(&c, "shared/x", None).await.unwrap();
        let mut pg = env._pg.take().unwrap();
        tokio::task::block_in_place(|| pg.stop());
        for _ in 0..3 {
            let e = env.broker.lease(&c, "shared/x", None).await.unwrap_err();
            assert!(matches!(e, BrokerError::Unavailable { .. }), "{e:?}");
            let e = env
                .broker
                .renew(&c, &before.lease_id, None)
                .await
                .unwrap_err();
            assert!(matches!(e, BrokerError::Unavailable { .. }), "{e:?}");
        }
        tokio::task::block_in_place(|| pg.resume().unwrap());
        let mut after = None;
        for _ in 0..50 {
            match env.broker.lease(&c, "shared/x", None).await {
                Ok(g) => {
                    after = Some(g);
                    break;
                }
                Err(BrokerError::Unavailable { .. }) => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(e) => panic!("{e:?}"),
            }
        }
        let after = after.expect("service came back without a restart");
        let now = keyhaven_broker::audit::now_ms();
        let leases = env
            .broker
            .store()
            .list_leases(&LeaseFilter::All, now, true)
            .await
            .unwrap();
        let ids: Vec<_> = leases.iter().map(|l| l.id.clone()).collect();
        assert_eq!(
            ids.len(),
            2,
            "exactly the two granted leases exist: {ids:?}"
        );
        assert!(ids.contains(&before.lease_id) && ids.contains(&after.lease_id));
        env.broker.renew(&c, &before.lease_id, None).await.unwrap();
        assert!(env.broker.store().verify_audit().await.unwrap().is_ok());
        drop(pg);
    });
}
