//! Reaching the broker: address rules (plaintext only to loopback), the TLS channel, the
//! bearer credential read from a file at each run, and turning a `tonic::Status` into one
//! clear line.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use keyhaven_proto::endpoint::{client_tls, TlsFiles};
use secrecy::{ExposeSecret, SecretString};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use zeroize::Zeroizing;

use keyhaven_proto::broker::v1::admin_client::AdminClient;
use keyhaven_proto::broker::v1::leases_client::LeasesClient;

use super::cli::ConnArgs;
use super::{CtlError, Usage};

/// Longest we wait for the TCP + TLS handshake, whatever `--timeout` says.
const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub use keyhaven_proto::endpoint::Target;

/// Checks `--addr` with the rules every broker client shares
/// ([`keyhaven_proto::endpoint::parse_addr`]).
pub fn parse_addr(addr: &str) -> Result<Target, Usage> {
    keyhaven_proto::endpoint::parse_addr(addr, "--addr").map_err(Usage)
}

/// Builds and connects the channel `--addr` and the TLS flags describe.
pub async fn connect(conn: &ConnArgs) -> Result<Channel, CtlError> {
    let target = parse_addr(&conn.addr)?;
    let mut endpoint = Endpoint::from(target.uri.clone())
        .connect_timeout(conn.timeout.min(MAX_CONNECT_TIMEOUT))
        .timeout(conn.timeout);
    if target.tls {
        endpoint = endpoint
            .tls_config(tls_config(conn)?)
            .map_err(CtlError::TlsConfig)?;
    } else {
        let given: Vec<&str> = [
            ("--ca-file", conn.ca_file.is_some()),
            ("--client-cert", conn.client_cert.is_some()),
            ("--tls-server-name", conn.tls_server_name.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, set)| set.then_some(name))
        .collect();
        if !given.is_empty() {
            return Err(Usage(format!(
                "{} only apply to https:// addresses, and --addr is {}",
                given.join(", "),
                conn.addr
            ))
            .into());
        }
    }
    endpoint
        .connect()
        .await
        .map_err(|source| CtlError::Connect {
            addr: conn.addr.clone(),
            source,
        })
}

/// The rustls client configuration: trust exactly `--ca-file`, optional client identity.
fn tls_config(conn: &ConnArgs) -> Result<ClientTlsConfig, CtlError> {
    if conn.ca_file.is_none() {
        return Err(Usage(
            "--ca-file (or KEYHAVEN_BROKER_CA) is required for https: the PEM CA bundle that \
             signed the broker's certificate"
                .into(),
        )
        .into());
    }
    let files = TlsFiles {
        ca_file: conn.ca_file.as_deref(),
        client_cert: conn.client_cert.as_deref(),
        client_key: conn.client_key.as_deref(),
        server_name: conn.tls_server_name.as_deref(),
    };
    client_tls(files, "--ca-file").map_err(CtlError::TlsFiles)
}

/// Where the credential came from (for messages; never the credential itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialKind {
    /// A ServiceAccount token (`--token-file`).
    Token,
    /// The bootstrap admin credential (`--bootstrap-file`).
    Bootstrap,
}

/// Reads the credential named by `--token-file` or `--bootstrap-file`: trailing newline
/// removed, kept as a secret. Errors name the file, never the content.
pub fn load_credential(conn: &ConnArgs) -> Result<(CredentialKind, SecretString), CtlError> {
    let (kind, path) =
        match (&conn.token_file, &conn.bootstrap_file) {
            (Some(_), Some(_)) => return Err(Usage(
                "give only one of --token-file and --bootstrap-file (check KEYHAVEN_TOKEN_FILE \
                 and KEYHAVEN_BOOTSTRAP_FILE)"
                    .into(),
            )
            .into()),
            (Some(p), None) => (CredentialKind::Token, p),
            (None, Some(p)) => (CredentialKind::Bootstrap, p),
            (None, None) => return Err(Usage(
                "no credential: give --token-file (a ServiceAccount token) or --bootstrap-file \
                 (the bootstrap admin credential), or set KEYHAVEN_TOKEN_FILE / \
                 KEYHAVEN_BOOTSTRAP_FILE"
                    .into(),
            )
            .into()),
        };
    Ok((kind, read_credential(path)?))
}

/// Reads one credential file.
pub fn read_credential(path: &Path) -> Result<SecretString, CtlError> {
    use keyhaven_process::secret_file::{read, Rules};
    let v = read(path, Rules::bearer("credential file"))?;
    Ok(SecretString::from(v.as_str()))
}

/// Adds `authorization: Bearer <credential>` to every call. `Debug` hides the value, and the
/// metadata value is marked sensitive.
#[derive(Clone)]
pub struct Bearer(MetadataValue<Ascii>);

impl Bearer {
    /// The header value for `credential` (checked by [`read_credential`]).
    pub fn new(credential: &SecretString) -> Result<Bearer, CtlError> {
        let text = Zeroizing::new(format!("Bearer {}", credential.expose_secret()));
        let mut value = MetadataValue::try_from(text.as_str())
            // The value's error says nothing more (and must not quote the credential).
            .map_err(|_| CtlError::CredentialNotAHeader)?;
        value.set_sensitive(true);
        Ok(Bearer(value))
    }
}

impl fmt::Debug for Bearer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Bearer(<redacted>)")
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

/// Admin client with the bearer credential.
pub type Admin = AdminClient<InterceptedService<Channel, Bearer>>;
/// Leases client with the bearer credential.
pub type Leases = LeasesClient<InterceptedService<Channel, Bearer>>;

