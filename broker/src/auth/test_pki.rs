//! Test-only: a throwaway CA and a server certificate for 127.0.0.1 and localhost, for the
//! local TLS servers the JWKS and TokenReview tests run.

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tokio_rustls::rustls;

/// A CA, and a certificate for 127.0.0.1 and localhost that it signed.
pub(crate) struct Pki {
    pub(crate) ca_pem: String,
    pub(crate) server_cert: rustls::pki_types::CertificateDer<'static>,
    pub(crate) server_key: Vec<u8>,
}

pub(crate) fn pki(name: &str) -> Pki {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, format!("{name} test CA"));
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    Pki {
        ca_pem: ca.pem(),
        server_cert: cert.der().clone(),
        server_key: key.serialize_der(),
    }
}
