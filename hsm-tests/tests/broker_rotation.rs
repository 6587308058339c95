//! Online KEK rotation of the broker: a new KEK in a real SoftHSM2 token, the resumable batched
//! re-wrap of stored DEKs (SQLite file and real PostgreSQL), retirement, automatic rotation.
//!
//! Library level (in process): the claim/commit logic of the store, the rotation lock.
//! Process level (real `broker` processes over TLS): rotation under a 100-client lease load,
//! `kill -9` at random points of a re-wrap, two replicas on one PostgreSQL, retirement through
//! `brokerctl`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hsm_tests::broker::{authed, broker_token, test_store, tls_channel, BrokerProc, BOOTSTRAP};
use hsm_tests::process::runtime;
use keyhaven_broker::audit::{EventKind, Outcome};
use keyhaven_broker::auth::{Authenticator, DevIssuer, Verifier};
use keyhaven_broker::crypto::{DekCache, Envelope, SecretData};
use keyhaven_broker::rotation::AutoRotation;
use keyhaven_broker::service::{Broker, BrokerConfig, BrokerError, Caller};
use keyhaven_broker::store::{Pool, Rewrapped, Store, StoreError};
use keyhaven_hsm::{BlockingKeystore, ErrorKind, KekId, Keystore};
use keyhaven_proto::broker::v1::admin_client::AdminClient;
use keyhaven_proto::broker::v1::leases_client::LeasesClient;
use keyhaven_proto::broker::v1::*;
use secrecy::SecretString;
use testkit::pki::DevPki;
use testkit::postgres::Postgres;
use testkit::softhsm::SoftHsm;
use tonic::transport::Channel;
use tonic::Code;

const PREFIX: &str = "keyhaven-broker-";

const POLICY: &str = r#"
policies:
- name: load
  subjects: [{namespace: load, serviceaccount: "*"}]
  paths: ["load/**"]
  capabilities: [read]
  ttl: 5m
  max_ttl: 1h
