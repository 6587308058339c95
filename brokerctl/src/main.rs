//! `brokerctl`: the operator CLI of the Keyhaven broker. Everything lives in
//! the `brokerctl` library; this only parses the command line, runs it on a small runtime
//! and turns an error into one line on stderr (the error and its causes) and an exit code
//! (1, or 2 for usage errors).
#![forbid(unsafe_code)]

use std::process::ExitCode;

use brokerctl as ctl;
use clap::Parser as _;

fn main() -> ExitCode {
    let cli = ctl::Cli::parse();
    ctl::init_logging();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(ctl::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", e.describe());
            ExitCode::from(e.exit_code())
        }
    }
}
