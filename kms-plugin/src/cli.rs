//! Command line: every flag also reads an environment variable, so the same binary is
//! configured by flags in a shell and by `env` in a pod manifest. No secret is ever a flag
//! value: the PIN comes from a file (`--pin-file`) or a named environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use keyhaven_hsm::Config;

use crate::apiserver::KubeArgs;
use crate::etcd::EtcdArgs;
use crate::migrate::MigrateArgs;
use crate::retire::RetireChecks;
use crate::rotation::CompleteArgs;

/// Kubernetes KMS v2 plugin with keys held in a PKCS#11 HSM.
#[derive(Debug, Parser)]
#[command(name = "kms-plugin", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the KMS v2 API on a Unix socket.
    Serve(ServeArgs),
    /// Manage the KEKs on the token (works beside a running plugin).
    Keys {
        /// HSM connection.
        #[command(flatten)]
        hsm: HsmArgs,
        /// Key operation.
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Check a running plugin the way the kube-apiserver uses it: Status, then an Encrypt and
    /// Decrypt round trip of a random 32-byte seed.
    Probe {
        /// The plugin's socket: `unix:///path/kms.sock` or `unix:///@name`.
        #[arg(
            long,
            env = "KEYHAVEN_KMS_LISTEN",
            default_value = "unix:///var/run/keyhaven/kms.sock"
        )]
        listen: String,
    },
    /// Initialise a token (development and tests: SoftHSM2). Real HSMs are initialised with
    /// their vendor's tools.
    Token {
        /// Token operation.
        #[command(subcommand)]
        command: TokenCommand,
    },
}

/// `kms-plugin keys ...`
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create the first KEK if the token has none (idempotent).
    Init,
    /// Create a new KEK; it becomes the primary. A running plugin adopts it within its rescan
    /// interval, or at once on SIGHUP. Older KEKs stay usable for Decrypt. With `--complete`,
    /// finish the rotation too: wait for the plugins and the apiserver, re-write every
    /// object, prove from etcd that nothing needs the older keys (and `--retire-old` them).
    /// A re-run continues an unfinished rotation instead of starting another.
    Rotate(Box<RotateArgs>),
    /// Count what etcd holds by key_id and resource (read-only): which keys objects still
    /// need, and what is not under KMS v2 at all.
    Usage {
        /// etcd access.
        #[command(flatten)]
        etcd: EtcdArgs,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: OutputFormat,
    },
    /// Re-write every object of the encrypted resources through the apiserver so each is
    /// stored under the current primary. Refuses until the apiserver writes under it.
    Migrate(Box<MigrateCommand>),
    /// Show every KEK: label, key_id, created, role and (from a running plugin) last decrypt.
    List {
        /// Metrics address of a running plugin (`host:port`) to ask when each KEK last
        /// decrypted.
        #[arg(long, env = "KEYHAVEN_KMS_PLUGIN_ADDR")]
        plugin_addr: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Destroy an old KEK in the HSM — only once etcd shows no object stored under it and no
    /// running plugin decrypted with it recently. Refuses the primary.
    Retire(Box<RetireArgs>),
}

/// `kms-plugin keys rotate`.
#[derive(Debug, Clone, Args)]
pub struct RotateArgs {
    /// Finish the rotation: plugins, apiserver, migration, proof (needs etcd and apiserver
    /// access).
    #[arg(long)]
    pub complete: bool,
    /// etcd access.
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// apiserver access.
    #[command(flatten)]
    pub kube: KubeArgs,
    /// Migration tuning.
    #[command(flatten)]
    pub migrate: MigrateArgs,
    /// Checks before retiring the older keys.
    #[command(flatten)]
    pub checks: RetireChecks,
    /// Waiting and retiring.
    #[command(flatten)]
    pub complete_args: CompleteArgs,
}

/// `kms-plugin keys migrate`.
#[derive(Debug, Clone, Args)]
pub struct MigrateCommand {
    /// etcd access (optional: skips objects already under the primary, and reads the canary).
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// apiserver access.
    #[command(flatten)]
    pub kube: KubeArgs,
    /// Migration tuning.
    #[command(flatten)]
    pub migrate: MigrateArgs,
}

/// `kms-plugin keys retire`.
#[derive(Debug, Clone, Args)]
pub struct RetireArgs {
    /// The key_id (as `keys list` shows it) of the KEK to destroy.
    pub key_id: String,
    /// Confirm: really destroy it (without it, only the checks run).
    #[arg(long)]
    pub yes: bool,
    /// etcd access: retire counts the objects stored under the key at the time of retire.
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Plugins to ask, and the escape hatch.
    #[command(flatten)]
    pub checks: RetireChecks,
}

