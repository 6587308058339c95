//! A throwaway PostgreSQL cluster from the installed server binaries: its own data and
//! socket directory in a temporary directory, a free loopback port, trust auth for the
//! [`USER`] user on loopback, otherwise the server's default (durable) configuration —
//! `fsync` and `synchronous_commit` on. As root the server runs as the `postgres` user
//! (`initdb` refuses root). Missing binaries are an [`Error::NotInstalled`] naming the install
//! command: never a silent skip. Stopped (fast shutdown) and deleted on drop.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::process::{free_port, run, ChildProcess};
use crate::{Error, Result};

/// The database user (trust auth on loopback only).
pub const USER: &str = "keyhaven";

/// How long the server may take to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The server binaries (`initdb`, `postgres`, `pg_isready`, `createdb`): `explicit`, else
/// `KEYHAVEN_PG_BIN`, else the newest `/usr/lib/postgresql/<version>/bin`.
pub fn pg_bin(explicit: Option<&Path>) -> Result<PathBuf> {
    let given = explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("KEYHAVEN_PG_BIN").map(PathBuf::from));
    if let Some(p) = given {
        return if p.join("initdb").is_file() {
            Ok(p)
        } else {
            Err(Error::NotInstalled {
                what: format!("{}/initdb", p.display()),
                hint: "name the PostgreSQL server binaries directory (KEYHAVEN_PG_BIN, --pg-bin)",
            })
        };
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
    found
        .pop()
        .map(|(_, p)| p)
        .ok_or_else(|| Error::NotInstalled {
            what: "PostgreSQL server binaries".into(),
            hint: "run `apt-get install -y postgresql` (or set KEYHAVEN_PG_BIN)",
        })
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
    bin: PathBuf,
    port: u16,
    settings: Vec<String>,
    version: String,
    server: Option<ChildProcess>,
}

impl Postgres {
    /// A cluster for tests: the binaries at [`pg_bin`]`(None)`, `max_connections=300` (each
    /// broker under test opens its own pool).
    pub fn start() -> Result<Postgres> {
        Postgres::start_with(&pg_bin(None)?, &["max_connections=300"])
    }

    /// `initdb`, start with `settings` (each `name=value`, given as `-c`), and wait until it
    /// accepts connections.
    pub fn start_with(bin: &Path, settings: &[&str]) -> Result<Postgres> {
        let dir = tempfile::Builder::new()
            .prefix("keyhaven-pg-")
            .tempdir()
            .map_err(|e| Error::io("create the PostgreSQL temporary directory", e))?;
        if is_root() {
            run(
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(dir.path()),
                "chown of the PostgreSQL temporary directory",
            )?;
        }
        let data = dir.path().join("data");
        // --no-sync: initdb's own final fsync; the server's settings are untouched.
        run(
            as_pg_user(bin, "initdb").arg("-D").arg(&data).args([
                "-U",
                USER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ]),
            "initdb",
        )?;
        let version = std::fs::read_to_string(data.join("PG_VERSION"))
            .unwrap_or_default()
            .trim()
            .to_owned();
        let mut pg = Postgres {
            port: free_port()?,
            dir,
            bin: bin.to_path_buf(),
            settings: settings.iter().map(|s| (*s).to_owned()).collect(),
            version,
            server: None,
        };
        pg.resume()?;
        Ok(pg)
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Server major version (from `PG_VERSION`).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// `postgres://keyhaven@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> String {
        self.database_url("postgres")
    }

    /// URL of database `db` on this cluster.
    pub fn database_url(&self, db: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates an empty database `name`.
    pub fn create_database(&self, name: &str) -> Result<()> {
        run(
            Command::new(self.bin.join("createdb"))
                .args(["-h", "127.0.0.1", "-U", USER, "-p", &self.port.to_string()])
                .arg(name),
            "createdb",
        )
        .map(drop)
    }

    /// Runs `sql` (given on stdin, so nothing in it reaches a command line) in database `db`
    /// as [`USER`] with `psql`, stopping at the first error.
    pub fn psql(&self, db: &str, sql: &str) -> Result<()> {
        use std::io::Write as _;
        let mut child = Command::new(self.bin.join("psql"))
            .args(["-h", "127.0.0.1", "-U", USER, "-p", &self.port.to_string()])
            .args(["-d", db, "-q", "-X", "-v", "ON_ERROR_STOP=1"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::io("run psql", e))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(sql.as_bytes())
                .map_err(|e| Error::io("write to psql", e))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| Error::io("run psql", e))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(Error::CommandFailed {
                what: "psql".into(),
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            })
        }
    }