"#;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A small xorshift generator, seeded from the clock (the seed is printed for a re-run).
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let seed = std::env::var("KEYHAVEN_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| now_ms() as u64 | 1);
        eprintln!("random seed {seed} (KEYHAVEN_TEST_SEED to repeat)");
        Rng(seed)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn broker_keystore(hsm: &SoftHsm) -> BlockingKeystore {
    let mut cfg = hsm.config();
    cfg.kek_label_prefix = PREFIX.into();
    BlockingKeystore::open(cfg).unwrap()
}

/// A fresh in-process envelope on the token, without a DEK cache (every open is a real HSM
/// unwrap with the KEK the row names).
async fn fresh_envelope(hsm: &SoftHsm) -> Envelope {
    let mut cfg = hsm.config();
    cfg.kek_label_prefix = PREFIX.into();
    Envelope::new(
        Keystore::open(cfg).await.unwrap(),
        DekCache::new(0, Duration::from_secs(1)),
    )
}

fn value(i: usize, version: i64) -> String {
    format!("v-{i}-{version}")
}

fn path(i: usize) -> String {
    format!("load/s-{i:05}")
}

/// Inserts version 1 of `load/s-<i>` for `i` in `0..n`, sealed under `kek`, in one transaction.
async fn seed(store: &Store, env: &Envelope, kek: KekId, n: usize) {
    let mut sealed = Vec::with_capacity(n);
    for i in 0..n {
        let data = SecretData::from_pairs([("value", value(i, 1))]);
        sealed.push(env.seal(kek, &path(i), 1, &data).await.unwrap());
    }
    let sql = "INSERT INTO secret_versions \
        (path, version, created_ms, kek_id, dek_iv, dek_ct, nonce, ciphertext) \
        VALUES ($1, 1, $2, $3, $4, $5, $6, $7)";
    macro_rules! insert_all {
        ($pool:expr) => {{
            let mut tx = $pool.begin().await.unwrap();
            for (i, s) in sealed.iter().enumerate() {
                sqlx::query(sql)
                    .bind(path(i))
                    .bind(now_ms())
                    .bind(kek.to_string())
                    .bind(&s.dek.iv)
                    .bind(&s.dek.ciphertext)
                    .bind(&s.nonce)
                    .bind(&s.ciphertext)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
            }
            tx.commit().await.unwrap();
        }};
    }
    match store.pool() {
        Pool::Sqlite(p) => insert_all!(p),
        Pool::Postgres(p) => insert_all!(p),
    }
}

/// Opens every live row with its own KEK in the HSM and checks the value; returns the rows
/// per KEK id.
async fn verify_all(store: &Store, env: &Envelope, n: usize) -> BTreeMap<String, usize> {
    let mut per_kek = BTreeMap::new();
    for i in 0..n {
        let p = path(i);
        let row = store.get_version(&p, None).await.unwrap().expect("row");
        let sealed = row.sealed.expect("sealed");
        *per_kek.entry(sealed.dek.kek_id.to_string()).or_insert(0) += 1;
        let data = env
            .open(&p, row.version, &sealed)
            .await
            .unwrap_or_else(|e| panic!("{p} does not open: {e}"));
        assert_eq!(
            data.0["value"].as_slice(),
            value(i, row.version).as_bytes(),
            "{p}"
        );
    }
    per_kek
}

// ---- library level: the store's claim and commit ----------------------------------------------

enum Db {
    Sqlite,
    Postgres,
}

fn with_store<F, Fut>(db: Db, f: F)
where
    F: FnOnce(Store, Envelope, SoftHsm) -> Fut,
    Fut: Future<Output = ()>,
{
    let hsm = SoftHsm::new().unwrap();
    let pg = matches!(db, Db::Postgres).then(|| Postgres::start().unwrap());
    let rt = runtime();
    rt.block_on(async {
        let store = test_store(&hsm, pg.as_ref()).await;
        let mut cfg = hsm.config();
        cfg.kek_label_prefix = PREFIX.into();
        let ks = Keystore::open(cfg).await.unwrap();
        let envelope = Envelope::new(ks, DekCache::new(1000, Duration::from_secs(60)));
        f(store, envelope, hsm).await
    });
    drop(pg);
}

async fn claims_move_each_row_once_and_never_touch_data(store: Store, env: Envelope, hsm: SoftHsm) {
    let ks = env.keystore().clone();
    let old = ks.generate_kek().await.unwrap().id;
    seed(&store, &env, old, 30).await;
    // A soft-deleted version still needs its DEK; a destroyed one has none.
    store.soft_delete(&path(3), now_ms()).await.unwrap();
    store.destroy(&path(4), now_ms()).await.unwrap();
    let before: Vec<_> = store.versions(&path(0)).await.unwrap();
    let new = ks.generate_kek().await.unwrap().id;

    // Nothing to claim from an empty list; a claim never returns destroyed rows.
    assert!(store
        .claim_rewrap(&[], new, None, 10)
        .await
        .unwrap()
        .rows
        .is_empty());
    let c1 = store.claim_rewrap(&[old], new, None, 10).await.unwrap();
    assert_eq!(c1.rows.len(), 10);
    assert!(c1.rows.iter().all(|r| r.path != path(4)));
    let c1_paths: HashSet<String> = c1.rows.iter().map(|r| r.path.clone()).collect();
    if let Pool::Postgres(_) = store.pool() {
        // A second replica claiming at the same time gets other rows (SKIP LOCKED).
        let c2 = store.claim_rewrap(&[old], new, None, 10).await.unwrap();
        assert_eq!(c2.rows.len(), 10);
        assert!(c2.rows.iter().all(|r| !c1_paths.contains(&r.path)));
        drop(c2); // rolled back: nothing moved
    }
    let mut moved = Vec::new();
    for r in &c1.rows {
        let w = env.rewrap(&r.path, r.version, &r.dek, new).await.unwrap();
        moved.push(Rewrapped {
            path: r.path.clone(),
            version: r.version,
            old: r.dek.clone(),
            new: w,
        });
    }
    assert_eq!(c1.commit(&moved, "replica-a", now_ms()).await.unwrap(), 10);
    // The same moves again (a replica that claimed the same rows earlier, or a retried
    // commit): the guard on the old KEK id and wrapped DEK moves nothing.
    let stale = store.claim_rewrap(&[], new, None, 10).await.unwrap();
    assert_eq!(
        stale.commit(&moved, "replica-b", now_ms()).await.unwrap(),
        0
    );

    // A cursor walks the rest in primary-key order without repeating a row.
    let mut cursor: Option<(String, i64)> = None;
    let mut seen = HashSet::new();
    loop {
        let c = store
            .claim_rewrap(
                &[old],
                new,
                cursor.as_ref().map(|(p, v)| (p.as_str(), *v)),
                7,
            )
            .await
            .unwrap();
        let Some(last) = c.rows.last() else { break };
        cursor = Some((last.path.clone(), last.version));
        let mut moved = Vec::new();
        for r in &c.rows {
            assert!(seen.insert(r.path.clone()), "{} claimed twice", r.path);
            moved.push(Rewrapped {
                path: r.path.clone(),
                version: r.version,
                old: r.dek.clone(),
                new: env.rewrap(&r.path, r.version, &r.dek, new).await.unwrap(),
            });
        }
        c.commit(&moved, "replica-a", now_ms()).await.unwrap();
    }
    assert_eq!(seen.len(), 29 - 10, "every live row not moved before, once");

    // Every live row moved exactly once; data ciphertext and nonce untouched.
    let counts = store.rewrap_counts().await.unwrap();
    assert_eq!(counts.len(), 29);
    assert!(counts.iter().all(|(_, _, n)| *n == 1), "{counts:?}");
    let after = store.versions(&path(0)).await.unwrap();
    let (b, a) = (
        before[0].sealed.as_ref().unwrap(),
        after[0].sealed.as_ref().unwrap(),
    );
    assert_eq!((&b.nonce, &b.ciphertext), (&a.nonce, &a.ciphertext));
    assert_ne!(b.dek, a.dek);
    assert_eq!(a.dek.kek_id, new);
    let per_kek = store.deks_per_kek().await.unwrap();
    assert_eq!(per_kek, vec![(new.to_string(), 29)]);
    assert_eq!(store.kek_usage(new).await.unwrap().rewraps_in, 29);
    assert_eq!(store.kek_usage(old).await.unwrap().seals, 0, "seeded raw");
    let by_replica = store.rewrap_moves_by_replica().await.unwrap();
    assert_eq!(by_replica, vec![("replica-a".to_string(), 29)]);
    let act = store.rewrap_activity(0).await.unwrap();
    assert_eq!((act.rows, act.replicas), (29, 1));

    // Everything opens, with a fresh envelope (no cache), soft-deleted version included.
    let env2 = fresh_envelope(&hsm).await;
    for i in (0..30).filter(|i| *i != 4) {
        let v = store.get_version(&path(i), Some(1)).await.unwrap().unwrap();
        let d = env2.open(&path(i), 1, &v.sealed.unwrap()).await.unwrap();
        assert_eq!(d.0["value"].as_slice(), value(i, 1).as_bytes());
    }

    // Retirement: refused while a live DEK (here a soft-deleted one) is under the KEK.
    let third = ks.generate_kek().await.unwrap().id;
    let row = store.get_version(&path(3), Some(1)).await.unwrap().unwrap();
    let w = env
        .rewrap(&path(3), 1, &row.sealed.unwrap().dek, third)
        .await
        .unwrap();
    let claim = store.claim_rewrap(&[], third, None, 1).await.unwrap();
    let back = vec![Rewrapped {
        path: path(3),
        version: 1,
        old: store
            .get_version(&path(3), Some(1))
            .await
            .unwrap()
            .unwrap()
            .sealed
            .unwrap()
            .dek,
        new: w,
    }];
    assert_eq!(claim.commit(&back, "replica-a", now_ms()).await.unwrap(), 1);
    match store.mark_kek_retired(third, now_ms()).await {
        Err(StoreError::KekInUse { deks, .. }) => assert_eq!(deks, 1),
        other => panic!("retired a KEK a soft-deleted version needs: {other:?}"),
    }
    assert!(!store.is_kek_retired(third).await.unwrap());
    // The old KEK only has the destroyed row left: retirement allowed, idempotent.
    store.mark_kek_retired(old, now_ms()).await.unwrap();
    store.mark_kek_retired(old, now_ms()).await.unwrap();
    assert!(store.is_kek_retired(old).await.unwrap());
    // Nothing is wrapped by a retired KEK any more: neither a new version nor a re-wrap.
    let sealed = env
        .seal(old, "load/late", 1, &SecretData::from_pairs([("k", "v")]))
        .await
        .unwrap();
    match store
        .insert_version("load/late", 1, now_ms(), &sealed)
        .await
    {
        Err(StoreError::KekRetired(k)) => assert_eq!(k, old.to_string()),
        other => panic!("a DEK was stored under a retired KEK: {other:?}"),
    }
    assert!(store
        .get_version("load/late", None)
        .await
        .unwrap()
        .is_none());
    let claim = store.claim_rewrap(&[new], old, None, 5).await;
    let refused = match claim {
        Err(StoreError::KekRetired(_)) => true, // PostgreSQL checks at claim time
        Ok(c) => {
            let rows = c.rows.clone();
            let mut moved = Vec::new();
            for r in &rows {
                moved.push(Rewrapped {
                    path: r.path.clone(),
                    version: r.version,
                    old: r.dek.clone(),
                    new: env.rewrap(&r.path, r.version, &r.dek, old).await.unwrap(),
                });
            }
            matches!(
                c.commit(&moved, "replica-a", now_ms()).await,
                Err(StoreError::KekRetired(_))
            )
        }
        Err(e) => panic!("{e}"),
    };
    assert!(refused, "a re-wrap to a retired KEK was not refused");
    let mut want = vec![(new.to_string(), 28), (third.to_string(), 1)];
    want.sort();
    assert_eq!(store.deks_per_kek().await.unwrap(), want);
}

#[test]
fn store_claims_move_each_row_once_sqlite() {
    with_store(Db::Sqlite, claims_move_each_row_once_and_never_touch_data);
}

#[test]
fn store_claims_move_each_row_once_postgres() {
    with_store(Db::Postgres, claims_move_each_row_once_and_never_touch_data);
}

// ---- library level: the service (rotation lock, automatic rotation, retire rules) --------------

async fn in_process_broker(store: Store, hsm: &SoftHsm, auto: AutoRotation) -> Broker {
    let mut cfg = hsm.config();
    cfg.kek_label_prefix = PREFIX.into();
    let envelope = Envelope::new(
        Keystore::open(cfg).await.unwrap(),
        DekCache::new(100, Duration::from_secs(60)),
    );
    let issuer = DevIssuer::generate().unwrap();
    let verifier = Arc::new(
        Verifier::new(
            keyhaven_broker::auth::dev_verifier_config(),
            keyhaven_broker::auth::dev_jwks_source(&issuer),
        )
        .unwrap(),
    );
    let authenticator = Authenticator::new(verifier)
        .with_bootstrap_admin(SecretString::from(BOOTSTRAP.to_string()));
    Broker::new(
        store,
        envelope,
        authenticator,
        BrokerConfig {
            auto_rotation: auto,
            ..BrokerConfig::default()
        },
    )
    .await
    .unwrap()
}

/// Two replicas (two brokers, one database) decide on a due automatic rotation at the same
/// moment: exactly one rotation happens, and it is audited once.
async fn racing_replicas_auto_rotate_once(store: Store, env: Envelope, hsm: SoftHsm) {
    let first = env.keystore().generate_kek().await.unwrap().id;
    let auto = AutoRotation {
        after: None,
        after_encryptions: Some(4),
    };
    let a = in_process_broker(store.clone(), &hsm, auto.clone()).await;
    let b = in_process_broker(store.clone(), &hsm, auto).await;
    let admin = a.authenticate(BOOTSTRAP).await.unwrap();
    for v in 0..4 {
        a.put_secret(
            &admin,
            "load/one",
            SecretData::from_pairs([("value", format!("{v}"))]),
        )
        .await
        .unwrap();
    }
    assert_eq!(store.kek_usage(first).await.unwrap().seals, 4);
    // 4 encryptions, but 4 live DEKs: a rotation's re-wrap alone would reach the limit again,
    // so the rule holds off.
    assert!(a.auto_rotate().await.unwrap().is_none());
    a.delete_secret(&admin, "load/one", true).await.unwrap();
    let (ra, rb) = tokio::join!(a.auto_rotate(), b.auto_rotate());
    let made: Vec<_> = [ra.unwrap(), rb.unwrap()].into_iter().flatten().collect();
    assert_eq!(made.len(), 1, "two replicas both rotated: {made:?}");
    assert_eq!(made[0].previous, Some(first));
    assert_eq!(env.keystore().list_keks().await.unwrap().len(), 2);
    // Not due any more, in either replica.
    assert!(a.auto_rotate().await.unwrap().is_none());
    assert!(b.auto_rotate().await.unwrap().is_none());
    let recs = store.audit_records(0, 10_000).await.unwrap();
    let rotations: Vec<_> = recs
        .iter()
        .filter(|r| r.event.kind == EventKind::Admin("key_rotate".into()))
        .collect();
    assert_eq!(rotations.len(), 1);
    assert_eq!(
        rotations[0].event.identity.as_deref(),
        Some("broker:auto-rotation")
    );
    assert_eq!(rotations[0].event.reason.as_deref(), Some("encryptions"));
    assert_eq!(
        rotations[0].event.path,
        Some(format!("kek:{}", made[0].kek.id))
    );

    // Retire rules through the service: the primary and unknown/malformed ids are refused,
    // and a workload without the `keys` capability cannot rotate.
    let e = a
        .retire_key(&admin, &made[0].kek.id.to_string())
        .await
        .unwrap_err();
    assert!(matches!(e, BrokerError::FailedPrecondition(_)), "{e}");
    let e = a.retire_key(&admin, &"0".repeat(32)).await.unwrap_err();
    assert!(matches!(e, BrokerError::NotFound(_)), "{e}");
    let e = a.retire_key(&admin, "xyz").await.unwrap_err();
    assert!(matches!(e, BrokerError::InvalidArgument(_)), "{e}");
    let worker = Caller::Workload(keyhaven_broker::identity::Identity {
        namespace: "load".into(),
        service_account: "x".into(),
        pod_name: None,
        pod_uid: None,
    });
    let e = a.rotate_key(&worker).await.unwrap_err();
    assert!(matches!(e, BrokerError::PermissionDenied(_)), "{e}");
    // The first KEK only wraps the destroyed secret: it can go.
    a.retire_key(&admin, &first.to_string()).await.unwrap();
    assert!(env
        .keystore()
        .list_keks()
        .await
        .unwrap()
        .iter()
        .all(|k| k.id != first));
    let recs = store.audit_records(0, 10_000).await.unwrap();
    let retires: Vec<_> = recs
        .iter()
        .filter(|r| r.event.kind == EventKind::Admin("key_retire".into()))
        .map(|r| (r.event.outcome, r.event.path.clone()))
        .collect();
    assert_eq!(retires.len(), 4, "{retires:?}");
    assert_eq!(
        retires.last().unwrap(),
        &(Outcome::Ok, Some(format!("kek:{first}")))
    );
}

#[test]
fn racing_replicas_auto_rotate_once_sqlite() {
    with_store(Db::Sqlite, racing_replicas_auto_rotate_once);
}

#[test]
fn racing_replicas_auto_rotate_once_postgres() {
    with_store(Db::Postgres, racing_replicas_auto_rotate_once);
}

// ---- process level --------------------------------------------------------------------------

async fn admin(ch: &Channel) -> AdminClient<Channel> {
    AdminClient::new(ch.clone())
}

async fn key_status(ch: &Channel) -> KeyStatusResponse {
    admin(ch)
        .await
        .key_status(authed(KeyStatusRequest {}, BOOTSTRAP))
        .await
        .unwrap()
        .into_inner()
}

async fn remaining(ch: &Channel) -> u64 {
    key_status(ch).await.rewrap.unwrap().remaining
}

/// Polls until no DEK is left under an older KEK (a hang guard, not a speed assertion).
async fn wait_rewrapped(ch: &Channel, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if remaining(ch).await == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the re-wrap never finished"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn rotate(ch: &Channel) -> RotateKeyResponse {
    admin(ch)
        .await
        .rotate_key(authed(RotateKeyRequest {}, BOOTSTRAP))
        .await
        .unwrap()
        .into_inner()
}

/// Leases `load/s-<i>` and checks the value; the error text on failure.
async fn lease_check(
    leases: &mut LeasesClient<Channel>,
    token: &str,
    i: usize,
) -> Result<(), String> {
    let l = leases
        .lease(authed(
            LeaseRequest {
                path: path(i),
                ttl_seconds: 0,
            },
            token,
        ))
        .await
        .map_err(|s| format!("{}: {:?} {}", path(i), s.code(), s.message()))?
        .into_inner();
    let want = value(i, l.version as i64);
    if l.data.get("value").map(Vec::as_slice) != Some(want.as_bytes()) {
        return Err(format!("{}: wrong value", path(i)));
    }
    Ok(())
}

/// Leases every secret `0..n` once, 16 at a time; returns the failures.
async fn sweep(ch: &Channel, token: &str, n: usize) -> Vec<String> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (ch, token, next) = (ch.clone(), token.to_owned(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut leases = LeasesClient::new(ch);
            let mut failed = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return failed;
                }
                if let Err(e) = lease_check(&mut leases, &token, i).await {
                    failed.push(e);
                }
            }
        }));
    }
    let mut failed = Vec::new();
    for t in tasks {
        failed.extend(t.await.unwrap());
    }
    failed
}

