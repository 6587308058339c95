//! `keyhaven-bench kms`: the whole run. Make a token and KEK, start the plugin, prepare
//! ciphertexts, then for each concurrency measure Encrypt and Decrypt on the plugin, the
//! raw HSM and the echo service one after the other (never two at once: they share the
//! CPUs), and print the table and verdicts.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::cli::KmsArgs;
use crate::echo::EchoProcess;
use crate::load::{Summary, Window};
use crate::plugin::PluginProcess;
use crate::raw::{self, RawHsm};
use crate::report::{self, Op, Row};
use crate::token::BenchToken;
use crate::workload::{self, SEED_LEN};

/// Distinct seeds (and so ciphertexts) the clients cycle through.
const SEEDS: usize = 64;
/// How long the plugin may take to become healthy.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the KMS benchmark and prints the result on stdout (progress on stderr).
pub fn run(args: &KmsArgs) -> anyhow::Result<()> {
    args.validate()?;
    let plugin_bin = plugin_path(args)?;
    eprintln!(
        "creating a SoftHSM2 token and KEK with {}",
        plugin_bin.display()
    );
    let token = BenchToken::create(&plugin_bin, &args.pkcs11_module)?;
    // SoftHSM2 reads SOFTHSM2_CONF once, when this process first initialises the module
    // (the raw baseline, later). This process has a single thread at this point, so the
    // write cannot race a reader of the environment.
    std::env::set_var("SOFTHSM2_CONF", token.conf());

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    let result = rt.block_on(async {
        tokio::select! {
            r = measure(args, &plugin_bin, &token) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        }
    });
    // Raw-baseline threads finish within one window; let them before the token goes.
    rt.shutdown_timeout(args.duration + args.warmup + Duration::from_secs(2));
    drop(token);
    let (header, rows) = result?;

    println!("{header}");
    print!("{}", report::table(&rows));
    let errors = report::errors(&rows);
    if !errors.is_empty() {
        println!("\nfailed requests:");
        for e in errors {
            println!("  {e}");
        }
    }
    println!();
    for v in report::verdicts(&rows) {
        println!("verdict: {v}");
    }
    if let Some(note) = report::shared_cpu_bound(&rows) {
        println!("note: {note}");
    }
    Ok(())
}

fn plugin_path(args: &KmsArgs) -> anyhow::Result<PathBuf> {
    plugin_bin(args.plugin.as_deref())
}

/// `--plugin`, or `kms-plugin` beside this binary; checked to exist.
pub fn plugin_bin(given: Option<&std::path::Path>) -> anyhow::Result<PathBuf> {
    let p = match given {
        Some(p) => p.to_path_buf(),
        None => testkit::process::bin_dir()?.join("kms-plugin"),
    };
    anyhow::ensure!(
        p.is_file(),
        "{} not found: build it (`cargo build --release -p kms-plugin -p keyhaven-bench`) \
         or pass --plugin",
        p.display()
    );
    Ok(p)
}

