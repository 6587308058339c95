//! Flags: the HTTPS listener and what is injected (agent image, broker address, bounds).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::quantity::Quantity;

/// Keyhaven injector: a mutating admission webhook that adds `broker-agent` to pods that
/// opt in (`keyhaven.io/inject: "true"`), as a native sidecar with the files the pod's
/// `keyhaven.io/secret-<file>` annotations name. Every flag also reads the environment
/// variable shown.
#[derive(Debug, Clone, Parser)]
#[command(name = "keyhaven-injector", version)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Serve the webhook over HTTPS: `/mutate`, `/healthz`, `/readyz`, `/metrics`.
    Serve(ServeArgs),
    /// Answer one AdmissionReview read from a file (`-`: standard input) and print the
    /// response — or its JSON Patch decoded (`--patch`), or the pod as it would be created
    /// (`--patched-pod`). No cluster needed.
    Mutate(MutateArgs),
}

/// `keyhaven-injector serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address of the HTTPS listener.
    #[arg(long, env = "KEYHAVEN_INJECTOR_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// PEM serving certificate (chain), read again when it changes.
    #[arg(long, env = "KEYHAVEN_INJECTOR_TLS_CERT")]
    pub tls_cert_file: PathBuf,
    /// PEM private key of `--tls-cert-file`, read again when it changes.
    #[arg(long, env = "KEYHAVEN_INJECTOR_TLS_KEY")]
    pub tls_key_file: PathBuf,
    /// How often the certificate and key files are checked for a change.
    #[arg(long, env = "KEYHAVEN_INJECTOR_CERT_RELOAD_INTERVAL", default_value = "2s", value_parser = positive)]
    pub cert_reload_interval: Duration,
    /// Most connections open at once; more wait in the kernel's accept queue.
    #[arg(long, env = "KEYHAVEN_INJECTOR_MAX_CONNECTIONS", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_connections: u32,
    /// A connection that has not finished its TLS handshake after this is closed.
    #[arg(long, env = "KEYHAVEN_INJECTOR_TLS_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = positive)]
    pub tls_handshake_timeout: Duration,
    /// A request whose headers and body have not arrived after this is answered 408 and its
    /// connection closed.
    #[arg(long, env = "KEYHAVEN_INJECTOR_REQUEST_TIMEOUT", default_value = "10s", value_parser = positive)]
    pub request_timeout: Duration,
    /// Every connection is closed gracefully after this (the apiserver reconnects); bounds
    /// how long an idle connection stays open.
    #[arg(long, env = "KEYHAVEN_INJECTOR_MAX_CONNECTION_AGE", default_value = "5m", value_parser = positive)]
    pub max_connection_age: Duration,
    /// Log format.
    #[arg(long, env = "KEYHAVEN_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// What is injected.
    #[command(flatten)]
    pub injection: InjectionConfig,
}

