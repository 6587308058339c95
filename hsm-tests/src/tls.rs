//! A throwaway CA, server and client certificates for TLS tests (rcgen).

use std::path::{Path, PathBuf};

/// PEM files written by [`DevPki::write`].
#[derive(Debug, Clone)]
pub struct DevPki {
    /// CA certificate.
    pub ca: PathBuf,
    /// Server certificate (localhost, 127.0.0.1).
    pub server_cert: PathBuf,
    /// Server key.
    pub server_key: PathBuf,
    /// Client certificate.
    pub client_cert: PathBuf,
    /// Client key.
    pub client_key: PathBuf,
}

impl DevPki {
    /// Generates a CA and a server and a client certificate into `dir`.
    pub fn write(dir: &Path) -> DevPki {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "keyhaven test CA");
        let ca =
            CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key")).expect("ca");
        let server_key = KeyPair::generate().expect("key");
        let server = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("server params")
            .signed_by(&server_key, &ca)
            .expect("server cert");
        let client_key = KeyPair::generate().expect("key");
        let client = CertificateParams::new(vec!["keyhaven-client".to_string()])
            .expect("client params")
            .signed_by(&client_key, &ca)
            .expect("client cert");
        let p = DevPki {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server-key.pem"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client-key.pem"),
        };
        std::fs::write(&p.ca, ca.pem()).expect("write");
        std::fs::write(&p.server_cert, server.pem()).expect("write");
        std::fs::write(&p.server_key, server_key.serialize_pem()).expect("write");
        std::fs::write(&p.client_cert, client.pem()).expect("write");
        std::fs::write(&p.client_key, client_key.serialize_pem()).expect("write");
        p
    }
}
