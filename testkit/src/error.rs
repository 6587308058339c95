//! The kit's one error type.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

/// What went wrong while standing up a part.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A program or library the kit runs is not installed.
    #[error("{what} not found: {hint}")]
    NotInstalled {
        /// The program or library.
        what: String,
        /// How to install it (or point the kit at it).
        hint: &'static str,
    },
    /// A binary of this workspace has not been built.
    #[error("{} is not built: run `cargo build --workspace --bins` first (scripts/test.sh does)", path.display())]
    NotBuilt {
        /// Where it was looked for.
        path: PathBuf,
    },
    /// A file or process operation failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A command ran to completion and failed.
    #[error("{what} failed ({status}): {stderr}")]
    CommandFailed {
        /// The command.
        what: String,
        /// Its exit status.
        status: ExitStatus,
        /// Its stderr.
        stderr: String,
    },
    /// A child process that should be running has exited.
    #[error("{what} exited ({status}); its log:\n{log}")]
    Exited {
        /// The process.
        what: String,
        /// Its exit status.
        status: ExitStatus,
        /// The end of its log.
        log: String,
    },
    /// A part did not become ready in time.
    #[error("{what} not ready after {after:?} ({last}); its log:\n{log}")]
    NotReady {
        /// The part.
        what: String,
        /// How long it was given.
        after: Duration,
        /// The last thing that went wrong while waiting.
        last: String,
        /// The end of its log.
        log: String,
    },
    /// Something a tool printed was not what the kit expected.
    #[error("unexpected output: {0}")]
    Unexpected(String),
    /// An etcd client call failed.
    #[error("etcd client")]
    Etcd(#[from] etcd_client::Error),
    /// A certificate could not be made.
    #[error("certificate generation")]
    Pki(#[from] rcgen::Error),
    /// A PKCS#11 call (through `keyhaven-hsm`) failed.
    #[error("PKCS#11")]
    Hsm(#[from] keyhaven_hsm::Error),
    /// The OS random number generator failed.
    #[error("OS CSPRNG: {0}")]
    Random(getrandom::Error),
}

impl Error {
    /// An [`Error::Io`] saying what was being done.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}

/// The kit's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;
