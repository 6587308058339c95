//! The command line of `brokerctl` (clap derive). Settings that configure the tool (where the
//! broker is, TLS files, credential files, HSM) also read an environment variable; per-call
//! data and confirmations (`--from-file`, `--yes`) are flags only. No secret is ever a flag
//! value: credentials and PINs come from files.

pub mod db;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};
use zeroize::Zeroizing;

use keyhaven_broker_core::audit::Checkpoint;

/// Default broker address.
pub const DEFAULT_ADDR: &str = "https://127.0.0.1:8443";
/// Default label prefix of the broker's KEKs.
pub const DEFAULT_KEK_PREFIX: &str = "keyhaven-broker-";
/// Default dev-issuer key file shared with a `--dev` broker.
pub const DEFAULT_DEV_KEY: &str = "./.keyhaven-dev/dev-issuer.pem";

/// Operator CLI of the Keyhaven broker.
///
/// Talks gRPC over TLS to a broker. Authenticates with a ServiceAccount token file
/// (`--token-file`) or, for first setup, the bootstrap admin credential file
/// (`--bootstrap-file`). Secret values go in with `secrets put` and come out only through
/// leases.
#[derive(Debug, Parser)]
#[command(name = "brokerctl", version, about, long_about)]
pub struct Cli {
    /// How to reach and authenticate to the broker.
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Output format.
    #[arg(
        short = 'o',
        long,
        global = true,
        help_heading = "Output",
        env = "KEYHAVEN_OUTPUT",
        value_enum,
        default_value = "text"
    )]
    pub output: Output,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Output format of every command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Human-readable lines and tables.
    Text,
    /// JSON on stdout (one document; `audit tail` writes one JSON record per line).
    Json,
}

/// Connection and credential flags shared by every command that talks to the broker.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Broker connection (any command that calls the broker)")]
pub struct ConnArgs {
    /// Broker address: `https://host:port`, or `http://` for a loopback host only.
    #[arg(long, global = true, env = "KEYHAVEN_BROKER_ADDR", default_value = DEFAULT_ADDR)]
    pub addr: String,
    /// PEM bundle of the CA(s) to trust for the broker's certificate (required for https).
    #[arg(long, global = true, env = "KEYHAVEN_BROKER_CA")]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, when the broker asks for client-certificate auth.
    #[arg(
        long,
        global = true,
        env = "KEYHAVEN_CLIENT_CERT",
        requires = "client_key"
    )]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `--client-cert`.
    #[arg(
        long,
        global = true,
        env = "KEYHAVEN_CLIENT_KEY",
        requires = "client_cert"
    )]
    pub client_key: Option<PathBuf>,
    /// File holding a ServiceAccount token (JWT), read at each run.
    #[arg(
        long,
        global = true,
        env = "KEYHAVEN_TOKEN_FILE",
        conflicts_with = "bootstrap_file"
    )]
    pub token_file: Option<PathBuf>,
    /// File holding the bootstrap admin credential (first setup), read at each run.
    #[arg(long, global = true, env = "KEYHAVEN_BOOTSTRAP_FILE")]
    pub bootstrap_file: Option<PathBuf>,
    /// Name to verify the broker's certificate against (default: the host of `--addr`).
    #[arg(long, global = true, env = "KEYHAVEN_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,
    /// Deadline of each call to the broker (and of connecting).
    #[arg(
        long,
        global = true,
        env = "KEYHAVEN_BROKER_TIMEOUT",
        default_value = "30s",
        value_parser = humantime::parse_duration
    )]
    pub timeout: Duration,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write, list, inspect and delete secrets. There is no `get`: values only flow through
    /// leases.
    Secrets {
        /// Secret operation.
        #[command(subcommand)]
        command: SecretsCommand,
    },
    /// Apply and show the policy document.
    Policy {
        /// Policy operation.
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// List and revoke leases (operator view).
    Leases {
        /// Lease operation.
        #[command(subcommand)]
        command: LeasesCommand,
    },
    /// The broker replicas sharing the database: version, heartbeat, policy generation,
    /// primary KEK.
    Replicas,
    /// Lease a secret as the calling workload (demos and tests).
    Lease(LeaseArgs),
    /// Renew one of the calling workload's leases.
    Renew(RenewArgs),
    /// Revoke one of the calling workload's leases.
    Revoke(RevokeArgs),
    /// Verify and read the hash-chained audit log.
    Audit {
        /// Audit operation.
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Broker KEKs: status from the broker, or first-time creation on the HSM.
    Keys {
        /// Key operation.
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Dynamic database credentials: connections, roles, status, reconciliation.
    Db {
        /// Database credential operation.
        #[command(subcommand)]
        command: db::DbCommand,
    },
    /// Mint a ServiceAccount-shaped token with the dev key (demos and tests only; a broker
    /// trusts it only when started with `--dev`). Prints the token to stdout.
    DevToken(DevTokenArgs),
    /// Write a dev CA, a server certificate and a client certificate (demos and tests only).
    DevCa(DevCaArgs),
}

/// `brokerctl secrets ...`
#[derive(Debug, Subcommand)]
pub enum SecretsCommand {
    /// Write a new version of the secret at PATH.
    Put(PutArgs),
    /// List secret paths (under PREFIX).
    List {
        /// Only paths under this prefix.
        prefix: Option<String>,
    },
    /// Show the version history of PATH (no values).
    Metadata {
        /// Secret path, e.g. `team/app/db`.
        path: String,
    },
    /// Soft-delete PATH: new leases are refused, history is kept.
    Delete {
        /// Secret path.
        path: String,
    },
    /// Erase every version of PATH for good.
    Destroy {
        /// Secret path.
        path: String,
        /// Confirm: really erase the data.
        #[arg(long)]
        yes: bool,
    },
}

/// `brokerctl secrets put`.
#[derive(Debug, Args)]
#[command(group(
    ArgGroup::new("data")
        .required(true)
        .multiple(true)
        .args(["from_file", "from_literal", "from_json"])
))]
pub struct PutArgs {
    /// Secret path, e.g. `team/app/db`.
    pub path: String,
    /// A key whose value is the content of a file (repeatable). The preferred way.
    #[arg(long, value_name = "KEY=PATH", value_parser = parse_key_file)]
    pub from_file: Vec<KeyFile>,
    /// A key with a value given on the command line (repeatable). Visible in `ps` and shell
    /// history: for non-secret demo values only.
    #[arg(long, value_name = "KEY=VALUE", value_parser = parse_key_literal)]
    pub from_literal: Vec<KeyLiteral>,
    /// A JSON object of string values (`-` reads stdin).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["from_file", "from_literal"])]
    pub from_json: Option<PathBuf>,
}

