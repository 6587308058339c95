//! `keyhaven-injector`: the mutating admission webhook that adds `broker-agent` to pods that
//! opt in with `keyhaven.io/` annotations — as a native sidecar with a projected
//! ServiceAccount token, an in-memory secrets volume mounted read-only into the app, and the
//! broker's address and CA from the injector's flags.
//!
//! A pod's annotations are checked whole before anything is injected: an unknown or malformed
//! `keyhaven.io/` annotation refuses the pod with a message naming it. The agent's command
//! line is checked with the agent's own parser, so what is injected is what the agent
//! accepts.
//!
//! Not here: talking to the apiserver (a webhook only answers), or to the broker.
#![forbid(unsafe_code)]

pub mod annotations;
pub mod config;
pub mod metrics;
pub mod mutate;
pub mod quantity;
pub mod review;
pub mod server;
pub mod tls;

use std::io::Read as _;
use std::sync::Arc;

use config::{Cli, Command, LogFormat, MutateArgs, ServeArgs};

/// Why the injector stopped.
#[derive(Debug, thiserror::Error)]
pub enum InjectorError {
    /// The serving certificate did not load at start.
    #[error("serving certificate: {0}")]
    Tls(#[from] tls::TlsError),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The listener could not be bound, or input not read.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// `mutate` was given something that is not an AdmissionReview.
    #[error("{0}")]
    Invalid(String),
}

/// Runs the command line.
pub async fn run(cli: Cli) -> Result<(), InjectorError> {
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Mutate(args) => mutate_once(&args),
    }
}

async fn serve(args: ServeArgs) -> Result<(), InjectorError> {
    keyhaven_process::init_logs(
        match args.log_format {
            LogFormat::Text => keyhaven_process::LogFormat::Text,
            LogFormat::Json => keyhaven_process::LogFormat::Json,
        },
        "info",
    );
    let cert = Arc::new(tls::ReloadingCert::load(
        &args.tls_cert_file,
        &args.tls_key_file,
    )?);
    let state = Arc::new(server::AppState {
        cfg: args.injection.clone(),
        metrics: metrics::Metrics::default(),
        cert: cert.clone(),
        request_timeout: args.request_timeout,
    });
    state.metrics.cert_not_after.set(cert.not_after());
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    tracing::info!(
        addr = %listener.local_addr()?,
        agent_image = %args.injection.agent_image,
        broker = %args.injection.broker_addr,
        "injector listening (/mutate, /healthz, /readyz, /metrics)"
    );
    let reload = tokio::spawn(server::reload_loop(
        state.clone(),
        args.cert_reload_interval,
    ));
    let r = server::serve(
        listener,
        state,
        server::limits(&args),
        keyhaven_process::shutdown_signal(),
    )
    .await;
    reload.abort();
    tracing::info!("injector stopped");
    Ok(r?)
}

fn mutate_once(args: &MutateArgs) -> Result<(), InjectorError> {
    let mut body = Vec::new();
    if args.file.as_os_str() == "-" {
        std::io::stdin().read_to_end(&mut body)?;
    } else {
        body = std::fs::read(&args.file)?;
    }
    if args.pod {
        let pod: serde_json::Value = serde_yaml_ng::from_slice(&body)
            .map_err(|e| InjectorError::Invalid(format!("not a Pod manifest: {e}")))?;
        let namespace = pod
            .pointer("/metadata/namespace")
            .and_then(|n| n.as_str())
            .unwrap_or("default")
            .to_owned();
        let request = review::create_request(&pod, &namespace, "keyhaven-injector-mutate");
        body = serde_json::to_vec(&request).map_err(std::io::Error::other)?;
    }
    let answer = review::answer(&body, &args.injection);
    if answer.outcome == review::Outcome::Invalid {
        let why = answer
            .body
            .pointer("/response/status/message")
            .and_then(|m| m.as_str())
            .unwrap_or("invalid AdmissionReview");
        return Err(InjectorError::Invalid(why.to_owned()));
    }
    let patch = review::patch_of(&answer.body).map(|p| serde_json::json!(p));
    let out = match (&answer.patched, &patch) {
        (Some(pod), _) if args.patched_pod => pod,
        (_, Some(p)) if args.patch => p,
        _ => &answer.body,
    };
    let text = serde_json::to_string_pretty(out).map_err(std::io::Error::other)?;
    println!("{text}");
    Ok(())
}
