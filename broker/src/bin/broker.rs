//! `broker` binary: parses flags and hands over to `keyhaven_broker::server`.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Keyhaven broker: short-lived, least-privilege secret leases for Kubernetes workloads.
#[derive(Debug, Parser)]
#[command(
    name = "broker",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    /// Without a subcommand, the broker serves.
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: keyhaven_broker::server::ServeArgs,
    /// Log format: text or json.
    #[arg(long, env = "KEYHAVEN_LOG_FORMAT", default_value = "text")]
    log_format: String,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Exit 0 if the broker on this host is ready (its /readyz answers 200), else 1 with the
    /// reason: the healthcheck of a container that has no shell and no HTTP client.
    Probe {
        /// The broker's --metrics-addr (an unspecified address is dialled on loopback).
        #[arg(long, env = "KEYHAVEN_METRICS_ADDR", default_value = "127.0.0.1:9465")]
        metrics_addr: SocketAddr,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Probe { metrics_addr }) = cli.command {
        return keyhaven_process::probe::run("broker", metrics_addr);
    }
    let format = if cli.log_format == "json" {
        keyhaven_process::LogFormat::Json
    } else {
        keyhaven_process::LogFormat::Text
    };
    keyhaven_process::init_logs(format, "info");
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("broker: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(keyhaven_broker::server::serve(
        cli.serve,
        keyhaven_process::shutdown_signal(),
    ));
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("broker: {e}");
            ExitCode::FAILURE
        }
    }
}
