//! A real `broker` process for end-to-end tests: TLS with a throwaway CA ([`DevPki`]), a
//! SoftHSM2 KEK, SQLite (or any database URL), dev-mode tokens, the bootstrap credential
//! [`BOOTSTRAP`], an audit file and a metrics listener. It can be killed (`SIGKILL`) and
//! restarted on the same port and database, and is stopped with `SIGTERM` on drop.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use testkit::broker::BrokerFlags;
use testkit::pki::DevPki;
use testkit::postgres::Postgres;
use testkit::process::ChildProcess;
use testkit::softhsm::SoftHsm;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

use crate::process::{bin_path, free_port};

/// The bootstrap admin credential every test broker is started with.
pub const BOOTSTRAP: &str = "test-bootstrap-credential-0123456789";

/// Creates the broker's first KEK on the token (what `brokerctl keys init` does).
pub fn broker_keys_init(hsm: &SoftHsm) {
    let mut cfg = hsm.config();
    cfg.kek_label_prefix = "keyhaven-broker-".into();
    let ks = keyhaven_hsm::BlockingKeystore::open(cfg).expect("open keystore");
    ks.generate_kek().expect("generate broker KEK");
}

/// A fresh SoftHSM2 token holding the broker's first KEK, and a throwaway PKI in its
/// directory: what every broker process test starts from.
pub fn broker_token() -> (SoftHsm, DevPki) {
    let hsm = SoftHsm::new().expect("SoftHSM2 token");
    broker_keys_init(&hsm);
    let pki = DevPki::write(hsm.dir()).expect("test PKI");
    (hsm, pki)
}

/// A running `broker`.
#[derive(Debug)]
pub struct BrokerProc {
    process: ChildProcess,
    flags: BrokerFlags,
    /// gRPC port on 127.0.0.1.
    pub port: u16,
    /// `https://localhost:<port>` (the dev certificate names `localhost`).
    pub addr: String,
    /// `127.0.0.1:<port>` of `/healthz`, `/readyz`, `/metrics`.
    pub metrics: String,
    /// The broker's stderr (appended to across restarts).
    pub log: PathBuf,
    /// Directory holding `bootstrap`, `dev.pem` (the dev issuer key), `audit.jsonl`.
    pub dir: PathBuf,
}

impl BrokerProc {
    /// Starts a broker on a SQLite file in the token's directory.
    pub fn start(hsm: &SoftHsm, pki: &DevPki, extra: &[&str]) -> BrokerProc {
        let url = format!("sqlite://{}", hsm.dir().join("broker.db").display());
        BrokerProc::start_on(hsm, pki, &url, extra)
    }

    /// Starts a broker on `database_url` (SQLite or PostgreSQL) and waits until it serves.
    pub fn start_on(hsm: &SoftHsm, pki: &DevPki, database_url: &str, extra: &[&str]) -> BrokerProc {
        let b = BrokerProc::spawn_on(hsm, pki, database_url, extra);
        b.wait_serving();
        b
    }

    /// Starts a broker on SQLite and waits only for its port, which answers gRPC health (and
    /// UNAVAILABLE) before the broker is logged in to the HSM and serves.
    pub fn start_unready(hsm: &SoftHsm, pki: &DevPki, extra: &[&str]) -> BrokerProc {
        let url = format!("sqlite://{}", hsm.dir().join("broker.db").display());
        BrokerProc::spawn_on(hsm, pki, &url, extra)
    }

    fn spawn_on(hsm: &SoftHsm, pki: &DevPki, database_url: &str, extra: &[&str]) -> BrokerProc {
        let dir = hsm.dir().to_path_buf();
        std::fs::write(dir.join("bootstrap"), BOOTSTRAP).expect("write bootstrap");
        let flags = BrokerFlags {
            port: free_port(),
            metrics_port: free_port(),
            database_url: database_url.to_owned(),
            tls_cert: pki.server_cert.clone(),
            tls_key: pki.server_key.clone(),
            softhsm_conf: hsm.conf.clone(),
            module: hsm.module.clone(),
            token_label: hsm.label.clone(),
            pin_file: hsm.pin_file.clone(),
            dev_key: dir.join("dev.pem"),
            bootstrap_file: dir.join("bootstrap"),
            audit_file: Some(dir.join("audit.jsonl")),
            extra: extra.iter().map(OsString::from).collect(),
        };
        let log = dir.join(format!("broker-{}.log", flags.port));
        let b = BrokerProc {
            process: spawn(&flags, &log),
            port: flags.port,
            addr: format!("https://localhost:{}", flags.port),
            metrics: flags.metrics_addr(),
            flags,
            log,
            dir,
        };
        b.wait_listening(false);
        b
    }

    fn wait_serving(&self) {
        self.wait_listening(true);
    }

