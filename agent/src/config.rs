//! Flags and the secrets file: which broker paths to lease and how to write each one.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use clap::{Parser, ValueEnum};
use serde::Deserialize;

/// Keyhaven sidecar: leases secrets from the broker with the pod's ServiceAccount token,
/// writes them atomically into a shared in-memory volume, renews the leases, follows new
/// secret versions, and revokes its leases on SIGTERM.
///
/// Secrets come from `--config` (a YAML file) and/or `--secret PATH=FILE`. Every flag also
/// reads the environment variable shown. Values and tokens are never logged.
#[derive(Debug, Clone, Parser)]
#[command(name = "broker-agent", version)]
pub struct Cli {
    /// Broker address: `https://host:port` (or `http://` on a loopback host, for demos).
    #[arg(long, env = "KEYHAVEN_BROKER_ADDR")]
    pub broker_addr: String,
    /// PEM CA bundle to verify the broker's certificate.
    #[arg(long, env = "KEYHAVEN_BROKER_CA")]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, when the broker asks for client certificates.
    #[arg(long, env = "KEYHAVEN_CLIENT_CERT", requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `--client-cert`.
    #[arg(long, env = "KEYHAVEN_CLIENT_KEY", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
    /// Name to verify the broker's certificate against (default: the host of the address).
    #[arg(long, env = "KEYHAVEN_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,
    /// The projected ServiceAccount token, read again at every call (the kubelet rotates it).
    #[arg(
        long,
        env = "KEYHAVEN_TOKEN_FILE",
        default_value = "/var/run/secrets/keyhaven/token"
    )]
    pub token_file: PathBuf,
    /// YAML file listing the secrets to lease (see the docs for the format).
    #[arg(long, env = "KEYHAVEN_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
    /// A secret without a config file: `PATH=FILE` (format json, or raw when FILE has no
    /// `.json`/`.env` extension and the secret has one key). Repeatable.
    #[arg(long = "secret", value_name = "PATH=FILE")]
    pub secrets: Vec<String>,
    /// Directory the files are written to (the shared in-memory volume).
    #[arg(long, env = "KEYHAVEN_OUTPUT_DIR", default_value = "/keyhaven/secrets")]
    pub output_dir: PathBuf,
    /// Init-container mode: lease and write every file once, then exit 0 — or non-zero with
    /// a clear message when any secret could not be written. Leases are left to expire.
    #[arg(long, env = "KEYHAVEN_AGENT_ONCE")]
    pub once: bool,
    /// What happens to a file whose lease ended with no lease to replace it: expired while the
    /// broker could not be reached, or revoked and leasing again failed. Either way the agent
    /// is not ready (`/readyz` 503) until a lease is granted again.
    #[arg(long, env = "KEYHAVEN_ON_EXPIRY", value_enum, default_value = "keep")]
    pub on_expiry: OnExpiry,
    /// What happens when the broker refuses a renewal (lease revoked, policy changed).
    #[arg(
        long,
        env = "KEYHAVEN_ON_REVOKED",
        value_enum,
        default_value = "lease-again"
    )]
    pub on_revoked: OnRevoked,
    /// File created once every secret has been written (removed again when not ready).
    #[arg(long, env = "KEYHAVEN_READY_FILE")]
    pub ready_file: Option<PathBuf>,
    /// Listener for `/healthz`, `/readyz` and Prometheus `/metrics`.
    #[arg(long, env = "KEYHAVEN_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Longest wait between retries when the broker is unreachable.
    #[arg(long, env = "KEYHAVEN_BACKOFF_MAX", default_value = "30s", value_parser = humantime::parse_duration)]
    pub backoff_max: Duration,
    /// Deadline of each call to the broker (and of connecting).
    #[arg(long, env = "KEYHAVEN_BROKER_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Do not revoke the leases on SIGTERM (they then run until their TTL).
    #[arg(long, env = "KEYHAVEN_KEEP_LEASES_ON_EXIT")]
    pub keep_leases_on_exit: bool,
    /// Log format.
    #[arg(long, env = "KEYHAVEN_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// `--on-expiry`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnExpiry {
    /// Keep the last good file (the application keeps working during a broker outage).
    Keep,
    /// Delete the file when its lease has ended.
    Delete,
}

