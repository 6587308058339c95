//! The broker's storage and secrets-at-rest, one conformance suite run on a real SQLite file
//! and on a real PostgreSQL server, with DEKs wrapped by a real SoftHSM2 KEK.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::future::Future;
use std::time::Duration;

use hsm_tests::broker::{broker_keystore, test_store};
use keyhaven_broker::audit::{AuditEvent, AuditRecord, EventKind, Outcome};
use keyhaven_broker::crypto::{CryptoError, DekCache, Envelope, SecretData};
use keyhaven_broker::identity::Identity;
use keyhaven_broker::store::{
    AuditAppender, LeaseFilter, LeaseRow, Pool, RenewedLease, Renewing, Store, StoreError,
};
use keyhaven_hsm::KekId;
use testkit::postgres::Postgres;
use testkit::softhsm::SoftHsm;

struct Env {
    store: Store,
    envelope: Envelope,
    kek: KekId,
    _pg: Option<Postgres>,
    _hsm: SoftHsm,
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
    let pg = match db {
        Db::Postgres => Some(Postgres::start().unwrap()),
        Db::Sqlite => None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = test_store(&hsm, pg.as_ref()).await;
        let ks = broker_keystore(&hsm).await;
        let kek = ks.generate_kek().await.unwrap().id;
        let envelope = Envelope::new(ks, DekCache::new(1000, Duration::from_secs(60)));
        f(Env {
            store,
            envelope,
            kek,
            _pg: pg,
            _hsm: hsm,
        })
        .await
    });
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

async fn put(env: &Env, path: &str, data: &SecretData) -> i64 {
    let v = env.store.latest_version(path).await.unwrap() + 1;
    let sealed = env.envelope.seal(env.kek, path, v, data).await.unwrap();
    env.store
        .insert_version(path, v, now_ms(), &sealed)
        .await
        .unwrap();
    v
}

