//! [`CtlError`]: what can go wrong in a `brokerctl` command, with its cause kept as
//! `source`; [`CtlError::exit_code`] and [`CtlError::describe`] are what the binary prints.

use std::error::Error as StdError;
use std::fmt;
use std::path::PathBuf;

use keyhaven_broker_core::dev_token::DevTokenError;
use keyhaven_broker_core::policy::PolicyError;
use keyhaven_process::secret_file::SecretFileError;

/// A mistake in how the command was called (exit code 2, like clap's parse errors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage(pub String);

impl fmt::Display for Usage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl StdError for Usage {}

/// Why a `brokerctl` command failed.
///
/// A variant's text says what failed at its level; the causes follow through `source()`
/// ([`CtlError::describe`] joins them). Texts never hold a credential or a secret value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CtlError {
    /// The command was called wrongly (exit code 2).
    #[error(transparent)]
    Usage(#[from] Usage),
    /// The broker refused a call, or the call did not reach it.
    #[error("{call} failed: {}", remote_text(.status))]
    Remote {
        /// The RPC, e.g. `PutSecret`.
        call: &'static str,
        /// The status the call ended with (its source, if any, is the transport failure).
        #[source]
        status: tonic::Status,
    },
    /// A transport failure without a client certificate: perhaps the broker wants one.
    #[error(
        "the connection broke; if the broker requires client certificates, give \
         --client-cert and --client-key"
    )]
    NoClientCert(#[source] Box<CtlError>),
    /// The channel to `--addr` could not be opened.
    #[error("cannot connect to {addr}")]
    Connect {
        /// `--addr` as given.
        addr: String,
        /// tonic's failure.
        #[source]
        source: tonic::transport::Error,
    },
    /// The CA bundle or the client identity cannot be used.
    #[error("{0}")]
    TlsFiles(String),
    /// tonic refused the TLS configuration.
    #[error("TLS configuration")]
    TlsConfig(#[source] tonic::transport::Error),
    /// The credential file cannot be read or is not acceptable.
    #[error(transparent)]
    Credential(#[from] SecretFileError),
    /// The credential cannot be sent as an HTTP header value.
    #[error("the credential is not a valid header value")]
    CredentialNotAHeader,
    /// A local file or stdin could not be read, or a file or directory written.
    #[error("{what}")]
    Io {
        /// What was being done, with the path (e.g. `cannot read --from-file a.txt`).
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Writing the results to stdout or a note to stderr failed.
    #[error("cannot write the output")]
    Output(#[from] std::io::Error),
    /// An input file's content is not acceptable (too large, not the expected JSON).
    #[error("{0}")]
    Input(String),
    /// The policy document does not validate.
    #[error("{name} is not a valid policy document")]
    Policy {
        /// The file name, or `stdin`.
        name: String,
        /// What is wrong with it (boxed: it is the largest cause).
        #[source]
        source: Box<PolicyError>,
    },
    /// `dev-ca` would replace existing files and `--force` is not given.
    #[error("refusing to overwrite {files} (use --force to replace them)")]
    WouldOverwrite {
        /// The existing files, comma-separated.
        files: String,
    },
    /// A `dev-ca` key or certificate could not be made.
    #[error("{what}")]
    Certificate {
        /// Which step.
        what: String,
        /// rcgen's failure.
        #[source]
        source: rcgen::Error,
    },
    /// The operating system's random number generator failed (`getrandom::Error` is not a
    /// `std::error::Error` without its `std` feature, so it is shown, not chained).
    #[error("no randomness available: {0}")]
    Random(getrandom::Error),
    /// The clock's date could not be read back (for the certificates' validity).
    #[error("cannot read today's date from {today}")]
    Clock {
        /// The formatted time that did not parse.
        today: String,
    },
    /// An HSM operation of `keys init` failed.
    #[error("{what}")]
    Hsm {
        /// Which step.
        what: &'static str,
        /// The HSM layer's error.
        #[source]
        source: keyhaven_hsm::Error,
    },
    /// The dev issuer's key cannot be loaded or created.
    #[error("dev issuer key {}", .path.display())]
    DevKey {
        /// The key file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: DevTokenError,
    },
    /// The broker checked its audit log and found it broken.
    #[error("audit log verification FAILED: {0}")]
    AuditBroken(String),
    /// The broker's answer does not make sense (e.g. audit records out of order).
    #[error("{0}")]
    BadResponse(String),
    /// The broker's policy document does not parse as YAML.
    #[error("the broker sent a policy document that is not YAML")]
    BadPolicyYaml(#[source] serde_yaml_ng::Error),
    /// A blocking task (the HSM calls of `keys init`) did not finish.
    #[error("the HSM task did not finish")]
    Task(#[source] tokio::task::JoinError),
}

impl CtlError {
    /// Maps a failed call to [`CtlError::Remote`] (for `map_err`).
    pub fn remote(call: &'static str) -> impl FnOnce(tonic::Status) -> CtlError {
        move |status| CtlError::Remote { call, status }
    }

    /// The gRPC code of a call the broker refused (or that did not reach it), if this is one.
    pub fn grpc_code(&self) -> Option<tonic::Code> {
        match self {
            CtlError::Remote { status, .. } => Some(status.code()),
            CtlError::NoClientCert(inner) => inner.grpc_code(),
            _ => None,
        }
    }

    /// The process exit code: 2 for [`Usage`] errors (as clap's own), 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            CtlError::Usage(_) => 2,
            _ => 1,
        }
    }

    /// Whether the reader of our output went away (`brokerctl ... | head`).
    pub fn is_broken_pipe(&self) -> bool {
        chain(self).any(|e| {
            e.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
        })
    }

    /// The error and its causes on one line, joined by `: `, control characters escaped and
    /// repeated texts dropped.
    ///
    /// tonic's own errors are followed but not shown: a `Status`'s code and message are
    /// already in [`CtlError::Remote`]'s text (its `Display` is a debug dump), and a
    /// transport error only says `transport error` before its causes.
    pub fn describe(&self) -> String {
        let mut parts: Vec<String> = Vec::new();
        for e in chain(self) {
            if e.is::<tonic::Status>() || e.is::<tonic::transport::Error>() {
                continue;
            }
            let text = one_line(&e.to_string());
            if !text.is_empty() && !parts.iter().any(|p| p.contains(&text)) {
                parts.push(text);
            }
        }
        parts.join(": ")
    }
}

/// `e` and its `source()` chain.
fn chain<'a>(
    e: &'a (dyn StdError + 'static),
) -> impl Iterator<Item = &'a (dyn StdError + 'static)> {
    let mut next = Some(e);
    std::iter::from_fn(move || {
        let e = next?;
        next = e.source();
        Some(e)
    })
}

/// The code, the broker's message and what to check, for [`CtlError::Remote`].
fn remote_text(status: &tonic::Status) -> String {
    let mut text = code_name(status.code()).to_owned();
    let message = one_line(status.message());
    if !message.is_empty() {
        text.push_str(": ");
        text.push_str(&message);
    }
    match status.code() {
        tonic::Code::Unauthenticated => {
            text.push_str(" (check the --token-file / --bootstrap-file credential)")
        }
        tonic::Code::DeadlineExceeded => text.push_str(" (see --timeout)"),
        _ => {}
    }
    text
}

/// The canonical name of a gRPC code (`NOT_FOUND`, ...).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// `s` with control characters escaped, so a message stays one line.
pub fn one_line(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect::<String>()
        .trim()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_errors_are_one_line_with_the_code() {
        let s = tonic::Status::permission_denied("caller ns/sa may not\nwrite team/app");
        let e = CtlError::remote("PutSecret")(s);
        assert_eq!(
            e.describe(),
            "PutSecret failed: PERMISSION_DENIED: caller ns/sa may not\\nwrite team/app"
        );
        assert_eq!(e.grpc_code(), Some(tonic::Code::PermissionDenied));
        assert_eq!(e.exit_code(), 1);
        let e = CtlError::remote("ListSecrets")(tonic::Status::unauthenticated("token expired"));
        assert!(e
            .describe()
            .starts_with("ListSecrets failed: UNAUTHENTICATED: token expired (check"));
        assert_eq!(
            CtlError::remote("Renew")(tonic::Status::unavailable("")).describe(),
            "Renew failed: UNAVAILABLE"
        );
        assert_eq!(code_name(tonic::Code::Unavailable), "UNAVAILABLE");
    }

    #[test]
    fn describe_joins_the_causes_and_drops_repeats() {
        let e = CtlError::Io {
            what: "cannot read --from-file a.txt".into(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "gone\naway"),
        };
        assert_eq!(e.describe(), "cannot read --from-file a.txt: gone\\naway");
        assert_eq!(e.exit_code(), 1);
        let e = CtlError::NoClientCert(Box::new(e));
        assert!(e.describe().starts_with("the connection broke; "));
        assert!(e
            .describe()
            .ends_with("--client-key: cannot read --from-file a.txt: gone\\naway"));

        let yaml = serde_yaml_ng::from_str::<u32>("[").unwrap_err();
        let text = yaml.to_string();
        let e = CtlError::Policy {
            name: "p.yaml".into(),
            source: Box::new(PolicyError::Yaml { source: yaml }),
        };
        // PolicyError::Yaml shows its source already: said once.
        assert_eq!(e.describe().matches(&text).count(), 1, "{}", e.describe());

        let e = CtlError::from(Usage("give --yes".into()));
        assert_eq!((e.exit_code(), e.describe()), (2, "give --yes".to_owned()));
    }

    #[test]
    fn broken_pipes_are_found_in_the_chain() {
        let pipe = || std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        assert!(CtlError::Output(pipe()).is_broken_pipe());
        assert!(CtlError::NoClientCert(Box::new(CtlError::Output(pipe()))).is_broken_pipe());
        assert!(!CtlError::Input("x".into()).is_broken_pipe());
    }
}