/// A connected, authenticated session.
#[derive(Debug, Clone)]
pub struct Session {
    /// Operator API.
    pub admin: Admin,
    /// Workload API.
    pub leases: Leases,
    /// What kind of credential is used.
    pub credential: CredentialKind,
}

impl Session {
    /// Reads the credential, then connects.
    pub async fn open(conn: &ConnArgs) -> Result<Session, CtlError> {
        let (credential, secret) = load_credential(conn)?;
        let bearer = Bearer::new(&secret)?;
        drop(secret);
        let channel = connect(conn).await?;
        Ok(Session {
            admin: AdminClient::with_interceptor(channel.clone(), bearer.clone()),
            leases: LeasesClient::with_interceptor(channel, bearer),
            credential,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_anywhere_http_only_to_loopback() {
        for ok in [
            "https://broker.example:8443",
            "https://10.0.0.1:8443",
            "https://[2001:db8::1]:8443/",
            "http://127.0.0.1:8080",
            "http://127.8.9.10:1",
            "http://localhost:8080",
            "http://LOCALHOST",
            "http://[::1]:8080",
            "http://[::ffff:127.0.0.1]:8080",
        ] {
            parse_addr(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        let t = parse_addr("http://[::1]:8080").unwrap();
        assert!(!t.tls);
        assert_eq!(t.host, "::1");
        let t = parse_addr("https://[2001:db8::1]:8443").unwrap();
        assert!(t.tls);
        assert_eq!(t.host, "2001:db8::1");
        for bad in [
            "http://broker.example:8080",
            "http://10.0.0.1:8080",
            "http://0.0.0.0:8080",
            "http://[2001:db8::1]:8080",
            "http://localhost.evil.example:80",
            "http://127.0.0.1.nip.io:80",
            "ftp://127.0.0.1",
            "127.0.0.1:8443",
            "https://",
            "https://broker:8443/v1",
            "https://broker:8443?x=1",
            "http://user@127.0.0.1:1",
            "not a url",
        ] {
            let e = parse_addr(bad).unwrap_err();
            assert!(e.0.contains("--addr"), "{bad}: {e}");
        }
        assert!(parse_addr("http://broker.example:1")
            .unwrap_err()
            .0
            .contains("loopback"));
    }

    fn conn() -> ConnArgs {
        ConnArgs {
            addr: "https://127.0.0.1:1".into(),
            ca_file: None,
            client_cert: None,
            client_key: None,
            token_file: None,
            bootstrap_file: None,
            tls_server_name: None,
            timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn credential_is_read_trimmed_and_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        std::fs::write(&f, "eyJhbGciOi.s3cr3t.sig\r\n").unwrap();
        let mut c = conn();
        c.token_file = Some(f.clone());
        let (kind, secret) = load_credential(&c).unwrap();
        assert_eq!(kind, CredentialKind::Token);
        assert_eq!(secret.expose_secret(), "eyJhbGciOi.s3cr3t.sig");
        let bearer = Bearer::new(&secret).unwrap();
        assert!(!format!("{bearer:?}").contains("s3cr3t"));
        assert!(!format!("{:?}", bearer.0).contains("s3cr3t"));

        std::fs::write(&f, "two words\n").unwrap();
        let e = load_credential(&c).unwrap_err().to_string();
        assert!(!e.contains("words"), "{e}");
        std::fs::write(&f, "\n").unwrap();
        assert!(load_credential(&c)
            .unwrap_err()
            .to_string()
            .contains("empty"));
        c.token_file = Some(dir.path().join("missing"));
        let e = load_credential(&c).unwrap_err();
        assert!(matches!(e, CtlError::Credential(_)), "{e:?}");
        let e = e.describe();
        assert!(e.contains("missing") && e.contains("No such file"), "{e}");

        c.token_file = None;
        let e = load_credential(&c).unwrap_err();
        assert!(matches!(e, CtlError::Usage(_)), "{e:?}");
        c.bootstrap_file = Some(f.clone());
        std::fs::write(&f, "bootstrap-s3cr3t\n").unwrap();
        let (kind, _) = load_credential(&c).unwrap();
        assert_eq!(kind, CredentialKind::Bootstrap);
        c.token_file = Some(f);
        assert!(matches!(
            load_credential(&c).unwrap_err(),
            CtlError::Usage(_)
        ));
    }

    #[tokio::test]
    async fn tls_needs_a_ca_and_plaintext_refuses_tls_flags() {
        let dir = tempfile::tempdir().unwrap();
        let c = conn();
        let e = connect(&c).await.unwrap_err();
        assert!(
            matches!(&e, CtlError::Usage(u) if u.0.contains("--ca-file")),
            "{e:?}"
        );

        let mut c = conn();
        let not_pem = dir.path().join("ca.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        c.ca_file = Some(not_pem);
        let e = connect(&c).await.unwrap_err();
        assert!(matches!(e, CtlError::TlsFiles(_)), "{e:?}");
        assert!(e.describe().contains("no PEM certificate"), "{e}");

        let mut c = conn();
        c.addr = "http://127.0.0.1:1".into();
        c.ca_file = Some(dir.path().join("ca.pem"));
        let e = connect(&c).await.unwrap_err();
        assert!(
            matches!(&e, CtlError::Usage(u) if u.0.contains("--ca-file")),
            "{e:?}"
        );

        // Nothing listens on the port: the cause is shown, tonic's bare wrapper is not.
        let mut c = conn();
        c.addr = "http://127.0.0.1:1".into();
        let e = connect(&c).await.unwrap_err();
        assert!(matches!(e, CtlError::Connect { .. }), "{e:?}");
        let line = e.describe();
        assert!(
            line.starts_with("cannot connect to http://127.0.0.1:1: "),
            "{line}"
        );
        assert!(!line.contains("transport error"), "{line}");
    }
}
