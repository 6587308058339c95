//! A throwaway PKI for TLS tests and benches (rcgen): a CA, a server certificate for
//! [`SERVER_NAME`] and `127.0.0.1`, and a client certificate, written as PEM files. The CA's
//! key is never written: nothing else is ever signed with it.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

use crate::{write_private, Error, Result};

/// The name the server certificate is issued to (clients verify it as this name).
pub const SERVER_NAME: &str = "localhost";

/// PEM files written by [`DevPki::write`]. Private keys have mode 0600.
#[derive(Debug, Clone)]
pub struct DevPki {
    /// CA certificate.
    pub ca: PathBuf,
    /// Server certificate ([`SERVER_NAME`], 127.0.0.1).
    pub server_cert: PathBuf,
    /// Server key.
    pub server_key: PathBuf,
    /// Client certificate.
    pub client_cert: PathBuf,
    /// Client key.
    pub client_key: PathBuf,
}

impl DevPki {
    /// Generates a CA, a server and a client certificate into `dir`.
    pub fn write(dir: &Path) -> Result<DevPki> {
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "keyhaven test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
        let server_key = KeyPair::generate()?;
        let server = CertificateParams::new(vec![SERVER_NAME.to_owned(), "127.0.0.1".to_owned()])?
            .signed_by(&server_key, &ca)?;
        let client_key = KeyPair::generate()?;
        let client = CertificateParams::new(vec!["keyhaven-client".to_owned()])?
            .signed_by(&client_key, &ca)?;
        let p = DevPki {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server-key.pem"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client-key.pem"),
        };
        let write = |path: &Path, pem: String| {
            std::fs::write(path, pem).map_err(|e| Error::io(format!("write {}", path.display()), e))
        };
        write(&p.ca, ca.pem())?;
        write(&p.server_cert, server.pem())?;
        write_private(&p.server_key, &server_key.serialize_pem())?;
        write(&p.client_cert, client.pem())?;
        write_private(&p.client_key, &client_key.serialize_pem())?;
        Ok(p)
    }
}