async fn secrets_are_versioned_encrypted_and_soft_deleted(env: Env) {
    let d1 = SecretData::from_pairs([("user", "app"), ("password", "hunter2-v1")]);
    let d2 = SecretData::from_pairs([("user", "app"), ("password", "hunter2-v2")]);
    assert_eq!(put(&env, "team/app/db", &d1).await, 1);
    assert_eq!(put(&env, "team/app/db", &d2).await, 2);
    put(&env, "team/other", &d1).await;

    let latest = env
        .store
        .get_version("team/app/db", None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(latest.version, 2);
    let sealed = latest.sealed.unwrap();
    // Nothing readable is stored: neither the value nor the DEK.
    assert!(!sealed.ciphertext.windows(10).any(|w| w == b"hunter2-v2"));
    let opened = env.envelope.open("team/app/db", 2, &sealed).await.unwrap();
    assert_eq!(opened, d2);
    let v1 = env
        .store
        .get_version("team/app/db", Some(1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        env.envelope
            .open("team/app/db", 1, &v1.sealed.unwrap())
            .await
            .unwrap(),
        d1
    );

    assert_eq!(
        env.store.list_paths("team").await.unwrap(),
        vec!["team/app/db".to_string(), "team/other".to_string()]
    );
    assert_eq!(
        env.store.list_paths("team/app").await.unwrap(),
        vec!["team/app/db".to_string()]
    );
    assert!(
        env.store.list_paths("tea").await.unwrap().is_empty(),
        "prefix is by segment"
    );

    // Soft delete keeps history; destroy erases the data.
    assert_eq!(
        env.store
            .soft_delete("team/app/db", now_ms())
            .await
            .unwrap(),
        2
    );
    assert!(env
        .store
        .get_version("team/app/db", None)
        .await
        .unwrap()
        .is_none());
    let history = env.store.versions("team/app/db").await.unwrap();
    assert_eq!(history.len(), 2);
    assert!(history
        .iter()
        .all(|v| v.deleted_ms.is_some() && v.sealed.is_some()));
    assert_eq!(env.store.destroy("team/app/db", now_ms()).await.unwrap(), 2);
    let history = env.store.versions("team/app/db").await.unwrap();
    assert!(history
        .iter()
        .all(|v| v.destroyed_ms.is_some() && v.sealed.is_none()));
    assert_eq!(
        env.store.list_paths("").await.unwrap(),
        vec!["team/other".to_string()]
    );
    assert_eq!(
        env.store.deks_per_kek().await.unwrap(),
        vec![(env.kek.to_string(), 1)]
    );
}

async fn a_tampered_row_is_an_integrity_error_never_wrong_data(env: Env) {
    let d = SecretData::from_pairs([("k", "value-one")]);
    put(&env, "a/b", &d).await;
    put(&env, "a/b", &SecretData::from_pairs([("k", "value-two")])).await;
    let row = env
        .store
        .get_version("a/b", Some(1))
        .await
        .unwrap()
        .unwrap();
    let sealed = row.sealed.unwrap();
    env.envelope.cache().clear();

    // A flipped bit in the data, the nonce or the wrapped DEK.
    let mut s = sealed.clone();
    s.ciphertext[0] ^= 1;
    let mut n = sealed.clone();
    n.nonce[3] ^= 1;
    let mut w = sealed.clone();
    w.dek.ciphertext[5] ^= 1;
    for bad in [s, n, w] {
        env.envelope.cache().clear();
        let e = env.envelope.open("a/b", 1, &bad).await.unwrap_err();
        assert!(matches!(e, CryptoError::Integrity { .. }), "{e:?}");
        assert!(!e.to_string().contains("value-one"));
    }
    // A row moved to another version or path does not open there.
    env.envelope.cache().clear();
    let e = env.envelope.open("a/b", 2, &sealed).await.unwrap_err();
    assert!(matches!(e, CryptoError::Integrity { .. }));
    let e = env.envelope.open("a/c", 1, &sealed).await.unwrap_err();
    assert!(matches!(e, CryptoError::Integrity { .. }));
    // Edited in the database itself.
    let mut bytes = sealed.ciphertext.clone();
    bytes[2] ^= 0x40;
    match env.store.pool() {
        Pool::Sqlite(p) => {
            sqlx::query(
                "UPDATE secret_versions SET ciphertext = $1 WHERE path = 'a/b' AND version = 1",
            )
            .bind(&bytes)
            .execute(p)
            .await
            .unwrap();
        }
        Pool::Postgres(p) => {
            sqlx::query(
                "UPDATE secret_versions SET ciphertext = $1 WHERE path = 'a/b' AND version = 1",
            )
            .bind(&bytes)
            .execute(p)
            .await
            .unwrap();
        }
    }
    let row = env
        .store
        .get_version("a/b", Some(1))
        .await
        .unwrap()
        .unwrap();
    let e = env
        .envelope
        .open("a/b", 1, &row.sealed.unwrap())
        .await
        .unwrap_err();
    assert!(matches!(e, CryptoError::Integrity { .. }));
    // The untouched version still opens.
    let row = env
        .store
        .get_version("a/b", Some(2))
        .await
        .unwrap()
        .unwrap();
    assert!(env
        .envelope
        .open("a/b", 2, &row.sealed.unwrap())
        .await
        .is_ok());
}

async fn the_same_version_cannot_be_written_twice(env: Env) {
    let d = SecretData::from_pairs([("k", "v")]);
    let sealed = env.envelope.seal(env.kek, "x/y", 1, &d).await.unwrap();
    env.store
        .insert_version("x/y", 1, now_ms(), &sealed)
        .await
        .unwrap();
    let e = env
        .store
        .insert_version("x/y", 1, now_ms(), &sealed)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Conflict(_)), "{e:?}");
}

#[allow(clippy::too_many_arguments)]
fn lease(
    id: &str,
    ns: &str,
    sa: &str,
    pod: &str,
    path: &str,
    now: i64,
    ttl: i64,
    max: i64,
) -> LeaseRow {
    LeaseRow {
        id: id.into(),
        identity: Identity {
            namespace: ns.into(),
            service_account: sa.into(),
            pod_name: Some(pod.into()),
            pod_uid: Some(format!("uid-{pod}")),
        },
        path: path.into(),
        version: 1,
        created_ms: now,
        expires_ms: now + ttl,
        max_expires_ms: now + max,
        renewals: 0,
        ended_ms: None,
        end_reason: None,
    }
}