/// `--from-file KEY=PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFile {
    /// Data key.
    pub key: String,
    /// File whose content is the value.
    pub path: PathBuf,
}

/// `--from-literal KEY=VALUE`. `Debug` shows the key only.
#[derive(Clone)]
pub struct KeyLiteral {
    /// Data key.
    pub key: String,
    /// The value.
    pub value: Zeroizing<String>,
}

impl fmt::Debug for KeyLiteral {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyLiteral")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// Longest data key.
pub const MAX_KEY_LEN: usize = 253;

/// Checks a data key the way Kubernetes checks Secret keys (`[-._a-zA-Z0-9]+`, not `.` or
/// `..`): the sidecar writes each key as a file name.
pub fn check_data_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("key is empty".into());
    }
    if key.len() > MAX_KEY_LEN {
        return Err(format!("key is longer than {MAX_KEY_LEN} bytes"));
    }
    if key == "." || key == ".." {
        return Err(format!("key `{key}` is not allowed"));
    }
    if let Some(c) = key
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')))
    {
        return Err(format!(
            "key `{}` has {:?}; keys may only use letters, digits, `-`, `.` and `_`",
            key.escape_debug(),
            c
        ));
    }
    Ok(())
}

/// Parses `KEY=PATH`.
pub fn parse_key_file(s: &str) -> Result<KeyFile, String> {
    let (key, path) = s
        .split_once('=')
        .ok_or_else(|| "expected KEY=PATH".to_owned())?;
    check_data_key(key)?;
    if path.is_empty() {
        return Err(format!("no file given for key `{key}` (expected KEY=PATH)"));
    }
    Ok(KeyFile {
        key: key.to_owned(),
        path: PathBuf::from(path),
    })
}

/// Parses `KEY=VALUE` (the value may be empty and may contain `=`). Errors never quote the
/// value.
pub fn parse_key_literal(s: &str) -> Result<KeyLiteral, String> {
    let (key, value) = s
        .split_once('=')
        .ok_or_else(|| "expected KEY=VALUE".to_owned())?;
    check_data_key(key)?;
    Ok(KeyLiteral {
        key: key.to_owned(),
        value: Zeroizing::new(value.to_owned()),
    })
}

