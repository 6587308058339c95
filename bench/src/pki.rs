//! A throwaway CA and a server certificate for the broker's TLS listener (rcgen), written as
//! PEM files into the bench's temporary directory. The CA's key is never written: nothing
//! else is ever signed with it.

use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

/// The name clients verify the broker's certificate against.
pub const SERVER_NAME: &str = "localhost";

/// PEM files written by [`ServerPki::write`].
#[derive(Debug, Clone)]
pub struct ServerPki {
    /// CA certificate (what clients trust).
    pub ca: PathBuf,
    /// Server certificate for `localhost` and `127.0.0.1`.
    pub cert: PathBuf,
    /// Server private key (mode 0600).
    pub key: PathBuf,
}

impl ServerPki {
    /// Generates a CA and a server certificate signed by it into `dir`.
    pub fn write(dir: &Path) -> anyhow::Result<ServerPki> {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).context("CA params")?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "keyhaven-bench throwaway CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)
            .context("self-sign the CA")?;
        let key = KeyPair::generate()?;
        let cert = CertificateParams::new(vec![SERVER_NAME.to_owned(), "127.0.0.1".to_owned()])
            .context("server certificate params")?
            .signed_by(&key, &ca)
            .context("sign the server certificate")?;
        let pki = ServerPki {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server-key.pem"),
        };
        std::fs::write(&pki.ca, ca.pem()).context("write ca.pem")?;
        std::fs::write(&pki.cert, cert.pem()).context("write server.pem")?;
        crate::token::write_private(&pki.key, &key.serialize_pem())?;
        Ok(pki)
    }
}
