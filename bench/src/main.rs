//! `keyhaven-bench`: Keyhaven's load generator. Every number it prints comes with baselines
//! measured in the same run on the same machine, so a result reads as "how far from what
//! the hardware and the RPC stack allow" rather than as an absolute figure.
//!
//! `keyhaven-bench kms` drives a real `kms-plugin serve` process over its Unix socket and
//! compares it with the raw HSM and with a bare tonic echo service. It is a measuring tool,
//! not a test: targets are reported, never asserted.
#![forbid(unsafe_code)]

mod cli;
mod echo;
mod grpc;
mod kms;
mod load;
mod plugin;
mod raw;
mod report;
mod token;
mod workload;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let result = match &cli.command {
        cli::Command::Kms(args) => kms::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keyhaven-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
