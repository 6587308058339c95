//! Dynamic PostgreSQL credentials with a real `broker` process, real `brokerctl` and a real
//! PostgreSQL that enforces passwords: the leased role logs in with exactly its grants, its
//! `VALID UNTIL` follows the lease, it is dropped (sessions ended) when the lease ends, caps
//! hold, a role left by a broker killed mid-creation is dropped, the reconciler fixes drift
//! both ways, a drop waits out a database outage, and under concurrency on two replicas and
//! `kill -9` at several points the database's roles end up equal to the live credentials.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod db_support;

use db_support::*;

use std::time::{Duration, Instant};

use hsm_tests::broker::{authed, broker_token, BrokerProc, BOOTSTRAP};
use hsm_tests::broker_client::BrokerClient;
use hsm_tests::process::runtime;
use keyhaven_broker::auth::DevIssuer;
use keyhaven_proto::broker::v1::*;
use sqlx::{Connection, PgConnection};
use testkit::postgres::Postgres;
use tonic::Code;

#[test]
fn a_leased_credential_has_exactly_its_grants_follows_its_lease_and_is_dropped_with_it() {
    let s = setup(&[]);
    let rt = runtime();

    // A connection whose role cannot create roles is refused, and nothing is stored.
    let plain = s.hsm.dir().join("plain-url");
    std::fs::write(
        &plain,
        format!("postgres://plain:plain-pw@127.0.0.1:{}/app", s.pg.port()),
    )
    .unwrap();
    let (ok, out) = ctl(
        &s,
        &[
            "db",
            "connection",
            "put",
            "weak",
            "--url-file",
            plain.to_str().unwrap(),
        ],
    );
    assert!(!ok && out.contains("CREATEROLE"), "{out}");
    assert!(!out.contains("plain-pw"), "{out}");
    // PutSecret cannot write the db/ space.
    let mut c = rt.block_on(BrokerClient::connect(&s.broker, &s.pki));
    let e = rt
        .block_on(c.admin.put_secret(authed(
            PutSecretRequest {
                path: "db/app".into(),
                data: [("url".to_string(), b"postgres://evil@x/y".to_vec())].into(),
            },
            BOOTSTRAP,
        )))
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    rt.block_on(async {
        let lease = c
            .lease(&s.web, "db/app/ro")
            .await
            .expect("lease a credential");
        let user = field(&lease, "username");
        let password = field(&lease, "password");
        let dsn = field(&lease, "dsn");
        assert!(user.starts_with("kh_shop_web_ro_"), "{user}");
        assert_eq!(lease.ttl_seconds, 300, "the policy's TTL, under the role's");
        assert_eq!(field(&lease, "database"), "app");

        // It logs in and reads what it was granted, and nothing else.
        let mut session = PgConnection::connect(&dsn)
            .await
            .expect("log in with the dsn");
        let x: i32 = sqlx::query_scalar("SELECT x FROM public_data")
            .fetch_one(&mut session)
            .await
            .unwrap();
        assert_eq!(x, 7);
        let denied = sqlx::query("SELECT y FROM private_data")
            .execute(&mut session)
            .await
            .unwrap_err();
        assert!(
            denied.as_database_error().and_then(|d| d.code()).as_deref() == Some("42501"),
            "{denied}"
        );
        // Only with its own password.
        let wrong = dsn.replace(&password, "not-the-password");
        assert!(PgConnection::connect(&wrong).await.is_err());

        // VALID UNTIL is the lease's expiry; a renewal moves it.
        let expires_s = now_s() + lease.ttl_seconds as i64;
        let vu = valid_until_s(&s.pg, &user).await;
        assert!(
            (vu - expires_s).abs() <= 2,
            "valid until {vu}, lease {expires_s}"
        );
        let renewed = c
            .leases
            .renew(authed(
                RenewRequest {
                    lease_id: lease.lease_id.clone(),
                    increment_seconds: 1200,
                },
                &s.web,
            ))
            .await
            .expect("renew")
            .into_inner();
        assert_eq!(renewed.ttl_seconds, 1200);
        let vu2 = valid_until_s(&s.pg, &user).await;
        assert!(
            (vu2 - (now_s() + 1200)).abs() <= 2,
            "renewed valid until {vu2}"
        );
        // Never past the role's max_ttl (30m), whatever is asked.
        let capped = c
            .leases
            .renew(authed(
                RenewRequest {
                    lease_id: lease.lease_id.clone(),
                    increment_seconds: u64::MAX,
                },
                &s.web,
            ))
            .await
            .expect("renew")
            .into_inner();
        assert!(capped.ttl_seconds <= 1800, "{capped:?}");
        assert!(valid_until_s(&s.pg, &user).await <= lease.renewable_until);

        // Revoked by its holder: the role is dropped, its open session ended.
        c.revoke(&s.web, &lease.lease_id).await.expect("revoke");
        assert!(
            until(Duration::from_secs(30), || async {
                !role_exists(&s.pg, &user).await
            })
            .await,
            "the role outlived its lease"
        );
        assert!(
            sqlx::query("SELECT 1").execute(&mut session).await.is_err(),
            "a session of a dropped credential is still open"
        );
        assert!(PgConnection::connect(&dsn).await.is_err());

        // Audited, chain intact; no password or admin URL anywhere.
        let records = c.audit_tail(0).await;
        assert!(
            records
                .iter()
                .any(|r| r.event.kind.as_text() == "admin:db_role_drop"
                    && r.event.lease_id.as_deref() == Some(lease.lease_id.as_str())),
            "no drop record"
        );
        c.audit_verifies().await;
        let audit_file = std::fs::read_to_string(s.broker.dir.join("audit.jsonl")).unwrap();
        for text in [&s.broker.log_text(), &audit_file] {
            assert!(
                !text.contains(&password),
                "the credential's password leaked"
            );
            assert!(!text.contains(ADMIN_PASSWORD), "the admin password leaked");
        }
    });
}