/// `--on-revoked`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnRevoked {
    /// Lease the secret again and rewrite the file (if the policy still allows it).
    LeaseAgain,
    /// Delete the file and stop leasing that secret.
    Delete,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// How a secret's data is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// One key's value, byte for byte.
    Raw,
    /// A JSON object of the keys and their (UTF-8) values.
    Json,
    /// `KEY="value"` lines, keys upper-cased with other characters turned into `_`.
    Dotenv,
}

/// One entry of the secrets file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretSpec {
    /// Broker path, e.g. `shop/db`.
    pub path: String,
    /// File under the output directory (relative, no `..`).
    pub file: PathBuf,
    /// Output format.
    pub format: Format,
    /// For `raw`: which key (optional when the secret has exactly one).
    pub key: Option<String>,
    /// File mode.
    pub mode: u32,
    /// Requested lease TTL (`None`: the policy's default).
    pub ttl: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    secrets: Vec<FileEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEntry {
    path: String,
    file: PathBuf,
    #[serde(default)]
    format: Option<Format>,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    ttl: Option<String>,
}

/// A configuration problem, with what is wrong and where.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn err(m: impl Into<String>) -> ConfigError {
    ConfigError(m.into())
}

/// Default file mode: read-only for the owner.
pub const DEFAULT_MODE: u32 = 0o400;

/// Parses a secrets YAML document (`source` names it in errors).
pub fn parse_file(text: &str, source: &str) -> Result<Vec<SecretSpec>, ConfigError> {
    let doc: FileDoc = serde_yaml_ng::from_str(text).map_err(|e| err(format!("{source}: {e}")))?;
    doc.secrets
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            let at = format!("{source}: secrets[{i}]");
            let mode = match e.mode.as_deref() {
                None => DEFAULT_MODE,
                Some(m) => parse_mode(m).map_err(|m| err(format!("{at}: {m}")))?,
            };
            let ttl = match e.ttl.as_deref() {
                None => None,
                Some(t) => Some(
                    humantime::parse_duration(t)
                        .map_err(|x| err(format!("{at}: ttl {t:?}: {x}")))?,
                ),
            };
            let format = e.format.unwrap_or_else(|| guess_format(&e.file));
            Ok(SecretSpec {
                path: e.path,
                file: e.file,
                format,
                key: e.key,
                mode,
                ttl,
            })
        })
        .collect()
}

/// Parses `--secret PATH=FILE`.
pub fn parse_secret_flag(s: &str) -> Result<SecretSpec, ConfigError> {
    let (path, file) = s
        .split_once('=')
        .ok_or_else(|| err(format!("--secret {s:?}: expected PATH=FILE")))?;
    let file = PathBuf::from(file);
    Ok(SecretSpec {
        path: path.to_string(),
        format: guess_format(&file),
        file,
        key: None,
        mode: DEFAULT_MODE,
        ttl: None,
    })
}

fn guess_format(file: &Path) -> Format {
    match file.extension().and_then(|e| e.to_str()) {
        Some("json") => Format::Json,
        Some("env") => Format::Dotenv,
        _ => Format::Raw,
    }
}

/// Parses an octal mode such as `"0400"` or `"440"`. Only permission bits, and the owner
/// must be able to read.
pub fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    let m = u32::from_str_radix(digits, 8).map_err(|_| format!("mode {s:?} is not octal"))?;
    if m > 0o777 {
        return Err(format!("mode {s:?}: only permission bits (at most 0777)"));
    }
    if m & 0o400 == 0 {
        return Err(format!(
            "mode {s:?}: the owner must be able to read the file"
        ));
    }
    Ok(m)
}

