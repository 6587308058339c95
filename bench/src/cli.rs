//! Command line. Every flag also reads an environment variable, like the other Keyhaven
//! binaries.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

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
    /// broker Lease/Renew over TLS against a raw-database and a raw-JWT baseline, per database.
    Broker(BrokerArgs),
    /// broker KEK rotation: the background re-wrap rate (DEKs/s) against the raw HSM
    /// unwrap+wrap rate, per database.
    Rewrap(RewrapArgs),
    /// `kms-plugin keys usage` over a real etcd (keys/s) against a raw paginated range read of
    /// the same keys, and the scan's peak RSS.
    Usage(UsageArgs),
    /// keyhaven-injector admission latency over HTTPS against a bare HTTPS echo on the same
    /// stack.
    Injector(InjectorArgs),
    /// broker dynamic PostgreSQL credentials: Lease on db/CONN/ROLE against a raw
    /// CREATE ROLE + DROP ROLE loop on the same PostgreSQL, and the rate at which expired
    /// credentials' roles are dropped.
    Dbcreds(DbcredsArgs),
    /// Internal: the bare HTTPS echo, run as its own process by `injector`.
    #[command(hide = true)]
    HttpsEchoServer(HttpsEchoArgs),
    /// Internal: the bare tonic echo KMS service, run as its own process by `kms` so that the
    /// baseline pays the same cross-process costs as the plugin.
    #[command(hide = true)]
    EchoServer(EchoArgs),
}

/// `keyhaven-bench echo-server` (internal).
#[derive(Debug, Clone, Args)]
pub struct EchoArgs {
    /// Unix socket to serve on.
    #[arg(long)]
    pub socket: PathBuf,
    /// key_id to answer with.
    #[arg(long)]
    pub key_id: String,
}

/// `keyhaven-bench https-echo-server` (internal).
#[derive(Debug, Clone, Args)]
pub struct HttpsEchoArgs {
    /// Address to serve on.
    #[arg(long)]
    pub listen: std::net::SocketAddr,
    /// PEM certificate.
    #[arg(long)]
    pub cert: PathBuf,
    /// PEM key.
    #[arg(long)]
    pub key: PathBuf,
}

/// `keyhaven-bench injector`.
#[derive(Debug, Clone, Args)]
pub struct InjectorArgs {
    /// Numbers of concurrent clients (one keep-alive connection each; comma-separated).
    #[arg(
        long,
        env = "KEYHAVEN_BENCH_CLIENTS",
        value_delimiter = ',',
        default_value = "1,64"
    )]
    pub clients: Vec<usize>,
    /// Measured time of each (clients, target) cell.
    #[arg(long, env = "KEYHAVEN_BENCH_DURATION", default_value = "3s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Unmeasured warm-up before each cell.
    #[arg(long, env = "KEYHAVEN_BENCH_WARMUP", default_value = "300ms", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// The keyhaven-injector binary to run. Default: `keyhaven-injector` beside this binary.
    #[arg(long, env = "KEYHAVEN_BENCH_INJECTOR")]
    pub injector: Option<PathBuf>,
}

impl InjectorArgs {
    /// Rejects values that would make a meaningless run.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.clients.is_empty(), "--clients is empty");
        anyhow::ensure!(
            self.clients.iter().all(|&n| (1..=1024).contains(&n)),
            "--clients values must be between 1 and 1024"
        );
        anyhow::ensure!(!self.duration.is_zero(), "--duration must be positive");
        Ok(())
    }
}