/// Output of `keys usage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// A table for people.
    Table,
    /// JSON for scripts.
    Json,
}

/// `kms-plugin token ...`
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Initialise a token in a free slot with a label, SO PIN and user PIN read from files.
    Init {
        /// Path of the PKCS#11 module.
        #[arg(long, env = "KEYHAVEN_PKCS11_MODULE", default_value = DEFAULT_MODULE)]
        pkcs11_module: PathBuf,
        /// Label for the new token.
        #[arg(long, env = "KEYHAVEN_TOKEN_LABEL")]
        token_label: String,
        /// File holding the security-officer PIN.
        #[arg(long, env = "KEYHAVEN_SO_PIN_FILE")]
        so_pin_file: PathBuf,
        /// File holding the user PIN.
        #[arg(long, env = "KEYHAVEN_PIN_FILE")]
        pin_file: PathBuf,
    },
}

pub use keyhaven_hsm::cli::DEFAULT_MODULE;

/// How to reach the HSM (the flags every binary shares), and this plugin's share of it.
#[derive(Debug, Clone, Args)]
pub struct HsmArgs {
    /// Module, token and PIN.
    #[command(flatten)]
    pub access: keyhaven_hsm::cli::HsmAccessArgs,
    /// Number of HSM sessions in the pool.
    #[arg(long, env = "KEYHAVEN_SESSION_POOL_SIZE", default_value_t = 8)]
    pub session_pool_size: usize,
    /// Label prefix of this plugin's KEKs (other objects on the token are ignored).
    #[arg(
        long,
        env = "KEYHAVEN_KEK_LABEL_PREFIX",
        default_value = "keyhaven-kms-"
    )]
    pub kek_label_prefix: String,
}

impl HsmArgs {
    /// The keystore configuration these flags describe.
    pub fn config(&self) -> Config {
        let mut cfg = self.access.config();
        cfg.pool_size = self.session_pool_size;
        cfg.kek_label_prefix = self.kek_label_prefix.clone();
        cfg
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `kms-plugin serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// HSM connection.
    #[command(flatten)]
    pub hsm: HsmArgs,
    /// Where to listen: `unix:///path/kms.sock` or the abstract form `unix:///@name`.
    #[arg(
        long,
        env = "KEYHAVEN_KMS_LISTEN",
        default_value = "unix:///var/run/keyhaven/kms.sock"
    )]
    pub listen: String,
    /// Mode of the socket file, in octal.
    #[arg(long, env = "KEYHAVEN_SOCKET_MODE", default_value = "0600", value_parser = parse_mode)]
    pub socket_mode: u32,
    /// Owner of the socket file: `UID` or `UID:GID`.
    #[arg(long, env = "KEYHAVEN_SOCKET_OWNER")]
    pub socket_owner: Option<String>,
    /// Only accept connections from these peer UIDs (comma-separated). Default: anyone who
    /// can open the socket file. Required with an abstract socket (`unix:///@name`).
    #[arg(long, env = "KEYHAVEN_ALLOW_UIDS", value_delimiter = ',')]
    pub allow_uid: Vec<u32>,
    /// Address of the HTTP listener for /healthz, /readyz, /metrics and /keys.
    #[arg(long, env = "KEYHAVEN_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Interval of the background HSM self-test (encrypt + decrypt probe).
    #[arg(long, env = "KEYHAVEN_SELF_TEST_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub self_test_interval: Duration,
    /// Interval at which the KEK list is re-read from the token (SIGHUP: at once).
    #[arg(long, env = "KEYHAVEN_RESCAN_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub rescan_interval: Duration,
    /// Longest an HSM operation may take before the request fails as UNAVAILABLE.
    #[arg(long, env = "KEYHAVEN_HSM_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub hsm_timeout: Duration,
    /// Log format.
    #[arg(long, env = "KEYHAVEN_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

fn parse_mode(s: &str) -> Result<u32, String> {
    let m = u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .map_err(|e| format!("socket mode must be octal like 0600: {e}"))?;
    if m > 0o777 {
        return Err("socket mode must be at most 0777".into());
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_mode_and_durations() {
        let cli = Cli::try_parse_from([
            "kms-plugin",
            "serve",
            "--token-label",
            "t",
            "--pin-file",
            "/p",
            "--socket-mode",
            "0660",
            "--self-test-interval",
            "500ms",
            "--allow-uid",
            "0,1000",
        ])
        .unwrap();
        let Command::Serve(s) = cli.command else {
            panic!("not serve")
        };
        assert_eq!(s.socket_mode, 0o660);
        assert_eq!(s.self_test_interval, Duration::from_millis(500));
        assert_eq!(s.allow_uid, vec![0, 1000]);
        assert!(parse_mode("999").is_err());
    }
}