/// Renews `id` at `now` to `expires_ms` through the audit appender, with a renewal record
/// (refusal: outcome error, reason `refused_by_the_test`); returns the record stored and the
/// renewed lease.
async fn renew(
    appender: &mut AuditAppender,
    id: &str,
    now: i64,
    expires_ms: i64,
) -> (AuditRecord, Option<RenewedLease>) {
    let event = AuditEvent::new(now, EventKind::Renew, Outcome::Ok).with_lease_id(id);
    let renewing = Renewing {
        lease_id: id.to_owned(),
        now_ms: now,
        expires_ms,
        refused: AuditEvent::new(now, EventKind::Renew, Outcome::Error)
            .with_lease_id(id)
            .with_reason("refused_by_the_test"),
    };
    let (mut recs, mut renewed) = appender
        .append_renewing(&[event], &[], &[(0, &renewing)], None)
        .await
        .unwrap();
    (recs.pop().unwrap(), renewed.pop().unwrap())
}

/// An active lease `id` of `ns/sa` (pod `p`) on `team/app`, one minute long.
fn lease_at(id: &str, now: i64) -> LeaseRow {
    lease(id, "ns", "sa", "p", "team/app", now, 60_000, 60_000)
}

async fn leases_renew_up_to_max_and_revoke_by_id_identity_pod_and_prefix(env: Env) {
    let s = &env.store;
    let now = now_ms();
    s.insert_lease(&lease(
        "l1",
        "ns1",
        "sa1",
        "p1",
        "team/app/db",
        now,
        60_000,
        120_000,
    ))
    .await
    .unwrap();
    s.insert_lease(&lease(
        "l2",
        "ns1",
        "sa1",
        "p2",
        "team/app/cache",
        now,
        60_000,
        120_000,
    ))
    .await
    .unwrap();
    s.insert_lease(&lease(
        "l3",
        "ns2",
        "sa2",
        "p3",
        "team/application",
        now,
        60_000,
        120_000,
    ))
    .await
    .unwrap();
    s.insert_lease(&lease(
        "l4", "ns2", "sa3", "p4", "other/x", now, 60_000, 120_000,
    ))
    .await
    .unwrap();
    s.insert_lease(&lease("l5", "ns3", "sa9", "p5", "z", now, 60_000, 120_000))
        .await
        .unwrap();
    assert_eq!(s.count_active_leases(now).await.unwrap(), 5);
    let in_ns2: HashSet<String> = s
        .list_leases(&LeaseFilter::Namespace("ns2".into()), now, false)
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.id)
        .collect();
    assert_eq!(in_ns2, HashSet::from(["l3".into(), "l4".into()]));

    // Renew extends, capped at max, with its record in the same transaction.
    let mut appender = s.audit_appender();
    let (rec, r) = renew(&mut appender, "l1", now, now + 90_000).await;
    let r = r.unwrap();
    assert_eq!(rec.event.outcome, Outcome::Ok);
    assert_eq!(
        (r.expires_ms, r.max_expires_ms),
        (now + 90_000, now + 120_000)
    );
    assert_eq!((r.version, r.latest_version), (1, None), "no secret stored");
    let l1 = s.get_lease("l1").await.unwrap().unwrap();
    assert_eq!((l1.expires_ms, l1.renewals), (now + 90_000, 1));
    let (_, r) = renew(&mut appender, "l1", now, now + 500_000).await;
    assert_eq!(r.unwrap().expires_ms, now + 120_000, "never past max");
    // Expired, or unknown: not renewed, and the record stored is the refusal.
    let (rec, r) = renew(&mut appender, "l2", now + 60_001, now + 100_000).await;
    assert_eq!((r, rec.event.outcome), (None, Outcome::Error));
    assert_eq!(rec.event.reason.as_deref(), Some("refused_by_the_test"));
    assert_eq!(s.get_lease("l2").await.unwrap().unwrap().renewals, 0);
    assert_eq!(renew(&mut appender, "nope", now, now + 1).await.1, None);
    // One record per renewal, refusals included: on PostgreSQL the refused ones were first
    // tried in one statement after the known head, which stored nothing when a renewal did
    // not apply.
    assert_eq!(s.audit_head().await.unwrap().seq, 4);
    assert!(s.verify_audit().await.unwrap().is_ok());

    // Revoke by prefix takes whole segments only.
    let ids = s
        .revoke_leases(
            &LeaseFilter::PathPrefix("team/app".into()),
            now,
            "revoked:prefix",
        )
        .await
        .unwrap();
    assert_eq!(
        ids.into_iter().collect::<HashSet<_>>(),
        HashSet::from(["l1".into(), "l2".into()])
    );
    assert_eq!(
        renew(&mut appender, "l1", now, now + 1000).await.1,
        None,
        "revoked cannot renew"
    );
    let ids = s
        .revoke_leases(
            &LeaseFilter::Pod {
                namespace: "ns2".into(),
                pod: "p4".into(),
            },
            now,
            "revoked:pod",
        )
        .await
        .unwrap();
    assert_eq!(ids, vec!["l4".to_string()]);
    let ids = s
        .revoke_leases(
            &LeaseFilter::Identity {
                namespace: "ns2".into(),
                service_account: "sa2".into(),
            },
            now,
            "revoked:identity",
        )
        .await
        .unwrap();
    assert_eq!(ids, vec!["l3".to_string()]);
    assert_eq!(
        s.revoke_leases(&LeaseFilter::Id("l3".into()), now, "again")
            .await
            .unwrap()
            .len(),
        0
    );
    let ids = s
        .revoke_leases(
            &LeaseFilter::Namespace("ns3".into()),
            now,
            "revoked:namespace",
        )
        .await
        .unwrap();
    assert_eq!(ids, vec!["l5".to_string()]);
    assert_eq!(s.count_active_leases(now).await.unwrap(), 0);
    let all = s.list_leases(&LeaseFilter::All, now, true).await.unwrap();
    assert_eq!(all.len(), 5);
    let l4 = s.get_lease("l4").await.unwrap().unwrap();
    assert_eq!(l4.end_reason.as_deref(), Some("revoked:pod"));
    assert!(!l4.is_active(now));
}

