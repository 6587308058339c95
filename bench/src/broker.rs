//! `keyhaven-bench broker`: the whole run. For each database, one after the other: make a
//! SoftHSM2 token with a broker KEK, the database (a SQLite file, or a throwaway PostgreSQL
//! cluster), a throwaway CA; start the `broker` process over TLS; apply the policy and put
//! the secrets through the Admin API; mint a token per client. Then for each concurrency
//! measure Lease and Renew through the broker, and the raw-insert and raw-JWT baselines, one
//! at a time (never two at once: they share the CPUs). Last, fill the broker's database with
//! active leases and read its resident memory. Print the tables and verdicts.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use keyhaven_broker::auth::DevIssuer;
use secrecy::SecretString;
use testkit::pki::DevPki;
use testkit::postgres::{self, Postgres};
use testkit::softhsm::SoftHsmDir;

use crate::baseline::{self, RawDb};
use crate::broker_proc::{BrokerProcess, BrokerSetup, Memory};
use crate::broker_report::{self, MemRow, Row};
use crate::cli::{BrokerArgs, Db};
use crate::leases;
use crate::load::{Summary, Window};
use crate::token::new_token;

/// The broker's KEK label prefix (its default).
pub(crate) const KEK_LABEL_PREFIX: &str = "keyhaven-broker-";
/// How long the broker may take to become ready.
pub(crate) const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Lease + Renew pairs made before the memory reading.
const TOUCH_ROUNDS: usize = 5;

/// What one run measured.
#[derive(Debug)]
struct Outcome {
    header: String,
    rows: Vec<Row>,
    mem: Vec<MemRow>,
    flood: Vec<crate::flood::FloodRow>,
}

/// Runs the broker benchmark and prints the result on stdout (progress on stderr).
pub fn run(args: &BrokerArgs) -> anyhow::Result<()> {
    args.validate()?;
    let broker_bin = broker_path(args.broker.as_deref())?;
    let pg_bin = if args.db.contains(&Db::Postgres) {
        Some(postgres::pg_bin(args.pg_bin.as_deref())?)
    } else {
        None
    };
    let hsm = SoftHsmDir::create(&args.pkcs11_module, "keyhaven-bench-")?;
    // This process makes the tokens itself, and SoftHSM2 reads SOFTHSM2_CONF once, when the
    // module is first initialised (later, in the first `new_token`). This process has a
    // single thread at this point, so the write cannot race a reader of the environment.
    std::env::set_var("SOFTHSM2_CONF", &hsm.conf);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    let result = rt.block_on(async {
        tokio::select! {
            r = measure(args, &broker_bin, pg_bin.as_deref(), &hsm) => r,
            e = interrupted() => Err(e),
        }
    });
    // Whatever was running (broker, PostgreSQL) was stopped when `measure` was dropped.
    rt.shutdown_timeout(Duration::from_secs(2));
    drop(hsm);
    let out = result?;

    println!("{}", out.header);
    print!("{}", broker_report::table(&out.rows));
    if !out.mem.is_empty() {
        println!("\nbroker resident memory, MiB (VmRSS; peak = VmHWM):");
        print!("{}", broker_report::memory_table(&out.mem));
    }
    print!("{}", crate::flood::table(&out.flood));
    let errors = broker_report::errors(&out.rows);
    if !errors.is_empty() {
        println!("\nfailed requests:");
        for e in errors {
            println!("  {e}");
        }
    }
    println!();
    for &db in &args.db {
        let mem = out.mem.iter().find(|m| m.db == db);
        for v in broker_report::verdicts(db, &out.rows, mem) {
            println!("verdict: {v}");
        }
    }
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub(crate) async fn interrupted() -> anyhow::Error {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        },
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    anyhow::anyhow!("interrupted")
}

/// The broker binary: `given` (`--broker`), else `broker` beside this binary; it must exist.
pub(crate) fn broker_path(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let p = match given {
        Some(p) => p.to_path_buf(),
        None => testkit::process::bin_dir()?.join("broker"),
    };
    anyhow::ensure!(
        p.is_file(),
        "{} not found: build it (`cargo build --release -p keyhaven-broker -p keyhaven-bench`) \
         or pass --broker",
        p.display()
    );
    Ok(p)
}

