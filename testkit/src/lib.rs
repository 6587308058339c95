//! `testkit`: the real parts Keyhaven's end-to-end tests (`hsm-tests`) and its load generator
//! (`keyhaven-bench`) stand up around the code they drive, written once:
//!
//! - [`softhsm`]: SoftHSM2 tokens in a temporary directory with their own `SOFTHSM2_CONF`;
//! - [`postgres`]: a throwaway PostgreSQL cluster on a free loopback port;
//! - [`etcd`]: a throwaway etcd member, plain or with TLS and client certificates;
//! - [`pki`]: a dev CA with a server and a client certificate;
//! - [`process`]: our built binaries, free ports, and child processes stopped on drop;
//! - [`broker`]: the command line of a dev-mode `broker` on a SoftHSM2 token;
//! - [`http`]: a small blocking `GET` for health and metrics endpoints.
//! - [`https`]: a small HTTPS/1.1 client (rustls) trusting one CA.
//!
//! Everything returns [`Result`]; a test that wants a panic calls `expect`. Whatever is
//! started or created here is stopped and removed on drop.
//!
//! It is not a place for the tests themselves, for fakes of the parts under test, or for
//! anything a Keyhaven binary links: it is test support, `publish = false`.
#![forbid(unsafe_code)]

pub mod broker;
mod error;
pub mod etcd;
pub mod http;
pub mod https;
pub mod pki;
pub mod postgres;
pub mod process;
pub mod random;
pub mod softhsm;

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

pub use error::{Error, Result};

/// Writes `content` to `path` with mode 0600 (a PIN, a credential, a private key), creating
/// the file or replacing what it held.
pub fn write_private(path: &Path, content: &str) -> Result<()> {
    let io = |source| Error::io(format!("write {}", path.display()), source);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    // `mode` applies only to a new file.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(io)?;
    f.write_all(content.as_bytes()).map_err(io)
}
