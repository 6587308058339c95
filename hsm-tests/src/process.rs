//! Real processes for end-to-end tests: finding our built binaries, running a `kms-plugin`
//! server on a temporary socket, and a tonic client over that socket.

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use keyhaven_proto::kms::v2::StatusRequest;

use crate::SoftHsm;

/// Path of a binary of this workspace, built by `cargo build --workspace --bins` (which
/// `scripts/test.sh` runs before the tests).
pub fn bin_path(name: &str) -> PathBuf {
    // Test executables live in target/<profile>/deps/.
    let exe = std::env::current_exe().expect("current exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let p = profile_dir.join(name);
    assert!(
        p.exists(),
        "{} is not built: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        p.display()
    );
    p
}

/// A free TCP port on loopback (for metrics listeners).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// `kms-plugin` with this token's environment: `SOFTHSM2_CONF`, token label and PIN file.
pub fn kms_plugin_cmd(hsm: &SoftHsm) -> Command {
    let mut c = Command::new(bin_path("kms-plugin"));
    c.env("SOFTHSM2_CONF", &hsm.conf)
        .env("KEYHAVEN_PKCS11_MODULE", &hsm.module)
        .env("KEYHAVEN_TOKEN_LABEL", &hsm.label)
        .env("KEYHAVEN_PIN_FILE", &hsm.pin_file)
        .env_remove("KEYHAVEN_TOKEN_SERIAL")
        .env_remove("KEYHAVEN_PIN_ENV");
    c
}

/// Runs `kms-plugin <args>` to completion.
pub fn kms_plugin_cli(hsm: &SoftHsm, args: &[&str]) -> Output {
    kms_plugin_cmd(hsm)
        .args(args)
        .output()
        .expect("run kms-plugin")
}

/// A running `kms-plugin serve`, stopped (SIGTERM, then SIGKILL) on drop.
#[derive(Debug)]
pub struct KmsPlugin {
    child: Option<Child>,
    /// The `--listen` value.
    pub listen: String,
    /// The socket file (for path listeners).
    pub socket: Option<PathBuf>,
    /// `127.0.0.1:port` of the metrics listener.
    pub metrics_addr: String,
    stderr_file: PathBuf,
}

/// Options for [`KmsPlugin::start`].
#[derive(Debug, Clone)]
pub struct PluginOpts {
    /// `--self-test-interval`.
    pub self_test_interval: &'static str,
    /// `--rescan-interval`.
    pub rescan_interval: &'static str,
    /// `--hsm-timeout`.
    pub hsm_timeout: &'static str,
    /// Extra arguments.
    pub extra: Vec<String>,
    /// Use this listen address instead of a socket in the token's directory.
    pub listen: Option<String>,
}

impl Default for PluginOpts {
    fn default() -> Self {
        PluginOpts {
            self_test_interval: "300ms",
            rescan_interval: "500ms",
            hsm_timeout: "1s",
            extra: Vec::new(),
            listen: None,
        }
    }
}

impl KmsPlugin {
    /// Starts the server and waits (up to 10 s) until its socket answers Status.
    pub fn start(hsm: &SoftHsm, opts: PluginOpts) -> KmsPlugin {
        let p = Self::spawn(hsm, opts);
        p.wait_ready();
        p
    }

    /// Starts the server without waiting.
    pub fn spawn(hsm: &SoftHsm, opts: PluginOpts) -> KmsPlugin {
        let (listen, socket) = match opts.listen {
            Some(l) => {
                let sock = l
                    .strip_prefix("unix://")
                    .filter(|p| !p.starts_with("/@"))
                    .map(PathBuf::from);
                (l, sock)
            }
            None => {
                let sock = hsm.dir().join(format!("kms-{}.sock", free_port()));
                (format!("unix://{}", sock.display()), Some(sock))
            }
        };
        let metrics_addr = format!("127.0.0.1:{}", free_port());
        let stderr_file = hsm.dir().join(format!("plugin-{}.log", free_port()));
        let log = std::fs::File::create(&stderr_file).expect("log file");
        let child = kms_plugin_cmd(hsm)
            .env("KEYHAVEN_LOG", "info,kms_plugin=debug,keyhaven_hsm=debug")
            .args([
                "serve",
                "--listen",
                &listen,
                "--metrics-addr",
                &metrics_addr,
            ])
            .args(["--self-test-interval", opts.self_test_interval])
            .args(["--rescan-interval", opts.rescan_interval])
            .args(["--hsm-timeout", opts.hsm_timeout])
            .args(&opts.extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn kms-plugin");
        KmsPlugin {
            child: Some(child),
            listen,
            socket,
            metrics_addr,
            stderr_file,
        }
    }

    /// Waits until Status answers over the socket.
    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let rt = runtime();
        loop {
            let ok = rt.block_on(async {
                match connect(&self.listen).await {
                    // Any gRPC answer means it is up (a refused peer UID answers too).
                    Ok(mut c) => match c.status(StatusRequest {}).await {
                        Ok(_) => true,
                        Err(s) => {
                            !matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown)
                        }
                    },
                    Err(_) => false,
                }
            });
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "kms-plugin did not come up; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The process's stderr so far.
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.stderr_file) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// Process id.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    /// Sends a signal.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).expect("signal");
    }

    /// If the process has exited, its status.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGTERM and wait (up to 10 s) for a clean exit; returns the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = self.try_wait() {
                self.child = None;
                return st;
            }
            assert!(Instant::now() < deadline, "kms-plugin ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for KmsPlugin {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A small runtime for tests that drive async clients from sync code.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

pub use kms_plugin::client::connect;

/// GET `http://addr/path`; returns (status, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).expect("connect metrics");
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("write");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read");
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_owned();
    (status, body)
}