#[test]
fn rotation_under_a_100_client_lease_load_fails_no_lease() {
    const SECRETS: usize = 300;
    const CLIENTS: usize = 100;
    let (hsm, pki) = broker_token();
    // Small, paced batches: the re-wrap takes seconds, so the load and a full sweep run while
    // it is in progress. The 100 clients share one loopback address, each with a new token:
    // no limit before authentication either.
    let b = BrokerProc::start(
        &hsm,
        &pki,
        &[
            "--rate-limit",
            "0",
            "--auth-attempts-per-peer",
            "0",
            "--rewrap-batch-size",
            "3",
            "--rewrap-pause",
            "250ms",
            "--kek-refresh-interval",
            "1s",
        ],
    );
    let rt = runtime();
    rt.block_on(async {
        let ch = tls_channel(&b.addr, &pki.ca).await;
        admin(&ch)
            .await
            .apply_policies(authed(
                ApplyPoliciesRequest {
                    yaml: POLICY.into(),
                    ..Default::default()
                },
                BOOTSTRAP,
            ))
            .await
            .unwrap();
        let next = Arc::new(AtomicUsize::new(0));
        let mut puts = Vec::new();
        for _ in 0..8 {
            let (ch, next) = (ch.clone(), next.clone());
            puts.push(tokio::spawn(async move {
                let mut a = AdminClient::new(ch);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= SECRETS {
                        return;
                    }
                    a.put_secret(authed(
                        PutSecretRequest {
                            path: path(i),
                            data: [("value".to_string(), value(i, 1).into_bytes())].into(),
                        },
                        BOOTSTRAP,
                    ))
                    .await
                    .unwrap();
                }
            }));
        }
        for p in puts {
            p.await.unwrap();
        }
        let dev = DevIssuer::load_or_generate(&hsm.dir().join("dev.pem")).unwrap();
        let sweeper = dev
            .mint("load", "sweeper", None, Duration::from_secs(3600))
            .unwrap();

        // 100 clients, each its own service account and TLS connection, leasing random
        // secrets back to back and checking every value, until told to stop.
        let phase = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let ok_per_phase: Arc<[AtomicU64; 3]> = Arc::new(Default::default());
        let failures = Arc::new(Mutex::new(Vec::<String>::new()));
        let mut clients = Vec::new();
        for c in 0..CLIENTS {
            let token = dev
                .mint(
                    "load",
                    &format!("client-{c}"),
                    Some(&format!("client-{c}-0")),
                    Duration::from_secs(3600),
                )
                .unwrap();
            let ch = tls_channel(&b.addr, &pki.ca).await;
            let (phase, stop, ok, failures) = (
                phase.clone(),
                stop.clone(),
                ok_per_phase.clone(),
                failures.clone(),
            );
            clients.push(tokio::spawn(async move {
                let mut leases = LeasesClient::new(ch);
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (c as u64 + 1));
                while !stop.load(Ordering::Relaxed) {
                    let p = phase.load(Ordering::Relaxed);
                    let i = rng.below(SECRETS as u64) as usize;
                    match lease_check(&mut leases, &token, i).await {
                        Ok(()) => {
                            ok[p].fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => failures.lock().unwrap().push(e),
                    }
                }
            }));
        }

        // Before: every secret opens.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let failed = sweep(&ch, &sweeper, SECRETS).await;
        assert!(failed.is_empty(), "before rotation: {failed:?}");
        let old = key_status(&ch).await.keks[0].kek_id.clone();

        // Rotate through brokerctl, under load.
        let out = b.ctl_admin(&hsm, &pki.ca, &["keys", "rotate"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let new = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        assert_eq!(new.len(), 32);
        phase.store(1, Ordering::Relaxed);
        // During: a whole sweep while the re-wrap is in progress (checked before and after).
        let st = key_status(&ch).await;
        let w = st.rewrap.unwrap();
        assert!(
            w.remaining > 0,
            "the re-wrap ended before the sweep began: {w:?}"
        );
        assert_eq!(st.keks.last().unwrap().kek_id, new);
        assert_eq!(st.keks.last().unwrap().role, "primary");
        let t0 = Instant::now();
        let failed = sweep(&ch, &sweeper, SECRETS).await;
        eprintln!("sweep during the re-wrap took {:?}", t0.elapsed());
        assert!(failed.is_empty(), "during the re-wrap: {failed:?}");
        // A new version written now is wrapped by the new KEK at once.
        admin(&ch)
            .await
            .put_secret(authed(
                PutSecretRequest {
                    path: path(0),
                    data: [("value".to_string(), value(0, 2).into_bytes())].into(),
                },
                BOOTSTRAP,
            ))
            .await
            .unwrap();
        let meta = admin(&ch)
            .await
            .secret_metadata(authed(SecretMetadataRequest { path: path(0) }, BOOTSTRAP))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(meta.versions.last().unwrap().kek_id, new);
        let w = key_status(&ch).await.rewrap.unwrap();
        assert!(w.remaining > 0, "the re-wrap ended during the sweep: {w:?}");
        assert!(w.moved > 0 && w.rate_per_second > 0.0, "{w:?}");
        assert!(w.eta_seconds >= 0, "{w:?}");

        wait_rewrapped(&ch, "under load").await;
        phase.store(2, Ordering::Relaxed);
        // After: every secret opens again, all under the new KEK.
        let failed = sweep(&ch, &sweeper, SECRETS).await;
        assert!(failed.is_empty(), "after the re-wrap: {failed:?}");
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.store(true, Ordering::Relaxed);
        for c in clients {
            c.await.unwrap();
        }
        let failures = failures.lock().unwrap().clone();
        assert!(
            failures.is_empty(),
            "{} failed leases: {:?}",
            failures.len(),
            &failures[..failures.len().min(10)]
        );
        let ok: Vec<u64> = ok_per_phase
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .collect();
        eprintln!("leases by the 100 clients before/during/after: {ok:?}");
        assert!(ok.iter().all(|n| *n > 0), "{ok:?}");

        let st = key_status(&ch).await;
        let old_row = st.keks.iter().find(|k| k.kek_id == old).unwrap();
        assert_eq!((old_row.role.as_str(), old_row.deks), ("decrypt-only", 0));
        let new_row = st.keks.iter().find(|k| k.kek_id == new).unwrap();
        assert_eq!(new_row.deks, SECRETS as u64 + 1);
        assert_eq!(new_row.encryptions, SECRETS as u64 + 1);
    });
    // Each row moved once; version 2 of s-0 was born under the new KEK.
    rt.block_on(async {
        let store = test_store(&hsm, None).await;
        for (p, v, n) in store.rewrap_counts().await.unwrap() {
            let want = if p == path(0) && v == 2 { 0 } else { 1 };
            assert_eq!(n, want, "{p}#{v} re-wrapped {n} times");
        }
    });
    let log = b.log_text();
    assert!(!log.contains("v-1-1") && !log.contains(BOOTSTRAP));
}

/// Kills the broker with SIGKILL at random points of two re-wraps; after each kill every row
/// is whole and opens, and after the restarts each re-wrap completes with every row moved
/// exactly once per rotation.
fn kill_9_during_rewrap(db: Db) {
    const SECRETS: usize = 1500;
    let hsm = SoftHsm::new().unwrap();
    let pg = matches!(db, Db::Postgres).then(|| Postgres::start().unwrap());
    let url = match &pg {
        Some(pg) => pg.url(),
        None => format!("sqlite://{}", hsm.dir().join("broker.db").display()),
    };
    let first = broker_keystore(&hsm).generate_kek().unwrap().id;
    let rt = runtime();
    rt.block_on(async {
        let store = Store::connect(&url).await.unwrap();
        seed(&store, &fresh_envelope(&hsm).await, first, SECRETS).await;
    });
    let pki = DevPki::write(hsm.dir()).unwrap();
    let mut b = BrokerProc::start_on(
        &hsm,
        &pki,
        &url,
        &[
            "--rate-limit",
            "0",
            "--rewrap-batch-size",
            "10",
            "--rewrap-pause",
            "20ms",
            "--kek-refresh-interval",
            "500ms",
        ],
    );
    let mut rng = Rng::new();
    let mut mid_job_kills = 0;
    let mut keks = vec![first.to_string()];
    for (round, kills) in [(1, 3), (2, 2)] {
        let new = rt.block_on(async {
            let ch = tls_channel(&b.addr, &pki.ca).await;
            rotate(&ch).await.kek_id
        });
        keks.push(new.clone());
        for k in 0..kills {
            std::thread::sleep(Duration::from_millis(150 + rng.below(900)));
            b.kill();
            let per_kek = rt.block_on(async {
                let store = Store::connect(&url).await.unwrap();
                let per_kek = verify_all(&store, &fresh_envelope(&hsm).await, SECRETS).await;
                // Whole rows only, and never more than one move per rotation so far.
                for (p, v, n) in store.rewrap_counts().await.unwrap() {
                    assert!(
                        n == round - 1 || n == round,
                        "{p}#{v}: {n} moves in round {round}"
                    );
                }
                per_kek
            });
            let on_new = per_kek.get(&new).copied().unwrap_or(0);
            eprintln!("round {round} kill {k}: {per_kek:?}");
            assert_eq!(per_kek.values().sum::<usize>(), SECRETS);
            if on_new > 0 && on_new < SECRETS {
                mid_job_kills += 1;
            }
            b.restart();
        }
        rt.block_on(async {
            let ch = tls_channel(&b.addr, &pki.ca).await;
            wait_rewrapped(&ch, &format!("round {round}")).await;
            let st = key_status(&ch).await;
            assert_eq!(st.keks.last().unwrap().kek_id, new);
            assert_eq!(st.keks.last().unwrap().deks, SECRETS as u64);
        });
    }
    assert!(
        mid_job_kills > 0,
        "no kill landed in the middle of a re-wrap; the test proved nothing"
    );
    rt.block_on(async {
        let store = Store::connect(&url).await.unwrap();
        let per_kek = verify_all(&store, &fresh_envelope(&hsm).await, SECRETS).await;
        assert_eq!(per_kek, [(keks[2].clone(), SECRETS)].into());
        for (p, v, n) in store.rewrap_counts().await.unwrap() {
            assert_eq!(n, 2, "{p}#{v}: moved {n} times in two rotations");
        }
        // And through the restarted broker itself: every secret leases.
        let ch = tls_channel(&b.addr, &pki.ca).await;
        admin(&ch)
            .await
            .apply_policies(authed(
                ApplyPoliciesRequest {
                    yaml: POLICY.into(),
                    ..Default::default()
                },
                BOOTSTRAP,
            ))
            .await
            .unwrap();
        let dev = DevIssuer::load_or_generate(&hsm.dir().join("dev.pem")).unwrap();
        let token = dev
            .mint("load", "check", None, Duration::from_secs(600))
            .unwrap();
        let failed = sweep(&ch, &token, SECRETS).await;
        assert!(failed.is_empty(), "{failed:?}");
    });
    drop(b);
    drop(pg);
}

#[test]
fn kill_9_at_random_points_of_a_rewrap_loses_nothing_sqlite() {
    kill_9_during_rewrap(Db::Sqlite);
}

#[test]
fn kill_9_at_random_points_of_a_rewrap_loses_nothing_postgres() {
    kill_9_during_rewrap(Db::Postgres);
}

#[test]
fn two_replicas_on_one_postgres_move_each_dek_exactly_once() {
    const SECRETS: usize = 1200;
    let hsm = SoftHsm::new().unwrap();
    let pg = Postgres::start().unwrap();
    let first = broker_keystore(&hsm).generate_kek().unwrap().id;
    let rt = runtime();
    rt.block_on(async {
        let store = Store::connect(&pg.url()).await.unwrap();
        seed(&store, &fresh_envelope(&hsm).await, first, SECRETS).await;
    });
    let pki = DevPki::write(hsm.dir()).unwrap();
    let flags = [
        "--rewrap-batch-size",
        "5",
        "--rewrap-pause",
        "30ms",
        "--kek-refresh-interval",
        "300ms",
    ];
    let a = BrokerProc::start_on(&hsm, &pki, &pg.url(), &flags);
    let b = BrokerProc::start_on(&hsm, &pki, &pg.url(), &flags);
    rt.block_on(async {
        let cha = tls_channel(&a.addr, &pki.ca).await;
        let chb = tls_channel(&b.addr, &pki.ca).await;
        let r = rotate(&cha).await;
        assert_eq!(r.previous_kek_id, first.to_string());
        assert_eq!(r.deks_to_rewrap, SECRETS as u64);
        // B adopts the new primary at its next refresh and joins the re-wrap.
        wait_rewrapped(&chb, "two replicas").await;
        let st = key_status(&chb).await;
        assert_eq!(st.keks.last().unwrap().kek_id, r.kek_id);

        let store = Store::connect(&pg.url()).await.unwrap();
        let counts = store.rewrap_counts().await.unwrap();
        assert_eq!(counts.len(), SECRETS);
        let twice: Vec<_> = counts.iter().filter(|(_, _, n)| *n != 1).collect();
        assert!(twice.is_empty(), "rows not moved exactly once: {twice:?}");
        let by_replica = store.rewrap_moves_by_replica().await.unwrap();
        eprintln!("DEKs moved per replica: {by_replica:?}");
        let moved_by = |pid: i32| {
            by_replica
                .iter()
                .filter(|(r, _)| r.ends_with(&format!("/{pid}")))
                .map(|(_, n)| *n)
                .sum::<i64>()
        };
        let (na, nb) = (moved_by(a.pid()), moved_by(b.pid()));
        assert_eq!(na + nb, SECRETS as i64, "{by_replica:?}");
        assert!(
            na > 0 && nb > 0,
            "the replicas did not re-wrap together: {by_replica:?}"
        );
        let new = KekId::from_hex(&r.kek_id).unwrap();
        assert_eq!(
            store.kek_usage(new).await.unwrap().rewraps_in,
            SECRETS as i64
        );
        let per_kek = verify_all(&store, &fresh_envelope(&hsm).await, SECRETS).await;
        assert_eq!(per_kek, [(r.kek_id.clone(), SECRETS)].into());
    });
    drop(a);
    drop(b);
    drop(pg);
}

#[test]
fn retire_is_refused_while_in_use_allowed_after_audited_and_the_kek_is_gone() {
    let (hsm, pki) = broker_token();
    let b = BrokerProc::start(
        &hsm,
        &pki,
        &[
            "--rewrap-batch-size",
            "2",
            "--rewrap-pause",
            "500ms",
            "--kek-refresh-interval",
            "300ms",
        ],
    );
    let ctl = |args: &[&str]| {
        let out = b.ctl_admin(&hsm, &pki.ca, args);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    std::fs::write(hsm.dir().join("v"), "retire-test-value").unwrap();
    for i in 0..8 {
        let (code, out, err) = ctl(&[
            "secrets",
            "put",
            &path(i),
            "--from-file",
            &format!("value={}", hsm.dir().join("v").display()),
        ]);
        assert_eq!(code, Some(0), "{out}{err}");
    }
    // A soft-deleted version still needs its KEK (it is re-wrapped too); a destroyed one not.
    let (code, _, err) = ctl(&["secrets", "delete", &path(6)]);
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = ctl(&["secrets", "destroy", &path(7), "--yes"]);
    assert_eq!(code, Some(0), "{err}");

    let (_, json, _) = ctl(&["-o", "json", "keys", "status"]);
    let st: serde_json::Value = serde_json::from_str(&json).unwrap();
    let old = st["keks"][0]["kek_id"].as_str().unwrap().to_owned();
    assert_eq!(st["keks"][0]["deks"], 7, "{st}");
    let (code, new, err) = ctl(&["keys", "rotate"]);
    assert_eq!(code, Some(0), "{err}");
    let new = new.trim().to_owned();

    // Refused while it still wraps DEKs: FAILED_PRECONDITION, nothing destroyed.
    let (code, _, err) = ctl(&["keys", "retire", &old, "--yes"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("FAILED_PRECONDITION") && err.contains("still wraps"),
        "{err}"
    );
    assert!(broker_keystore(&hsm)
        .list_keks()
        .unwrap()
        .iter()
        .any(|k| k.id.to_string() == old));
    // The primary, a malformed id, no --yes, an unknown id: refused.
    let (code, _, err) = ctl(&["keys", "retire", &new, "--yes"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("FAILED_PRECONDITION") && err.contains("primary"),
        "{err}"
    );
    let (code, _, err) = ctl(&["keys", "retire", &old]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--yes"), "{err}");
    let (code, _, _) = ctl(&["keys", "retire", "nope", "--yes"]);
    assert_eq!(code, Some(2));
    let (code, _, err) = ctl(&["keys", "retire", &"0".repeat(32), "--yes"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("NOT_FOUND"), "{err}");

    // Wait for the re-wrap (plain lines: not a terminal), then retire.
    let (code, out, err) = ctl(&["keys", "status", "--wait", "--interval", "200ms"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("to go"),
        "no progress line while waiting: {out}"
    );
    assert!(out.contains("re-wrap: done"), "{out}");
    assert!(
        out.contains("decrypt-only") && out.contains("primary"),
        "{out}"
    );
    let (_, json, _) = ctl(&["-o", "json", "keys", "status"]);
    let st: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(st["keks"][0]["kek_id"], old.as_str());
    assert_eq!(st["keks"][0]["deks"], 0, "{st}");
    assert_eq!(st["keks"][1]["deks"], 7, "{st}");
    assert_eq!(st["rewrap"]["remaining"], 0, "{st}");
    assert_eq!(st["rewrap"]["moved"], 7, "{st}");
    assert_eq!(st["auto_rotation"], "off");
    let (code, out, err) = ctl(&["keys", "retire", &old, "--yes"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains(&old), "{out}");

    // Gone from the HSM.
    let ks = broker_keystore(&hsm);
    assert!(ks
        .list_keks()
        .unwrap()
        .iter()
        .all(|k| k.id.to_string() != old));
    let e = ks
        .find_kek_by_id(&KekId::from_hex(&old).unwrap())
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::KeyNotFound);
    let (code, _, err) = ctl(&["keys", "retire", &old, "--yes"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("NOT_FOUND"), "{err}");

    // Audited: the rotation (its start before the HSM call, then its outcome), the refusals
    // and the retirement (its start stored with the retired mark), with the KEK id; chain
    // intact.
    let (code, out, err) = ctl(&["-o", "json", "audit", "tail", "--limit", "500"]);
    assert_eq!(code, Some(0), "{err}");
    let recs: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let keys: Vec<(String, String, String)> = recs
        .iter()
        .filter(|r| r["kind"].as_str().unwrap().starts_with("admin:key_r"))
        .map(|r| {
            (
                r["kind"].as_str().unwrap().to_owned(),
                r["outcome"].as_str().unwrap().to_owned(),
                r["path"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    let kek = |id: &str| format!("kek:{id}");
    assert_eq!(
        keys,
        vec![
            ("admin:key_rotate_begin".into(), "ok".into(), String::new()),
            ("admin:key_rotate".into(), "ok".into(), kek(&new)),
            ("admin:key_retire".into(), "denied".into(), kek(&old)),
            ("admin:key_retire".into(), "denied".into(), kek(&new)),
            (
                "admin:key_retire".into(),
                "denied".into(),
                kek(&"0".repeat(32))
            ),
            ("admin:key_retire_begin".into(), "ok".into(), kek(&old)),
            ("admin:key_retire".into(), "ok".into(), kek(&old)),
            ("admin:key_retire".into(), "denied".into(), kek(&old)),
        ],
        "{out}"
    );
    let (code, out, err) = ctl(&["audit", "verify"]);
    assert_eq!(code, Some(0), "{out}{err}");

    // Live secrets still lease after the retirement.
    let rt = runtime();
    rt.block_on(async {
        let ch = tls_channel(&b.addr, &pki.ca).await;
        admin(&ch)
            .await
            .apply_policies(authed(
                ApplyPoliciesRequest {
                    yaml: POLICY.into(),
                    ..Default::default()
                },
                BOOTSTRAP,
            ))
            .await
            .unwrap();
        let dev = DevIssuer::load_or_generate(&hsm.dir().join("dev.pem")).unwrap();
        let token = dev
            .mint("load", "check", None, Duration::from_secs(600))
            .unwrap();
        let mut leases = LeasesClient::new(ch);
        for i in 0..6 {
            let l = leases
                .lease(authed(
                    LeaseRequest {
                        path: path(i),
                        ttl_seconds: 0,
                    },
                    &token,
                ))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(l.data["value"], b"retire-test-value");
        }
        let e = leases
            .lease(authed(
                LeaseRequest {
                    path: path(7),
                    ttl_seconds: 0,
                },
                &token,
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
    });
    let log = b.log_text();
    assert!(!log.contains("retire-test-value") && !log.contains(BOOTSTRAP));
}
