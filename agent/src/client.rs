//! The broker as the agent sees it: a lazily connected TLS channel (reconnects on its own
//! after the broker restarts) and the three workload calls, each carrying the pod's
//! ServiceAccount token read from its file at that moment.

use std::path::{Path, PathBuf};
use std::time::Duration;

use keyhaven_proto::broker::v1::leases_client::LeasesClient;
use keyhaven_proto::broker::v1::{
    LeaseRequest, LeaseResponse, RenewRequest, RenewResponse, RevokeRequest,
};
use keyhaven_proto::endpoint::{client_tls, parse_addr, TlsFiles};
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use zeroize::Zeroizing;

use crate::config::Cli;

/// Longest TCP + TLS handshake, whatever `--timeout` says.
const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A client of the broker's `Leases` service.
#[derive(Debug, Clone)]
pub struct Broker {
    client: LeasesClient<Channel>,
    token_file: PathBuf,
    timeout: Duration,
}

/// What kind of failure a broker answer is, for the agent's decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The broker refuses this lease or renewal for good (revoked, expired, policy changed,
    /// no such secret).
    Refused,
    /// The token was not accepted (expired, not yet rotated by the kubelet, wrong audience):
    /// retried, since the kubelet refreshes the file.
    Unauthenticated,
    /// Could not reach the broker, or it could not serve now: retried with backoff.
    Unavailable,
}

impl Failure {
    /// Classifies a gRPC status.
    pub fn of(status: &Status) -> Failure {
        match status.code() {
            Code::FailedPrecondition | Code::NotFound | Code::PermissionDenied => Failure::Refused,
            Code::Unauthenticated => Failure::Unauthenticated,
            _ => Failure::Unavailable,
        }
    }

    /// Label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Failure::Refused => "refused",
            Failure::Unauthenticated => "unauthenticated",
            Failure::Unavailable => "unavailable",
        }
    }
}

impl Broker {
    /// Builds the client from the flags; nothing is dialled until the first call.
    pub fn new(cli: &Cli) -> Result<Broker, String> {
        let target = parse_addr(&cli.broker_addr, "--broker-addr")?;
        let mut endpoint = Endpoint::from(target.uri.clone())
            .connect_timeout(cli.timeout.min(MAX_CONNECT_TIMEOUT))
            .timeout(cli.timeout)
            .http2_keep_alive_interval(Duration::from_secs(60))
            .keep_alive_while_idle(false);
        if target.tls {
            let files = TlsFiles {
                ca_file: cli.ca_file.as_deref(),
                client_cert: cli.client_cert.as_deref(),
                client_key: cli.client_key.as_deref(),
                server_name: cli.tls_server_name.as_deref(),
            };
            endpoint = endpoint
                .tls_config(client_tls(files, "--ca-file")?)
                .map_err(|e| format!("TLS configuration: {e}"))?;
        } else if cli.ca_file.is_some() || cli.client_cert.is_some() {
            return Err(format!(
                "--ca-file and --client-cert only apply to https:// addresses, and --broker-addr is {}",
                cli.broker_addr
            ));
        }
        Ok(Broker {
            client: LeasesClient::new(endpoint.connect_lazy()),
            token_file: cli.token_file.clone(),
            timeout: cli.timeout,
        })
    }

    fn request<T>(&self, msg: T) -> Result<tonic::Request<T>, Status> {
        let token = read_token(&self.token_file).map_err(Status::unauthenticated)?;
        let mut header =
            MetadataValue::try_from(format!("Bearer {}", token.as_str())).map_err(|_| {
                Status::unauthenticated(format!(
                    "token file {} holds characters not allowed in a header",
                    self.token_file.display()
                ))
            })?;
        header.set_sensitive(true);
        let mut r = tonic::Request::new(msg);
        r.metadata_mut().insert("authorization", header);
        r.set_timeout(self.timeout);
        Ok(r)
    }

    /// `Lease(path)`.
    pub async fn lease(&self, path: &str, ttl: Option<Duration>) -> Result<LeaseResponse, Status> {
        let req = self.request(LeaseRequest {
            path: path.to_owned(),
            ttl_seconds: ttl.map(|t| t.as_secs()).unwrap_or(0),
        })?;
        Ok(self.client.clone().lease(req).await?.into_inner())
    }

    /// `Renew(lease_id, increment)`.
    pub async fn renew(
        &self,
        lease_id: &str,
        increment: Duration,
    ) -> Result<RenewResponse, Status> {
        let req = self.request(RenewRequest {
            lease_id: lease_id.to_owned(),
            increment_seconds: increment.as_secs(),
        })?;
        Ok(self.client.clone().renew(req).await?.into_inner())
    }

    /// `Revoke(lease_id)`.
    pub async fn revoke(&self, lease_id: &str) -> Result<(), Status> {
        let req = self.request(RevokeRequest {
            lease_id: lease_id.to_owned(),
        })?;
        self.client.clone().revoke(req).await?;
        Ok(())
    }
}

/// Reads the token file (trailing whitespace removed). Errors name the file, never the
/// content.
pub fn read_token(path: &Path) -> Result<Zeroizing<String>, String> {
    use keyhaven_process::secret_file::{read, Rules};
    read(path, Rules::bearer("token file")).map_err(|e| match std::error::Error::source(&e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    })
}

/// One line for a log: code and the broker's message (which never holds a value or token).
pub fn describe(status: &Status) -> String {
    let msg: String = status
        .message()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(300)
        .collect();
    format!("{:?}: {msg}", status.code())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn token_is_trimmed_and_errors_never_show_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        std::fs::write(&p, "eyJhbGciOi.secret-part.sig\n").unwrap();
        assert_eq!(
            read_token(&p).unwrap().as_str(),
            "eyJhbGciOi.secret-part.sig"
        );
        std::fs::write(&p, "  \n").unwrap();
        assert!(read_token(&p).unwrap_err().contains("empty"));
        std::fs::write(&p, b"\xffsecret-part").unwrap();
        let e = read_token(&p).unwrap_err();
        assert!(e.contains("not UTF-8") && !e.contains("secret-part"));
        let e = read_token(&dir.path().join("missing")).unwrap_err();
        assert!(e.contains("missing"));
    }

    #[test]
    fn failures_are_classified_for_the_retry_policy() {
        for (code, f) in [
            (Code::FailedPrecondition, Failure::Refused),
            (Code::NotFound, Failure::Refused),
            (Code::PermissionDenied, Failure::Refused),
            (Code::Unauthenticated, Failure::Unauthenticated),
            (Code::Unavailable, Failure::Unavailable),
            (Code::DeadlineExceeded, Failure::Unavailable),
            (Code::ResourceExhausted, Failure::Unavailable),
        ] {
            assert_eq!(Failure::of(&Status::new(code, "x")), f, "{code:?}");
        }
        assert_eq!(
            describe(&Status::unavailable("db\ndown")),
            "Unavailable: db down"
        );
    }
}