/// `brokerctl policy ...`
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Replace all policies with a YAML document, validated here before it is sent.
    Apply {
        /// The `policies:` YAML document (`-` reads stdin).
        #[arg(short = 'f', long = "filename", value_name = "FILE")]
        file: PathBuf,
        /// The broker's cap on `max_ttl`, for local validation (match the broker's setting).
        #[arg(
            long,
            env = "KEYHAVEN_MAX_TTL_CAP",
            default_value = "24h",
            value_parser = humantime::parse_duration
        )]
        max_ttl_cap: Duration,
        /// Ask the broker what the new set would do (the active leases it would end), changing
        /// nothing.
        #[arg(long, conflicts_with = "validate_only")]
        dry_run: bool,
        /// Only validate locally; send nothing.
        #[arg(long)]
        validate_only: bool,
    },
    /// Print the current policy document.
    List,
    /// The stored policy generation and the one each broker replica enforces.
    Status,
}

/// Which leases (`leases list` / `leases revoke`): one lease, a namespace, a service account,
/// a pod, or a path prefix.
#[derive(Debug, Clone, Default, Args)]
pub struct SelectorArgs {
    /// One lease by id.
    #[arg(long, conflicts_with_all = ["namespace", "serviceaccount", "pod", "prefix"])]
    pub id: Option<String>,
    /// Every lease in this namespace (or, with `--serviceaccount` / `--pod`, theirs).
    #[arg(long, conflicts_with = "prefix")]
    pub namespace: Option<String>,
    /// Service account in `--namespace`.
    #[arg(
        long,
        visible_alias = "service-account",
        requires = "namespace",
        conflicts_with_all = ["pod", "prefix"]
    )]
    pub serviceaccount: Option<String>,
    /// Pod (by name) in `--namespace`.
    #[arg(long, requires = "namespace", conflicts_with = "prefix")]
    pub pod: Option<String>,
    /// Every lease on this path or below it (`team/app` matches `team/app/db`).
    #[arg(long)]
    pub prefix: Option<String>,
}

/// `brokerctl leases ...`
#[derive(Debug, Subcommand)]
pub enum LeasesCommand {
    /// List leases (active ones; `--all` adds ended ones). No selector: every lease.
    List {
        /// Which leases.
        #[command(flatten)]
        selector: SelectorArgs,
        /// Include revoked and expired leases.
        #[arg(long)]
        all: bool,
    },
    /// Revoke the active leases a selector matches (or `--everything --yes`).
    Revoke {
        /// Which leases.
        #[command(flatten)]
        selector: SelectorArgs,
        /// Revoke every active lease of every workload.
        #[arg(long, conflicts_with_all = ["id", "namespace", "serviceaccount", "pod", "prefix"])]
        everything: bool,
        /// Confirm `--everything`.
        #[arg(long)]
        yes: bool,
    },
}

/// `brokerctl lease`.
#[derive(Debug, Args)]
pub struct LeaseArgs {
    /// Secret path.
    pub path: String,
    /// Requested TTL (default: the policy's).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub ttl: Option<Duration>,
    /// Also print the values (they end up on your terminal).
    #[arg(long)]
    pub show_values: bool,
}

/// `brokerctl renew`.
#[derive(Debug, Args)]
pub struct RenewArgs {
    /// Lease id.
    pub lease_id: String,
    /// Requested extension (default: the policy's TTL).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub increment: Option<Duration>,
}

/// `brokerctl revoke`.
#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// Lease id.
    pub lease_id: String,
}

/// `brokerctl audit ...`
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Verify the whole chain in the broker's database; exit 1 if it is broken.
    Verify {
        /// A checkpoint `SEQ:HASH` kept outside the database (from an earlier verify):
        /// also detects a cut tail.
        #[arg(long, value_name = "SEQ:HASH", value_parser = parse_checkpoint)]
        anchor: Option<Checkpoint>,
    },
    /// Print audit records: the last `--limit` ones, or those after `--after`.
    Tail {
        /// Start after this sequence number (default: show the last `--limit` records).
        #[arg(long, value_name = "SEQ")]
        after: Option<i64>,
        /// How many records.
        #[arg(long, value_name = "N", default_value_t = 20)]
        limit: u32,
        /// Keep polling for new records until interrupted.
        #[arg(long)]
        follow: bool,
        /// Poll interval of `--follow` (each poll is itself an audited call).
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        interval: Duration,
    },
}

