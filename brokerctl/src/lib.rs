//! `brokerctl`, the operator CLI of the broker, as a library so that it can be tested: a gRPC
//! client of the `Admin` and `Leases` services over TLS, plus three local helpers (`keys
//! init` on the HSM, `dev-token`, `dev-ca`).
//!
//! The binary (`src/main.rs`) only parses [`Cli`], builds a runtime and calls
//! [`run`]; errors become one line on stderr and exit code 1 ([`Usage`] errors: 2, as clap's
//! own). Credentials are read from files at each run and held as `SecretString`; they are
//! never flags, never printed. There is deliberately no `secrets get`: values leave the
//! broker only through leases.
//!
//! Not here: the server side (`grpc`, the `broker` binary).

use std::fmt;
use std::io::{Read, Write};

mod cli;
mod conn;
mod devca;
mod input;
mod local;
mod output;
mod remote;

pub use cli::{
    AuditCommand, Cli, Command, ConnArgs, DevCaArgs, DevTokenArgs, HsmArgs, KeyStatusArgs,
    KeysCommand, LeaseArgs, LeasesCommand, Output, PolicyCommand, PutArgs, RenewArgs, RetireArgs,
    RevokeArgs, SecretsCommand, SelectorArgs,
};
pub use conn::{connect, parse_addr, RemoteError, Session, Target};
pub use devca::dev_ca;
pub use input::lease_selector;
pub use local::keys_init;

/// A mistake in how the command was called (exit code 2, like clap's parse errors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage(pub String);

impl fmt::Display for Usage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

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
pub async fn run(cli: Cli) -> anyhow::Result<()> {
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
        Err(e) if is_broken_pipe(&e) => Ok(()),
        other => other,
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Runs `cli` with the given streams.
pub async fn run_with(cli: &Cli, io: &mut Io<'_>) -> anyhow::Result<()> {
    dispatch(cli, io).await.map_err(|e| hint(e, &cli.conn))
}

/// Adds what the operator can do about a connection that broke during the TLS handshake.
fn hint(e: anyhow::Error, conn: &ConnArgs) -> anyhow::Error {
    let transport = e
        .downcast_ref::<RemoteError>()
        .is_some_and(|r| r.message.starts_with("transport error"));
    if transport && conn.client_cert.is_none() {
        return e.context(
            "the connection broke; if the broker requires client certificates, give \
             --client-cert and --client-key",
        );
    }
    e
}

async fn dispatch(cli: &Cli, io: &mut Io<'_>) -> anyhow::Result<()> {
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
            let r = tokio::task::spawn_blocking(move || local::keys_init(&hsm)).await??;
            local::print_keys_init(&r, io)
        }
        // Each checks its input locally, then connects.
        Command::Secrets { command } => remote::secrets(&cli.conn, command, io).await,
        Command::Policy { command } => remote::policy(&cli.conn, command, io).await,
        Command::Leases { command } => remote::leases(&cli.conn, command, io).await,
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

/// The exit code for an error of [`run`]: 2 for [`Usage`], 1 otherwise.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<Usage>().is_some() {
        2
    } else {
        1
    }
}

/// An error of [`run`] as one line (its causes joined by `: `).
pub fn describe(e: &anyhow::Error) -> String {
    conn::one_line(&format!("{e:#}"))
}

/// Logs (from the libraries, e.g. the HSM layer) go to stderr; `KEYHAVEN_LOG` sets the filter
/// (default `warn`).
pub fn init_logging() {
    keyhaven_process::init_logs(keyhaven_process::LogFormat::Text, "warn");
}

#[cfg(test)]
mod tests;
