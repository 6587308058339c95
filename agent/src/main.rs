//! `broker-agent` binary: see the library for what it does.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::{CommandFactory as _, Parser, Subcommand};

// The agent's flags (`broker_agent::config::Cli`), or a subcommand. No doc comment here: `--help`
// shows the description of `Cli`.
#[derive(Debug, Parser)]
#[command(name = "broker-agent", version, args_conflicts_with_subcommands = true)]
struct Main {
    /// Without a subcommand, the agent runs.
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: Option<broker_agent::config::Cli>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Exit 0 if the agent on this host is ready (its /readyz answers 200: every file written
    /// under a lease), else 1 with the reason: the healthcheck of a container that has no shell.
    Probe {
        /// The agent's --metrics-addr (an unspecified address is dialled on loopback).
        #[arg(long, env = "KEYHAVEN_METRICS_ADDR", default_value = "127.0.0.1:9466")]
        metrics_addr: SocketAddr,
    },
}

fn main() -> ExitCode {
    match Main::parse() {
        Main {
            command: Some(Command::Probe { metrics_addr }),
            ..
        } => keyhaven_process::probe::run("broker-agent", metrics_addr),
        Main { run: Some(cli), .. } => broker_agent::main_with(cli),
        // clap has already refused a command line without the required flags.
        Main { .. } => {
            let _ = Main::command().print_help();
            ExitCode::from(broker_agent::EXIT_USAGE)
        }
    }
}