/// `keyhaven-bench usage`.
#[derive(Debug, Clone, Args)]
pub struct UsageArgs {
    /// etcd sizes to measure at (keys, comma-separated; filled in increasing order).
    #[arg(
        long,
        env = "KEYHAVEN_BENCH_KEYS",
        value_delimiter = ',',
        default_value = "20000,100000"
    )]
    pub keys: Vec<usize>,
    /// Bytes of encrypted data per Secret (a small Secret is about 1 KiB).
    #[arg(long, env = "KEYHAVEN_BENCH_VALUE_SIZE", default_value_t = 1024)]
    pub value_size: usize,
    /// Keys per page, for the scan and the raw read alike.
    #[arg(long, env = "KEYHAVEN_BENCH_PAGE_SIZE", default_value_t = 500)]
    pub page_size: u32,
    /// Alternating rounds per size (the best of each side is reported).
    #[arg(long, env = "KEYHAVEN_BENCH_ROUNDS", default_value_t = 3)]
    pub rounds: usize,
    /// The kms-plugin binary to run. Default: `kms-plugin` beside this binary.
    #[arg(long, env = "KEYHAVEN_BENCH_PLUGIN")]
    pub plugin: Option<PathBuf>,
    /// SoftHSM2 PKCS#11 module (the bench makes its own temporary token with it).
    #[arg(long, env = "KEYHAVEN_PKCS11_MODULE", default_value = kms_plugin::cli::DEFAULT_MODULE)]
    pub pkcs11_module: PathBuf,
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

/// A database the broker can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Db {
    /// A SQLite file in the bench's temporary directory (WAL, synchronous=FULL).
    Sqlite,
    /// A throwaway PostgreSQL cluster started from the installed server binaries.
    Postgres,
}

impl std::fmt::Display for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            Db::Sqlite => "sqlite",
            Db::Postgres => "postgres",
        })
    }
}

/// `keyhaven-bench broker`.
#[derive(Debug, Clone, Args)]
pub struct BrokerArgs {
    /// Databases to run the broker on, one after the other (comma-separated).
    #[arg(
        long,
        env = "KEYHAVEN_BENCH_DB",
        value_delimiter = ',',
        default_value = "sqlite,postgres"
    )]
    pub db: Vec<Db>,
    /// Numbers of concurrent clients to measure at (comma-separated). Each client is its own
    /// service account with its own token.
    #[arg(
        long,
        env = "KEYHAVEN_BENCH_CLIENTS",
        value_delimiter = ',',
        default_value = "1,16,128"
    )]
    pub clients: Vec<usize>,
    /// Measured time of each (database, clients, target) cell.
    #[arg(long, env = "KEYHAVEN_BENCH_DURATION", default_value = "3s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Unmeasured warm-up before each cell.
    #[arg(long, env = "KEYHAVEN_BENCH_WARMUP", default_value = "300ms", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// The broker binary to run. Default: `broker` beside this binary.
    #[arg(long, env = "KEYHAVEN_BENCH_BROKER")]
    pub broker: Option<PathBuf>,
    /// SoftHSM2 PKCS#11 module (the bench makes its own temporary tokens with it).
    #[arg(long, env = "KEYHAVEN_PKCS11_MODULE", default_value = kms_plugin::cli::DEFAULT_MODULE)]
    pub pkcs11_module: PathBuf,
    /// PostgreSQL server binaries (initdb, postgres, pg_isready). Default: the newest
    /// `/usr/lib/postgresql/<version>/bin`.
    #[arg(long, env = "KEYHAVEN_PG_BIN")]
    pub pg_bin: Option<PathBuf>,
    /// Active leases to put in the broker's database before reading its memory (0: skip).
    #[arg(long, env = "KEYHAVEN_BENCH_LEASES", default_value_t = 100_000)]
    pub leases: usize,
    /// Clients sharing one gRPC channel (one TLS connection each). 1: every client is a pod
    /// with its own connection.
    #[arg(long, env = "KEYHAVEN_BENCH_CLIENTS_PER_CHANNEL", default_value_t = 1)]
    pub clients_per_channel: usize,
}

impl BrokerArgs {
    /// Rejects values that would make a meaningless run.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.db.is_empty(), "--db is empty");
        anyhow::ensure!(!self.clients.is_empty(), "--clients is empty");
        anyhow::ensure!(
            self.clients.iter().all(|&n| (1..=1024).contains(&n)),
            "--clients values must be between 1 and 1024"
        );
        anyhow::ensure!(!self.duration.is_zero(), "--duration must be positive");
        anyhow::ensure!(
            self.leases <= 10_000_000,
            "--leases must be at most 10000000"
        );
        anyhow::ensure!(
            self.clients_per_channel >= 1,
            "--clients-per-channel must be at least 1"
        );
        Ok(())
    }
}

