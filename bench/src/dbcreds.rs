//! `keyhaven-bench dbcreds`: the broker's dynamic PostgreSQL credentials. One run: a SoftHSM2
//! token with a broker KEK; a throwaway PostgreSQL cluster holding the credentials' database
//! (and the broker's store with `--db postgres`; a SQLite file otherwise); a throwaway CA;
//! one `broker` process over TLS; the policy, the connection and the role through the Admin
//! API. Then, for each concurrency, Lease on `db/bench/load` (each Lease creates a role)
//! beside the raw `CREATE ROLE` + `DROP ROLE` loop on the same database, one at a time.
//! Last, the revoker's rate: the load cells' credentials revoked in bulk, then `--expiring`
//! credentials issued with one common expiry, each time watched until the database holds no
//! `kh_` role. Prints the tables and verdicts.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use keyhaven_broker::auth::DevIssuer;
use secrecy::SecretString;
use sqlx::PgPool;
use testkit::pki::DevPki;
use testkit::postgres::{self, Postgres};
use testkit::softhsm::SoftHsmDir;

use crate::broker::{interrupted, progress, KEK_LABEL_PREFIX, READY_TIMEOUT};
use crate::broker_proc::{BrokerProcess, BrokerSetup};
use crate::cli::{Db, DbcredsArgs};
use crate::credentials;
use crate::dbcreds_report::{self, Drain, Row};
use crate::leases;
use crate::load::Window;
use crate::token::new_token;

/// The credentials' database on the throwaway cluster.
const TARGET_DB: &str = "bench_target";
/// The roles to drop are counted this long before the common expiry.
const COUNT_BEFORE_EXPIRY: Duration = Duration::from_millis(500);
/// How often the bench counts the `kh_` roles while the revoker works.
const POLL: Duration = Duration::from_millis(100);
/// Time between the end of the issue and the common expiry is planned from the load cells'
/// rate at this fraction (the issue slows as live credentials accumulate)...
const ISSUE_RATE_MARGIN: f64 = 0.5;
/// ...plus this much.
const EXPIRY_SLACK: Duration = Duration::from_secs(5);
/// The bench stops watching a drain after this long plus this long per role (a rate of
/// 10 roles/s), and reports what was left.
const WATCH_BASE: Duration = Duration::from_secs(120);
const WATCH_PER_ROLE: Duration = Duration::from_millis(100);

/// What one run measured.
#[derive(Debug)]
struct Outcome {
    header: String,
    rows: Vec<Row>,
    drains: Vec<Drain>,
    notes: Vec<String>,
}

/// Runs the dynamic-credential benchmark and prints the result on stdout (progress on stderr).
pub fn run(args: &DbcredsArgs) -> anyhow::Result<()> {
    args.validate()?;
    let broker_bin = crate::broker::broker_path(args.broker.as_deref())?;
    let pg_bin = postgres::pg_bin(args.pg_bin.as_deref())?;
    let hsm = SoftHsmDir::create(&args.pkcs11_module, "keyhaven-bench-")?;
    // SoftHSM2 reads SOFTHSM2_CONF once, when the module is first initialised; this process
    // has a single thread here, so the write races no reader.
    std::env::set_var("SOFTHSM2_CONF", &hsm.conf);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    let result = rt.block_on(async {
        tokio::select! {
            r = measure(args, &broker_bin, &pg_bin, &hsm) => r,
            e = interrupted() => Err(e),
        }
    });
    // The broker and PostgreSQL were stopped when `measure` was dropped.
    rt.shutdown_timeout(Duration::from_secs(2));
    drop(hsm);
    let out = result?;

    println!("{}", out.header);
    print!("{}", dbcreds_report::table(args.db, &out.rows));
    if !out.drains.is_empty() {
        println!("\nroles dropped by the broker's revoker after their leases ended:");
        print!("{}", dbcreds_report::drain_table(&out.drains));
    }
    let errors = dbcreds_report::errors(&out.rows);
    if !errors.is_empty() {
        println!("\nfailed requests:");
        for e in errors {
            println!("  {e}");
        }
    }
    for n in &out.notes {
        println!("note: {n}");
    }
    println!();
    for v in dbcreds_report::verdicts(&out.rows, &out.drains) {
        println!("verdict: {v}");
    }
    Ok(())
}