async fn measure(
    args: &BrokerArgs,
    broker_bin: &Path,
    pg_bin: Option<&Path>,
    hsm: &SoftHsmDir,
) -> anyhow::Result<Outcome> {
    let mut rows = Vec::new();
    let mut mem = Vec::new();
    let mut db_lines = Vec::new();
    let mut flood = Vec::new();
    for &db in &args.db {
        eprintln!("== {db}");
        let (r, m, line, f) = measure_db(db, args, broker_bin, pg_bin, hsm).await?;
        rows.extend(r);
        mem.push(m);
        db_lines.push(line);
        flood.push(f);
    }

    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let per_channel = args.clients_per_channel;
    let mut header = format!(
        "keyhaven-bench broker: {cpus} CPUs; each cell {} measured after {} warm-up\n\
         broker    : {} (--dev, --rate-limit 0: every client is its own identity; \
         --auth-attempts-per-peer 0 --auth-attempts 0: every client shares one loopback \
         address), gRPC over TLS \
         (throwaway CA), SoftHSM2 KEK on a fresh token per database, {} secrets of 2 keys\n\
         {}\n\
         load      : N tokio tasks, each its own service account ({}/client-<i>) and token, \
         {per_channel} client(s) per TLS connection; Lease cycles the secrets; Renew renews \
         one lease the client took before the window (+{} s per renewal, max_ttl 12 h); every \
         answer checked\n\
         raw-insert: sqlx INSERT of one lease-shaped row (the broker's leases columns and \
         indexes, own table and database) + SELECT of it by id, N tasks on a pool the broker's \
         size (sqlite {}, postgres {}), same server\n\
         raw-jwt   : keyhaven_broker::auth::Verifier (dev issuer config and JWKS) verifying a \
         pre-minted ES256 token per task without the verdict cache (the full check every \
         time), N tasks in this process\n\
         memory    : VmRSS of the broker from /proc/<pid>/status; {} active leases INSERTed \
         straight into its leases table while it runs (namespace {}), then {TOUCH_ROUNDS} \
         Lease+Renew and a /metrics scrape, then the reading\n\
         Lease x2  : (postgres) the Lease load with the clients' connections spread over two \
         broker replicas on the same database\n\
         flood     : last, a broker with the default limits before authentication on the \
         same database (the others stopped): Lease at {} clients alone, then while {} \
         clients send forged tokens back to back\n\
         ratios    : throughput, broker / baseline; each Lease is one audit transaction \
         (authentication + lease records and the lease row, group-committed), each Renew the \
         same with its lease's update instead of the row\n",
        humantime::format_duration(args.duration),
        humantime::format_duration(args.warmup),
        broker_bin.display(),
        leases::SECRETS,
        db_lines.join("\n"),
        leases::NAMESPACE,
        leases::LEASE_TTL.as_secs(),
        baseline::SQLITE_POOL,
        baseline::POSTGRES_POOL,
        args.leases,
        crate::fill::NAMESPACE,
        crate::flood::VALID_CLIENTS,
        crate::flood::FLOODERS,
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
        mem,
        flood,
    })
}

