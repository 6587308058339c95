//! What the dynamic-credential tests share: a PostgreSQL cluster that enforces passwords with
//! database `app`, a broker (store on SQLite or on the same cluster) with a connection `app`
//! and role `app/ro`, tokens, and probes of the database and of the store.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use hsm_tests::broker::{broker_token, BrokerProc};
use hsm_tests::broker_client::BrokerClient;
use hsm_tests::process::runtime;
use keyhaven_broker::auth::DevIssuer;
use keyhaven_proto::broker::v1::*;
use sqlx::{Connection, PgConnection};
use testkit::postgres::Postgres;

/// The admin role's password (the cluster's own user is trusted; a password in the URL must
/// still never leak).
pub const ADMIN_PASSWORD: &str = "AdminPw-7f3a9c";

pub const POLICY: &str = r#"
policies:
- name: web-db
  subjects: [{namespace: shop, serviceaccount: web}]
  paths: ["db/app/ro"]
  capabilities: [read]
  ttl: 5m
  max_ttl: 1h
- name: batch-db
  subjects: [{namespace: shop, serviceaccount: batch}]
  paths: ["db/app/*"]
  capabilities: [read]
  ttl: 5m
  max_ttl: 1h
- name: fleet-db
  subjects: [{namespace: fleet, serviceaccount: "*"}]
  paths: ["db/app/many"]
  capabilities: [read]
  ttl: 5m
  max_ttl: 1h
"#;

pub const ROLE: &str = "ttl: 10m\nmax_ttl: 30m\nmax_per_identity: 2\nmax_total: 3\n\
creation: |\n  CREATE ROLE {{name}} LOGIN PASSWORD {{password}} VALID UNTIL {{expiration}};\n  \
GRANT SELECT ON public_data TO {{name}};\n";

pub struct Setup {
    pub pg: Postgres,
    pub hsm: testkit::softhsm::SoftHsm,
    pub pki: testkit::pki::DevPki,
    pub broker: BrokerProc,
    pub web: String,
    pub batch: String,
}

pub fn admin_url(pg: &Postgres) -> String {
    format!(
        "postgres://keyhaven:{ADMIN_PASSWORD}@127.0.0.1:{}/app",
        pg.port()
    )
}

pub async fn admin(pg: &Postgres) -> PgConnection {
    PgConnection::connect(&pg.database_url("app"))
        .await
        .unwrap()
}

pub fn ctl(s: &Setup, args: &[&str]) -> (bool, String) {
    let out = s.broker.ctl_admin(&s.hsm, &s.pki.ca, args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

pub fn setup(extra: &[&str]) -> Setup {
    setup_on(extra, false)
}

/// [`setup`], with the broker's own store on the same PostgreSQL cluster (database
/// `postgres`) when `store_on_pg`.
pub fn setup_on(extra: &[&str], store_on_pg: bool) -> Setup {
    let pg = Postgres::start().unwrap();
    pg.create_database("app").unwrap();
    let rt = runtime();
    rt.block_on(async {
        let mut c = admin(&pg).await;
        sqlx::raw_sql(
            "CREATE TABLE public_data (x int); INSERT INTO public_data VALUES (7); \
             CREATE TABLE private_data (y int); \
             CREATE ROLE plain LOGIN PASSWORD 'plain-pw';",
        )
        .execute(&mut c)
        .await
        .unwrap();
    });
    pg.require_passwords().unwrap();
    let (hsm, pki) = broker_token();
    let broker = if store_on_pg {
        BrokerProc::start_on(&hsm, &pki, &pg.url(), extra)
    } else {
        BrokerProc::start(&hsm, &pki, extra)
    };
    let dev = DevIssuer::load_or_generate(&hsm.dir().join("dev.pem")).unwrap();
    let web = dev
        .mint("shop", "web", Some("web-0"), Duration::from_secs(600))
        .unwrap();
    let batch = dev
        .mint("shop", "batch", Some("batch-0"), Duration::from_secs(600))
        .unwrap();
    let s = Setup {
        pg,
        hsm,
        pki,
        broker,
        web,
        batch,
    };
    rt.block_on(async {
        BrokerClient::connect(&s.broker, &s.pki)
            .await
            .apply(POLICY, false)
            .await;
    });
    let url_file = s.hsm.dir().join("app-url");
    std::fs::write(&url_file, admin_url(&s.pg) + "\n").unwrap();
    let (ok, out) = ctl(
        &s,
        &[
            "db",
            "connection",
            "put",
            "app",
            "--url-file",
            url_file.to_str().unwrap(),
        ],
    );
    assert!(ok, "{out}");
    let role_file = s.hsm.dir().join("ro.yaml");
    std::fs::write(&role_file, ROLE).unwrap();
    let (ok, out) = ctl(
        &s,
        &[
            "db",
            "role",
            "put",
            "app/ro",
            "-f",
            role_file.to_str().unwrap(),
        ],
    );
    assert!(ok, "{out}");
    s
}

pub fn field(l: &LeaseResponse, k: &str) -> String {
    String::from_utf8(l.data.get(k).unwrap_or_else(|| panic!("no {k}")).clone()).unwrap()
}

pub async fn role_exists(pg: &Postgres, name: &str) -> bool {
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM pg_roles WHERE rolname = $1")
        .bind(name)
        .fetch_one(&mut admin(pg).await)
        .await
        .unwrap();
    n > 0
}

pub async fn marked_roles(pg: &Postgres) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT r.rolname::text FROM pg_roles r JOIN pg_shdescription d ON d.objoid = r.oid \
         WHERE r.rolname LIKE 'kh\\_%' ORDER BY 1",
    )
    .fetch_all(&mut admin(pg).await)
    .await
    .unwrap()
}

pub async fn valid_until_s(pg: &Postgres, name: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT floor(EXTRACT(EPOCH FROM rolvaliduntil))::bigint FROM pg_roles WHERE rolname = $1",
    )
    .bind(name)
    .fetch_one(&mut admin(pg).await)
    .await
    .unwrap()
}

/// Polls `f` until it holds or `patience` (a bound for a hung test, not a measurement) passes.
pub async fn until<F, Fut>(patience: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + patience;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One number from the broker's store.
pub async fn store_scalar(s: &Setup, on_pg: bool, sql: &str) -> i64 {
    if on_pg {
        sqlx::query_scalar(sql)
            .fetch_one(&mut PgConnection::connect(&s.pg.url()).await.unwrap())
            .await
            .unwrap()
    } else {
        sqlx::query_scalar(sql)
            .fetch_one(&mut sqlite(s).await)
            .await
            .unwrap()
    }
}

pub async fn sqlite(s: &Setup) -> sqlx::SqliteConnection {
    sqlx::SqliteConnection::connect(&format!(
        "sqlite://{}",
        s.hsm.dir().join("broker.db").display()
    ))
    .await
    .unwrap()
}

pub fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Stores role definition `name` (`CONN/ROLE`) from `yaml`.
pub fn put_role(s: &Setup, name: &str, yaml: &str) {
    let file = s.hsm.dir().join(format!("{}.yaml", name.replace('/', "-")));
    std::fs::write(&file, yaml).unwrap();
    let (ok, out) = ctl(
        s,
        &["db", "role", "put", name, "-f", file.to_str().unwrap()],
    );
    assert!(ok, "{out}");
}