/// `keyhaven-injector mutate`.
#[derive(Debug, Clone, Args)]
pub struct MutateArgs {
    /// The AdmissionReview request (JSON), `-` for standard input.
    pub file: PathBuf,
    /// FILE is a Pod manifest (YAML or JSON), not an AdmissionReview: answer the request the
    /// apiserver would send to create it (in its `metadata.namespace`, else `default`).
    #[arg(long)]
    pub pod: bool,
    /// Print the patched pod instead of the AdmissionReview response.
    #[arg(long, conflicts_with = "patch")]
    pub patched_pod: bool,
    /// Print the response's JSON Patch, decoded, instead of the AdmissionReview response.
    #[arg(long)]
    pub patch: bool,
    /// What is injected.
    #[command(flatten)]
    pub injection: InjectionConfig,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// What the injector adds to a pod, and the bounds on what a pod's annotations may change.
#[derive(Debug, Clone, Args)]
pub struct InjectionConfig {
    /// Image of the agent container.
    #[arg(long, env = "KEYHAVEN_AGENT_IMAGE")]
    pub agent_image: String,
    /// Image pull policy of the agent container.
    #[arg(long, env = "KEYHAVEN_AGENT_IMAGE_PULL_POLICY", default_value = "IfNotPresent", value_parser = ["Always", "IfNotPresent", "Never"])]
    pub agent_image_pull_policy: String,
    /// Broker address given to every agent (`https://host:port`).
    #[arg(long, env = "KEYHAVEN_BROKER_ADDR")]
    pub broker_addr: String,
    /// ConfigMap, in the pod's namespace, holding the broker's CA certificate.
    #[arg(
        long,
        env = "KEYHAVEN_BROKER_CA_CONFIGMAP",
        default_value = "keyhaven-broker-ca"
    )]
    pub broker_ca_configmap: String,
    /// Key of the CA certificate in that ConfigMap.
    #[arg(long, env = "KEYHAVEN_BROKER_CA_KEY", default_value = "ca.crt")]
    pub broker_ca_key: String,
    /// Let a pod choose another broker with `keyhaven.io/broker-addr` (off: the annotation
    /// is refused).
    #[arg(long, env = "KEYHAVEN_ALLOW_BROKER_ADDR_OVERRIDE")]
    pub allow_broker_addr_override: bool,
    /// Namespaces whose pods are never changed (repeatable, or comma-separated).
    #[arg(
        long = "exclude-namespace",
        env = "KEYHAVEN_EXCLUDE_NAMESPACES",
        value_delimiter = ',',
        default_value = "kube-system,kube-public,kube-node-lease"
    )]
    pub exclude_namespaces: Vec<String>,
    /// The injector's own namespace (from the downward API); its pods are never changed.
    #[arg(long, env = "POD_NAMESPACE")]
    pub own_namespace: Option<String>,
    /// Lifetime of the projected ServiceAccount token (the kubelet rotates it at 80%).
    #[arg(long, env = "KEYHAVEN_TOKEN_EXPIRATION", default_value = "10m", value_parser = token_expiration)]
    pub token_expiration: Duration,
    /// Port of the agent's `/healthz`, `/readyz` and `/metrics` (a pod may choose another
    /// with `keyhaven.io/agent-port`).
    #[arg(long, env = "KEYHAVEN_AGENT_PORT", default_value_t = 9466, value_parser = clap::value_parser!(u16).range(1024..))]
    pub agent_port: u16,
    /// Size limit of the in-memory secrets volume.
    #[arg(long, env = "KEYHAVEN_SECRETS_VOLUME_SIZE", default_value = "1Mi")]
    pub secrets_volume_size: Quantity,
    /// The agent's CPU request (a pod may change it within `--max-agent-cpu`).
    #[arg(long, env = "KEYHAVEN_AGENT_CPU_REQUEST", default_value = "5m")]
    pub agent_cpu_request: Quantity,
    /// The agent's CPU limit (none by default).
    #[arg(long, env = "KEYHAVEN_AGENT_CPU_LIMIT")]
    pub agent_cpu_limit: Option<Quantity>,
    /// The agent's memory request.
    #[arg(long, env = "KEYHAVEN_AGENT_MEMORY_REQUEST", default_value = "16Mi")]
    pub agent_memory_request: Quantity,
    /// The agent's memory limit.
    #[arg(long, env = "KEYHAVEN_AGENT_MEMORY_LIMIT", default_value = "32Mi")]
    pub agent_memory_limit: Quantity,
    /// Largest CPU request or limit a pod's annotations may give the agent.
    #[arg(long, env = "KEYHAVEN_MAX_AGENT_CPU", default_value = "500m")]
    pub max_agent_cpu: Quantity,
    /// Largest memory request or limit a pod's annotations may give the agent.
    #[arg(long, env = "KEYHAVEN_MAX_AGENT_MEMORY", default_value = "256Mi")]
    pub max_agent_memory: Quantity,
}

fn positive(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(d)
}

/// Kubernetes accepts projected token lifetimes from 10 minutes to 2^32 seconds.
fn token_expiration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < Duration::from_secs(600) || d.as_secs() > u64::from(u32::MAX) {
        return Err("must be between 10m and 2^32 seconds (the apiserver's bounds)".into());
    }
    Ok(d)
}

impl InjectionConfig {
    /// The configuration these flags give (as `keyhaven-injector mutate` parses them), for
    /// tests and embedding: `["--agent-image=…", "--broker-addr=…"]`.
    pub fn from_flags(flags: &[&str]) -> Result<Self, clap::Error> {
        let args = ["keyhaven-injector", "mutate", "-"]
            .into_iter()
            .chain(flags.iter().copied());
        match Cli::try_parse_from(args)?.command {
            Command::Mutate(m) => Ok(m.injection),
            Command::Serve(s) => Ok(s.injection),
        }
    }
}
