//! Command line. Every flag also reads an environment variable, like the other Keyhaven
//! binaries.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// Keyhaven load generator; baselines are measured in the same run.
#[derive(Debug, Parser)]
#[command(name = "keyhaven-bench", version, about)]
pub struct Cli {
    /// What to benchmark.
    #[command(subcommand)]
    pub command: Command,
}

/// Benchmarks.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// kms-plugin Encrypt/Decrypt against a raw-HSM and a bare-gRPC (echo) baseline.
    Kms(KmsArgs),
}

/// `keyhaven-bench kms`.
#[derive(Debug, Clone, Args)]
pub struct KmsArgs {
    /// Numbers of concurrent clients to measure at (comma-separated).
    #[arg(
        long,
        env = "KEYHAVEN_BENCH_CLIENTS",
        value_delimiter = ',',
        default_value = "1,8,64"
    )]
    pub clients: Vec<usize>,
    /// Measured time of each (operation, clients, target) cell.
    #[arg(long, env = "KEYHAVEN_BENCH_DURATION", default_value = "3s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Unmeasured warm-up before each cell.
    #[arg(long, env = "KEYHAVEN_BENCH_WARMUP", default_value = "300ms", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// The kms-plugin binary to run. Default: `kms-plugin` beside this binary.
    #[arg(long, env = "KEYHAVEN_BENCH_PLUGIN")]
    pub plugin: Option<PathBuf>,
    /// SoftHSM2 PKCS#11 module (the bench makes its own temporary token with it).
    #[arg(long, env = "KEYHAVEN_PKCS11_MODULE", default_value = kms_plugin::cli::DEFAULT_MODULE)]
    pub pkcs11_module: PathBuf,
    /// HSM session pool size of the plugin, and of the raw-HSM baseline alike.
    #[arg(long, env = "KEYHAVEN_BENCH_SESSION_POOL_SIZE", default_value_t = 8)]
    pub session_pool_size: usize,
    /// Clients sharing one gRPC channel (one HTTP/2 connection each).
    #[arg(long, env = "KEYHAVEN_BENCH_CLIENTS_PER_CHANNEL", default_value_t = 8)]
    pub clients_per_channel: usize,
}

impl KmsArgs {
    /// Rejects values that would make a meaningless run.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.clients.is_empty(), "--clients is empty");
        anyhow::ensure!(
            self.clients.iter().all(|&n| (1..=4096).contains(&n)),
            "--clients values must be between 1 and 4096"
        );
        anyhow::ensure!(!self.duration.is_zero(), "--duration must be positive");
        anyhow::ensure!(
            self.session_pool_size >= 1,
            "--session-pool-size must be at least 1"
        );
        anyhow::ensure!(
            self.clients_per_channel >= 1,
            "--clients-per-channel must be at least 1"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent_and_smoke_flags_parse() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "keyhaven-bench",
            "kms",
            "--duration",
            "1s",
            "--clients",
            "1,8",
        ])
        .map_err(|e| e.to_string());
        let Ok(Cli {
            command: Command::Kms(args),
        }) = cli
        else {
            panic!("parse failed: {cli:?}");
        };
        assert_eq!(args.clients, vec![1, 8]);
        assert_eq!(args.duration, Duration::from_secs(1));
        assert_eq!(args.session_pool_size, 8);
        assert!(args.validate().is_ok());
        let mut bad = args.clone();
        bad.clients = vec![0];
        assert!(bad.validate().is_err());
    }
}