async fn the_reaper_ends_each_expired_lease_exactly_once_even_when_racing(env: Env) {
    let now = now_ms();
    for i in 0..300 {
        let ttl = if i % 3 == 0 { 60_000 } else { 1 };
        env.store
            .insert_lease(&lease(
                &format!("r{i:04}"),
                "ns",
                "sa",
                "p",
                "a/b",
                now - 10,
                ttl,
                60_000,
            ))
            .await
            .unwrap();
    }
    let later = now + 1000;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let store = env.store.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let batch = store.reap_expired(later, 17).await.unwrap();
                if batch.is_empty() {
                    break mine;
                }
                mine.extend(batch.into_iter().map(|l| l.id));
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let unique: HashSet<_> = all.iter().cloned().collect();
    assert_eq!(all.len(), unique.len(), "a lease was reaped twice");
    assert_eq!(unique.len(), 200, "every expired lease reaped");
    assert_eq!(env.store.count_active_leases(later).await.unwrap(), 100);
    let l = env.store.get_lease("r0001").await.unwrap().unwrap();
    assert_eq!(l.end_reason.as_deref(), Some("expired"));
}

async fn exec(store: &Store, sql: &str) {
    match store.pool() {
        Pool::Sqlite(p) => {
            sqlx::query(sql).execute(p).await.unwrap();
        }
        Pool::Postgres(p) => {
            sqlx::query(sql).execute(p).await.unwrap();
        }
    }
}