    /// Serves TLS too (`ssl=on`) with this certificate and key, restarting the server.
    pub fn enable_tls(&mut self, cert: &Path, key: &Path) -> Result<()> {
        let tls = self.dir.path().join("tls");
        std::fs::create_dir_all(&tls).map_err(|e| Error::io("create the TLS directory", e))?;
        for (from, to) in [(cert, "server.pem"), (key, "server-key.pem")] {
            std::fs::copy(from, tls.join(to)).map_err(|e| Error::io("copy a TLS file", e))?;
        }
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(
                tls.join("server-key.pem"),
                std::fs::Permissions::from_mode(0o600),
            )
            .map_err(|e| Error::io("chmod the TLS key", e))?;
        }
        if is_root() {
            run(
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(&tls),
                "chown of the TLS directory",
            )?;
        }
        self.settings.push("ssl=on".into());
        self.settings.push(format!(
            "ssl_cert_file={}",
            tls.join("server.pem").display()
        ));
        self.settings.push(format!(
            "ssl_key_file={}",
            tls.join("server-key.pem").display()
        ));
        self.stop();
        self.resume()
    }

    /// Every role but the cluster's own user must log in with its password
    /// (`scram-sha-256`), as in production, so passwords and `VALID UNTIL` are enforced. The
    /// server re-reads `pg_hba.conf` at once (SIGHUP); this waits for that.
    pub fn require_passwords(&self) -> Result<()> {
        let hba = format!(
            "local all {USER} trust\nhost all {USER} 127.0.0.1/32 trust\n\
             local all all scram-sha-256\nhost all all 127.0.0.1/32 scram-sha-256\n"
        );
        let data = self.dir.path().join("data");
        std::fs::write(data.join("pg_hba.conf"), hba)
            .map_err(|e| Error::io("write pg_hba.conf", e))?;
        let postmaster = std::fs::read_to_string(data.join("postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<i32>().ok()))
            .ok_or_else(|| Error::io("read postmaster.pid", std::io::ErrorKind::NotFound.into()))?;
        kill(Pid::from_raw(postmaster), Signal::SIGHUP)
            .map_err(|e| Error::io("signal the postmaster", std::io::Error::from(e)))?;
        std::thread::sleep(Duration::from_millis(500));
        Ok(())
    }

    /// Starts the server again after [`Postgres::stop`] (same data, same port).
    pub fn resume(&mut self) -> Result<()> {
        if self.server.is_some() {
            return Ok(());
        }
        let mut cmd = as_pg_user(&self.bin, "postgres");
        cmd.arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-p", &self.port.to_string(), "-k"])
            .arg(self.dir.path())
            .args(["-c", "listen_addresses=127.0.0.1"])
            .stdin(Stdio::null());
        for s in &self.settings {
            cmd.args(["-c", s]);
        }
        let server = self.server.insert(ChildProcess::spawn_logged(
            &mut cmd,
            "postgres",
            &self.dir.path().join("server.log"),
        )?);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            server.ensure_running()?;
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-U", USER])
                .args(["-p", &self.port.to_string()])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::NotReady {
                    what: "PostgreSQL".into(),
                    after: READY_TIMEOUT,
                    last: "pg_isready: not accepting connections".into(),
                    log: server.log_tail(20),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the server (fast shutdown), keeping its data.
    pub fn stop(&mut self) {
        let Some(mut server) = self.server.take() else {
            return;
        };
        // As root, `server` is runuser: signal the postmaster itself (the first line of
        // postmaster.pid). SIGINT = fast shutdown.
        let pidfile = self.dir.path().join("data").join("postmaster.pid");
        let postmaster = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<i32>().ok()))
            .or_else(|| i32::try_from(server.id()).ok())
            .map(Pid::from_raw);
        if let Some(pid) = postmaster {
            let _ = kill(pid, Signal::SIGINT);
        }
        if !matches!(server.wait_timeout(Duration::from_secs(20)), Ok(Some(_))) {
            if let Some(pid) = postmaster {
                let _ = kill(pid, Signal::SIGKILL);
            }
            server.kill();
        }
        // The postmaster's children leave with it; wait for its pid file to go, so a restart
        // can bind again and the directory is removed cleanly.
        let deadline = Instant::now() + Duration::from_secs(20);
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
