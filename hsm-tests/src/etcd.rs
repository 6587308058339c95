//! A throwaway etcd member (Debian's `etcd-server`) on free loopback ports with its own data
//! directory, in plain HTTP or with TLS and client-certificate authentication like the
//! apiserver's etcd. Killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::process::free_port;
use crate::tls::DevPki;

/// The etcd binary: `KEYHAVEN_ETCD_BIN`, else `etcd` on the PATH.
pub fn etcd_bin() -> PathBuf {
    if let Ok(p) = std::env::var("KEYHAVEN_ETCD_BIN") {
        return PathBuf::from(p);
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join("etcd");
        if p.exists() {
            return p;
        }
    }
    panic!("etcd not found: install Debian's etcd-server (scripts/test.sh does) or set KEYHAVEN_ETCD_BIN")
}

/// A running etcd member.
#[derive(Debug)]
pub struct EtcdMember {
    child: Option<Child>,
    /// Client URL (`http://127.0.0.1:port` or `https://...`).
    pub endpoint: String,
    /// TLS material, when started with TLS.
    pub pki: Option<DevPki>,
    dir: tempfile::TempDir,
}

impl EtcdMember {
    /// Starts a plain-HTTP member (a loopback development etcd).
    pub fn start() -> EtcdMember {
        Self::spawn(false)
    }

    /// Starts a member that serves TLS and requires client certificates from its own dev CA
    /// ([`EtcdMember::pki`]).
    pub fn start_tls() -> EtcdMember {
        Self::spawn(true)
    }

    fn spawn(tls: bool) -> EtcdMember {
        let dir = tempfile::tempdir().expect("etcd dir");
        let pki = tls.then(|| {
            let d = dir.path().join("pki");
            std::fs::create_dir(&d).expect("pki dir");
            DevPki::write(&d)
        });
        let (cport, pport) = (free_port(), free_port());
        let scheme = if pki.is_some() { "https" } else { "http" };
        let endpoint = format!("{scheme}://127.0.0.1:{cport}");
        let peer = format!("http://127.0.0.1:{pport}");
        let log = std::fs::File::create(dir.path().join("etcd.log")).expect("log");
        let mut cmd = Command::new(etcd_bin());
        cmd.args(["--name", "t", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &endpoint])
            .args(["--advertise-client-urls", &endpoint])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("t={peer}")])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(p) = &pki {
            cmd.arg("--cert-file")
                .arg(&p.server_cert)
                .arg("--key-file")
                .arg(&p.server_key)
                .arg("--trusted-ca-file")
                .arg(&p.ca)
                .arg("--client-cert-auth");
        }
        let child = cmd.spawn().expect("spawn etcd");
        let m = EtcdMember {
            child: Some(child),
            endpoint,
            pki,
            dir,
        };
        m.wait_ready();
        m
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let rt = crate::process::runtime();
        loop {
            let ok = rt.block_on(async {
                match self.client().await {
                    Ok(mut c) => c.get("/", None).await.is_ok(),
                    Err(_) => false,
                }
            });
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not come up; log:\n{}",
                std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A client with this member's TLS material.
    pub async fn client(&self) -> Result<etcd_client::Client, etcd_client::Error> {
        let mut opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(10));
        if let Some(p) = &self.pki {
            let read = |f: &Path| std::fs::read(f).expect("pki file");
            opts = opts.with_tls(
                etcd_client::TlsOptions::new()
                    .ca_certificate(etcd_client::Certificate::from_pem(read(&p.ca)))
                    .identity(etcd_client::Identity::from_pem(
                        read(&p.client_cert),
                        read(&p.client_key),
                    )),
            );
        }
        etcd_client::Client::connect([self.endpoint.as_str()], Some(opts)).await
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
    pub fn put(&self, key: &str, value: &[u8]) {
        crate::process::runtime().block_on(async {
            let mut c = self.client().await.expect("etcd client");
            c.put(key, value.to_vec(), None).await.expect("etcd put");
        });
    }

    /// Reads one key (blocking).
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        crate::process::runtime().block_on(async {
            let mut c = self.client().await.expect("etcd client");
            let r = c.get(key, None).await.expect("etcd get");
            r.kvs().first().map(|kv| kv.value().to_vec())
        })
    }

    /// Every key/value under `prefix` (blocking).
    pub fn range(&self, prefix: &str) -> Vec<(String, Vec<u8>)> {
        crate::process::runtime().block_on(async {
            let mut c = self.client().await.expect("etcd client");
            let r = c
                .get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
                .await
                .expect("etcd range");
            r.kvs()
                .iter()
                .map(|kv| {
                    (
                        String::from_utf8_lossy(kv.key()).into_owned(),
                        kv.value().to_vec(),
                    )
                })
                .collect()
        })
    }
}

impl Drop for EtcdMember {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
