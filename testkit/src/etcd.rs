//! A throwaway etcd member (Debian's `etcd-server`) on free loopback ports with its own data
//! directory, in plain HTTP or with TLS and client-certificate authentication like the
//! apiserver's etcd. Stopped on drop.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::pki::DevPki;
use crate::process::{free_port, runtime, ChildProcess};
use crate::{Error, Result};

/// How long the member may take to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// The etcd binary: `KEYHAVEN_ETCD_BIN`, else `etcd` on the PATH.
pub fn etcd_bin() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("KEYHAVEN_ETCD_BIN") {
        return Ok(PathBuf::from(p));
    }
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|dir| Path::new(dir).join("etcd"))
        .find(|p| p.exists())
        .ok_or_else(|| Error::NotInstalled {
            what: "etcd".into(),
            hint: "install Debian's etcd-server (scripts/test.sh does) or set KEYHAVEN_ETCD_BIN",
        })
}

/// A running etcd member.
#[derive(Debug)]
pub struct EtcdMember {
    process: ChildProcess,
    /// Client URL (`http://127.0.0.1:port` or `https://...`).
    pub endpoint: String,
    /// TLS material, when started with TLS.
    pub pki: Option<DevPki>,
    _dir: tempfile::TempDir,
}

impl EtcdMember {
    /// Starts a plain-HTTP member (a loopback development etcd).
    pub fn start() -> Result<EtcdMember> {
        Self::spawn(false)
    }

    /// Starts a member that serves TLS and requires client certificates from its own dev CA
    /// ([`EtcdMember::pki`]).
    pub fn start_tls() -> Result<EtcdMember> {
        Self::spawn(true)
    }

    fn spawn(tls: bool) -> Result<EtcdMember> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("create the etcd directory", e))?;
        let pki = if tls {
            let d = dir.path().join("pki");
            std::fs::create_dir(&d).map_err(|e| Error::io("create the etcd PKI directory", e))?;
            Some(DevPki::write(&d)?)
        } else {
            None
        };
        let (cport, pport) = (free_port()?, free_port()?);
        let scheme = if pki.is_some() { "https" } else { "http" };
        let endpoint = format!("{scheme}://127.0.0.1:{cport}");
        let peer = format!("http://127.0.0.1:{pport}");
        let mut cmd = Command::new(etcd_bin()?);
        cmd.args(["--name", "t", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &endpoint])
            .args(["--advertise-client-urls", &endpoint])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("t={peer}")])
            .args(["--logger", "zap", "--log-level", "warn"]);
        if let Some(p) = &pki {
            cmd.arg("--cert-file")
                .arg(&p.server_cert)
                .arg("--key-file")
                .arg(&p.server_key)
                .arg("--trusted-ca-file")
                .arg(&p.ca)
                .arg("--client-cert-auth");
        }
        let process = ChildProcess::spawn_logged(&mut cmd, "etcd", &dir.path().join("etcd.log"))?;
        let mut m = EtcdMember {
            process,
            endpoint,
            pki,
            _dir: dir,
        };
        m.wait_ready()?;
        Ok(m)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let rt = runtime()?;
        loop {
            self.process.ensure_running()?;
            let answer: Result<_> =
                rt.block_on(async { Ok(self.client().await?.get("/", None).await?) });
            let last = match answer {
                Ok(_) => return Ok(()),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(Error::NotReady {
                    what: "etcd".into(),
                    after: READY_TIMEOUT,
                    last,
                    log: self.process.log_tail(30),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A client with this member's TLS material.
    pub async fn client(&self) -> Result<etcd_client::Client> {
        let mut opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(10));
        if let Some(p) = &self.pki {
            let read = |f: &Path| {
                std::fs::read(f).map_err(|e| Error::io(format!("read {}", f.display()), e))
            };
            opts = opts.with_tls(
                etcd_client::TlsOptions::new()
                    .ca_certificate(etcd_client::Certificate::from_pem(read(&p.ca)?))
                    .identity(etcd_client::Identity::from_pem(
                        read(&p.client_cert)?,
                        read(&p.client_key)?,
                    )),
            );
        }
        Ok(etcd_client::Client::connect([self.endpoint.as_str()], Some(opts)).await?)
    }

    /// The `kms-plugin` flags that reach this member.
    pub fn args(&self) -> Vec<String> {
        let mut a = vec!["--etcd-endpoints".to_string(), self.endpoint.clone()];
        if let Some(p) = &self.pki {
            for (flag, path) in [
                ("--etcd-cacert", &p.ca),
                ("--etcd-cert", &p.client_cert),
                ("--etcd-key", &p.client_key),
            ] {
                a.push(flag.into());
                a.push(path.display().to_string());
            }
        }
        a
    }

    /// Writes one key (blocking).
    pub fn put(&self, key: &str, value: &[u8]) -> Result<()> {
        runtime()?.block_on(async {
            self.client().await?.put(key, value, None).await?;
            Ok(())
        })
    }

    /// Reads one key (blocking).
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        runtime()?.block_on(async {
            let r = self.client().await?.get(key, None).await?;
            Ok(r.kvs().first().map(|kv| kv.value().to_vec()))
        })
    }

    /// Every key/value under `prefix` (blocking).
    pub fn range(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        runtime()?.block_on(async {
            let r = self
                .client()
                .await?
                .get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
                .await?;
            Ok(r.kvs()
                .iter()
                .map(|kv| {
                    (
                        String::from_utf8_lossy(kv.key()).into_owned(),
                        kv.value().to_vec(),
                    )
                })
                .collect())
        })
    }
}