/// Checks the whole list: paths look like broker paths, files are relative without `..`,
/// no two entries write the same file.
pub fn validate(specs: &[SecretSpec]) -> Result<(), ConfigError> {
    if specs.is_empty() {
        return Err(err(
            "no secrets to lease: give --config FILE or --secret PATH=FILE",
        ));
    }
    let mut files = HashSet::new();
    for s in specs {
        if s.path.is_empty()
            || s.path.starts_with('/')
            || s.path.ends_with('/')
            || s.path
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(err(format!("secret path {:?} is not a valid path", s.path)));
        }
        let ok = !s.file.as_os_str().is_empty()
            && s.file
                .components()
                .all(|c| matches!(c, Component::Normal(_)));
        if !ok {
            return Err(err(format!(
                "file {:?} (for {}) must be a relative path without `..`",
                s.file.display(),
                s.path
            )));
        }
        if s.file.components().any(|c| {
            c.as_os_str()
                .to_str()
                .is_some_and(|n| n.starts_with(".keyhaven-tmp"))
        }) {
            return Err(err(format!(
                "file {:?}: names starting with .keyhaven-tmp are reserved",
                s.file.display()
            )));
        }
        if !files.insert(s.file.clone()) {
            return Err(err(format!(
                "file {:?} is written by two secrets",
                s.file.display()
            )));
        }
        if s.key.is_some() && s.format != Format::Raw {
            return Err(err(format!("{}: `key` only applies to format raw", s.path)));
        }
    }
    Ok(())
}

/// All secrets from the flags and the config file, validated.
pub fn load(cli: &Cli) -> Result<Vec<SecretSpec>, ConfigError> {
    let mut specs = Vec::new();
    if let Some(p) = &cli.config {
        let text = std::fs::read_to_string(p)
            .map_err(|e| err(format!("cannot read {}: {e}", p.display())))?;
        specs.extend(parse_file(&text, &p.display().to_string())?);
    }
    for s in &cli.secrets {
        specs.push(parse_secret_flag(s)?);
    }
    validate(&specs)?;
    Ok(specs)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_the_documented_file() {
        let y = r#"
secrets:
  - path: shop/db
    file: db.json
    format: json
    mode: "0440"
    ttl: 5m
  - path: shop/api
    file: api-key
    key: token
  - path: shop/env
    file: app.env
"#;
        let s = parse_file(y, "t.yaml").unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].format, Format::Json);
        assert_eq!(s[0].mode, 0o440);
        assert_eq!(s[0].ttl, Some(Duration::from_secs(300)));
        assert_eq!(s[1].format, Format::Raw);
        assert_eq!(s[1].key.as_deref(), Some("token"));
        assert_eq!(s[1].mode, DEFAULT_MODE);
        assert_eq!(s[2].format, Format::Dotenv);
        validate(&s).unwrap();
    }

    #[test]
    fn rejects_bad_entries_with_a_message_naming_them() {
        let unknown = parse_file("secrets:\n- {path: a, file: b, colour: red}\n", "t.yaml");
        assert!(unknown.unwrap_err().0.contains("colour"));
        let badfmt = parse_file("secrets:\n- {path: a, file: b, format: xml}\n", "t.yaml");
        assert!(badfmt.is_err());
        let badmode = parse_file("secrets:\n- {path: a, file: b, mode: '0200'}\n", "t.yaml");
        assert!(badmode.unwrap_err().0.contains("secrets[0]"));
        assert!(parse_mode("999").is_err());
        assert!(parse_mode("01777").is_err());
        assert_eq!(parse_mode("0o600").unwrap(), 0o600);
        for (path, file) in [
            ("a", "../x"),
            ("a", "/etc/passwd"),
            ("a", ""),
            ("/a", "x"),
            ("a//b", "x"),
            ("a/..", "x"),
            ("a", ".keyhaven-tmp-1"),
        ] {
            let s = parse_secret_flag(&format!("{path}={file}")).unwrap();
            assert!(validate(&[s]).is_err(), "{path}={file} accepted");
        }
        let a = parse_secret_flag("a=x").unwrap();
        let b = parse_secret_flag("b=x").unwrap();
        assert!(validate(&[a.clone(), b])
            .unwrap_err()
            .0
            .contains("two secrets"));
        assert!(validate(&[]).is_err());
        assert!(parse_secret_flag("no-equals").is_err());
        validate(&[a]).unwrap();
    }
}
