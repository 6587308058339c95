//! A throwaway PostgreSQL cluster per test, from the installed server binaries: its own data
//! directory and socket directory in a temp dir, a free loopback port, trust auth for the
//! `keyhaven` user. As root, the server runs as the `postgres` user (initdb refuses root).
//! Missing binaries fail the test with the install command: never a silent skip.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The PostgreSQL server binaries directory: `KEYHAVEN_PG_BIN`, else the newest
/// `/usr/lib/postgresql/<v>/bin`.
pub fn pg_bin() -> PathBuf {
    if let Ok(p) = std::env::var("KEYHAVEN_PG_BIN") {
        return PathBuf::from(p);
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, p)| p).unwrap_or_else(|| {
        panic!("PostgreSQL server binaries not found: run `apt-get install -y postgresql` (or set KEYHAVEN_PG_BIN)")
    })
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn as_pg_user(bin: &Path, prog: &str) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(prog));
        c
    } else {
        Command::new(bin.join(prog))
    }
}

/// A running throwaway cluster. Stopped and deleted on drop.
#[derive(Debug)]
pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    child: Option<Child>,
    /// `postgres://keyhaven@127.0.0.1:<port>/postgres`
    pub url: String,
}

impl Postgres {
    /// initdb + start; waits until it accepts connections.
    pub fn start() -> Postgres {
        let bin = pg_bin();
        let dir = tempfile::Builder::new()
            .prefix("keyhaven-pg-")
            .tempdir()
            .expect("temp dir");
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .expect("chown")
                .success();
            assert!(ok, "chown of the PostgreSQL temp dir failed");
        }
        let data = dir.path().join("data");
        let out = as_pg_user(&bin, "initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", "keyhaven", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = crate::process::free_port();
        let mut pg = Postgres {
            url: format!("postgres://keyhaven@127.0.0.1:{port}/postgres"),
            dir,
            bin,
            port,
            child: None,
        };
        pg.resume();
        pg
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Starts the server again after [`Postgres::stop`] (same data, same port).
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::File::create(self.dir.path().join("server.log")).expect("log");
        let child = as_pg_user(&self.bin, "postgres")
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-p", &self.port.to_string()])
            .args(["-k"])
            .arg(self.dir.path())
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "max_connections=300",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start postgres");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = Command::new(self.bin.join("pg_isready"))
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "keyhaven",
                    "-q",
                ])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "PostgreSQL did not start: {}",
                std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the server (fast shutdown), keeping its data.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // postgres may run under runuser: signal the postmaster itself (its pid is the
            // first line of postmaster.pid); SIGINT = fast shutdown.
            let pidfile = self.dir.path().join("data").join("postmaster.pid");
            let target = std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<i32>().ok()))
                .unwrap_or(c.id() as i32);
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(target),
                nix::sys::signal::Signal::SIGINT,
            );
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
            // Wait for the postmaster pid file to go, so a restart can bind again.
            let pid = self.dir.path().join("data").join("postmaster.pid");
            let deadline = Instant::now() + Duration::from_secs(20);
            while pid.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}
