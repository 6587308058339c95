//! `keyhaven-bench rewrap`: the broker's KEK rotation. For each database, one after the other:
//! a SoftHSM2 token with a broker KEK; `--deks` secret versions sealed under it (each its own
//! DEK, wrapped in the HSM by the broker's own code) and written straight into the broker's
//! database; the raw-HSM baseline on the same token; then a real `broker` process is started,
//! its KEK rotated through the Admin API, and the background re-wrap timed until no DEK is
//! left under the old KEK. Prints the re-wrap rate beside the raw rate and the verdict.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use keyhaven_broker::crypto::{dek_aad, DekCache, Envelope, SecretData};
use keyhaven_broker::rotation::REWRAP_HSM_CONCURRENCY;
use keyhaven_broker::store::{Pool, Store};
use keyhaven_hsm::{Config, KekId, Keystore, PinSource, TokenSelector};
use keyhaven_proto::broker::v1::admin_client::AdminClient;
use keyhaven_proto::broker::v1::{KeyStatusRequest, RotateKeyRequest};
use sqlx::QueryBuilder;
use testkit::pki::DevPki;
use testkit::postgres::{self, Postgres};
use testkit::softhsm::SoftHsmDir;
use tonic::metadata::{Ascii, MetadataValue};

use crate::broker_proc::{BrokerProcess, BrokerSetup};
use crate::cli::{Db, RewrapArgs};
use crate::load::{self, Summary, Window};
use crate::token::new_token;

const KEK_LABEL_PREFIX: &str = "keyhaven-broker-";
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest the re-wrap may take before the run gives up.
const REWRAP_TIMEOUT: Duration = Duration::from_secs(1800);
/// Rows per INSERT while seeding (8 parameters each).
const SEED_BATCH: usize = 500;
/// The target: re-wrap rate over the raw HSM rate at the same number of HSM calls in flight.
const TARGET: f64 = 0.5;

/// One database's figures.
#[derive(Debug)]
struct Row {
    db: Db,
    deks: usize,
    /// DEKs moved / time from the first batch's start to the last batch's commit (the
    /// broker's own batch log).
    job_rate: f64,
    job_time: Duration,
    /// DEKs / time from the RotateKey answer to `KeyStatus` showing none left.
    end_to_end_rate: f64,
    replicas: i64,
    raw_1: Summary,
    raw_c: Summary,
}

