//! `brokerctl`, the operator CLI of the broker, as a library so that it can be tested: a gRPC
//! client of the `Admin` and `Leases` services over TLS, plus three local helpers (`keys
//! init` on the HSM, `dev-token`, `dev-ca`).
//!
//! The binary (`src/main.rs`) only parses [`Cli`], builds a runtime and calls
//! [`run`]; a [`CtlError`] becomes one line on stderr with its causes
//! ([`CtlError::describe`]) and exit code 1 ([`Usage`] errors: 2, as clap's own). Credentials are read from files at each run and held as `SecretString`; they are
//! never flags, never printed. There is deliberately no `secrets get`: values leave the
//! broker only through leases.
//!
//! Not here: the server side (`grpc`, the `broker` binary).

use std::fmt;
use std::io::{Read, Write};

mod cli;
mod conn;
mod devca;
mod error;
mod input;
mod local;
mod output;
mod remote;

pub use cli::{
    AuditCommand, Cli, Command, ConnArgs, DevCaArgs, DevTokenArgs, HsmArgs, KeyStatusArgs,
    KeysCommand, LeaseArgs, LeasesCommand, Output, PolicyCommand, PutArgs, RenewArgs, RetireArgs,
    RevokeArgs, SecretsCommand, SelectorArgs,
};
pub use conn::{connect, parse_addr, Session, Target};
pub use devca::dev_ca;
pub use error::{CtlError, Usage};
pub use input::lease_selector;
pub use local::keys_init;

/// Where a command writes and reads: stdout, stderr (warnings, notes), stdin (`-`).
pub struct Io<'a> {
    /// Results.
    pub out: &'a mut dyn Write,
    /// Warnings and notes.
    pub err: &'a mut dyn Write,
    /// Input for `--from-json -` and `policy apply -f -`.
    pub stdin: &'a mut dyn Read,
    /// Output format.
    pub output: Output,
    /// `out` is a terminal (progress bars are drawn only then).
    pub terminal: bool,
}

impl fmt::Debug for Io<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Io")
            .field("output", &self.output)
            .finish_non_exhaustive()
    }
}

impl Io<'_> {
    /// A `warning: ...` line on stderr.
    pub fn warn(&mut self, msg: &str) -> std::io::Result<()> {
        writeln!(self.err, "warning: {msg}")
    }
}

/// Runs `cli` against the process's stdout, stderr and stdin.
pub async fn run(cli: Cli) -> Result<(), CtlError> {
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    let stdin = std::io::stdin();
    let (mut out, mut err, mut input) = (stdout.lock(), stderr.lock(), stdin.lock());
    let terminal = std::io::IsTerminal::is_terminal(&stdout);
    let mut io = Io {
        out: &mut out,
        err: &mut err,
        stdin: &mut input,
        output: cli.output,
        terminal,
    };
    let r = run_with(&cli, &mut io)
        .await
        .and_then(|()| Ok(io.out.flush()?));
    match r {
        // The reader went away (`brokerctl ... | head`): not our failure.
        Err(e) if e.is_broken_pipe() => Ok(()),
        other => other,
    }
}

/// Runs `cli` with the given streams.
pub async fn run_with(cli: &Cli, io: &mut Io<'_>) -> Result<(), CtlError> {
    dispatch(cli, io).await.map_err(|e| hint(e, &cli.conn))
}

/// Adds what the operator can do about a connection that broke during the TLS handshake.
fn hint(e: CtlError, conn: &ConnArgs) -> CtlError {
    // tonic says so in the status's message, or keeps its transport error as the source.
    let transport = matches!(&e, CtlError::Remote { status, .. }
        if status.message().starts_with("transport error")
            || std::error::Error::source(status).is_some_and(|s| s.is::<tonic::transport::Error>()));
    if transport && conn.client_cert.is_none() {
        return CtlError::NoClientCert(Box::new(e));
    }
    e
}

async fn dispatch(cli: &Cli, io: &mut Io<'_>) -> Result<(), CtlError> {
    match &cli.command {
        Command::DevCa(args) => {
            let files = dev_ca(args)?;
            match io.output {
                Output::Json => output::json(io.out, &serde_json::json!(files))?,
                Output::Text => {
                    for f in &files {
                        writeln!(io.out, "{}", f.display())?;
                    }
                    io.warn(
                        "dev-ca certificates and unencrypted keys are for demos and tests only",
                    )?;
                }
            }
            Ok(())
        }
        Command::DevToken(args) => local::dev_token(args, io),
        Command::Keys {
            command: KeysCommand::Init(hsm),
        } => {
            let hsm = hsm.clone();
            let r = tokio::task::spawn_blocking(move || local::keys_init(&hsm))
                .await
                .map_err(CtlError::Task)??;
            local::print_keys_init(&r, io)
        }
        // Each checks its input locally, then connects.
        Command::Secrets { command } => remote::secrets(&cli.conn, command, io).await,
        Command::Policy { command } => remote::policy(&cli.conn, command, io).await,
        Command::Leases { command } => remote::leases(&cli.conn, command, io).await,
        Command::Replicas => remote::replicas(&cli.conn, io).await,
        Command::Db { command } => remote::db(&cli.conn, command, io).await,
        Command::Lease(args) => remote::lease(&cli.conn, args, io).await,
        Command::Renew(args) => remote::renew(&cli.conn, args, io).await,
        Command::Revoke(args) => remote::revoke(&cli.conn, args, io).await,
        Command::Audit { command } => remote::audit(&cli.conn, command, io).await,
        Command::Keys {
            command: KeysCommand::Status(args),
        } => remote::key_status(&cli.conn, args, io).await,
        Command::Keys {
            command: KeysCommand::Rotate,
        } => remote::key_rotate(&cli.conn, io).await,
        Command::Keys {
            command: KeysCommand::Retire(args),
        } => remote::key_retire(&cli.conn, args, io).await,
    }
}

/// Logs (from the libraries, e.g. the HSM layer) go to stderr; `KEYHAVEN_LOG` sets the filter
/// (default `warn`).
pub fn init_logging() {
    keyhaven_process::init_logs(keyhaven_process::LogFormat::Text, "warn");
}

#[cfg(test)]
mod tests;
