//! How clients reach a broker — shared by `brokerctl` and `broker-agent` so both follow the
//! same rules: `https://host[:port]`, plaintext `http://` only to a loopback host, trust
//! exactly the given CA bundle, optional client certificate. Errors name files and flags,
//! never their content.

use std::net::IpAddr;
use std::path::Path;

use rustls_pki_types::pem::SectionKind;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, Uri};
use zeroize::Zeroizing;

/// A checked broker address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The URI to dial.
    pub uri: Uri,
    /// `https` (true) or plaintext `http` to a loopback host (false).
    pub tls: bool,
    /// The host, without IPv6 brackets.
    pub host: String,
}

/// Checks a broker address given with `flag`: `https://host[:port]`, or `http://` only when
/// the host is loopback (`localhost`, `127.0.0.0/8`, `::1`). No path, query or user info.
pub fn parse_addr(addr: &str, flag: &str) -> Result<Target, String> {
    let bad = |why: &str| format!("{flag} {addr:?}: {why}");
    let uri: Uri = addr
        .parse()
        .map_err(|_| bad("not a URL like https://broker.example:8443"))?;
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        Some(_) => return Err(bad("the scheme must be https (or http for loopback)")),
        None => return Err(bad("give a scheme: https://host:port")),
    };
    let authority = uri.authority().ok_or_else(|| bad("no host"))?;
    if authority.as_str().contains('@') {
        return Err(bad("user info is not allowed"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(bad("no path or query, only scheme, host and port"));
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    if host.is_empty() {
        return Err(bad("no host"));
    }
    if !tls && !is_loopback(&host) {
        return Err(bad(
            "plaintext http:// is only allowed to a loopback host (localhost, 127.0.0.1, ::1); use https://",
        ));
    }
    Ok(Target { uri, tls, host })
}

/// `localhost` or a loopback IP address.
pub fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| match ip {
            IpAddr::V4(v4) => v4.is_loopback(),
            IpAddr::V6(v6) => {
                v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
            }
        })
}

/// The files of a TLS client configuration.
#[derive(Debug, Clone, Copy, Default)]
pub struct TlsFiles<'a> {
    /// PEM bundle of the CA(s) to trust (required).
    pub ca_file: Option<&'a Path>,
    /// PEM client certificate (with `client_key`).
    pub client_cert: Option<&'a Path>,
    /// PEM private key of `client_cert`.
    pub client_key: Option<&'a Path>,
    /// Name to verify the server certificate against (default: the host dialled).
    pub server_name: Option<&'a str>,
}

/// The rustls client configuration: trust exactly the CA file, optional client identity.
/// `ca_flag` names the CA flag in the error when it is missing.
pub fn client_tls(files: TlsFiles<'_>, ca_flag: &str) -> Result<ClientTlsConfig, String> {
    let ca_file = files.ca_file.ok_or_else(|| {
        format!(
            "{ca_flag} is required for https: the PEM CA bundle that signed the broker's certificate"
        )
    })?;
    let ca = std::fs::read(ca_file)
        .map_err(|e| format!("cannot read CA bundle {}: {e}", ca_file.display()))?;
    if !has_pem_section(&ca, is_certificate) {
        return Err(format!(
            "CA bundle {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            ca_file.display()
        ));
    }
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    if let Some(name) = files.server_name {
        tls = tls.domain_name(name.to_owned());
    }
    if let (Some(cert_file), Some(key_file)) = (files.client_cert, files.client_key) {
        let cert = std::fs::read(cert_file).map_err(|e| {
            format!(
                "cannot read client certificate {}: {e}",
                cert_file.display()
            )
        })?;
        if !has_pem_section(&cert, is_certificate) {
            return Err(format!(
                "client certificate {} holds no PEM certificate",
                cert_file.display()
            ));
        }
        let key = Zeroizing::new(
            std::fs::read(key_file)
                .map_err(|e| format!("cannot read client key {}: {e}", key_file.display()))?,
        );
        if !has_pem_section(&key, is_private_key) {
            return Err(format!(
                "client key {} holds no PEM private key",
                key_file.display()
            ));
        }
        tls = tls.identity(Identity::from_pem(cert, &*key));
    }
    Ok(tls)
}

/// Whether `pem` holds a well-formed PEM section of a kind `want` accepts (and no malformed
/// one). Decoded bodies are zeroized: a section may be a private key.
pub fn has_pem_section(pem: &[u8], want: fn(&SectionKind) -> bool) -> bool {
    let mut rd = pem;
    let mut found = false;
    loop {
        match rustls_pki_types::pem::from_buf(&mut rd) {
            Ok(Some((kind, der))) => {
                drop(Zeroizing::new(der));
                found |= want(&kind);
            }
            Ok(None) => return found,
            Err(_) => return false,
        }
    }
}

/// A certificate section.
pub fn is_certificate(k: &SectionKind) -> bool {
    matches!(k, SectionKind::Certificate)
}

/// A private key section: PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
pub fn is_private_key(k: &SectionKind) -> bool {
    matches!(
        k,
        SectionKind::PrivateKey | SectionKind::RsaPrivateKey | SectionKind::EcPrivateKey
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(label: &str, body: &str) -> Vec<u8> {
        format!("-----BEGIN {label}-----\n{body}\n-----END {label}-----\n").into_bytes()
    }

    #[test]
    fn pem_sections_are_recognised_by_kind() {
        let cert = section("CERTIFICATE", "MIIBAAAA");
        assert!(has_pem_section(&cert, is_certificate));
        assert!(!has_pem_section(&cert, is_private_key));
        for label in ["PRIVATE KEY", "EC PRIVATE KEY", "RSA PRIVATE KEY"] {
            assert!(
                has_pem_section(&section(label, "MIIBAAAA"), is_private_key),
                "{label}"
            );
        }
        let mut bundle = b"comment before\n".to_vec();
        bundle.extend(section("PUBLIC KEY", "MIIBAAAA"));
        bundle.extend(&cert);
        assert!(
            has_pem_section(&bundle, is_certificate),
            "second of two sections"
        );
    }

    #[test]
    fn malformed_pem_is_refused() {
        assert!(!has_pem_section(b"", is_certificate));
        assert!(!has_pem_section(b"not pem at all", is_certificate));
        assert!(!has_pem_section(
            &section("CERTIFICATE", "***"),
            is_certificate
        ));
        assert!(!has_pem_section(
            b"-----BEGIN CERTIFICATE-----\nMIIBAAAA\n",
            is_certificate
        ));
    }
}