/// Parses `--anchor`.
pub fn parse_checkpoint(s: &str) -> Result<Checkpoint, String> {
    s.parse::<Checkpoint>().map_err(|e| e.to_string())
}

/// `brokerctl keys ...`
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Ask the broker for its KEKs (id, label, role, creation time, DEKs each still wraps,
    /// encryptions) and the progress of the re-wrap (a bar in a terminal), its rate and ETA.
    Status(KeyStatusArgs),
    /// Make a new KEK in the HSM: new secret versions use it at once, and every broker
    /// replica re-wraps the stored DEKs to it in the background (watch `keys status`).
    Rotate,
    /// Destroy a KEK in the HSM, once it is not the primary and wraps no DEK any more
    /// (`keys status` shows 0). Irreversible.
    Retire(RetireArgs),
    /// On the HSM itself (not through the broker): create the first broker KEK if there is
    /// none (idempotent) and print its id.
    Init(HsmArgs),
}

/// `brokerctl keys status`.
#[derive(Debug, Clone, Default, Args)]
pub struct KeyStatusArgs {
    /// Keep asking until no DEK is left to re-wrap, showing the progress.
    #[arg(long)]
    pub wait: bool,
    /// How often `--wait` asks (each ask is one KeyStatus call).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
}

/// `brokerctl keys retire`.
#[derive(Debug, Clone, Args)]
pub struct RetireArgs {
    /// The KEK id (32 hex digits, from `keys status`).
    #[arg(value_name = "KEK_ID")]
    pub kek_id: String,
    /// Confirm: the KEK is destroyed in the HSM, and anything still wrapped by it (e.g. in an
    /// old database backup) can never be opened again.
    #[arg(long)]
    pub yes: bool,
}

/// How to reach the HSM (`keys init`): the flags kms-plugin takes too, and the broker's KEK
/// label prefix.
#[derive(Debug, Clone, Args)]
pub struct HsmArgs {
    /// Module, token and PIN.
    #[command(flatten)]
    pub access: keyhaven_hsm::cli::HsmAccessArgs,
    /// Label prefix of the broker's KEKs (must match the broker's).
    #[arg(long, env = "KEYHAVEN_KEK_LABEL_PREFIX", default_value = DEFAULT_KEK_PREFIX)]
    pub kek_label_prefix: String,
}

impl HsmArgs {
    /// The keystore configuration these flags describe (one session is enough here).
    pub fn config(&self) -> keyhaven_hsm::Config {
        let mut cfg = self.access.config();
        cfg.pool_size = 1;
        cfg.kek_label_prefix = self.kek_label_prefix.clone();
        cfg
    }
}

/// `brokerctl dev-token`.
#[derive(Debug, Args)]
pub struct DevTokenArgs {
    /// Namespace of the workload.
    #[arg(long)]
    pub namespace: String,
    /// Service account of the workload.
    #[arg(long, visible_alias = "service-account")]
    pub serviceaccount: String,
    /// Pod name to put in the token.
    #[arg(long)]
    pub pod: Option<String>,
    /// Token lifetime (at most 24h).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    /// The dev issuer's key (PKCS#8 PEM), created (mode 0600) if missing; the `--dev` broker
    /// must use the same file.
    #[arg(long, env = "KEYHAVEN_DEV_KEY", default_value = DEFAULT_DEV_KEY)]
    pub dev_key: PathBuf,
}