async fn measure(
    args: &DbcredsArgs,
    broker_bin: &Path,
    pg_bin: &Path,
    hsm: &SoftHsmDir,
) -> anyhow::Result<Outcome> {
    let db = args.db;
    let window = Window {
        warmup: args.warmup,
        measure: args.duration,
    };
    let dir = hsm.dir().join("dbcreds");
    std::fs::create_dir(&dir).with_context(|| format!("create {}", dir.display()))?;
    let token = tokio::task::block_in_place(|| {
        new_token(hsm, "dbcreds", dir.join("user.pin"), KEK_LABEL_PREFIX)
    })?;

    eprintln!(
        "starting a throwaway PostgreSQL cluster from {}",
        pg_bin.display()
    );
    // Declared before the broker, so dropped after it: the broker stops first.
    let pg = tokio::task::block_in_place(|| -> testkit::Result<Postgres> {
        let cluster = Postgres::start_with(pg_bin, &[])?;
        cluster.create_database(TARGET_DB)?;
        if db == Db::Postgres {
            cluster.create_database("keyhaven_broker")?;
        }
        Ok(cluster)
    })?;
    let target_url = pg.database_url(TARGET_DB);
    let store_url = match db {
        Db::Sqlite => format!("sqlite://{}", dir.join("broker.db").display()),
        Db::Postgres => pg.database_url("keyhaven_broker"),
    };

    let pki = DevPki::write(&dir)?;
    let dev_key = dir.join("dev-issuer.pem");
    let issuer = DevIssuer::load_or_generate(&dev_key).context("make the dev-issuer key")?;
    let bootstrap = testkit::random::pin()?;
    let bootstrap_file = dir.join("bootstrap");
    testkit::write_private(&bootstrap_file, &bootstrap)?;
    let bootstrap = SecretString::from(bootstrap.as_str());
    // Every client comes from one loopback address: the limits before authentication would
    // measure themselves.
    let mut broker = BrokerProcess::spawn(&BrokerSetup {
        bin: broker_bin,
        softhsm_conf: &hsm.conf,
        module: &hsm.module,
        token: &token,
        database_url: &store_url,
        pki: &pki,
        dev_key: &dev_key,
        bootstrap_file: &bootstrap_file,
        log: dir.join("broker.log"),
        extra: ["--auth-attempts-per-peer", "0", "--auth-attempts", "0"]
            .map(String::from)
            .to_vec(),
    })?;
    broker.wait_ready(READY_TIMEOUT).await?;
    eprintln!("broker ready (pid {})", broker.pid());
    let ep = leases::endpoint(&broker.endpoint(), &pki.ca)?;
    credentials::setup(&ep, &bootstrap, &target_url)
        .await
        .context("apply the policy, put the connection and the role")?;
    let max_clients = args.clients.iter().copied().max().unwrap_or(1);
    let ids = leases::mint_clients(&issuer, max_clients)?;
    let watcher = credentials::target_pool(&target_url, 1).await?;

    let mut rows = Vec::new();
    for &n in &args.clients {
        let lease = credentials::lease(&ep, &ids, n, window).await?;
        progress(db, n, "Lease", &lease);
        broker.ensure_running()?;
        let raw = credentials::raw(&target_url, n, window).await?;
        progress(db, n, "raw-role", &raw);
        rows.push(Row {
            clients: n,
            lease,
            raw,
        });
    }

    let mut drains = Vec::new();
    let mut notes = Vec::new();
    if args.expiring > 0 {
        // The load cells' credentials first: ended in bulk, so that the expiry below starts
        // from a database without kh_ roles.
        let roles = credentials::marked_roles(&watcher).await?;
        let ended = Instant::now();
        let revoked = credentials::revoke_all(&ep, &bootstrap).await?;
        eprintln!("revoked {revoked} leases of the load cells ({roles} kh_ roles)");
        let bulk = watch(&watcher, &mut broker, "revoked", roles, ended).await?;
        drains.push(bulk);

        let rate = rows
            .iter()
            .find(|r| r.clients == max_clients)
            .map_or(0.0, |r| r.lease.throughput)
            .max(1.0);
        let planned = Duration::from_secs_f64(args.expiring as f64 / (rate * ISSUE_RATE_MARGIN));
        let expiry = Instant::now() + planned + EXPIRY_SLACK;
        eprintln!(
            "issuing {} credentials with {max_clients} clients, all expiring in {:.0} s",
            args.expiring,
            (planned + EXPIRY_SLACK).as_secs_f64()
        );
        let issued =
            credentials::issue_expiring(&ep, &ids, max_clients, args.expiring, expiry).await?;
        let issue_rate = issued.count as f64 / issued.took.as_secs_f64().max(1e-9);
        eprintln!(
            "issued {} in {:.1} s ({issue_rate:.0}/s), {} failed",
            issued.count,
            issued.took.as_secs_f64(),
            issued.errors
        );
        if issued.errors > 0 {
            notes.push(format!(
                "{} of {} expiring credentials were not issued; first failure: {}",
                issued.errors,
                args.expiring,
                issued.first_error.as_deref().unwrap_or("?")
            ));
        }
        if issued.late > 0 {
            notes.push(format!(
                "the issue overran the planned expiry: {} credentials were asked for after it \
                 (TTL 1 s each), so the drain overlapped the issue",
                issued.late
            ));
        }
        // Counted just before the expiry: the first leases expire at it, and the revoker may
        // take them at once.
        tokio::time::sleep_until((expiry - COUNT_BEFORE_EXPIRY).into()).await;
        let roles = credentials::marked_roles(&watcher).await?;
        tokio::time::sleep_until(expiry.into()).await;
        if roles != issued.count as i64 {
            notes.push(format!(
                "{roles} kh_ roles at the expiry for {} credentials issued",
                issued.count
            ));
        }
        let mut drain = watch(&watcher, &mut broker, "expired", roles, expiry).await?;
        drain.issue_rate = Some(issue_rate);
        drains.push(drain);

        let (live, pending) = credentials::db_status(&ep, &bootstrap).await?;
        if live > 0 || pending > 0 {
            notes.push(format!(
                "after the drains the broker still lists {live} live credentials and \
                 {pending} roles to drop"
            ));
        }
    }
    broker.ensure_running()?;
    watcher.close().await;
    drop(broker);
    let version = pg.version().to_owned();
    drop(pg);

    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let store = match db {
        Db::Sqlite => "a SQLite file (WAL, synchronous=FULL)".to_owned(),
        Db::Postgres => "database keyhaven_broker on the same cluster".to_owned(),
    };
    let mut header = format!(
        "keyhaven-bench dbcreds: {cpus} CPUs; each cell {} measured after {} warm-up\n\
         postgres : throwaway PostgreSQL {version} cluster (default durable settings: fsync, \
         synchronous_commit on) over TCP loopback; the credentials' database {TARGET_DB}\n\
         broker   : {} (--dev, --rate-limit 0, no limits before authentication), gRPC over TLS, \
         store: {store}; connection {c} = {TARGET_DB} as the cluster's superuser, role \
         {r} with the default statements (CREATE ROLE … LOGIN PASSWORD … VALID UNTIL …, the \
         reconciler's COMMENT; revocation: NOLOGIN, end sessions, REASSIGN/DROP OWNED, DROP \
         ROLE)\n\
         Lease    : N tokio tasks, each its own service account and TLS connection, leasing \
         {path} back to back (TTL {} s); every answer checked (lease id, kh_ username, \
         password)\n\
         raw-role : N tasks, each its own sqlx connection to {TARGET_DB}: the same rendered \
         CREATE ROLE, then DROP ROLE (two commits per operation)\n\
         revoked  : after the cells, RevokeLeases on db/{c}/ (the cells' credentials), timed \
         until no kh_ role is left in the cluster\n\
         expired  : then {} credentials issued by {max_clients} clients, each asking for the \
         whole seconds left to one common expiry, timed from that expiry until no kh_ role is \
         left (roles counted every {} ms)\n",
        humantime::format_duration(args.duration),
        humantime::format_duration(args.warmup),
        broker_bin.display(),
        credentials::LEASE_TTL.as_secs(),
        args.expiring,
        POLL.as_millis(),
        c = credentials::CONNECTION,
        r = credentials::ROLE,
        path = credentials::PATH,
    );
    if cfg!(debug_assertions) {
        header.push_str("WARNING: keyhaven-bench is a debug build; build with --release\n");
    }
    if broker_bin.components().any(|c| c.as_os_str() == "debug") {
        header.push_str("WARNING: the broker looks like a debug build; use target/release\n");
    }
    Ok(Outcome {
        header,
        rows,
        drains,
        notes,
    })
}