/// One database: set up, measure every concurrency, read memory, stop. Returns the rows,
/// the memory row and a header line describing the database.
async fn measure_db(
    db: Db,
    args: &BrokerArgs,
    broker_bin: &Path,
    pg_bin: Option<&Path>,
    hsm: &SoftHsmDir,
) -> anyhow::Result<(Vec<Row>, MemRow, String, crate::flood::FloodRow)> {
    let window = Window {
        warmup: args.warmup,
        measure: args.duration,
    };
    let dir = hsm.dir().join(db.to_string());
    std::fs::create_dir(&dir).with_context(|| format!("create {}", dir.display()))?;

    // Blocking PKCS#11 calls, a few hundred milliseconds, before any load.
    let token = tokio::task::block_in_place(|| {
        new_token(hsm, &db.to_string(), dir.join("user.pin"), KEK_LABEL_PREFIX)
    })?;
    eprintln!("token {} with KEK {}", token.label, token.kek.label);

    // Declared before the broker, so dropped after it: the broker stops first.
    let mut pg: Option<Postgres> = None;
    let (broker_url, raw, line) = match db {
        Db::Sqlite => {
            let file = dir.join("broker.db");
            let raw = RawDb::sqlite(&dir.join("baseline.db")).await?;
            let line = format!(
                "sqlite    : broker file {} (WAL, synchronous=FULL, pool {}), baseline in \
                 baseline.db beside it, same settings",
                file.display(),
                raw.pool_size()
            );
            (format!("sqlite://{}", file.display()), raw, line)
        }
        Db::Postgres => {
            let bin = pg_bin.context("no PostgreSQL binaries")?;
            eprintln!(
                "starting a throwaway PostgreSQL cluster from {}",
                bin.display()
            );
            let cluster = pg.insert(tokio::task::block_in_place(
                || -> testkit::Result<Postgres> {
                    let cluster = Postgres::start_with(bin, &[])?;
                    cluster.create_database("keyhaven_broker")?;
                    cluster.create_database("bench_baseline")?;
                    Ok(cluster)
                },
            )?);
            let raw = RawDb::postgres(&cluster.database_url("bench_baseline")).await?;
            let line = format!(
                "postgres  : throwaway PostgreSQL {} cluster (default durable settings: fsync, \
                 synchronous_commit on) over TCP loopback; broker database keyhaven_broker \
                 (pool {}), baseline database bench_baseline",
                cluster.version(),
                raw.pool_size()
            );
            (cluster.database_url("keyhaven_broker"), raw, line)
        }
    };
    debug_assert_eq!(raw.kind(), db);

    let pki = DevPki::write(&dir)?;
    let dev_key = dir.join("dev-issuer.pem");
    let issuer = DevIssuer::load_or_generate(&dev_key).context("make the dev-issuer key")?;
    let bootstrap = testkit::random::pin()?;
    let bootstrap_file = dir.join("bootstrap");
    testkit::write_private(&bootstrap_file, &bootstrap)?;
    let bootstrap = SecretString::from(bootstrap.as_str());

    let setup = |log: &str, extra: &[&str]| BrokerSetup {
        bin: broker_bin,
        softhsm_conf: &hsm.conf,
        module: &hsm.module,
        token: &token,
        database_url: &broker_url,
        pki: &pki,
        dev_key: &dev_key,
        bootstrap_file: &bootstrap_file,
        log: dir.join(log),
        extra: extra.iter().map(|s| s.to_string()).collect(),
    };
    // All clients come from one loopback address: the limits before authentication would
    // measure themselves. The flood row, last, runs on a broker with them.
    let no_pre_auth_limits = ["--auth-attempts-per-peer", "0", "--auth-attempts", "0"];
    let mut broker = BrokerProcess::spawn(&setup("broker.log", &no_pre_auth_limits))?;
    broker.wait_ready(READY_TIMEOUT).await?;
    let started = Memory::of(broker.pid())?;
    eprintln!(
        "broker ready (pid {}, {:.1} MiB resident)",
        broker.pid(),
        started.rss_kib as f64 / 1024.0
    );

    let ep = leases::endpoint(&broker.endpoint(), &pki.ca)?;
    // PostgreSQL: a second replica on the same database, for the two-replica Lease row. It
    // idles (a heartbeat, the policy poll) while the other cells run.
    let mut second = match db {
        Db::Postgres => {
            let mut b = BrokerProcess::spawn(&setup("broker-2.log", &no_pre_auth_limits))?;
            b.wait_ready(READY_TIMEOUT).await?;
            eprintln!("second replica ready (pid {})", b.pid());
            Some(b)
        }
        Db::Sqlite => None,
    };
    let both = match &second {
        Some(b) => vec![ep.clone(), leases::endpoint(&b.endpoint(), &pki.ca)?],
        None => Vec::new(),
    };
    let secrets = Arc::new(leases::secrets()?);
    leases::setup(&ep, &bootstrap, &secrets)
        .await
        .context("apply the policy and put the secrets")?;
    let max_clients = args.clients.iter().copied().max().unwrap_or(1);
    let ids = leases::mint_clients(&issuer, max_clients)?;
    let verifier = baseline::verifier(&issuer).await?;
    let per_channel = args.clients_per_channel;

    let mut rows = Vec::new();
    for &n in &args.clients {
        let one = std::slice::from_ref(&ep);
        let lease = leases::lease(one, &ids, n, per_channel, &secrets, window).await?;
        progress(db, n, "Lease", &lease);
        broker.ensure_running()?;
        let lease_replicas = match &mut second {
            Some(b) => {
                let two = leases::lease(&both, &ids, n, per_channel, &secrets, window).await?;
                progress(db, n, "Lease x2", &two);
                b.ensure_running()?;
                Some(two)
            }
            None => None,
        };
        let renew = leases::renew(one, &ids, n, per_channel, &secrets, window).await?;
        progress(db, n, "Renew", &renew);
        broker.ensure_running()?;
        let insert = baseline::insert(&raw, &ids, n, window).await?;
        progress(db, n, "raw-insert", &insert);
        let jwt = baseline::jwt(&verifier, &ids, n, window).await?;
        progress(db, n, "raw-jwt", &jwt);
        rows.push(Row {
            db,
            clients: n,
            lease,
            lease_replicas,
            renew,
            insert,
            jwt,
        });
    }
    raw.close().await;
    let loaded = Memory::of(broker.pid())?;

    let fill = args.leases > 0;
    if fill {
        let took = crate::fill::leases(db, &broker_url, args.leases)
            .await
            .context("insert leases into the broker's database")?;
        eprintln!(
            "inserted {} active leases into the broker's database in {:.1} s",
            args.leases,
            took.as_secs_f64()
        );
        leases::touch(&ep, &ids[0], &secrets, TOUCH_ROUNDS)
            .await
            .context("Lease and Renew after the fill")?;
    }
    let active = active_leases(&broker).await?;
    let filled = if fill {
        Some(Memory::of(broker.pid())?)
    } else {
        None
    };
    broker.ensure_running()?;
    let mem = MemRow {
        db,
        started,
        loaded,
        filled,
        leases: args.leases,
        active,
    };
    drop(second);
    drop(broker);

    let mut guarded = BrokerProcess::spawn(&setup("broker-flood.log", &[]))?;
    guarded.wait_ready(READY_TIMEOUT).await?;
    let gep = leases::endpoint(&guarded.endpoint(), &pki.ca)?;
    let flood = crate::flood::measure(db, &gep, &ids, &issuer, per_channel, &secrets, window)
        .await
        .context("the flood row")?;
    eprintln!(
        "{db}: Lease at {} clients {:.0}/s alone, {:.0}/s under a flood of {:.0} attempts/s",
        crate::flood::VALID_CLIENTS,
        flood.alone.throughput,
        flood.flooded.throughput,
        flood.attempts_per_s
    );
    guarded.ensure_running()?;
    drop(guarded);
    drop(pg);
    Ok((rows, mem, line, flood))
}