/// `brokerctl dev-ca`.
#[derive(Debug, Args)]
pub struct DevCaArgs {
    /// Directory to write ca.pem, ca-key.pem, server.pem, server-key.pem, client.pem and
    /// client-key.pem into (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Names and IP addresses the server certificate is valid for.
    #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1")]
    pub hosts: Vec<String>,
    /// Replace existing files.
    #[arg(long)]
    pub force: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("brokerctl").chain(args.iter().copied()))
    }

    #[test]
    fn global_flags_go_anywhere_and_have_defaults() {
        let cli = parse(&[
            "secrets",
            "list",
            "--addr",
            "http://localhost:1",
            "--output",
            "json",
        ])
        .unwrap();
        assert_eq!(cli.conn.addr, "http://localhost:1");
        assert_eq!(cli.output, Output::Json);
        assert_eq!(cli.conn.timeout, Duration::from_secs(30));
        let cli = parse(&["keys", "status"]).unwrap();
        assert_eq!(cli.output, Output::Text);
    }

    #[test]
    fn token_and_bootstrap_files_conflict() {
        let e = parse(&[
            "--token-file",
            "a",
            "--bootstrap-file",
            "b",
            "policy",
            "list",
        ])
        .unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict);
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn put_needs_data_and_from_json_stands_alone() {
        let e = parse(&["secrets", "put", "a/b"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        let e = parse(&[
            "secrets",
            "put",
            "a/b",
            "--from-json",
            "x.json",
            "--from-file",
            "k=f",
        ])
        .unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict);
        let cli = parse(&[
            "secrets",
            "put",
            "a/b",
            "--from-file",
            "password=/run/pw",
            "--from-literal",
            "user=demo=x",
        ])
        .unwrap();
        let Command::Secrets {
            command: SecretsCommand::Put(p),
        } = cli.command
        else {
            panic!("not secrets put")
        };
        assert_eq!(
            p.from_file,
            vec![KeyFile {
                key: "password".into(),
                path: "/run/pw".into()
            }]
        );
        assert_eq!(p.from_literal[0].key, "user");
        assert_eq!(p.from_literal[0].value.as_str(), "demo=x");
    }

    #[test]
    fn data_flags_are_checked_and_errors_do_not_quote_values() {
        assert!(parse_key_file("k").is_err());
        assert!(parse_key_file("k=").is_err());
        assert!(parse_key_file("=f").is_err());
        assert!(parse_key_file("../x=f").is_err());
        assert!(parse_key_file("a/b=f").is_err());
        assert!(parse_key_file("..=f").is_err());
        assert_eq!(
            parse_key_file("tls.crt=a=b").unwrap().path,
            PathBuf::from("a=b")
        );
        let lit = parse_key_literal("empty=").unwrap();
        assert_eq!(lit.value.as_str(), "");
        let err = parse_key_literal("bad key=hunter2").unwrap_err();
        assert!(!err.contains("hunter2"), "{err}");
        let err = parse_key_literal("hunter2").unwrap_err();
        assert!(!err.contains("hunter2"), "{err}");
        let lit = parse_key_literal("k=hunter2").unwrap();
        assert!(!format!("{lit:?}").contains("hunter2"));
        assert!(parse_key_literal(&format!("{}=v", "k".repeat(MAX_KEY_LEN + 1))).is_err());
    }

    #[test]
    fn selector_flags_combine_only_sensibly() {
        assert!(parse(&["leases", "list", "--pod", "p"]).is_err());
        assert!(parse(&["leases", "list", "--serviceaccount", "s"]).is_err());
        assert!(parse(&["leases", "list", "--id", "x", "--prefix", "a"]).is_err());
        assert!(parse(&[
            "leases",
            "list",
            "--namespace",
            "n",
            "--pod",
            "p",
            "--serviceaccount",
            "s"
        ])
        .is_err());
        assert!(parse(&["leases", "revoke", "--everything", "--prefix", "a"]).is_err());
        assert!(parse(&[
            "leases",
            "list",
            "--namespace",
            "n",
            "--service-account",
            "s"
        ])
        .is_ok());
        assert!(parse(&["leases", "revoke", "--everything", "--yes"]).is_ok());
        assert!(parse(&["leases", "revoke", "--namespace", "n"]).is_ok());
    }

    #[test]
    fn anchor_is_parsed_as_a_checkpoint() {
        let good = format!("7:{}", "a".repeat(64));
        let cli = parse(&["audit", "verify", "--anchor", &good]).unwrap();
        let Command::Audit {
            command: AuditCommand::Verify { anchor },
        } = cli.command
        else {
            panic!("not audit verify")
        };
        assert_eq!(anchor.unwrap().seq, 7);
        let e = parse(&["audit", "verify", "--anchor", "7:xyz"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation);
    }

    #[test]
    fn keys_init_takes_kms_plugin_style_hsm_flags() {
        let cli = parse(&["keys", "init", "--token-label", "t", "--pin-file", "/p"]).unwrap();
        let Command::Keys {
            command: KeysCommand::Init(h),
        } = cli.command
        else {
            panic!("not keys init")
        };
        let cfg = h.config();
        assert_eq!(cfg.kek_label_prefix, DEFAULT_KEK_PREFIX);
        assert_eq!(cfg.token, keyhaven_hsm::TokenSelector::Label("t".into()));
        assert_eq!(cfg.pin, keyhaven_hsm::PinSource::File("/p".into()));
    }
}
