//! The serving certificate, reloaded when its files change: cert-manager or a Secret mount
//! rotates them without a restart. A handshake takes the certificate current at that moment;
//! connections already open keep theirs, so nothing in flight is dropped. A pair that does
//! not load (half-written, key does not match) is refused and the previous one kept.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// Why a certificate and key could not be loaded. Never contains key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The certificate file holds no PEM certificate.
    #[error("{0}: no PEM certificate")]
    NoCertificate(PathBuf),
    /// The key file holds no usable PEM private key.
    #[error("{0}: no usable PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey(PathBuf),
    /// The key is not the certificate's, or rustls refuses it.
    #[error("the private key does not match the certificate, or is of an unsupported type")]
    Mismatch(#[source] rustls::Error),
    /// The leaf certificate could not be parsed.
    #[error("{0}: the certificate cannot be parsed")]
    BadCertificate(PathBuf),
}

/// The current certificate and where it comes from.
#[derive(Debug)]
pub struct ReloadingCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    state: RwLock<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    digest: [u8; 32],
    not_after: i64,
}

impl ReloadingCert {
    /// Loads the pair; fails when it does not load.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, TlsError> {
        let loaded = read_pair(cert_path, key_path)?;
        Ok(Self {
            cert_path: cert_path.to_owned(),
            key_path: key_path.to_owned(),
            state: RwLock::new(loaded),
        })
    }

    /// Reads the files again; swaps the certificate when they changed and load. `Ok(true)`:
    /// a new certificate is in use.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let (cert, key) = read_files(&self.cert_path, &self.key_path)?;
        let digest = digest(&cert, &key);
        if self.read().digest == digest {
            return Ok(false);
        }
        let loaded = parse_pair(&cert, &key, &self.cert_path, &self.key_path)?;
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = loaded;
        Ok(true)
    }

    /// The certificate's notAfter, in seconds since the Unix epoch.
    pub fn not_after(&self) -> i64 {
        self.read().not_after
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Loaded> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.read().key.clone())
    }
}

fn read_files(cert: &Path, key: &Path) -> Result<(Vec<u8>, Zeroizing<Vec<u8>>), TlsError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| TlsError::Read {
            path: p.to_owned(),
            source,
        })
    };
    Ok((read(cert)?, Zeroizing::new(read(key)?)))
}

fn digest(cert: &[u8], key: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update((cert.len() as u64).to_be_bytes());
    h.update(cert);
    h.update(key);
    h.finalize().into()
}

fn read_pair(cert_path: &Path, key_path: &Path) -> Result<Loaded, TlsError> {
    let (cert, key) = read_files(cert_path, key_path)?;
    parse_pair(&cert, &key, cert_path, key_path)
}

fn parse_pair(
    cert: &[u8],
    key: &[u8],
    cert_path: &Path,
    key_path: &Path,
) -> Result<Loaded, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<_, _>>()
        .map_err(|_| TlsError::NoCertificate(cert_path.to_owned()))?;
    let Some(leaf) = chain.first() else {
        return Err(TlsError::NoCertificate(cert_path.to_owned()));
    };
    let not_after = x509_parser::parse_x509_certificate(leaf)
        .map_err(|_| TlsError::BadCertificate(cert_path.to_owned()))?
        .1
        .validity()
        .not_after
        .timestamp();
    let private =
        PrivateKeyDer::from_pem_slice(key).map_err(|_| TlsError::NoKey(key_path.to_owned()))?;
    let provider = rustls::crypto::ring::default_provider();
    let certified =
        CertifiedKey::from_der(chain, private, &provider).map_err(TlsError::Mismatch)?;
    Ok(Loaded {
        key: Arc::new(certified),
        digest: digest(cert, key),
        not_after,
    })
}

/// A rustls server configuration serving `cert` over HTTP/1.1, TLS 1.2 and 1.3.
pub fn server_config(cert: Arc<ReloadingCert>) -> Result<rustls::ServerConfig, rustls::Error> {
    let mut c = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_cert_resolver(cert);
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(c)
}