async fn the_audit_chain_survives_concurrent_appends_and_shows_edits_and_deletions(env: Env) {
    use keyhaven_broker::audit::{AuditEvent, EventKind, Outcome, VerifyError};
    let mut tasks = Vec::new();
    for t in 0..8 {
        let store = env.store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..25 {
                let ev = AuditEvent::new(now_ms(), EventKind::Lease, Outcome::Ok)
                    .with_identity(format!("ns{t}/sa"))
                    .with_path(format!("team/app{i}"))
                    .with_lease_id(format!("lease-{t}-{i}"));
                store.append_audit(ev).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let head = env.store.audit_head().await.unwrap();
    assert_eq!(head.seq, 200);
    let report = env.store.verify_audit().await.unwrap().unwrap();
    assert_eq!(report.records, 200);
    assert_eq!(report.checkpoint(), head);

    // An edited row is found at its seq.
    exec(
        &env.store,
        "UPDATE audit SET path = 'team/elsewhere' WHERE seq = 57",
    )
    .await;
    let e = env.store.verify_audit().await.unwrap().unwrap_err();
    assert_eq!(e.seq(), Some(57), "{e}");
    exec(&env.store, "DELETE FROM audit WHERE seq = 57").await;
    let e = env.store.verify_audit().await.unwrap().unwrap_err();
    assert!(matches!(e, VerifyError::Gap { .. }), "{e}");
}

async fn an_append_after_a_stale_or_unknown_head_writes_nothing(env: Env) {
    use keyhaven_broker::audit::{AuditEvent, Checkpoint, EventKind, Outcome};
    let s = &env.store;
    let ev = |i: i64| {
        AuditEvent::new(now_ms(), EventKind::Lease, Outcome::Ok)
            .with_identity("ns/sa")
            .with_lease_id(format!("l{i}"))
    };
    let now = now_ms();
    let row = move |i: i64| lease_at(&format!("l{i}"), now);

    // No head known yet (genesis): refused, the locked append is the way in.
    let e = s
        .append_audit_batch_after(&Checkpoint::genesis(), vec![ev(0)], &[row(0)])
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Conflict(_)), "{e:?}");
    let first = s
        .append_audit_batch_with(vec![ev(1)], &[row(1)])
        .await
        .unwrap();
    let head = first[0].checkpoint();

    // After the true head: both records and the lease row land, chained after it.
    let recs = s
        .append_audit_batch_after(&head, vec![ev(2), ev(3)], &[row(2)])
        .await
        .unwrap();
    assert_eq!(recs.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![2, 3]);
    assert_eq!(recs[0].prev_hash, head.hash);
    assert!(s.get_lease("l2").await.unwrap().is_some());
    let stored_head = s.audit_head().await.unwrap();
    assert_eq!(stored_head, recs[1].checkpoint());

    // A stale head (the chain moved on: seq 2 and 3 exist) and a head that is not in the log
    // at all (same seq, other hash): nothing is written, neither records nor the lease row.
    let forged = Checkpoint {
        seq: 3,
        hash: "0".repeat(64),
    };
    for (i, h) in [(4, &head), (5, &forged)] {
        let e = s
            .append_audit_batch_after(h, vec![ev(i)], &[row(i)])
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::Conflict(_)), "{e:?}");
        assert!(s.get_lease(&format!("l{i}")).await.unwrap().is_none());
        assert_eq!(s.audit_head().await.unwrap(), stored_head);
    }

    // Many appends in a row, each after the last (the writer's steady state), then the whole
    // chain verifies and the failed attempts left no transaction open on any connection.
    let mut h = stored_head;
    for i in 10..40 {
        let recs = s
            .append_audit_batch_after(&h, vec![ev(i)], &[row(i)])
            .await
            .unwrap();
        h = recs[0].checkpoint();
    }
    let report = s.verify_audit().await.unwrap().unwrap();
    assert_eq!(report.records, 33);
    assert_eq!(report.checkpoint(), h);
    let mut waiters = Vec::new();
    for i in 100..116 {
        let s = s.clone();
        waiters.push(tokio::spawn(async move {
            s.append_audit_batch_with(vec![ev(i)], &[row(i)])
                .await
                .unwrap();
        }));
    }
    for w in waiters {
        w.await.unwrap();
    }
    assert_eq!(s.verify_audit().await.unwrap().unwrap().records, 49);
}