    /// Waits until the port accepts connections and, with `serving`, until the broker logged
    /// that it serves its services (its port answers gRPC health before that).
    fn wait_listening(&self, serving: bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err()
            || (serving && !self.log_text().contains("broker serving"))
        {
            assert!(
                Instant::now() < deadline,
                "broker did not start:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Process id.
    pub fn pid(&self) -> i32 {
        self.process.id() as i32
    }

    /// The broker's log so far.
    pub fn log_text(&self) -> String {
        self.process.log()
    }

    /// `SIGKILL`, and waits for the process to be gone.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// `SIGTERM`, waiting up to 10 s for a clean exit; `SIGKILL` after that.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        self.process.terminate()
    }

    /// Starts the broker again with the same flags (same port, database, audit file), after
    /// [`BrokerProc::kill`] or [`BrokerProc::terminate`].
    pub fn restart(&mut self) {
        self.kill();
        let before = self.log_text().len();
        self.process = spawn(&self.flags, &self.log);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self
            .log_text()
            .get(before..)
            .unwrap_or_default()
            .contains("broker serving")
        {
            assert!(
                Instant::now() < deadline,
                "broker did not start again:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A TLS channel to this broker, trusting `ca`.
    pub async fn channel(&self, ca: &Path) -> Channel {
        tls_channel(&self.addr, ca).await
    }

    /// Runs `brokerctl --addr <this broker> --ca-file <ca> --bootstrap-file <bootstrap>
    /// <args>` to completion.
    pub fn ctl_admin(&self, hsm: &SoftHsm, ca: &Path, args: &[&str]) -> Output {
        let mut all: Vec<OsString> = vec![
            "--addr".into(),
            self.addr.clone().into(),
            "--ca-file".into(),
            ca.into(),
            "--bootstrap-file".into(),
            self.dir.join("bootstrap").into(),
        ];
        all.extend(args.iter().map(OsString::from));
        brokerctl(hsm, &all)
    }
}

impl BrokerProc {
    /// Like [`BrokerProc::ctl_admin`], with `pki`'s client certificate (for a broker started
    /// with `--tls-client-ca`) and `stdin` fed to the command.
    pub fn ctl_admin_mtls(
        &self,
        hsm: &SoftHsm,
        pki: &DevPki,
        args: &[&str],
        stdin: &str,
    ) -> Output {
        use std::io::Write as _;
        let mut child = Command::new(bin_path("brokerctl"))
            .env("SOFTHSM2_CONF", &hsm.conf)
            .env_remove("KEYHAVEN_BROKER_ADDR")
            .args(["--addr", &self.addr])
            .arg("--ca-file")
            .arg(&pki.ca)
            .arg("--client-cert")
            .arg(&pki.client_cert)
            .arg("--client-key")
            .arg(&pki.client_key)
            .arg("--bootstrap-file")
            .arg(self.dir.join("bootstrap"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run brokerctl");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin.as_bytes())
            .expect("write stdin");
        child.wait_with_output().expect("brokerctl output")
    }
}

/// Starts `broker` with `flags`, logging to `log`; stopped on drop (`SIGTERM`, 10 s, `SIGKILL`).
fn spawn(flags: &BrokerFlags, log: &Path) -> ChildProcess {
    let mut cmd = flags.command(&bin_path("broker"));
    cmd.env("KEYHAVEN_LOG", "info");
    ChildProcess::spawn_logged(&mut cmd, "broker", log)
        .expect("spawn broker")
        .with_grace(Duration::from_secs(10))
}

/// Runs `brokerctl <args>` with the token's `SOFTHSM2_CONF`, to completion.
pub fn brokerctl<S: AsRef<std::ffi::OsStr>>(hsm: &SoftHsm, args: &[S]) -> Output {
    Command::new(bin_path("brokerctl"))
        .env("SOFTHSM2_CONF", &hsm.conf)
        .env_remove("KEYHAVEN_BROKER_ADDR")
        .args(args)
        .output()
        .expect("run brokerctl")
}

/// A TLS channel to `addr` (`https://localhost:<port>`), trusting `ca`.
pub async fn tls_channel(addr: &str, ca: &Path) -> Channel {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).expect("read CA")))
        .domain_name("localhost");
    Channel::from_shared(addr.to_string())
        .expect("address")
        .tls_config(tls)
        .expect("tls config")
        .connect()
        .await
        .expect("connect to the broker")
}

/// `msg` with `authorization: Bearer <cred>`.
pub fn authed<T>(msg: T, cred: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {cred}").parse().expect("header value"),
    );
    r
}

/// The database URL of an in-process test broker: the PostgreSQL cluster's when given, else a
/// SQLite file in the token's directory (the same file [`BrokerProc::start`] uses).
pub fn database_url(hsm: &SoftHsm, pg: Option<&Postgres>) -> String {
    match pg {
        Some(pg) => pg.url(),
        None => format!("sqlite://{}", hsm.dir().join("broker.db").display()),
    }
}

/// The broker's store at [`database_url`] (migrated).
pub async fn test_store(hsm: &SoftHsm, pg: Option<&Postgres>) -> keyhaven_broker::store::Store {
    keyhaven_broker::store::Store::connect(&database_url(hsm, pg))
        .await
        .expect("connect the broker database")
}

/// The broker's keystore on the token (KEK label prefix `keyhaven-broker-`).
pub async fn broker_keystore(hsm: &SoftHsm) -> keyhaven_hsm::Keystore {
    let mut cfg = hsm.config();
    cfg.kek_label_prefix = "keyhaven-broker-".into();
    keyhaven_hsm::Keystore::open(cfg)
        .await
        .expect("open the broker keystore")
}