/// `keyhaven-bench dbcreds`.
#[derive(Debug, Clone, Args)]
pub struct DbcredsArgs {
    /// The broker's own store (the credentials' database is always the throwaway PostgreSQL).
    #[arg(long, env = "KEYHAVEN_BENCH_DB", default_value = "sqlite")]
    pub db: Db,
    /// Numbers of concurrent clients to measure at (comma-separated). Each client is its own
    /// service account with its own token.
    #[arg(
        long,
        env = "KEYHAVEN_BENCH_CLIENTS",
        value_delimiter = ',',
        default_value = "1,16"
    )]
    pub clients: Vec<usize>,
    /// Measured time of each (clients, target) cell.
    #[arg(long, env = "KEYHAVEN_BENCH_DURATION", default_value = "3s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Unmeasured warm-up before each cell.
    #[arg(long, env = "KEYHAVEN_BENCH_WARMUP", default_value = "300ms", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Credentials issued with one common expiry, whose roles the broker must then drop
    /// (0: skip the revocation rows).
    #[arg(long, env = "KEYHAVEN_BENCH_EXPIRING", default_value_t = 10_000)]
    pub expiring: usize,
    /// The broker binary to run. Default: `broker` beside this binary.
    #[arg(long, env = "KEYHAVEN_BENCH_BROKER")]
    pub broker: Option<PathBuf>,
    /// SoftHSM2 PKCS#11 module (the bench makes its own temporary token with it).
    #[arg(long, env = "KEYHAVEN_PKCS11_MODULE", default_value = kms_plugin::cli::DEFAULT_MODULE)]
    pub pkcs11_module: PathBuf,
    /// PostgreSQL server binaries. Default: the newest `/usr/lib/postgresql/<version>/bin`.
    #[arg(long, env = "KEYHAVEN_PG_BIN")]
    pub pg_bin: Option<PathBuf>,
}

impl DbcredsArgs {
    /// Rejects values that would make a meaningless run.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.clients.is_empty(), "--clients is empty");
        anyhow::ensure!(
            self.clients.iter().all(|&n| (1..=256).contains(&n)),
            "--clients values must be between 1 and 256"
        );
        anyhow::ensure!(!self.duration.is_zero(), "--duration must be positive");
        anyhow::ensure!(
            self.expiring <= 1_000_000,
            "--expiring must be at most 1000000"
        );
        Ok(())
    }
}

/// `keyhaven-bench rewrap`.
#[derive(Debug, Clone, Args)]
pub struct RewrapArgs {
    /// Databases to run the broker on, one after the other (comma-separated).
    #[arg(
        long,
        env = "KEYHAVEN_BENCH_DB",
        value_delimiter = ',',
        default_value = "sqlite,postgres"
    )]
    pub db: Vec<Db>,
    /// DEKs stored before the rotation (secret versions, one DEK each).
    #[arg(long, env = "KEYHAVEN_BENCH_DEKS", default_value_t = 20_000)]
    pub deks: usize,
    /// The broker's `--rewrap-batch-size`.
    #[arg(long, env = "KEYHAVEN_BENCH_BATCH_SIZE", default_value_t = 500)]
    pub batch_size: usize,
    /// Measured time of each raw-HSM cell.
    #[arg(long, env = "KEYHAVEN_BENCH_DURATION", default_value = "3s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Unmeasured warm-up before each raw-HSM cell.
    #[arg(long, env = "KEYHAVEN_BENCH_WARMUP", default_value = "300ms", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// The broker binary to run. Default: `broker` beside this binary.
    #[arg(long, env = "KEYHAVEN_BENCH_BROKER")]
    pub broker: Option<PathBuf>,
    /// SoftHSM2 PKCS#11 module (the bench makes its own temporary tokens with it).
    #[arg(long, env = "KEYHAVEN_PKCS11_MODULE", default_value = kms_plugin::cli::DEFAULT_MODULE)]
    pub pkcs11_module: PathBuf,
    /// PostgreSQL server binaries. Default: the newest `/usr/lib/postgresql/<version>/bin`.
    #[arg(long, env = "KEYHAVEN_PG_BIN")]
    pub pg_bin: Option<PathBuf>,
}