/// Two writers on one database (two broker replicas on PostgreSQL; on SQLite, two stores on
/// one file): each appends after the head it last wrote, so nearly every batch finds the chain
/// moved on and falls back to the locked append. Nothing is lost, duplicated or misordered.
async fn two_appenders_on_one_database_keep_one_unbroken_chain(env: Env) {
    use keyhaven_broker::audit::{AuditEvent, EventKind, Outcome};
    // A second connection pool to the same database, as another replica would have.
    let url = match (env.store.pool(), &env._pg) {
        (Pool::Sqlite(p), _) => {
            format!("sqlite://{}", p.connect_options().get_filename().display())
        }
        (Pool::Postgres(_), Some(pg)) => pg.url(),
        (Pool::Postgres(_), None) => unreachable!(),
    };
    let second = Store::connect(&url).await.unwrap();
    let now = now_ms();
    let mut tasks = Vec::new();
    for (w, store) in [(0, env.store.clone()), (1, second)] {
        tasks.push(tokio::spawn(async move {
            let mut appender = store.audit_appender();
            for i in 0..100 {
                let id = format!("r{w}-{i}");
                let evs = vec![
                    AuditEvent::new(now, EventKind::Authenticate, Outcome::Ok)
                        .with_identity(format!("ns/sa{w}")),
                    AuditEvent::new(now, EventKind::Lease, Outcome::Ok)
                        .with_identity(format!("ns/sa{w}"))
                        .with_lease_id(id.clone()),
                ];
                let l = lease(
                    &id,
                    "ns",
                    &format!("sa{w}"),
                    "p",
                    "team/app",
                    now,
                    60_000,
                    60_000,
                );
                let recs = appender.append(evs, &[l]).await.unwrap();
                assert_eq!(recs.len(), 2);
                assert_eq!(
                    recs[1].seq,
                    recs[0].seq + 1,
                    "a request's records are adjacent"
                );
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let report = env.store.verify_audit().await.unwrap().unwrap();
    assert_eq!(report.records, 400);
    for w in 0..2 {
        for i in 0..100 {
            assert!(env
                .store
                .get_lease(&format!("r{w}-{i}"))
                .await
                .unwrap()
                .is_some());
        }
    }
    // Each lease's record is in the log exactly once.
    let recs = env.store.audit_records(0, 1000).await.unwrap();
    let ids: HashSet<_> = recs
        .iter()
        .filter_map(|r| r.event.lease_id.clone())
        .collect();
    assert_eq!(ids.len(), 200);
}

/// The secrets generation moves with every change to a secret (and not with a refused write);
/// a version remembered under an older generation is never written into a lease: the guarded
/// append refuses, writing nothing, on the locked path and on the unlocked one.
async fn a_remembered_version_is_handed_out_only_under_the_current_generation(env: Env) {
    use keyhaven_broker::audit::{AuditEvent, EventKind, Outcome};
    let s = &env.store;
    let reads = s.hot_reads(2);
    let generation = || async { s.secrets_generation().await.unwrap() };
    let d = SecretData::from_pairs([("k", "v")]);
    let g0 = generation().await;
    put(&env, "a/b", &d).await;
    let g1 = generation().await;
    assert!(g1 > g0);
    // A refused write (the same version again) moves nothing.
    let sealed = env.envelope.seal(env.kek, "a/b", 1, &d).await.unwrap();
    s.insert_version("a/b", 1, now_ms(), &sealed)
        .await
        .unwrap_err();
    assert_eq!(generation().await, g1);

    // Read once, then remembered, with the generation it was read under.
    for _ in 0..2 {
        let (v, g) = reads.latest_version_remembered("a/b").await.unwrap();
        assert_eq!((v.unwrap().version, g), (1, g1));
    }
    assert_eq!(reads.remembered_stats(), (1, 1));
    // A path with no live version is not remembered.
    for _ in 0..2 {
        let (v, g) = reads.latest_version_remembered("a/none").await.unwrap();
        assert!(v.is_none());
        assert_eq!(g, g1);
    }
    assert_eq!(reads.remembered_stats(), (1, 3));

    // Another replica writes version 2: this one's memory still says 1 ...
    put(&env, "a/b", &d).await;
    let g2 = generation().await;
    assert!(g2 > g1);
    let (v, g) = reads.latest_version_remembered("a/b").await.unwrap();
    assert_eq!((v.unwrap().version, g), (1, g1));

    // ... but a lease guarded by that generation is not stored. First on the locked path
    // (the appender knows no head yet).
    let now = now_ms();
    let ev = |id: &str| {
        vec![AuditEvent::new(now, EventKind::Lease, Outcome::Ok)
            .with_identity("ns/sa")
            .with_lease_id(id)]
    };
    let mut appender = s.audit_appender();
    let head = s.audit_head().await.unwrap();
    let e = appender
        .append_at(&ev("l1"), &[lease_at("l1", now)], Some(g1))
        .await
        .unwrap_err();
    assert!(
        matches!(e, StoreError::StaleGeneration { current, read } if current == g2 && read == g1),
        "{e:?}"
    );
    assert_eq!(s.audit_head().await.unwrap(), head);
    assert!(s.get_lease("l1").await.unwrap().is_none());

    // Under the current generation it is stored; the appender now knows the head, so the
    // next append takes the unlocked path, which refuses a stale generation just the same.
    appender
        .append_at(&ev("l2"), &[lease_at("l2", now)], Some(g2))
        .await
        .unwrap();
    assert!(s.get_lease("l2").await.unwrap().is_some());
    let head = s.audit_head().await.unwrap();
    assert_eq!(s.soft_delete("a/b", now_ms()).await.unwrap(), 2);
    let g3 = generation().await;
    assert!(g3 > g2);
    let e = appender
        .append_at(&ev("l3"), &[lease_at("l3", now)], Some(g2))
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::StaleGeneration { .. }), "{e:?}");
    assert_eq!(s.audit_head().await.unwrap(), head);
    assert!(s.get_lease("l3").await.unwrap().is_none());
    // Unguarded appends are not affected.
    appender
        .append_at(&ev("l4"), &[lease_at("l4", now)], None)
        .await
        .unwrap();

    // Forgotten, the path is read again: soft-deleted, no live version.
    reads.forget_versions();
    let (v, g) = reads.latest_version_remembered("a/b").await.unwrap();
    assert!(v.is_none());
    assert_eq!(g, g3);
    // Destroying moves the generation too.
    s.destroy("a/b", now_ms()).await.unwrap();
    assert!(generation().await > g3);
    // A version too large to keep in memory is read every time.
    let big = SecretData::from_pairs([("k", "x".repeat(300 << 10))]);
    put(&env, "a/big", &big).await;
    let (hits, misses) = reads.remembered_stats();
    for _ in 0..2 {
        let (v, _) = reads.latest_version_remembered("a/big").await.unwrap();
        assert_eq!(v.unwrap().version, 1);
    }
    assert_eq!(reads.remembered_stats(), (hits, misses + 2));
    assert_eq!(
        s.verify_audit().await.unwrap().unwrap().records,
        head.seq as u64 + 1
    );
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[test] fn $name() { super::run(super::Db::Sqlite, super::$name) } )*
        }
        mod postgres {
            $( #[test] fn $name() { super::run(super::Db::Postgres, super::$name) } )*
        }
    };
}

conformance!(
    secrets_are_versioned_encrypted_and_soft_deleted,
    a_tampered_row_is_an_integrity_error_never_wrong_data,
    the_same_version_cannot_be_written_twice,
    leases_renew_up_to_max_and_revoke_by_id_identity_pod_and_prefix,
    the_reaper_ends_each_expired_lease_exactly_once_even_when_racing,
    the_audit_chain_survives_concurrent_appends_and_shows_edits_and_deletions,
    an_append_after_a_stale_or_unknown_head_writes_nothing,
    two_appenders_on_one_database_keep_one_unbroken_chain,
    a_remembered_version_is_handed_out_only_under_the_current_generation,
);

/// The broker checkpoints SQLite's write-ahead log itself, off the request path; SQLite's own
/// checkpoint stays as a backstop (which under sustained load is what starts the log over).
#[test]
fn the_sqlite_wal_is_checkpointed_on_demand_with_the_automatic_one_as_backstop() {
    run(Db::Sqlite, |env| async move {
        let env = env; // the whole Env (its temporary directory), not just the fields used
        let Pool::Sqlite(p) = env.store.pool() else {
            unreachable!()
        };
        let backstop: i64 = sqlx::query_scalar("PRAGMA wal_autocheckpoint")
            .fetch_one(p)
            .await
            .unwrap();
        assert_eq!(backstop, 20_000);
        let now = now_ms();
        for i in 0..50 {
            let l = lease_at(&format!("w{i}"), now);
            env.store.insert_lease(&l).await.unwrap();
        }
        let (log, done) = env.store.checkpoint_wal().await.unwrap().expect("sqlite");
        assert!(log > 0, "50 commits left frames in the log");
        assert_eq!(
            done, log,
            "no reader holds the log: all of it is in the database"
        );
        // Nothing new since: the log is empty or fully copied, and the rows are all there.
        let (log2, done2) = env.store.checkpoint_wal().await.unwrap().expect("sqlite");
        assert_eq!(log2, done2);
        assert!(env.store.get_lease("w49").await.unwrap().is_some());

        // Under a writer that never pauses, SQLite would not start the log over by itself (it
        // does so only at the start of a write transaction that finds the log wholly copied);
        // from the restart threshold the checkpoint makes sure it does, so the log stays short.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (store, stop) = (env.store.clone(), stop.clone());
            tokio::spawn(async move {
                let mut appender = store.audit_appender();
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let evs = (0..20)
                        .map(|i| {
                            keyhaven_broker::audit::AuditEvent::new(
                                now,
                                keyhaven_broker::audit::EventKind::Lease,
                                keyhaven_broker::audit::Outcome::Ok,
                            )
                            .with_identity(format!("ns/sa{i}"))
                        })
                        .collect();
                    let l = lease_at(&format!("busy{n}"), now);
                    appender.append(evs, &[l]).await.unwrap();
                    n += 1;
                }
                n
            })
        };
        let mut logs = Vec::new();
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(25)).await;
            let (log, _) = env
                .store
                .checkpoint_wal_restarting_at(64)
                .await
                .unwrap()
                .expect("sqlite");
            logs.push(log);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let appended = writer.await.unwrap();
        assert!(
            appended > 100,
            "the writer kept writing ({appended} appends)"
        );
        let restarts = logs.windows(2).filter(|w| w[1] < w[0]).count();
        assert!(
            restarts >= 5,
            "the log started over {restarts} times: {logs:?}"
        );
        assert!(env.store.verify_audit().await.unwrap().is_ok());
    });
    run(Db::Postgres, |env| async move {
        let env = env;
        assert_eq!(env.store.checkpoint_wal().await.unwrap(), None);
    });
}