/// Runs the re-wrap benchmark and prints the result on stdout (progress on stderr).
pub fn run(args: &RewrapArgs) -> anyhow::Result<()> {
    args.validate()?;
    let broker_bin = crate::broker::broker_path(args.broker.as_deref())?;
    let pg_bin = if args.db.contains(&Db::Postgres) {
        Some(postgres::pg_bin(args.pg_bin.as_deref())?)
    } else {
        None
    };
    let hsm = SoftHsmDir::create(&args.pkcs11_module, "keyhaven-bench-")?;
    // SoftHSM2 reads SOFTHSM2_CONF once, when the module is first initialised; this process
    // has a single thread here, so the write races no reader.
    std::env::set_var("SOFTHSM2_CONF", &hsm.conf);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    let result = rt.block_on(async {
        let mut rows = Vec::new();
        for &db in &args.db {
            eprintln!("== {db}");
            rows.push(measure_db(db, args, &broker_bin, pg_bin.as_deref(), &hsm).await?);
        }
        anyhow::Ok(rows)
    });
    rt.shutdown_timeout(Duration::from_secs(2));
    drop(hsm);
    let rows = result?;

    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "keyhaven-bench rewrap: {cpus} CPUs; raw cells {} measured after {} warm-up\n\
         re-wrap : `broker` {} (one replica, --rewrap-batch-size {}, --rewrap-pause 0s, \
         --kek-refresh-interval 100ms), {} DEKs sealed under the first KEK and stored \
         before the start; RotateKey through the Admin API, then the background job moves them \
         all; job rate = DEKs / (first batch start .. last batch commit) from the broker's \
         batch log; end-to-end = DEKs / (RotateKey answer .. KeyStatus shows 0 left)\n\
         raw-HSM : keyhaven_hsm::BlockingKeystore on the same token (pool 8, as the broker's): \
         C_Decrypt of a stored wrapped DEK (its real AAD) + C_Encrypt of the 32 bytes back, \
         per operation; at 1 thread and at {c} threads (the broker's re-wrap keeps {c} HSM \
         calls in flight)\n\
         ratio   : job rate / raw rate at {c} threads (target >= {TARGET}x)",
        humantime::format_duration(args.duration),
        humantime::format_duration(args.warmup),
        broker_bin.display(),
        args.batch_size,
        args.deks,
        c = REWRAP_HSM_CONCURRENCY,
    );
    if cfg!(debug_assertions) || broker_bin.components().any(|c| c.as_os_str() == "debug") {
        println!("WARNING: a debug build is measured; build with --release");
    }
    println!();
    println!(
        "{:<9} {:>7} {:>9} {:>13} {:>14} {:>13} {:>13} {:>7}",
        "db",
        "deks",
        "job s",
        "job DEKs/s",
        "end-to-end/s",
        "raw 1 thr/s",
        format!("raw {} thr/s", REWRAP_HSM_CONCURRENCY),
        "ratio"
    );
    for r in &rows {
        println!(
            "{:<9} {:>7} {:>9.2} {:>13.0} {:>14.0} {:>13.0} {:>13.0} {:>6.2}x",
            r.db.to_string(),
            r.deks,
            r.job_time.as_secs_f64(),
            r.job_rate,
            r.end_to_end_rate,
            r.raw_1.throughput,
            r.raw_c.throughput,
            r.job_rate / r.raw_c.throughput.max(1e-9),
        );
    }
    println!();
    for r in &rows {
        let ratio = r.job_rate / r.raw_c.throughput.max(1e-9);
        let failed = r.raw_1.errors + r.raw_c.errors > 0 || r.replicas != 1;
        println!(
            "verdict: {}: re-wrap rate >= {TARGET}x the raw HSM unwrap+wrap rate: {:.0} vs {:.0} \
             DEKs/s = {ratio:.2}x: {}",
            r.db,
            r.job_rate,
            r.raw_c.throughput,
            if ratio >= TARGET && !failed {
                "PASS"
            } else {
                "MISS"
            }
        );
    }
    Ok(())
}

/// A wrapped DEK as stored, for the raw baseline.
struct Stored {
    aad: Vec<u8>,
    iv: Vec<u8>,
    ct: Vec<u8>,
}

