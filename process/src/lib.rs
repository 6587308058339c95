//! `keyhaven-process`: what every Keyhaven binary (`kms-plugin`, `broker`, `brokerctl`,
//! `broker-agent`) does the same way — logs to stderr filtered by `KEYHAVEN_LOG`, stops on
//! SIGTERM/SIGINT, and reads secrets (tokens, credentials, database URLs) from files whose
//! content never appears in an error. Servers enable feature `http` for the bounded HTTP/1.1
//! listener they share ([`http`]); [`probe`] asks such a listener's `/readyz` (a container
//! healthcheck).
//!
//! Not here: anything about PKCS#11, the broker or the apiserver.
#![forbid(unsafe_code)]

#[cfg(feature = "http")]
pub mod http;
pub mod probe;
pub mod secret_file;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Logs to stderr, filtered by `KEYHAVEN_LOG` (`info`, `warn,kms_plugin=debug`, ...), else by
/// `default_filter`. A second call in one process does nothing.
pub fn init_logs(format: LogFormat, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEYHAVEN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => b.json().try_init(),
        LogFormat::Text => b.try_init(),
    };
}

/// Resolves at the first SIGTERM or SIGINT (never, if the handlers cannot be installed).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
