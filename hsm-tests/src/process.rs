//! Real processes for end-to-end tests: a `kms-plugin` server on a temporary socket, a tonic
//! client over that socket, and panicking shorthands for the test kit's process helpers.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use keyhaven_proto::kms::v2::StatusRequest;
use testkit::process::ChildProcess;
use testkit::softhsm::SoftHsm;

/// [`testkit::process::bin_path`], panicking when the binary is not built.
pub fn bin_path(name: &str) -> PathBuf {
    testkit::process::bin_path(name).expect("a workspace binary")
}

/// [`testkit::process::free_port`], panicking.
pub fn free_port() -> u16 {
    testkit::process::free_port().expect("free port")
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
    process: ChildProcess,
    /// The `--listen` value.
    pub listen: String,
    /// The socket file (for path listeners).
    pub socket: Option<PathBuf>,
    /// `127.0.0.1:port` of the metrics listener.
    pub metrics_addr: String,
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
        let mut cmd = kms_plugin_cmd(hsm);
        cmd.env("KEYHAVEN_LOG", "info,kms_plugin=debug,keyhaven_hsm=debug")
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
            .args(&opts.extra);
        let process = ChildProcess::spawn_logged(&mut cmd, "kms-plugin", &stderr_file)
            .expect("spawn kms-plugin");
        KmsPlugin {
            process,
            listen,
            socket,
            metrics_addr,
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
        self.process.log()
    }

    /// Process id.
    pub fn pid(&self) -> i32 {
        self.process.id() as i32
    }

    /// Sends a signal.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        self.process.signal(sig).expect("signal");
    }

    /// If the process has exited, its status.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.process.try_wait().ok().flatten()
    }

    /// SIGTERM and wait (up to 10 s) for a clean exit; returns the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        self.process
            .wait_timeout(Duration::from_secs(10))
            .expect("wait for kms-plugin")
            .expect("kms-plugin ignored SIGTERM")
    }
}

/// [`testkit::process::runtime`], panicking: a small runtime for tests that drive async
/// clients from sync code.
pub fn runtime() -> tokio::runtime::Runtime {
    testkit::process::runtime().expect("runtime")
}

pub use kms_plugin::client::connect;

/// Polls `f` until it returns true or `within` passes.
pub fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The value of the sample named `sample` (name and labels, as printed) on
/// `http://addr/metrics`; 0 when absent.
pub fn metric(addr: &str, sample: &str) -> f64 {
    let sample = sample.trim_end();
    let (_, body) = http_get(addr, "/metrics");
    body.lines()
        .find_map(|l| {
            l.strip_prefix(sample)
                .filter(|v| v.starts_with(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// `grpc.health.v1` status of `service` (`""`: the whole server) over `channel`: `Ok(status)`
/// (1 SERVING, 2 NOT_SERVING) or the call's error code.
pub async fn grpc_health(
    channel: tonic::transport::Channel,
    service: &str,
) -> Result<i32, tonic::Code> {
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .map(|r| r.into_inner().status)
        .map_err(|s| s.code())
}

/// [`testkit::http::get`], panicking: GET `http://addr/path`; returns (status, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    testkit::http::get(addr, path).expect("GET")
}
