//! A throwaway PostgreSQL cluster for one bench run, from the installed server binaries:
//! its own data and socket directory in a temporary directory, a free loopback port, trust
//! auth for the `keyhaven` user, otherwise the server's default (durable) configuration —
//! `fsync` and `synchronous_commit` on. As root the server runs as the `postgres` user
//! (initdb refuses root). Stopped (fast shutdown) and deleted on drop, so it goes away on
//! every exit path, errors and Ctrl-C included.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The database user (trust auth on loopback only).
const USER: &str = "keyhaven";

/// The server binaries: `explicit`, else the newest `/usr/lib/postgresql/<v>/bin`.
pub fn pg_bin(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        anyhow::ensure!(
            p.join("initdb").is_file(),
            "{} has no initdb (--pg-bin)",
            p.display()
        );
        return Ok(p.to_path_buf());
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((v, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, p)| p).context(
        "PostgreSQL server binaries not found: `apt-get install -y postgresql`, or pass --pg-bin",
    )
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// `bin/prog`, as the `postgres` user when we are root.
fn as_pg_user(bin: &Path, prog: &str) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(prog));
        c
    } else {
        Command::new(bin.join(prog))
    }
}

/// A running throwaway cluster.
#[derive(Debug)]
pub struct Postgres {
    dir: tempfile::TempDir,
    child: Option<Child>,
    port: u16,
    version: String,
}

impl Postgres {
    /// initdb, start, and wait until it accepts connections.
    pub async fn start(bin: &Path) -> anyhow::Result<Postgres> {
        let dir = tempfile::Builder::new()
            .prefix("keyhaven-bench-pg-")
            .tempdir()
            .context("create the PostgreSQL temporary directory")?;
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .context("run chown")?
                .success();
            anyhow::ensure!(ok, "chown of the PostgreSQL temporary directory failed");
        }
        let data = dir.path().join("data");
        let out = as_pg_user(bin, "initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", USER, "--auth=trust", "-E", "UTF8"])
            .stdin(Stdio::null())
            .output()
            .context("run initdb")?;
        anyhow::ensure!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let version = std::fs::read_to_string(data.join("PG_VERSION"))
            .unwrap_or_default()
            .trim()
            .to_owned();
        let port = crate::broker_proc::free_port()?;
        let log = std::fs::File::create(dir.path().join("server.log"))
            .context("create the PostgreSQL log")?;
        let child = as_pg_user(bin, "postgres")
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-k"])
            .arg(dir.path())
            .args(["-c", "listen_addresses=127.0.0.1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("start postgres")?;
        let mut pg = Postgres {
            dir,
            child: Some(child),
            port,
            version,
        };
        pg.wait_ready(bin).await?;
        Ok(pg)
    }

    async fn wait_ready(&mut self, bin: &Path) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Some(status) = c.try_wait().context("wait for postgres")? {
                    self.child = None;
                    anyhow::bail!("postgres exited ({status}): {}", self.log_tail());
                }
            }
            let ready = Command::new(bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-U", USER])
                .args(["-p", &self.port.to_string()])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                anyhow::bail!("PostgreSQL did not start in 30 s: {}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// URL of database `db` on this cluster.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{db}", self.port)
    }

    /// Server major version (from `PG_VERSION`).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Creates an empty database `name`.
    pub async fn create_database(&self, name: &str) -> anyhow::Result<()> {
        use sqlx::Connection;
        let mut c = sqlx::PgConnection::connect(&self.url("postgres"))
            .await
            .context("connect to PostgreSQL")?;
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut c)
            .await
            .with_context(|| format!("create database {name}"))?;
        c.close().await.ok();
        Ok(())
    }

    /// The last lines of the server log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // As root, `child` is runuser: signal the postmaster itself (first line of
        // postmaster.pid). SIGINT = fast shutdown.
        let pidfile = self.dir.path().join("data").join("postmaster.pid");
        let target = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<i32>().ok()))
            .or_else(|| i32::try_from(child.id()).ok());
        if let Some(pid) = target {
            let _ = kill(Pid::from_raw(pid), Signal::SIGINT);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Ok(None) = child.try_wait() {
            if let Some(pid) = target {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // The postmaster's children leave with it; wait for its pid file to go so the
        // directory can be removed cleanly.
        let deadline = Instant::now() + Duration::from_secs(10);
        while pidfile.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}
