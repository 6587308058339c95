//! The broker under test: the `broker` binary as a child process, gRPC over TLS on a free
//! loopback port, `/readyz` and `/metrics` on another, stderr to a log file in the bench's
//! temporary directory. Stopped on drop (SIGTERM, then SIGKILL), so it goes away on every
//! exit path, errors and Ctrl-C included.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::pki::ServerPki;
use crate::token::HsmToken;

/// A free TCP port on loopback.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("find a free loopback port")?
        .port())
}

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
    pub pki: &'a ServerPki,
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
    child: Option<Child>,
    pid: u32,
    port: u16,
    metrics: String,
    log: PathBuf,
}

impl BrokerProcess {
    /// Starts the broker. Configured by flags (file paths for every secret); every inherited
    /// `KEYHAVEN_*` variable is removed first so the caller's shell cannot change the run.
    pub fn spawn(s: &BrokerSetup<'_>) -> anyhow::Result<BrokerProcess> {
        let port = free_port()?;
        let metrics = format!("127.0.0.1:{}", free_port()?);
        let log_file = std::fs::File::create(&s.log).context("create the broker log")?;
        let mut cmd = Command::new(s.bin);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("KEYHAVEN_") {
                cmd.env_remove(name);
            }
        }
        cmd.env("SOFTHSM2_CONF", s.softhsm_conf)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--database-url", s.database_url])
            .arg("--tls-cert")
            .arg(&s.pki.cert)
            .arg("--tls-key")
            .arg(&s.pki.key)
            .arg("--pkcs11-module")
            .arg(s.module)
            .args(["--token-label", &s.token.label])
            .arg("--pin-file")
            .arg(&s.token.pin_file)
            .arg("--dev")
            .arg("--dev-key")
            .arg(s.dev_key)
            .arg("--bootstrap-file")
            .arg(s.bootstrap_file)
            .args(["--metrics-addr", &metrics])
            // Every client is its own identity; the per-identity limit (default 50/s) would
            // measure the limiter, not the broker.
            .args(["--rate-limit", "0"])
            .args(&s.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        let child = cmd
            .spawn()
            .with_context(|| format!("start {}", s.bin.display()))?;
        Ok(BrokerProcess {
            pid: child.id(),
            child: Some(child),
            port,
            metrics,
            log: s.log.clone(),
        })
    }

    /// The gRPC endpoint (TLS; verify the certificate as [`crate::pki::SERVER_NAME`]).
    pub fn endpoint(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// Process id (for `/proc/<pid>/status`).
    pub fn pid(&self) -> u32 {
        self.pid
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
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// GET `path` on the metrics listener; returns (status, body).
    pub async fn http_get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let fut = async {
            let mut s = tokio::net::TcpStream::connect(&self.metrics).await?;
            s.write_all(
                format!("GET {path} HTTP/1.0\r\nHost: {}\r\n\r\n", self.metrics).as_bytes(),
            )
            .await?;
            let mut resp = String::new();
            s.read_to_string(&mut resp).await?;
            Ok::<_, std::io::Error>(resp)
        };
        let resp = tokio::time::timeout(Duration::from_secs(10), fut)
            .await
            .with_context(|| format!("GET {path} timed out"))?
            .with_context(|| format!("GET {path}"))?;
        let status = resp
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = resp.split_once("\r\n\r\n").map_or("", |x| x.1).to_owned();
        Ok((status, body))
    }

    /// Fails (with the end of its log) if the process has exited.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        let exited = match self.child.as_mut() {
            Some(c) => c.try_wait().context("wait for the broker")?,
            None => anyhow::bail!("the broker was already stopped"),
        };
        if let Some(status) = exited {
            self.child = None;
            anyhow::bail!("broker exited ({status}); its log:\n{}", self.log_tail());
        }
        Ok(())
    }

    /// The last lines of the broker's stderr.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        self.stop();
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