/// Everything after the token exists: returns the header text and the rows.
async fn measure(
    args: &KmsArgs,
    plugin_bin: &Path,
    token: &BenchToken,
) -> anyhow::Result<(String, Vec<Row>)> {
    let window = Window {
        warmup: args.warmup,
        measure: args.duration,
    };
    let per_channel = args.clients_per_channel;

    let mut plugin = PluginProcess::spawn(
        token,
        plugin_bin,
        args.session_pool_size,
        token.dir().join("kms.sock"),
    )?;
    let key_id = plugin.wait_ready(READY_TIMEOUT).await?;
    eprintln!("kms-plugin is healthy; key_id {key_id}");

    let seeds = Arc::new(workload::seeds(SEEDS)?);
    let plugin_envs = {
        let mut c = crate::grpc::client(plugin.socket()).await?;
        Arc::new(
            workload::seal(&mut c, &seeds)
                .await
                .context("prepare ciphertexts with the plugin")?,
        )
    };
    let ct_len = plugin_envs.first().map_or(0, |e| e.sealed.ciphertext.len());

    let raw_cts = Arc::new(raw::split(&plugin_envs)?);
    let raw = {
        let cfg = token.hsm_config(args.session_pool_size);
        let key_id = key_id.clone();
        let cts = raw_cts.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<RawHsm> {
            let raw = RawHsm::open(cfg, &key_id)?;
            raw.check(&cts)?;
            Ok(raw)
        })
        .await??
    };
    let raw = Arc::new(raw);

    let echo_socket = token.dir().join("echo.sock");
    let _echo = EchoProcess::start(&echo_socket, &key_id)?;
    let echo_envs = {
        let mut c = crate::grpc::client(&echo_socket).await?;
        Arc::new(
            workload::seal(&mut c, &seeds)
                .await
                .context("prepare echo ciphertexts")?,
        )
    };
    anyhow::ensure!(
        echo_envs.first().map(|e| e.sealed.ciphertext.len()) == Some(ct_len),
        "echo ciphertexts are not the plugin's size"
    );

    let key_id: Arc<str> = key_id.into();
    let mut rows = Vec::new();
    for &n in &args.clients {
        for op in [Op::Encrypt, Op::Decrypt] {
            let plugin_s = match op {
                Op::Encrypt => {
                    workload::encrypt(plugin.socket(), n, per_channel, &seeds, &key_id, window)
                        .await?
                }
                Op::Decrypt => {
                    workload::decrypt(plugin.socket(), n, per_channel, &plugin_envs, window).await?
                }
            };
            progress(op, n, "plugin", &plugin_s);
            plugin.ensure_running()?;

            let raw_s = {
                let (raw, seeds, cts) = (raw.clone(), seeds.clone(), raw_cts.clone());
                tokio::task::spawn_blocking(move || match op {
                    Op::Encrypt => raw.encrypt(n, window, &seeds),
                    Op::Decrypt => raw.decrypt(n, window, &cts),
                })
                .await??
            };
            progress(op, n, "raw-HSM", &raw_s);

            let echo_s = match op {
                Op::Encrypt => {
                    workload::encrypt(&echo_socket, n, per_channel, &seeds, &key_id, window).await?
                }
                Op::Decrypt => {
                    workload::decrypt(&echo_socket, n, per_channel, &echo_envs, window).await?
                }
            };
            progress(op, n, "echo", &echo_s);

            rows.push(Row {
                op,
                clients: n,
                plugin: plugin_s,
                raw: raw_s,
                echo: echo_s,
            });
        }
    }
    plugin.ensure_running()?;

    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut header = format!(
        "keyhaven-bench kms: {cpus} CPUs; each cell {} measured after {} warm-up\n\
         plugin : {} serve (session pool {}), key_id {key_id}\n\
         raw-HSM: keyhaven_hsm::BlockingKeystore in this process, N OS threads, same token, KEK and AAD, \
         session pool {} (= the plugin's)\n\
         echo   : bare tonic KeyManagementService in its own process (like the plugin), same client code and message sizes\n\
         load   : N tokio tasks, {per_channel} per gRPC channel; Encrypt {SEED_LEN}-byte seed -> \
         {ct_len}-byte ciphertext, Decrypt back; {SEEDS} distinct seeds\n\
         ratios : throughput, plugin / baseline (min = the slower baseline)\n",
        humantime::format_duration(args.duration),
        humantime::format_duration(args.warmup),
        plugin_bin.display(),
        args.session_pool_size,
        raw.pool_size(),
    );
    if cfg!(debug_assertions) {
        header.push_str("WARNING: keyhaven-bench is a debug build; build with --release\n");
    }
    if plugin_bin.components().any(|c| c.as_os_str() == "debug") {
        header.push_str("WARNING: the plugin looks like a debug build; use target/release\n");
    }
    Ok((header, rows))
}

fn progress(op: Op, clients: usize, target: &str, s: &Summary) {
    eprintln!(
        "  {op:<7} {clients:>3} clients  {target:<7} {:>9.0} ops/s  p50 {:>8.1} µs  p99 {:>8.1} µs{}",
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
