//! `broker` binary: parses flags and hands over to `keyhaven_broker::server`.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

/// Keyhaven broker: short-lived, least-privilege secret leases for Kubernetes workloads.
#[derive(Debug, Parser)]
#[command(name = "broker", version, about)]
struct Cli {
    #[command(flatten)]
    serve: keyhaven_broker::server::ServeArgs,
    /// Log format: text or json.
    #[arg(long, env = "KEYHAVEN_LOG_FORMAT", default_value = "text")]
    log_format: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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
