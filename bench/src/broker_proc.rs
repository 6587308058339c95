//! The broker under test: the `broker` binary as a child process, gRPC over TLS on a free
//! loopback port, `/readyz` and `/metrics` on another, stderr to a log file in the bench's
//! temporary directory. Stopped on drop (SIGTERM, then SIGKILL), so it goes away on every
//! exit path, errors and Ctrl-C included.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use testkit::broker::BrokerFlags;
use testkit::pki::DevPki;
use testkit::process::{free_port, ChildProcess};

use crate::token::HsmToken;

/// Everything a broker process is started with.
#[derive(Debug)]
pub struct BrokerSetup<'a> {
    /// The `broker` binary.
    pub bin: &'a Path,
    /// `softhsm2.conf` of the run.
    pub softhsm_conf: &'a Path,
    /// PKCS#11 module.
    pub module: &'a Path,
    /// The token holding the broker KEK.
    pub token: &'a HsmToken,
    /// Database URL (no password in it: trust auth or a file).
    pub database_url: &'a str,
    /// TLS files.
    pub pki: &'a DevPki,
    /// Dev-mode issuer key (PKCS#8 PEM) shared with the bench's token minting.
    pub dev_key: &'a Path,
    /// File holding the bootstrap admin credential.
    pub bootstrap_file: &'a Path,
    /// Where its stderr goes.
    pub log: PathBuf,
    /// More flags, appended last.
    pub extra: Vec<String>,
}

/// A running `broker`.
#[derive(Debug)]
pub struct BrokerProcess {
    process: ChildProcess,
    port: u16,
    metrics: String,
}

impl BrokerProcess {
    /// Starts the broker. Configured by flags (file paths for every secret); every inherited
    /// `KEYHAVEN_*` variable is removed first so the caller's shell cannot change the run.
    pub fn spawn(s: &BrokerSetup<'_>) -> anyhow::Result<BrokerProcess> {
        let flags = BrokerFlags {
            port: free_port()?,
            metrics_port: free_port()?,
            database_url: s.database_url.to_owned(),
            tls_cert: s.pki.server_cert.clone(),
            tls_key: s.pki.server_key.clone(),
            softhsm_conf: s.softhsm_conf.to_path_buf(),
            module: s.module.to_path_buf(),
            token_label: s.token.label.clone(),
            pin_file: s.token.pin_file.clone(),
            dev_key: s.dev_key.to_path_buf(),
            bootstrap_file: s.bootstrap_file.to_path_buf(),
            audit_file: None,
            // Every client is its own identity; the per-identity limit (default 50/s) would
            // measure the limiter, not the broker.
            extra: ["--rate-limit", "0"]
                .into_iter()
                .chain(s.extra.iter().map(String::as_str))
                .map(Into::into)
                .collect(),
        };
        let process = ChildProcess::spawn_logged(&mut flags.command(s.bin), "broker", &s.log)
            .with_context(|| format!("start {}", s.bin.display()))?;
        Ok(BrokerProcess {
            process,
            port: flags.port,
            metrics: flags.metrics_addr(),
        })
    }

    /// The gRPC endpoint (TLS; verify the certificate as [`testkit::pki::SERVER_NAME`]).
    pub fn endpoint(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// Process id (for `/proc/<pid>/status`).
    pub fn pid(&self) -> u32 {
        self.process.id()
    }

    /// Waits until `/readyz` answers 200 (database answers, KEK found).
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.ensure_running()?;
            let last = match self.http_get("/readyz").await {
                Ok((200, _)) => return Ok(()),
                Ok((code, body)) => format!("/readyz {code}: {}", body.trim()),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "broker not ready after {timeout:?} (last: {last}); its log:\n{}",
                    self.process.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// GET `path` on the metrics listener; returns (status, body).
    pub async fn http_get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let (addr, p) = (self.metrics.clone(), path.to_owned());
        Ok(tokio::task::spawn_blocking(move || testkit::http::get(&addr, &p)).await??)
    }

    /// Fails (with the end of its log) if the process has exited.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        Ok(self.process.ensure_running()?)
    }
}

/// Resident memory of a process, from `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    /// `VmRSS`: resident now.
    pub rss_kib: u64,
    /// `VmHWM`: the most it has been resident.
    pub hwm_kib: u64,
}

impl Memory {
    /// Reads `/proc/<pid>/status`.
    pub fn of(pid: u32) -> anyhow::Result<Memory> {
        let path = format!("/proc/{pid}/status");
        let text = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
        Ok(Memory {
            rss_kib: status_kib(&text, "VmRSS:").with_context(|| format!("no VmRSS in {path}"))?,
            hwm_kib: status_kib(&text, "VmHWM:").with_context(|| format!("no VmHWM in {path}"))?,
        })
    }
}

/// The value in kB of a `Name:   1234 kB` line.
fn status_kib(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_proc_status_lines() {
        let text = "Name:\tbroker\nVmHWM:\t   51234 kB\nVmRSS:\t   40960 kB\n";
        assert_eq!(status_kib(text, "VmRSS:"), Some(40960));
        assert_eq!(status_kib(text, "VmHWM:"), Some(51234));
        assert_eq!(status_kib(text, "VmSwap:"), None);
        let me = Memory::of(std::process::id()).unwrap_or_default();
        assert!(me.rss_kib > 0 && me.hwm_kib >= me.rss_kib, "{me:?}");
    }
}