/// Counts the `kh_` roles every [`POLL`] from now until none is left (or the watch's bound
/// passes); times are from `ended`, when the `roles` credentials' leases ended.
async fn watch(
    pool: &PgPool,
    broker: &mut BrokerProcess,
    cause: &'static str,
    roles: i64,
    ended: Instant,
) -> anyhow::Result<Drain> {
    let bound = WATCH_BASE + WATCH_PER_ROLE * u32::try_from(roles.max(0)).unwrap_or(u32::MAX);
    let mut first = None;
    let mut said = Instant::now();
    loop {
        let left = credentials::marked_roles(pool).await?;
        let now = Instant::now();
        if left < roles && first.is_none() {
            first = Some(now - ended);
        }
        if left == 0 || now - ended >= bound {
            let all = (left == 0).then(|| now - ended);
            eprintln!(
                "{cause}: {} of {roles} roles dropped in {:.1} s",
                roles - left,
                (now - ended).as_secs_f64()
            );
            return Ok(Drain {
                cause,
                roles,
                issue_rate: None,
                first,
                all,
                left,
                watched: now - ended,
            });
        }
        if said.elapsed() >= Duration::from_secs(10) {
            said = Instant::now();
            eprintln!(
                "  {cause}: {left} of {roles} roles left after {:.0} s",
                (now - ended).as_secs_f64()
            );
            broker.ensure_running()?;
        }
        tokio::time::sleep(POLL).await;
    }
}
