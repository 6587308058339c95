//! `keyhaven-bench`: Keyhaven's load generator. Every number it prints comes with baselines
//! measured in the same run on the same machine, so a result reads as "how far from what
//! the hardware and the RPC stack allow" rather than as an absolute figure.
//!
//! - `keyhaven-bench kms` drives a real `kms-plugin serve` process over its Unix socket and
//!   compares it with the raw HSM and with a bare tonic echo service.
//! - `keyhaven-bench broker` drives a real `broker` process over TLS (Lease, Renew) on SQLite
//!   and on PostgreSQL, beside a raw sqlx insert + select and raw JWT verification on the same
//!   database, and reads the broker's memory with 100,000 active leases.
//! - `keyhaven-bench rewrap` stores DEKs in a real `broker`'s database, rotates its KEK and
//!   measures the background re-wrap (DEKs/s) beside the raw HSM unwrap+wrap rate.
//! - `keyhaven-bench usage` times `kms-plugin keys usage` over a real etcd filled with KMS v2
//!   values beside a raw paginated range read of the same keys, and reads the scan's peak RSS.
//! - `keyhaven-bench dbcreds` leases dynamic PostgreSQL credentials from a real `broker`
//!   beside a raw `CREATE ROLE` + `DROP ROLE` loop on the same PostgreSQL, and times how fast
//!   the broker drops the roles of expired credentials.
//! - `keyhaven-bench injector` drives a real `keyhaven-injector serve` process over HTTPS
//!   beside a bare HTTPS echo on the same stack.
//!
//! It is a measuring tool, not a test: targets are reported, never asserted.
#![forbid(unsafe_code)]

mod baseline;
mod broker;
mod broker_proc;
mod broker_report;
mod cli;
mod credentials;
mod dbcreds;
mod dbcreds_report;
mod echo;
mod fill;
mod flood;
mod grpc;
mod https_echo;
mod injector;
mod kms;
mod leases;
mod load;
mod plugin;
mod raw;
mod report;
mod rewrap;
mod token;
mod usage;
mod workload;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let result = match &cli.command {
        cli::Command::Kms(args) => kms::run(args),
        cli::Command::Broker(args) => broker::run(args),
        cli::Command::Rewrap(args) => rewrap::run(args),
        cli::Command::Usage(args) => usage::run(args),
        cli::Command::EchoServer(args) => echo::serve_process(args),
        cli::Command::Injector(args) => injector::run(args),
        cli::Command::Dbcreds(args) => dbcreds::run(args),
        cli::Command::HttpsEchoServer(args) => https_echo::serve_process(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keyhaven-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
