//! `kms-plugin` binary: parses the command line and hands over to the library.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use kms_plugin::cli::{Cli, Command, LogFormat, TokenCommand};

fn init_logs(format: LogFormat) {
    let format = match format {
        LogFormat::Json => keyhaven_process::LogFormat::Json,
        LogFormat::Text => keyhaven_process::LogFormat::Text,
    };
    // The Kubernetes client logs every error answer itself; `keys migrate` reports each
    // failure (and every retry's outcome) in its own words.
    keyhaven_process::init_logs(format, "info,kube_client=off");
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kms-plugin: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and the causes under it that its text does not already say, `: `-separated
/// (several of our errors repeat their source in their own message).
fn one_line(e: &anyhow::Error) -> String {
    let mut s = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
    }
    s
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            init_logs(args.log_format);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                kms_plugin::server::serve(args, keyhaven_process::shutdown_signal()).await
            })?;
            // Blocking HSM calls still in flight are abandoned; the process is exiting.
            rt.shutdown_timeout(std::time::Duration::from_secs(2));
        }
        Command::Keys { hsm, command } => {
            init_logs(LogFormat::Text);
            let ks = keyhaven_hsm::BlockingKeystore::open(hsm.config())?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(kms_plugin::keys::run(&ks, &command, &mut std::io::stdout()))?;
        }
        Command::Probe { listen } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let r = rt
                .block_on(kms_plugin::client::probe(&listen))
                .map_err(anyhow::Error::msg)?;
            println!("Status:  healthz={:?} key_id={}", r.healthz, r.key_id);
            println!(
                "Encrypt: 32-byte seed -> {}-byte ciphertext under {}",
                r.ciphertext_len, r.key_id
            );
            println!(
                "Decrypt: {}",
                if r.round_trip_ok {
                    "seed recovered"
                } else {
                    "MISMATCH"
                }
            );
            if !r.round_trip_ok || r.healthz != "ok" {
                anyhow::bail!("plugin is not healthy");
            }
        }
        Command::Token { command } => match command {
            TokenCommand::Init {
                pkcs11_module,
                token_label,
                so_pin_file,
                pin_file,
            } => {
                let so = keyhaven_hsm::PinSource::File(so_pin_file).read()?;
                let user = keyhaven_hsm::PinSource::File(pin_file).read()?;
                keyhaven_hsm::init_token(&pkcs11_module, &token_label, &so, &user)?;
                println!("initialised token '{token_label}'");
            }
        },
    }
    Ok(())
}