#[test]
fn caps_a_role_left_by_a_crash_drift_both_ways_and_an_outage_during_revocation() {
    let mut s = setup(&["--db-reconcile-interval", "1h"]);
    let rt = runtime();
    let mut c = rt.block_on(BrokerClient::connect(&s.broker, &s.pki));
    // The comment this installation's roles carry (`db status`).
    let (ok, out) = ctl(&s, &["--output", "json", "db", "status"]);
    assert!(ok, "{out}");
    let marker = serde_json::from_str::<serde_json::Value>(&out).unwrap()["marker"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        marker.starts_with("keyhaven dynamic credential "),
        "{marker}"
    );
    rt.block_on(async {
        // max_per_identity 2 for web; max_total 3 across web and batch.
        let a = c.lease(&s.web, "db/app/ro").await.unwrap();
        let _b = c.lease(&s.web, "db/app/ro").await.unwrap();
        let e = c.lease(&s.web, "db/app/ro").await.unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        assert!(e.message().contains("max_per_identity"), "{e:?}");
        let _c3 = c.lease(&s.batch, "db/app/ro").await.unwrap();
        let e = c.lease(&s.batch, "db/app/ro").await.unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        assert!(e.message().contains("max_total"), "{e:?}");
        assert_eq!(marked_roles(&s.pg).await.len(), 3);
        // Not a role path; a role that does not exist.
        assert_eq!(
            c.lease(&s.batch, "db/app").await.unwrap_err().code(),
            Code::PermissionDenied
        );
        assert_eq!(
            c.lease(&s.batch, "db/app/nope").await.unwrap_err().code(),
            Code::NotFound
        );

        // A role dropped behind the broker's back: reconcile ends its lease.
        let gone = field(&a, "username");
        sqlx::raw_sql(&format!("DROP OWNED BY \"{gone}\"; DROP ROLE \"{gone}\""))
            .execute(&mut admin(&s.pg).await)
            .await
            .unwrap();
        // A marked role created behind its back (or left by a broker killed between creating
        // it and recording its lease: the row says pending, long ago — see below); and one
        // marked by another installation sharing the database, which is not ours to drop.
        sqlx::raw_sql(&format!(
            "CREATE ROLE kh_stray_x_y_00000000 LOGIN; \
             COMMENT ON ROLE kh_stray_x_y_00000000 IS '{marker}'; \
             CREATE ROLE kh_theirs_x_y_11111111 LOGIN; \
             COMMENT ON ROLE kh_theirs_x_y_11111111 IS 'keyhaven dynamic credential 0123abcd'"
        ))
        .execute(&mut admin(&s.pg).await)
        .await
        .unwrap();
    });
    let (ok, out) = ctl(&s, &["db", "reconcile", "app", "--dry-run"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("would drop role kh_stray_x_y_00000000"),
        "{out}"
    );
    assert!(rt.block_on(role_exists(&s.pg, "kh_stray_x_y_00000000")));
    let (ok, out) = ctl(&s, &["--output", "json", "db", "reconcile", "app"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v["dropped_roles"],
        serde_json::json!(["kh_stray_x_y_00000000"])
    );
    assert_eq!(v["ended_leases"].as_array().unwrap().len(), 1);
    rt.block_on(async {
        assert!(!role_exists(&s.pg, "kh_stray_x_y_00000000").await);
        assert!(role_exists(&s.pg, "kh_theirs_x_y_11111111").await);
        sqlx::raw_sql("DROP ROLE kh_theirs_x_y_11111111")
            .execute(&mut admin(&s.pg).await)
            .await
            .unwrap();
        // The lease of the vanished role ended with the reason; its cap slot is free again.
        let ended = v["ended_leases"][0].as_str().unwrap();
        let info = c.lease_info(ended).await;
        assert_eq!(info.end_reason, "revoked:role_missing");
        c.lease(&s.web, "db/app/ro").await.expect("a slot freed");
    });

    // The target database is down when a lease ends: the drop waits, says why, and completes
    // once the database is back.
    let held = rt.block_on(async {
        let leases = c
            .admin
            .list_leases(authed(
                ListLeasesRequest {
                    selector: Some(LeaseSelector {
                        namespace: "shop".into(),
                        service_account: "batch".into(),
                        ..Default::default()
                    }),
                    include_ended: false,
                },
                BOOTSTRAP,
            ))
            .await
            .unwrap()
            .into_inner()
            .leases;
        leases.into_iter().find(|l| l.path == "db/app/ro").unwrap()
    });
    let user: String = rt.block_on(async {
        sqlx::query_scalar("SELECT username FROM db_credentials WHERE lease_id = $1")
            .bind(&held.lease_id)
            .fetch_one(&mut sqlite(&s).await)
            .await
            .unwrap()
    });
    s.pg.stop();
    rt.block_on(async {
        c.admin
            .revoke_leases(authed(
                RevokeLeasesRequest {
                    selector: Some(LeaseSelector {
                        lease_id: held.lease_id.clone(),
                        ..Default::default()
                    }),
                },
                BOOTSTRAP,
            ))
            .await
            .unwrap();
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let pending = loop {
        let p = waiting(&s, &user);
        if p.as_ref()
            .is_some_and(|d| d["attempts"].as_u64().unwrap_or(0) >= 2)
        {
            break p.unwrap();
        }
        assert!(Instant::now() < deadline, "no failed attempt recorded");
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(
        pending["last_error"]
            .as_str()
            .unwrap()
            .contains("unavailable"),
        "{pending}"
    );
    s.pg.resume().unwrap();
    rt.block_on(async {
        assert!(
            until(Duration::from_secs(90), || async {
                !role_exists(&s.pg, &user).await
            })
            .await,
            "the role was not dropped after the database came back"
        );
    });
    assert!(waiting(&s, &user).is_none());

    // A broker killed after creating a role and before storing its lease leaves a pending row
    // (written first) and the role: after a restart, the row is past its grace and the role is
    // dropped.
    rt.block_on(async {
        let mut db = sqlite(&s).await;
        sqlx::raw_sql(
            "CREATE ROLE kh_shop_web_ro_deadbeef LOGIN; \
             COMMENT ON ROLE kh_shop_web_ro_deadbeef IS 'keyhaven dynamic credential'",
        )
        .execute(&mut admin(&s.pg).await)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO db_credentials (lease_id, connection, role, username, namespace, \
             service_account, state, created_ms, valid_until_ms) \
             VALUES ('shop/web/db/app/ro/dead', 'app', 'ro', 'kh_shop_web_ro_deadbeef', \
             'shop', 'web', 'pending', $1, $1)",
        )
        .bind((now_s() - 120) * 1000)
        .execute(&mut db)
        .await
        .unwrap();
    });
    s.broker.kill();
    s.broker.restart();
    rt.block_on(async {
        assert!(
            until(Duration::from_secs(30), || async {
                !role_exists(&s.pg, "kh_shop_web_ro_deadbeef").await
            })
            .await,
            "the role of a never-stored lease survived a restart"
        );
    });
    // Every marked role left has an active lease.
    let live: Vec<String> = rt.block_on(async {
        sqlx::query_scalar(
            "SELECT username FROM db_credentials c JOIN leases l ON l.id = c.lease_id \
             WHERE c.state <> 'dropped' AND l.ended_ms IS NULL ORDER BY 1",
        )
        .fetch_all(&mut sqlite(&s).await)
        .await
        .unwrap()
    });
    assert_eq!(rt.block_on(marked_roles(&s.pg)), live);
}

/// `brokerctl db status`'s entry for `user` among the roles waiting to be dropped.
fn waiting(s: &Setup, user: &str) -> Option<serde_json::Value> {
    let (ok, out) = ctl(s, &["--output", "json", "db", "status"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["pending_drops"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["username"] == user)
        .cloned()
}

const MANY: &str = "ttl: 10m\nmax_ttl: 30m\nmax_per_identity: 3\nmax_total: 20\n\
creation: |\n  CREATE ROLE {{name}} LOGIN PASSWORD {{password}} VALID UNTIL {{expiration}};\n";

/// Leases `db/app/many` as `fleet/sa<i % 10>` for every `i` in `range`, all at once, spread
/// over `brokers`; the results in order.
async fn lease_many(
    brokers: &[&BrokerProc],
    pki: &testkit::pki::DevPki,
    tokens: &[String],
    range: std::ops::Range<usize>,
) -> Vec<Result<LeaseResponse, tonic::Status>> {
    let mut clients = Vec::new();
    for b in brokers {
        clients.push(BrokerClient::connect(b, pki).await);
    }
    let calls = range.map(|i| {
        let mut c = clients[i % clients.len()].leases.clone();
        let token = tokens[i % tokens.len()].clone();
        async move {
            c.lease(authed(
                LeaseRequest {
                    path: "db/app/many".into(),
                    ttl_seconds: 0,
                },
                &token,
            ))
            .await
            .map(tonic::Response::into_inner)
        }
    });
    let tasks: Vec<_> = calls.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[test]
fn caps_hold_under_concurrency_on_two_replicas_and_kill_9_leaves_no_role_behind() {
    let mut s = setup_on(&["--db-pending-grace", "3s"], true);
    let mut b2 = BrokerProc::start_on(&s.hsm, &s.pki, &s.pg.url(), &["--db-pending-grace", "3s"]);
    let role_file = s.hsm.dir().join("many.yaml");
    std::fs::write(&role_file, MANY).unwrap();
    let (ok, out) = ctl(
        &s,
        &[
            "db",
            "role",
            "put",
            "app/many",
            "-f",
            role_file.to_str().unwrap(),
        ],
    );
    assert!(ok, "{out}");
    let dev = DevIssuer::load_or_generate(&s.hsm.dir().join("dev.pem")).unwrap();
    let tokens: Vec<String> = (0..10)
        .map(|i| {
            dev.mint("fleet", &format!("sa{i}"), None, Duration::from_secs(600))
                .unwrap()
        })
        .collect();
    let rt = runtime();

    // 100 requests from 10 identities over two replicas: exactly max_total succeed, none
    // past max_per_identity, the rest RESOURCE_EXHAUSTED.
    let results = rt.block_on(lease_many(&[&s.broker, &b2], &s.pki, &tokens, 0..100));
    let granted: Vec<&LeaseResponse> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    for r in &results {
        if let Err(e) = r {
            assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        }
    }
    assert_eq!(granted.len(), 20, "max_total");
    let mut per_sa = std::collections::BTreeMap::<String, usize>::new();
    for g in &granted {
        let sa = g.lease_id.split('/').nth(1).unwrap().to_owned();
        *per_sa.entry(sa).or_default() += 1;
    }
    assert!(per_sa.values().all(|n| *n <= 3), "{per_sa:?}");
    assert_eq!(rt.block_on(marked_roles(&s.pg)).len(), 20);

    // Free every slot, then kill -9 a replica while leases are being made, at five points.
    let (ok, out) = ctl(&s, &["leases", "revoke", "--prefix", "db/app/many"]);
    assert!(ok, "{out}");
    // A slot is free once its role is dropped (the cap counts roles, not leases).
    assert!(rt.block_on(until(Duration::from_secs(30), || async {
        marked_roles(&s.pg).await.is_empty()
    })));
    kill_9_at_five_points_then_settle(&mut s, &tokens, true);
    b2.kill();
}

/// Kills the broker (`kill -9`) at five points while eight Leases of `db/app/many` are in
/// flight (half of them 1 s long, so earlier ones are being dropped), restarting it each time; then, after the pending grace (3 s in these setups), the
/// revokers and one reconcile, the database's marked roles must equal the credentials of
/// active leases. `on_pg`: the broker's store is PostgreSQL (else SQLite).
fn kill_9_at_five_points_then_settle(s: &mut Setup, tokens: &[String], on_pg: bool) {
    let rt = runtime();
    let count = "SELECT COUNT(*) FROM db_credentials WHERE role = 'many'";
    let before = rt.block_on(store_scalar(s, on_pg, count));
    for delay_ms in [5u64, 20, 50, 100, 250] {
        rt.block_on(async {
            // Connected first, so the requests are in flight when the broker dies.
            let c = BrokerClient::connect(&s.broker, &s.pki).await;
            for (i, token) in tokens.iter().enumerate().take(8) {
                let mut l = c.leases.clone();
                let token = token.clone();
                tokio::spawn(async move {
                    let _ = l
                        .lease(authed(
                            LeaseRequest {
                                path: "db/app/many".into(),
                                // Half expire within the loop, so roles are being
                                // dropped as well as created when the broker dies.
                                ttl_seconds: if i % 2 == 0 { 1 } else { 60 + i as u64 },
                            },
                            &token,
                        ))
                        .await;
                });
            }
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        });
        s.broker.kill();
        s.broker.restart();
    }
    // Some of those requests made rows (and roles) before their broker died.
    let made = rt.block_on(store_scalar(s, on_pg, count)) - before;
    eprintln!("credentials made in all: {made}");
    assert!(
        made > 0,
        "no request reached the database while a broker was killed"
    );
    // After the grace, the revokers and one reconcile: the marked roles are exactly the
    // credentials of active leases.
    std::thread::sleep(Duration::from_secs(4));
    let (ok, out) = ctl(s, &["db", "reconcile", "app"]);
    assert!(ok, "{out}");
    let settled = rt.block_on(async {
        until(Duration::from_secs(30), || async {
            let sql = format!(
                "SELECT c.username FROM db_credentials c JOIN leases l ON l.id = c.lease_id \
                 WHERE c.state <> 'dropped' AND l.ended_ms IS NULL AND l.expires_ms > {} \
                 ORDER BY 1",
                now_s() * 1000
            );
            let live: Vec<String> = if on_pg {
                sqlx::query_scalar(&sql)
                    .fetch_all(&mut PgConnection::connect(&s.pg.url()).await.unwrap())
                    .await
                    .unwrap()
            } else {
                sqlx::query_scalar(&sql)
                    .fetch_all(&mut sqlite(s).await)
                    .await
                    .unwrap()
            };
            marked_roles(&s.pg).await == live
        })
        .await
    });
    assert!(
        settled,
        "marked roles and live credentials differ after kill -9"
    );
}

#[test]
fn kill_9_on_a_sqlite_store_leaves_no_role_behind() {
    let mut s = setup(&["--db-pending-grace", "3s"]);
    let role_file = s.hsm.dir().join("many.yaml");
    std::fs::write(&role_file, MANY).unwrap();
    let (ok, out) = ctl(
        &s,
        &[
            "db",
            "role",
            "put",
            "app/many",
            "-f",
            role_file.to_str().unwrap(),
        ],
    );
    assert!(ok, "{out}");
    let dev = DevIssuer::load_or_generate(&s.hsm.dir().join("dev.pem")).unwrap();
    let tokens: Vec<String> = (0..10)
        .map(|i| {
            dev.mint("fleet", &format!("sa{i}"), None, Duration::from_secs(600))
                .unwrap()
        })
        .collect();
    kill_9_at_five_points_then_settle(&mut s, &tokens, false);
}

#[test]
fn a_connection_verifies_the_database_certificate() {
    let mut pg = Postgres::start().unwrap();
    pg.create_database("app").unwrap();
    let (hsm, pki) = broker_token();
    pg.enable_tls(&pki.server_cert, &pki.server_key).unwrap();
    let broker = BrokerProc::start(&hsm, &pki, &[]);
    std::fs::create_dir_all(hsm.dir().join("other")).unwrap();
    let other = testkit::pki::DevPki::write(&hsm.dir().join("other")).unwrap();
    let put = |ca: &std::path::Path| {
        let url = hsm.dir().join("tls-url");
        std::fs::write(
            &url,
            format!(
                "postgres://keyhaven:{ADMIN_PASSWORD}@localhost:{}/app?sslmode=verify-full&sslrootcert={}",
                pg.port(),
                ca.display()
            ),
        )
        .unwrap();
        let out = broker.ctl_admin(
            &hsm,
            &pki.ca,
            &[
                "db",
                "connection",
                "put",
                "app",
                "--url-file",
                url.to_str().unwrap(),
            ],
        );
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    // A certificate from another CA is refused, and nothing is stored.
    let (ok, out) = put(&other.ca);
    assert!(
        !ok && out.contains("certificate verification failed"),
        "{out}"
    );
    assert!(!out.contains(ADMIN_PASSWORD), "{out}");
    // The database's own CA: verified (verify-full connects only over TLS to a certificate
    // that chains to it and names the host), stored.
    let (ok, out) = put(&pki.ca);
    assert!(ok, "{out}");

    // The workload's DSN keeps verify-full; the role says where the pod has the CA.
    pg.psql("app", "CREATE TABLE public_data (x int)").unwrap();
    let role = format!(
        "{ROLE}dsn_params:\n  sslrootcert: {}\n  application_name: shop web\n",
        pki.ca.display()
    );
    let file = hsm.dir().join("tls-role.yaml");
    std::fs::write(&file, role).unwrap();
    let out = broker.ctl_admin(
        &hsm,
        &pki.ca,
        &["db", "role", "put", "app/ro", "-f", file.to_str().unwrap()],
    );
    assert!(out.status.success(), "{out:?}");
    let dev = DevIssuer::load_or_generate(&hsm.dir().join("dev.pem")).unwrap();
    let web = dev
        .mint("shop", "web", Some("web-0"), Duration::from_secs(600))
        .unwrap();
    runtime().block_on(async {
        let mut c = BrokerClient::connect(&broker, &pki).await;
        c.apply(POLICY, false).await;
        let lease = c.lease(&web, "db/app/ro").await.expect("lease");
        let dsn = field(&lease, "dsn");
        assert!(
            dsn.contains("sslmode=verify-full") && dsn.contains("application_name=shop%20web"),
            "{}",
            dsn.replace(&field(&lease, "password"), "***")
        );
        let mut session = PgConnection::connect(&dsn).await.expect("log in over TLS");
        let over_tls: bool =
            sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                .fetch_one(&mut session)
                .await
                .unwrap();
        assert!(over_tls);
    });
}

/// A second connection, `own`, whose admin is an ordinary CREATEROLE role logging in with a
/// password (`khadmin`, what production uses), with a role `own/app` of the default templates.
fn own_connection(s: &Setup) {
    runtime().block_on(async {
        sqlx::raw_sql("CREATE ROLE khadmin LOGIN CREATEROLE PASSWORD 'KhAdmin-1'")
            .execute(&mut admin(&s.pg).await)
            .await
            .unwrap();
    });
    let url_file = s.hsm.dir().join("own-url");
    std::fs::write(
        &url_file,
        format!("postgres://khadmin:KhAdmin-1@127.0.0.1:{}/app", s.pg.port()),
    )
    .unwrap();
    let (ok, out) = ctl(
        s,
        &[
            "db",
            "connection",
            "put",
            "own",
            "--url-file",
            url_file.to_str().unwrap(),
        ],
    );
    assert!(ok, "{out}");
    let role_file = s.hsm.dir().join("own-app.yaml");
    std::fs::write(&role_file, "max_per_identity: 5\nmax_total: 5\n").unwrap();
    let (ok, out) = ctl(
        s,
        &[
            "db",
            "role",
            "put",
            "own/app",
            "-f",
            role_file.to_str().unwrap(),
        ],
    );
    assert!(ok, "{out}");
}

const OWN_POLICY: &str = r#"
policies:
- name: web-own
  subjects: [{namespace: shop, serviceaccount: web}]
  paths: ["db/own/*"]
  capabilities: [read]
  ttl: 5m
  max_ttl: 1h
"#;

async fn sqlstate_of_login(url: &str) -> Option<String> {
    match PgConnection::connect(url).await {
        Ok(_) => None,
        Err(e) => Some(
            e.as_database_error()
                .and_then(|d| d.code())
                .map(|c| c.into_owned())
                .unwrap_or_else(|| e.to_string()),
        ),
    }
}

#[test]
fn rotate_root_leaves_only_the_broker_knowing_the_password_and_an_interrupted_rotation_recovers() {
    let s = setup(&[]);
    let rt = runtime();
    own_connection(&s);
    let policy = format!("{POLICY}{}", OWN_POLICY.trim_start_matches("\npolicies:\n"));
    let mut c = rt.block_on(async {
        let mut c = BrokerClient::connect(&s.broker, &s.pki).await;
        c.apply(&policy, false).await;
        c
    });
    let old_url = format!("postgres://khadmin:KhAdmin-1@127.0.0.1:{}/app", s.pg.port());

    let (ok, out) = ctl(&s, &["db", "connection", "rotate-root", "own"]);
    assert!(ok && out.contains("version 2"), "{out}");
    rt.block_on(async {
        // The operator's password no longer logs in.
        assert_eq!(sqlstate_of_login(&old_url).await.as_deref(), Some("28P01"));
        // The broker goes on with its own: a credential is made, works, and is dropped (the
        // default revocation, run by a CREATEROLE admin that is not a superuser).
        let lease = c
            .lease(&s.web, "db/own/app")
            .await
            .expect("lease after rotation");
        let user = field(&lease, "username");
        let mut session = PgConnection::connect(&field(&lease, "dsn")).await.unwrap();
        sqlx::query("SELECT 1").execute(&mut session).await.unwrap();
        c.revoke(&s.web, &lease.lease_id).await.unwrap();
        assert!(
            until(Duration::from_secs(20), || async {
                !role_exists(&s.pg, &user).await
            })
            .await,
            "role not dropped after rotation"
        );
        assert!(sqlx::query("SELECT 1").execute(&mut session).await.is_err());

        // A rotation interrupted between its two commits leaves the newest version with a
        // password the database never took (here: the database put back on the one before).
        sqlx::raw_sql("ALTER ROLE khadmin PASSWORD 'KhAdmin-1'")
            .execute(&mut admin(&s.pg).await)
            .await
            .unwrap();
        // (Leases may still succeed for a while: the pool's sessions are logged in.)
        assert_eq!(
            sqlstate_of_login(&old_url).await,
            None,
            "the database takes the old password again"
        );
    });
    // The next rotation logs in with the version before and goes on.
    let (ok, out) = ctl(&s, &["db", "connection", "rotate-root", "own"]);
    assert!(ok && out.contains("version 3"), "{out}");
    rt.block_on(async {
        assert_eq!(sqlstate_of_login(&old_url).await.as_deref(), Some("28P01"));
        c.lease(&s.web, "db/own/app")
            .await
            .expect("lease after the recovery");
    });
    // A connection that does not exist, and a caller without `write` on it, are refused.
    let (ok, out) = ctl(&s, &["db", "connection", "rotate-root", "nosuch"]);
    assert!(!ok && out.contains("not found"), "{out}");
    let e = rt
        .block_on(
            c.admin
                .rotate_db_root(authed(RotateDbRootRequest { name: "own".into() }, &s.web)),
        )
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // Audited; no password in the log or the audit file.
    let audit = std::fs::read_to_string(s.broker.dir.join("audit.jsonl")).unwrap();
    assert_eq!(
        audit.matches("db_connection_rotate_root").count(),
        4,
        "two rotations and two refusals (the unknown connection, the caller without write)"
    );
    for text in [&s.broker.log_text(), &audit] {
        assert!(!text.contains("KhAdmin-1"));
    }
}

#[test]
fn deleting_a_role_or_a_connection_is_refused_while_anything_still_needs_it() {
    let s = setup(&[]);
    let rt = runtime();
    let mut c = rt.block_on(BrokerClient::connect(&s.broker, &s.pki));
    let lease = rt.block_on(c.lease(&s.web, "db/app/ro")).unwrap();
    let user = field(&lease, "username");

    // A live credential: neither its role nor its connection can go.
    let (ok, out) = ctl(&s, &["db", "role", "delete", "app/ro"]);
    assert!(
        !ok && out.contains("1 credential(s) of db/app/ro are live"),
        "{out}"
    );
    assert!(out.contains("brokerctl db status"), "{out}");
    let (ok, out) = ctl(&s, &["db", "connection", "delete", "app"]);
    assert!(!ok && out.contains("live"), "{out}");
    let (ok, out) = ctl(
        &s,
        &["db", "connection", "delete", "app", "--database-gone"],
    );
    assert!(!ok && out.contains("live"), "{out}");
    rt.block_on(async {
        assert!(role_exists(&s.pg, &user).await);
        c.lease(&s.web, "db/app/ro").await.expect("still leasable");
    });

    // Its leases end and the roles are dropped: now the role can be deleted.
    let (ok, out) = ctl(&s, &["leases", "revoke", "--prefix", "db/app"]);
    assert!(ok, "{out}");
    rt.block_on(async {
        assert!(
            until(Duration::from_secs(20), || async {
                marked_roles(&s.pg).await.is_empty()
            })
            .await
        );
    });
    let (ok, out) = ctl(&s, &["db", "role", "delete", "app/ro"]);
    assert!(ok, "{out}");
    let e = rt.block_on(c.lease(&s.web, "db/app/ro")).unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    // A role the broker marked, still in the database with no credential: the connection
    // (the only way to drop it) stays until it is reconciled away.
    rt.block_on(async {
        sqlx::raw_sql(
            "CREATE ROLE kh_stray_x LOGIN; \
             COMMENT ON ROLE kh_stray_x IS 'keyhaven dynamic credential'",
        )
        .execute(&mut admin(&s.pg).await)
        .await
        .unwrap();
    });
    let (ok, out) = ctl(&s, &["db", "connection", "delete", "app"]);
    assert!(!ok && out.contains("brokerctl db reconcile app"), "{out}");
    let (ok, out) = ctl(&s, &["db", "reconcile", "app"]);
    assert!(ok && out.contains("kh_stray_x"), "{out}");
    let (ok, out) = ctl(&s, &["db", "connection", "delete", "app"]);
    assert!(ok && out.contains("1 stored version(s) destroyed"), "{out}");

    // Gone: its URL destroyed, nothing leasable, nothing to rotate.
    rt.block_on(async {
        let kept: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM secret_versions WHERE path = 'db/app' \
             AND (destroyed_ms IS NULL OR ciphertext IS NOT NULL OR dek_ct IS NOT NULL)",
        )
        .fetch_one(&mut sqlite(&s).await)
        .await
        .unwrap();
        assert_eq!(kept, 0, "every version destroyed, its data erased");
    });
    let (ok, out) = ctl(&s, &["db", "connection", "rotate-root", "app"]);
    assert!(!ok && out.contains("not found"), "{out}");
    let (ok, out) = ctl(&s, &["db", "role", "list"]);
    assert!(ok && !out.contains("db/app/"), "{out}");
    let audit = std::fs::read_to_string(s.broker.dir.join("audit.jsonl")).unwrap();
    assert!(audit.contains("db_connection_delete") && audit.contains("db_role_delete"));
}

#[test]
fn a_rotation_on_one_replica_is_followed_by_the_other() {
    let s = setup_on(&[], true);
    let b2 = BrokerProc::start_on(&s.hsm, &s.pki, &s.pg.url(), &[]);
    let rt = runtime();
    own_connection(&s);
    let policy = format!("{POLICY}{}", OWN_POLICY.trim_start_matches("\npolicies:\n"));
    let mut c2 = rt.block_on(async {
        BrokerClient::connect(&s.broker, &s.pki)
            .await
            .apply(&policy, false)
            .await;
        BrokerClient::connect(&b2, &s.pki).await
    });
    // The second replica (once it enforces the new policy, within its bound) has a pool
    // logged in with the operator's password.
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(20);
        while let Err(e) = c2.lease(&s.web, "db/own/app").await {
            assert!(Instant::now() < deadline, "lease on replica 2: {e:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let (ok, out) = ctl(&s, &["db", "connection", "rotate-root", "own"]);
    assert!(ok && out.contains("version 2"), "{out}");
    rt.block_on(async {
        // Every admin session ended: a lease on replica 2 needs a new login, with the new
        // password it reads from the store.
        sqlx::raw_sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'khadmin'",
        )
        .execute(&mut admin(&s.pg).await)
        .await
        .unwrap();
        let lease = c2
            .lease(&s.web, "db/own/app")
            .await
            .expect("lease on replica 2 after the rotation on replica 1");
        let mut session = PgConnection::connect(&field(&lease, "dsn")).await.unwrap();
        sqlx::query("SELECT 1").execute(&mut session).await.unwrap();
    });
    drop(b2);
}
