//! Flags and the secrets file: which broker paths to lease and how to write each one.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use clap::{Parser, ValueEnum};
use serde::Deserialize;

use crate::template::{Template, MAX_TEMPLATE_BYTES};

mod flags;
pub use flags::flag_specs;

/// Keyhaven sidecar: leases secrets from the broker with the pod's ServiceAccount token,
/// writes them atomically into a shared in-memory volume, renews the leases, follows new
/// secret versions, and revokes its leases on SIGTERM.
///
/// Secrets come from `--config` (a YAML file) and/or `--secret PATH=FILE`, each with
/// `--format`, `--key`, `--template` or `--template-file FILE=…` for its file. Every flag that
/// is not repeatable also reads the environment variable shown. Values and tokens are never
/// logged.
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
    /// A secret without a config file: `PATH=FILE`, the broker path first, then the file.
    /// The format is guessed from FILE (`.json`: json, `.env`: dotenv, else raw, which needs
    /// a secret with one key or `--key`) unless `--format` or `--template` says otherwise.
    /// Repeatable.
    #[arg(long = "secret", value_name = "PATH=FILE")]
    pub secrets: Vec<String>,
    /// Format of the `--secret` that writes FILE: raw, json, dotenv or template (overrides
    /// the guess from the extension). Repeatable.
    #[arg(long = "format", value_name = "FILE=FORMAT")]
    pub formats: Vec<String>,
    /// For format raw: the key of the `--secret` that writes FILE. Repeatable.
    #[arg(long = "key", value_name = "FILE=KEY")]
    pub keys: Vec<String>,
    /// Inline template for FILE (format template, implied): the secret's keys are variables,
    /// `{{ username }}`, also as `{{ data["db-url"] }}`, and `{{ path }}` is the broker path.
    /// Repeatable.
    #[arg(long = "template", value_name = "FILE=TEXT")]
    pub templates: Vec<String>,
    /// Like `--template`, the template read once from the file PATH at startup. Repeatable.
    #[arg(long = "template-file", value_name = "FILE=PATH")]
    pub template_files: Vec<String>,
    /// Requested lease TTL of the `--secret` secrets (default: the policy's).
    #[arg(long, env = "KEYHAVEN_TTL", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub ttl: Option<Duration>,
    /// Mode of the files the `--secret` secrets are written to (octal; the owner must be
    /// able to read).
    #[arg(long, env = "KEYHAVEN_FILE_MODE", value_name = "OCTAL", default_value = "0400", value_parser = parse_mode)]
    pub file_mode: u32,
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
    /// A template (`SecretSpec::template`) rendered with the keys as variables.
    Template,
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Format::Raw => "raw",
            Format::Json => "json",
            Format::Dotenv => "dotenv",
            Format::Template => "template",
        })
    }
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Format, String> {
        match s {
            "raw" => Ok(Format::Raw),
            "json" => Ok(Format::Json),
            "dotenv" => Ok(Format::Dotenv),
            "template" => Ok(Format::Template),
            _ => Err(format!(
                "unknown format {s:?} (raw, json, dotenv or template)"
            )),
        }
    }
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
    /// For `template`: the compiled template (the format of any other has none).
    pub template: Option<Template>,
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
    #[serde(default)]
    template: Option<String>,
    #[serde(default)]
    template_file: Option<PathBuf>,
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

