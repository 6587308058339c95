//! Processes: this workspace's built binaries, free loopback ports, a runtime for driving
//! async clients from blocking code, and [`ChildProcess`], a child stopped on drop.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::{Error, Result};

/// How often a wait polls the child.
const POLL: Duration = Duration::from_millis(20);

/// The directory holding this workspace's binaries (`target/<profile>`), found from the
/// running executable: a test in `target/<profile>/deps/` or a binary in `target/<profile>/`.
pub fn bin_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().map_err(|e| Error::io("find the running executable", e))?;
    let dir = exe
        .parent()
        .ok_or_else(|| Error::Unexpected(format!("{} has no directory", exe.display())))?;
    Ok(match dir.file_name() {
        Some(n) if n == "deps" => dir.parent().unwrap_or(dir),
        _ => dir,
    }
    .to_path_buf())
}

/// Path of a binary of this workspace, built by `cargo build --workspace --bins` (which
/// `scripts/test.sh` runs before the tests).
pub fn bin_path(name: &str) -> Result<PathBuf> {
    let p = bin_dir()?.join(name);
    if p.exists() {
        Ok(p)
    } else {
        Err(Error::NotBuilt { path: p })
    }
}

/// `Command::new(bin)` without any `KEYHAVEN_*` variable this process inherited, so the
/// caller's shell cannot change what a test or a bench run starts.
pub fn clean_command(bin: &Path) -> Command {
    let mut cmd = Command::new(bin);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("KEYHAVEN_") {
            cmd.env_remove(name);
        }
    }
    cmd
}

/// Runs `cmd` to completion with stdin from `/dev/null`; an [`Error::CommandFailed`] with its
/// stderr unless it succeeds. `what` names the command in errors.
pub fn run(cmd: &mut Command, what: &str) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::io(format!("run {what}"), e))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(Error::CommandFailed {
            what: what.to_owned(),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// A free TCP port on loopback.
pub fn free_port() -> Result<u16> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Error::io("find a free loopback port", e))
}

/// A small runtime for driving async clients from blocking code.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::io("start a tokio runtime", e))
}

/// A running child process, stopped on drop: `SIGTERM`, then `SIGKILL` if it has not exited
/// within its grace period (5 s unless [`ChildProcess::with_grace`] says otherwise).
#[derive(Debug)]
pub struct ChildProcess {
    child: Child,
    what: String,
    log: Option<PathBuf>,
    grace: Duration,
    exited: Option<ExitStatus>,
}

impl ChildProcess {
    /// Spawns `cmd` with its standard streams as the caller set them. `what` names the
    /// process in errors.
    pub fn spawn(cmd: &mut Command, what: &str) -> Result<ChildProcess> {
        Self::start(cmd, what, None)
    }

    /// Spawns `cmd` with stdout discarded and stderr appended to `log` (created if missing,
    /// so a restarted process keeps one log).
    pub fn spawn_logged(cmd: &mut Command, what: &str, log: &Path) -> Result<ChildProcess> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| Error::io(format!("open {}", log.display()), e))?;
        cmd.stdout(Stdio::null()).stderr(file);
        Self::start(cmd, what, Some(log.to_path_buf()))
    }

    fn start(cmd: &mut Command, what: &str, log: Option<PathBuf>) -> Result<ChildProcess> {
        let child = cmd
            .spawn()
            .map_err(|e| Error::io(format!("start {what}"), e))?;
        Ok(ChildProcess {
            child,
            what: what.to_owned(),
            log,
            grace: Duration::from_secs(5),
            exited: None,
        })
    }

    /// How long [`ChildProcess::terminate`] (and drop) waits after `SIGTERM`.
    pub fn with_grace(mut self, grace: Duration) -> ChildProcess {
        self.grace = grace;
        self
    }

    /// Process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    fn pid(&self) -> Pid {
        // Linux pids fit in an i32 (pid_max is at most 2^22).
        Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(i32::MAX))
    }

    /// Sends `sig` to the process (an error once it has been reaped).
    pub fn signal(&self, sig: Signal) -> Result<()> {
        if let Some(status) = self.exited {
            return Err(self.exited_error(status));
        }
        kill(self.pid(), sig)
            .map_err(|e| Error::io(format!("send {sig} to {}", self.what), e.into()))
    }

    /// If the process has exited, its status (it is reaped then).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.exited.is_none() {
            self.exited = self
                .child
                .try_wait()
                .map_err(|e| Error::io(format!("wait for {}", self.what), e))?;
        }
        Ok(self.exited)
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(POLL);
        }
    }

    /// Fails with [`Error::Exited`] (and the end of its log) if the process has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        match self.try_wait()? {
            Some(status) => Err(self.exited_error(status)),
            None => Ok(()),
        }
    }

    fn exited_error(&self, status: ExitStatus) -> Error {
        Error::Exited {
            what: self.what.clone(),
            status,
            log: self.log_tail(30),
        }
    }

    /// `SIGTERM`, then up to the grace period for the process to exit, then `SIGKILL`.
    /// Returns the exit status if it exited on its own before the `SIGKILL`.
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        if let Ok(Some(status)) = self.try_wait() {
            return Some(status);
        }
        let _ = kill(self.pid(), Signal::SIGTERM);
        if let Ok(Some(status)) = self.wait_timeout(self.grace) {
            return Some(status);
        }
        self.kill();
        None
    }

    /// `SIGKILL`, and waits for the process to be gone.
    pub fn kill(&mut self) {
        if self.exited.is_some() {
            return;
        }
        let _ = self.child.kill();
        self.exited = self.child.wait().ok();
    }

    /// The log file, when started with [`ChildProcess::spawn_logged`].
    pub fn log_path(&self) -> Option<&Path> {
        self.log.as_deref()
    }

    /// The process's stderr so far (empty without a log file).
    pub fn log(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// The last `lines` lines of [`ChildProcess::log`].
    pub fn log_tail(&self, lines: usize) -> String {
        let text = self.log();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        self.terminate();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_is_stopped_on_drop_and_its_stderr_logged() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("sh.log");
        let mut p = ChildProcess::spawn_logged(
            Command::new("sh").args(["-c", "echo started >&2; exec sleep 30"]),
            "sh",
            &log,
        )
        .unwrap()
        .with_grace(Duration::from_secs(2));
        p.ensure_running().unwrap();
        let pid = p.pid();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !p.log().contains("started") && Instant::now() < deadline {
            std::thread::sleep(POLL);
        }
        assert_eq!(p.log_tail(1), "started");
        drop(p);
        // Reaped: the pid no longer names our child.
        assert!(kill(pid, None).is_err());
    }

    #[test]
    fn an_exited_child_is_reported_with_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("false.log");
        let mut p = ChildProcess::spawn_logged(
            Command::new("sh").args(["-c", "echo broken >&2; exit 3"]),
            "sh",
            &log,
        )
        .unwrap();
        let status = p.wait_timeout(Duration::from_secs(5)).unwrap().unwrap();
        assert_eq!(status.code(), Some(3));
        match p.ensure_running() {
            Err(Error::Exited { what, log, .. }) => {
                assert_eq!(what, "sh");
                assert_eq!(log, "broken");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            p.signal(Signal::SIGTERM),
            Err(Error::Exited { .. })
        ));
    }
}
