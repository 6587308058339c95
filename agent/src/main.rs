//! `broker-agent` binary: see the library for what it does.
#![forbid(unsafe_code)]

use clap::Parser as _;

fn main() -> std::process::ExitCode {
    broker_agent::main_with(broker_agent::config::Cli::parse())
}