async fn measure_db(
    db: Db,
    args: &RewrapArgs,
    broker_bin: &Path,
    pg_bin: Option<&Path>,
    hsm: &SoftHsmDir,
) -> anyhow::Result<Row> {
    let dir = hsm.dir().join(format!("rewrap-{db}"));
    std::fs::create_dir(&dir).with_context(|| format!("create {}", dir.display()))?;
    let token = tokio::task::block_in_place(|| {
        // Token labels are at most 32 characters.
        let name = match db {
            Db::Sqlite => "rw-sql",
            Db::Postgres => "rw-pg",
        };
        new_token(hsm, name, dir.join("user.pin"), KEK_LABEL_PREFIX)
    })?;
    let mut pg: Option<Postgres> = None;
    let url = match db {
        Db::Sqlite => format!("sqlite://{}", dir.join("broker.db").display()),
        Db::Postgres => {
            let bin = pg_bin.context("no PostgreSQL binaries")?;
            let cluster = pg.insert(tokio::task::block_in_place(
                || -> testkit::Result<Postgres> {
                    let cluster = Postgres::start_with(bin, &[])?;
                    cluster.create_database("keyhaven_broker")?;
                    Ok(cluster)
                },
            )?);
            cluster.database_url("keyhaven_broker")
        }
    };

    // Seal the DEKs with the broker's own envelope code and store them.
    let mut cfg = Config::new(
        &hsm.module,
        TokenSelector::Label(token.label.clone()),
        PinSource::File(token.pin_file.clone()),
    );
    cfg.kek_label_prefix = KEK_LABEL_PREFIX.into();
    cfg.pool_size = Config::DEFAULT_POOL_SIZE;
    let ks = Keystore::open(cfg)
        .await
        .context("open the bench keystore")?;
    let envelope = Envelope::new(ks.clone(), DekCache::new(0, Duration::from_secs(1)));
    let store = Store::connect(&url)
        .await
        .context("open the broker database")?;
    let kek = token.kek.id;
    let t0 = Instant::now();
    let stored = seed(&store, &envelope, kek, args.deks).await?;
    eprintln!(
        "sealed and stored {} DEKs in {:.1} s",
        args.deks,
        t0.elapsed().as_secs_f64()
    );

    // The raw baseline, before the broker runs (they would share the CPUs).
    let window = Window {
        warmup: args.warmup,
        measure: args.duration,
    };
    let raw = |threads: usize| {
        let blocking = ks.blocking();
        load::drive_threads(threads, window, |t, seq| {
            let s = &stored[((seq as usize) * threads + t) % stored.len()];
            let dek = blocking
                .decrypt(&kek, &s.aad, &s.iv, &s.ct)
                .map_err(|e| e.to_string())?;
            let w = blocking
                .encrypt(&kek, &s.aad, &dek)
                .map_err(|e| e.to_string())?;
            if w.ciphertext.len() != s.ct.len() {
                return Err("wrap returned a ciphertext of the wrong length".into());
            }
            Ok(())
        })
    };
    let raw_1 = tokio::task::block_in_place(|| raw(1))?;
    eprintln!(
        "  raw-HSM 1 thread   {:>8.0} unwrap+wrap/s",
        raw_1.throughput
    );
    let raw_c = tokio::task::block_in_place(|| raw(REWRAP_HSM_CONCURRENCY))?;
    eprintln!(
        "  raw-HSM {} threads  {:>8.0} unwrap+wrap/s",
        REWRAP_HSM_CONCURRENCY, raw_c.throughput
    );

    let pki = DevPki::write(&dir)?;
    let dev_key = dir.join("dev-issuer.pem");
    keyhaven_broker::auth::DevIssuer::load_or_generate(&dev_key).context("dev-issuer key")?;
    let bootstrap = testkit::random::pin()?;
    let bootstrap_file = dir.join("bootstrap");
    testkit::write_private(&bootstrap_file, &bootstrap)?;
    let mut broker = BrokerProcess::spawn(&BrokerSetup {
        bin: broker_bin,
        softhsm_conf: &hsm.conf,
        module: &hsm.module,
        token: &token,
        database_url: &url,
        pki: &pki,
        dev_key: &dev_key,
        bootstrap_file: &bootstrap_file,
        log: dir.join("broker.log"),
        extra: vec![
            "--kek-refresh-interval".into(),
            "100ms".into(),
            "--rewrap-batch-size".into(),
            args.batch_size.to_string(),
        ],
    })?;
    broker.wait_ready(READY_TIMEOUT).await?;
    let ep = crate::leases::endpoint(&broker.endpoint(), &pki.ca)?;
    let mut admin = AdminClient::new(ep.connect().await.context("connect to the broker")?);
    let mut auth: MetadataValue<Ascii> = format!("Bearer {}", bootstrap.as_str())
        .parse()
        .context("bootstrap credential")?;
    auth.set_sensitive(true);
    fn req<T>(m: T, auth: &MetadataValue<Ascii>) -> tonic::Request<T> {
        let mut r = tonic::Request::new(m);
        r.metadata_mut().insert("authorization", auth.clone());
        r
    }
    let rotated = admin
        .rotate_key(req(RotateKeyRequest {}, &auth))
        .await
        .map_err(|s| anyhow::anyhow!("RotateKey: {}", s.message()))?
        .into_inner();
    let started = Instant::now();
    eprintln!("rotated to KEK {}; re-wrapping", rotated.kek_id);
    loop {
        let st = admin
            .key_status(req(KeyStatusRequest {}, &auth))
            .await
            .map_err(|s| anyhow::anyhow!("KeyStatus: {}", s.message()))?
            .into_inner();
        if st.rewrap.is_some_and(|w| w.remaining == 0) {
            break;
        }
        broker.ensure_running()?;
        anyhow::ensure!(
            started.elapsed() < REWRAP_TIMEOUT,
            "the re-wrap did not finish within {REWRAP_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let end_to_end = started.elapsed();
    drop(broker);

    // The broker's own record of its batches, and a check that every DEK moved.
    let act = store.rewrap_activity(0).await?;
    let per_kek = store.deks_per_kek().await?;
    anyhow::ensure!(
        per_kek == vec![(rotated.kek_id.clone(), args.deks as i64)] && act.rows == args.deks as i64,
        "after the re-wrap: {per_kek:?}, {} moved",
        act.rows
    );
    let job_ms = (act.last_ms - act.first_start_ms).max(1);
    let job_rate = act.rows as f64 * 1000.0 / job_ms as f64;
    eprintln!(
        "  re-wrap            {job_rate:>8.0} DEKs/s ({} in {:.2} s; end to end {:.2} s)",
        act.rows,
        job_ms as f64 / 1000.0,
        end_to_end.as_secs_f64()
    );
    drop(store);
    drop(pg);
    Ok(Row {
        db,
        deks: args.deks,
        job_rate,
        job_time: Duration::from_millis(job_ms as u64),
        end_to_end_rate: args.deks as f64 / end_to_end.as_secs_f64(),
        replicas: act.replicas,
        raw_1,
        raw_c,
    })
}

/// Seals version 1 of `bench/rewrap/<i>` for every `i` under `kek` and inserts the rows.
async fn seed(
    store: &Store,
    envelope: &Envelope,
    kek: KekId,
    n: usize,
) -> anyhow::Result<Vec<Stored>> {
    let mut rows = Vec::with_capacity(n);
    let mut stored = Vec::with_capacity(n);
    let data = SecretData::from_pairs([("password", testkit::random::pin()?.to_string())]);
    for i in 0..n {
        let path = format!("bench/rewrap/{i:08}");
        let s = envelope.seal(kek, &path, 1, &data).await?;
        stored.push(Stored {
            aad: dek_aad(&path, 1),
            iv: s.dek.iv.clone(),
            ct: s.dek.ciphertext.clone(),
        });
        rows.push((path, s));
    }
    const HEAD: &str = "INSERT INTO secret_versions \
        (path, version, created_ms, kek_id, dek_iv, dek_ct, nonce, ciphertext) ";
    let now = keyhaven_broker::audit::now_ms();
    let kek = kek.to_string();
    macro_rules! insert {
        ($pool:expr, $db:ty) => {{
            let mut tx = $pool.begin().await?;
            for chunk in rows.chunks(SEED_BATCH) {
                let mut q = QueryBuilder::<$db>::new(HEAD);
                q.push_values(chunk, |mut b, (path, s)| {
                    b.push_bind(path.clone())
                        .push_bind(1_i64)
                        .push_bind(now)
                        .push_bind(kek.clone())
                        .push_bind(s.dek.iv.clone())
                        .push_bind(s.dek.ciphertext.clone())
                        .push_bind(s.nonce.clone())
                        .push_bind(s.ciphertext.clone());
                });
                q.build()
                    .execute(&mut *tx)
                    .await
                    .context("insert DEK rows")?;
            }
            tx.commit().await?;
        }};
    }
    match store.pool() {
        Pool::Sqlite(p) => insert!(p, sqlx::Sqlite),
        Pool::Postgres(p) => insert!(p, sqlx::Postgres),
    }
    Ok(stored)
}