/// `keyhaven_broker_active_leases` from the broker's `/metrics` (the scrape counts them in
/// the database).
async fn active_leases(broker: &BrokerProcess) -> anyhow::Result<Option<i64>> {
    let (code, body) = broker.http_get("/metrics").await?;
    anyhow::ensure!(code == 200, "/metrics answered {code}");
    Ok(metric_value(&body, "keyhaven_broker_active_leases"))
}

/// The value of an unlabelled sample `name` in Prometheus text format.
fn metric_value(text: &str, name: &str) -> Option<i64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as i64)
}

pub(crate) fn progress(db: Db, clients: usize, target: &str, s: &Summary) {
    eprintln!(
        "  {db:<8} {clients:>3} clients  {target:<10} {:>8.0} ops/s  p50 {:>9.1} µs  p99 {:>9.1} µs{}",
        s.throughput,
        s.p50.as_secs_f64() * 1e6,
        s.p99.as_secs_f64() * 1e6,
        if s.errors > 0 {
            format!("  {} errors", s.errors)
        } else {
            String::new()
        }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_an_unlabelled_gauge() {
        let text = "# HELP keyhaven_broker_active_leases Active leases.\n\
                    # TYPE keyhaven_broker_active_leases gauge\n\
                    keyhaven_broker_active_leases_total 3\n\
                    keyhaven_broker_active_leases 100123\n";
        assert_eq!(
            metric_value(text, "keyhaven_broker_active_leases"),
            Some(100_123)
        );
        assert_eq!(metric_value(text, "keyhaven_broker_missing"), None);
    }
}