#[test]
fn postgres_gone_is_unavailable_and_service_resumes_when_it_returns() {
    let hsm = SoftHsm::new().unwrap();
    let mut pg = Postgres::start().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let store = rt.block_on(Store::connect(&pg.url())).unwrap();
    let now = now_ms();
    rt.block_on(store.insert_lease(&lease("keep", "ns", "sa", "p", "a", now, 600_000, 600_000)))
        .unwrap();
    // The broker's hot-path reads keep connections out of the pool: fill it with four.
    let reads = store.hot_reads(4);
    rt.block_on(async {
        let r = &reads;
        let k = "keep";
        let all = tokio::join!(
            r.get_lease(k),
            r.get_lease(k),
            r.get_lease(k),
            r.get_lease(k)
        );
        for l in [all.0, all.1, all.2, all.3] {
            assert!(l.unwrap().is_some());
        }
    });
    pg.stop();
    let e = rt.block_on(reads.get_lease("keep")).unwrap_err();
    assert!(e.is_unavailable(), "{e:?}");
    let e = rt.block_on(store.get_lease("keep")).unwrap_err();
    assert!(e.is_unavailable(), "{e:?}");
    let e = rt
        .block_on(store.insert_lease(&lease("lost?", "ns", "sa", "p", "a", now, 1, 1)))
        .unwrap_err();
    assert!(e.is_unavailable(), "{e:?}");
    pg.resume().unwrap();
    let mut back = None;
    for _ in 0..50 {
        match rt.block_on(store.get_lease("keep")) {
            Ok(v) => {
                back = v;
                break;
            }
            Err(e) => {
                assert!(e.is_unavailable(), "{e:?}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    assert_eq!(back.expect("lease survived").id, "keep");
    // Its kept connections died with the server; each read finds one stale, closes it and
    // succeeds on a fresh one: no request fails once the database is back.
    for _ in 0..5 {
        let l = rt.block_on(reads.get_lease("keep")).unwrap();
        assert_eq!(l.expect("lease").id, "keep");
    }
    assert!(
        rt.block_on(store.get_lease("lost?")).unwrap().is_none(),
        "failed write left nothing"
    );
    drop(hsm);
}
