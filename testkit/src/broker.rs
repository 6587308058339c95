//! The command line of a `broker` under test: gRPC over TLS and a metrics listener on
//! loopback, a KEK on a SoftHSM2 token, dev mode (tokens from a dev issuer whose key is a
//! file) and a bootstrap admin credential read from a file. Every secret is a file path.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::process::clean_command;

/// What a dev-mode `broker` is started with.
#[derive(Debug, Clone)]
pub struct BrokerFlags {
    /// gRPC port on 127.0.0.1.
    pub port: u16,
    /// Port of `/healthz`, `/readyz` and `/metrics` on 127.0.0.1.
    pub metrics_port: u16,
    /// `--database-url` (SQLite or PostgreSQL; no password in it).
    pub database_url: String,
    /// Server certificate (PEM).
    pub tls_cert: PathBuf,
    /// Server key (PEM).
    pub tls_key: PathBuf,
    /// `softhsm2.conf` of the token (`SOFTHSM2_CONF`).
    pub softhsm_conf: PathBuf,
    /// PKCS#11 module.
    pub module: PathBuf,
    /// Label of the token holding the broker's KEK.
    pub token_label: String,
    /// File holding the token's user PIN.
    pub pin_file: PathBuf,
    /// Dev-issuer key (PKCS#8 PEM; made by the broker if missing).
    pub dev_key: PathBuf,
    /// File holding the bootstrap admin credential.
    pub bootstrap_file: PathBuf,
    /// `--audit-file`, if the audit log should go to a file.
    pub audit_file: Option<PathBuf>,
    /// More flags, appended last.
    pub extra: Vec<OsString>,
}

impl BrokerFlags {
    /// `127.0.0.1:<metrics_port>`.
    pub fn metrics_addr(&self) -> String {
        format!("127.0.0.1:{}", self.metrics_port)
    }

    /// The arguments: `--dev` and a flag for each field, then [`BrokerFlags::extra`].
    pub fn args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec![
            "--listen".into(),
            format!("127.0.0.1:{}", self.port).into(),
            "--database-url".into(),
            self.database_url.clone().into(),
            "--tls-cert".into(),
            self.tls_cert.clone().into(),
            "--tls-key".into(),
            self.tls_key.clone().into(),
            "--pkcs11-module".into(),
            self.module.clone().into(),
            "--token-label".into(),
            self.token_label.clone().into(),
            "--pin-file".into(),
            self.pin_file.clone().into(),
            "--dev".into(),
            "--dev-key".into(),
            self.dev_key.clone().into(),
            "--bootstrap-file".into(),
            self.bootstrap_file.clone().into(),
        ];
        if let Some(f) = &self.audit_file {
            a.extend(["--audit-file".into(), f.clone().into()]);
        }
        a.extend(["--metrics-addr".into(), self.metrics_addr().into()]);
        a.extend(self.extra.iter().cloned());
        a
    }

    /// `bin` (the `broker` binary) with these flags and `SOFTHSM2_CONF`, and none of the
    /// `KEYHAVEN_*` variables this process inherited.
    pub fn command(&self, bin: &Path) -> Command {
        let mut c = clean_command(bin);
        c.env("SOFTHSM2_CONF", &self.softhsm_conf).args(self.args());
        c
    }
}