impl RewrapArgs {
    /// Rejects values that would make a meaningless run.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.db.is_empty(), "--db is empty");
        anyhow::ensure!(
            (100..=10_000_000).contains(&self.deks),
            "--deks must be between 100 and 10000000"
        );
        anyhow::ensure!(
            (1..=10_000).contains(&self.batch_size),
            "--batch-size must be between 1 and 10000"
        );
        anyhow::ensure!(!self.duration.is_zero(), "--duration must be positive");
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

    #[test]
    fn broker_defaults_and_flags_parse() {
        let parse = |args: &[&str]| match Cli::try_parse_from(args) {
            Ok(Cli {
                command: Command::Broker(a),
            }) => Some(a),
            _ => None,
        };
        let Some(d) = parse(&["keyhaven-bench", "broker"]) else {
            panic!("defaults do not parse");
        };
        assert_eq!(d.db, vec![Db::Sqlite, Db::Postgres]);
        assert_eq!(d.clients, vec![1, 16, 128]);
        assert_eq!((d.leases, d.clients_per_channel), (100_000, 1));
        assert!(d.validate().is_ok());
        let Some(a) = parse(&[
            "keyhaven-bench",
            "broker",
            "--db",
            "postgres",
            "--clients",
            "4",
            "--duration",
            "1s",
            "--leases",
            "0",
        ]) else {
            panic!("flags do not parse");
        };
        assert_eq!(
            (&a.db, &a.clients, a.leases),
            (&vec![Db::Postgres], &vec![4], 0)
        );
        assert!(parse(&["keyhaven-bench", "broker", "--db", "mysql"]).is_none());
        let mut bad = a.clone();
        bad.db.clear();
        assert!(bad.validate().is_err());
    }

    #[test]
    fn dbcreds_defaults_and_flags_parse() {
        let parse = |args: &[&str]| match Cli::try_parse_from(args) {
            Ok(Cli {
                command: Command::Dbcreds(a),
            }) => Some(a),
            _ => None,
        };
        let Some(d) = parse(&["keyhaven-bench", "dbcreds"]) else {
            panic!("defaults do not parse");
        };
        assert_eq!(
            (d.db, &d.clients, d.expiring),
            (Db::Sqlite, &vec![1, 16], 10_000)
        );
        assert!(d.validate().is_ok());
        let Some(a) = parse(&[
            "keyhaven-bench",
            "dbcreds",
            "--db",
            "postgres",
            "--expiring",
            "500",
        ]) else {
            panic!("flags do not parse");
        };
        assert_eq!((a.db, a.expiring), (Db::Postgres, 500));
        assert!(parse(&["keyhaven-bench", "dbcreds", "--db", "sqlite,postgres"]).is_none());
        let mut bad = a.clone();
        bad.clients = vec![0];
        assert!(bad.validate().is_err());
    }

    #[test]
    fn rewrap_defaults_and_flags_parse() {
        let parse = |args: &[&str]| match Cli::try_parse_from(args) {
            Ok(Cli {
                command: Command::Rewrap(a),
            }) => Some(a),
            _ => None,
        };
        let Some(d) = parse(&["keyhaven-bench", "rewrap"]) else {
            panic!("defaults do not parse");
        };
        assert_eq!(d.db, vec![Db::Sqlite, Db::Postgres]);
        assert_eq!((d.deks, d.batch_size), (20_000, 500));
        assert!(d.validate().is_ok());
        let Some(a) = parse(&[
            "keyhaven-bench",
            "rewrap",
            "--db",
            "sqlite",
            "--deks",
            "1000",
        ]) else {
            panic!("flags do not parse");
        };
        assert_eq!((a.db, a.deks), (vec![Db::Sqlite], 1000));
        let mut bad = d.clone();
        bad.deks = 5;
        assert!(bad.validate().is_err());
    }
}