/// Parses a secrets YAML document (`source` names it in errors). A relative `template_file`
/// is read from the directory of `source`.
pub fn parse_file(text: &str, source: &str) -> Result<Vec<SecretSpec>, ConfigError> {
    let doc: FileDoc = serde_yaml_ng::from_str(text).map_err(|e| err(format!("{source}: {e}")))?;
    let base = Path::new(source).parent().unwrap_or(Path::new(""));
    doc.secrets
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            let at = format!("{source}: secrets[{i}] ({})", e.file.display());
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
            let text = match (format, e.template, e.template_file) {
                (Format::Template, Some(t), None) => Some(t),
                (Format::Template, None, Some(p)) => Some(
                    read_template_file(&base.join(&p)).map_err(|m| err(format!("{at}: {m}")))?,
                ),
                (Format::Template, Some(_), Some(_)) => {
                    return Err(err(format!(
                        "{at}: give `template` or `template_file`, not both"
                    )))
                }
                (Format::Template, None, None) => {
                    return Err(err(format!(
                        "{at}: format template needs `template` or `template_file`"
                    )))
                }
                (_, None, None) => None,
                (_, _, _) => {
                    return Err(err(format!(
                        "{at}: `template` and `template_file` need `format: template`"
                    )))
                }
            };
            let template = text
                .map(|t| Template::compile(&t).map_err(|x| err(format!("{at}: {x}"))))
                .transpose()?;
            Ok(SecretSpec {
                path: e.path,
                file: e.file,
                format,
                key: e.key,
                mode,
                ttl,
                template,
            })
        })
        .collect()
}

/// Reads a template file: a regular file of at most `MAX_TEMPLATE_BYTES`, UTF-8.
pub fn read_template_file(path: &Path) -> Result<String, String> {
    use std::io::Read as _;
    let cannot = |e: std::io::Error| format!("cannot read the template {}: {e}", path.display());
    // Before opening: opening a FIFO would block.
    if !std::fs::metadata(path).map_err(cannot)?.is_file() {
        return Err(format!("template {} is not a regular file", path.display()));
    }
    let f = std::fs::File::open(path).map_err(cannot)?;
    let mut bytes = Vec::new();
    f.take(MAX_TEMPLATE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(cannot)?;
    if bytes.len() > MAX_TEMPLATE_BYTES {
        return Err(format!(
            "template {} is larger than {MAX_TEMPLATE_BYTES} bytes",
            path.display()
        ));
    }
    String::from_utf8(bytes).map_err(|_| format!("template {} is not UTF-8", path.display()))
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
        template: None,
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
        if (s.format == Format::Template) != s.template.is_some() {
            return Err(err(format!(
                "{}: a template goes with format template, and only with it",
                s.path
            )));
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
    specs.extend(flag_specs(cli)?);
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

    #[test]
    fn template_entries_inline_or_from_a_file_beside_the_config() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("t")).unwrap();
        std::fs::write(dir.path().join("t/db.tmpl"), "user={{ username }}\n").unwrap();
        let source = dir.path().join("agent.yaml").display().to_string();
        let y = r#"
secrets:
  - path: shop/db
    file: db.conf
    format: template
    template: "host=db user={{ username }}"
  - path: shop/db
    file: db2.conf
    format: template
    template_file: t/db.tmpl
"#;
        let s = parse_file(y, &source).unwrap();
        validate(&s).unwrap();
        assert_eq!(s[0].format, Format::Template);
        assert_eq!(
            s[0].template.as_ref().map(Template::source),
            Some("host=db user={{ username }}")
        );
        assert_eq!(
            s[1].template.as_ref().map(Template::source),
            Some("user={{ username }}\n")
        );
        let bad = |entry: &str| {
            parse_file(
                &format!("secrets:\n- {{path: a, file: f, {entry}}}\n"),
                &source,
            )
            .unwrap_err()
            .0
        };
        assert!(bad("format: template").contains("needs `template` or `template_file`"));
        assert!(
            bad("format: template, template: x, template_file: t/db.tmpl").contains("not both")
        );
        assert!(bad("template: x").contains("need `format: template`"));
        assert!(bad("format: json, template_file: t/db.tmpl").contains("need `format: template`"));
        assert!(bad("format: template, template_file: nope").contains("cannot read the template"));
        let e = bad("format: template, template: \"a\\n{{ b \"");
        assert!(
            e.contains("secrets[0] (f): template syntax error at line 2"),
            "{e}"
        );
        let keyed = parse_file(
            "secrets:\n- {path: a, file: f, format: template, template: x, key: k}\n",
            &source,
        )
        .unwrap();
        assert!(validate(&keyed)
            .unwrap_err()
            .0
            .contains("only applies to format raw"));
    }
}
