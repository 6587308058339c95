//! The plugin under test: `kms-plugin serve` as a child process on a socket in the bench's
//! temporary directory, stderr to a log file there. Stopped on drop (SIGTERM, then SIGKILL),
//! so it goes away on every exit path, errors and Ctrl-C included.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use keyhaven_proto::kms::v2::StatusRequest;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::grpc;
use crate::token::BenchToken;

/// A running `kms-plugin serve`.
#[derive(Debug)]
pub struct PluginProcess {
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
}

impl PluginProcess {
    /// Starts `plugin serve` on `socket` with a session pool of `pool_size`.
    pub fn spawn(
        token: &BenchToken,
        plugin: &Path,
        pool_size: usize,
        socket: PathBuf,
    ) -> anyhow::Result<PluginProcess> {
        let log = token.dir().join("kms-plugin.log");
        let log_file = std::fs::File::create(&log).context("create the plugin log")?;
        let child = token
            .command(plugin, pool_size)
            .arg("serve")
            .arg("--listen")
            .arg(format!("unix://{}", socket.display()))
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("start {} serve", plugin.display()))?;
        Ok(PluginProcess {
            child: Some(child),
            socket,
            log,
        })
    }

    /// The socket it serves on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Waits until Status answers `healthz: "ok"`; returns the key_id it reports.
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        let mut last = String::from("socket not there yet");
        loop {
            self.ensure_running()?;
            if self.socket.exists() {
                match self.status().await {
                    Ok((healthz, key_id)) if healthz == "ok" => return Ok(key_id),
                    Ok((healthz, _)) => last = format!("healthz {healthz:?}"),
                    Err(e) => last = format!("{e:#}"),
                }
            }
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "kms-plugin not healthy after {timeout:?} (last: {last}); its log:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn status(&self) -> anyhow::Result<(String, String)> {
        let mut c = grpc::client(&self.socket).await?;
        let st = tokio::time::timeout(Duration::from_secs(2), c.status(StatusRequest {}))
            .await
            .context("Status timed out")?
            .map_err(|s| anyhow::anyhow!("Status: {:?}: {}", s.code(), s.message()))?
            .into_inner();
        Ok((st.healthz, st.key_id))
    }

    /// Fails (with the end of its log) if the process has exited.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        let exited = match self.child.as_mut() {
            Some(c) => c.try_wait().context("wait for kms-plugin")?,
            None => anyhow::bail!("kms-plugin was already stopped"),
        };
        if let Some(status) = exited {
            self.child = None;
            anyhow::bail!(
                "kms-plugin exited ({status}); its log:\n{}",
                self.log_tail()
            );
        }
        Ok(())
    }

    /// The last lines of the plugin's stderr.
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

impl Drop for PluginProcess {
    fn drop(&mut self) {
        self.stop();
    }
}
