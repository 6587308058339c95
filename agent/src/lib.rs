//! `broker-agent`: the sidecar in each pod that leases secrets from the broker, renews
//! them, and writes the values atomically into a shared in-memory volume. It uses only the
//! wire contracts (`keyhaven-proto`): no HSM, no database. It runs in every pod, so it is
//! small: one thread, one connection, a task per secret.
#![forbid(unsafe_code)]

pub mod agent;
pub mod client;
pub mod config;
pub mod files;
pub mod fuzz_targets;
pub mod http;
pub mod metrics;
pub mod template;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::config::{Cli, LogFormat};

/// Exit code for a configuration error.
pub const EXIT_USAGE: u8 = 2;

fn init_logs(format: LogFormat) {
    let format = match format {
        LogFormat::Json => keyhaven_process::LogFormat::Json,
        LogFormat::Text => keyhaven_process::LogFormat::Text,
    };
    keyhaven_process::init_logs(format, "info");
}

/// Runs the agent as the command line says.
pub fn main_with(cli: Cli) -> ExitCode {
    init_logs(cli.log_format);
    let specs = match config::load(&cli) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("broker-agent: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("broker-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(run(cli, specs))
}

async fn run(cli: Cli, specs: Vec<config::SecretSpec>) -> ExitCode {
    if let Err(e) = std::fs::create_dir_all(&cli.output_dir) {
        eprintln!(
            "broker-agent: cannot create --output-dir {}: {e}",
            cli.output_dir.display()
        );
        return ExitCode::FAILURE;
    }
    files::clean_temporaries(&cli.output_dir);
    let ctx = match agent::context(&cli, specs) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("broker-agent: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Some(addr) = cli.metrics_addr {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => {
                let shared = ctx.shared.clone();
                tokio::spawn(http::serve(l, shared));
            }
            Err(e) => {
                eprintln!("broker-agent: cannot listen on --metrics-addr {addr}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let n = ctx.shared.specs.len();
    if cli.once {
        let problems = agent::run_once(&ctx).await;
        if problems.is_empty() {
            tracing::info!(files = n, "every secret file is written (--once)");
            return ExitCode::SUCCESS;
        }
        for p in &problems {
            eprintln!("broker-agent: not written: {p}");
        }
        eprintln!(
            "broker-agent: {} of {n} secret files could not be written",
            problems.len()
        );
        return ExitCode::FAILURE;
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let tasks: Vec<_> = (0..n)
        .map(|i| tokio::spawn(agent::run_secret(ctx.clone(), i, stop_rx.clone())))
        .collect();
    tracing::info!(secrets = n, broker = %cli.broker_addr, "agent started");
    keyhaven_process::shutdown_signal().await;
    tracing::info!("stopping on SIGTERM or SIGINT");
    let _ = stop_tx.send(true);
    for t in tasks {
        // A task in the middle of a call finishes it (bounded by --timeout).
        if tokio::time::timeout(cli.timeout, t).await.is_err() {
            tracing::warn!("a lease task did not stop in time");
        }
    }
    if cli.keep_leases_on_exit {
        tracing::info!("leaving the leases to expire (--keep-leases-on-exit)");
        return ExitCode::SUCCESS;
    }
    revoke_all(&ctx).await;
    ExitCode::SUCCESS
}

async fn revoke_all(ctx: &Arc<agent::Ctx>) {
    let ids = ctx.shared.held_leases();
    let revokes: Vec<_> = ids
        .into_iter()
        .map(|id| {
            let broker = ctx.broker.clone();
            tokio::spawn(async move {
                let r = broker.revoke(&id).await;
                (id, r)
            })
        })
        .collect();
    let (mut ok, mut failed) = (0, 0);
    for t in revokes {
        match tokio::time::timeout(Duration::from_secs(15), t).await {
            Ok(Ok((_, Ok(())))) => ok += 1,
            Ok(Ok((id, Err(s)))) => {
                failed += 1;
                ctx.shared.metrics.failure("revoke");
                tracing::warn!(lease_id = %id, error = %client::describe(&s), "could not revoke (it expires on its own)");
            }
            _ => failed += 1,
        }
    }
    tracing::info!(revoked = ok, failed, "leases revoked on exit");
}
