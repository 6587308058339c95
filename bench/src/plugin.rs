//! The plugin under test: `kms-plugin serve` as a child process on a socket in the bench's
//! temporary directory, stderr to a log file there. Stopped on drop (SIGTERM, then SIGKILL),
//! so it goes away on every exit path, errors and Ctrl-C included.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use keyhaven_proto::kms::v2::StatusRequest;
use testkit::process::ChildProcess;

use crate::grpc;
use crate::token::BenchToken;

/// A running `kms-plugin serve`.
#[derive(Debug)]
pub struct PluginProcess {
    process: ChildProcess,
    socket: PathBuf,
}

impl PluginProcess {
    /// Starts `plugin serve` on `socket` with a session pool of `pool_size`.
    pub fn spawn(
        token: &BenchToken,
        plugin: &Path,
        pool_size: usize,
        socket: PathBuf,
    ) -> anyhow::Result<PluginProcess> {
        let mut cmd = token.command(plugin, pool_size);
        cmd.arg("serve")
            .arg("--listen")
            .arg(format!("unix://{}", socket.display()));
        let process = ChildProcess::spawn_logged(
            &mut cmd,
            "kms-plugin",
            &token.dir().join("kms-plugin.log"),
        )?;
        Ok(PluginProcess { process, socket })
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
                    self.process.log_tail(30)
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
        Ok(self.process.ensure_running()?)
    }
}
