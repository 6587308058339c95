//! The command-line flags that say how to reach the HSM (feature `cli`): the PKCS#11
//! module, the token and where its user PIN is. Every Keyhaven binary that opens the HSM
//! flattens [`HsmAccessArgs`] into its own arguments and adds what is its own (its KEK label
//! prefix, a session pool size).

use std::path::PathBuf;

use clap::Args;

use crate::{Config, PinSource, TokenSelector};

/// Default PKCS#11 module (Debian's SoftHSM2).
pub const DEFAULT_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// How to reach the HSM: module, token (by label or serial) and user PIN (from a file or a
/// named environment variable — never a flag value). Every flag also reads an environment
/// variable.
#[derive(Debug, Clone, Args)]
pub struct HsmAccessArgs {
    /// Path of the PKCS#11 module.
    #[arg(long, env = "KEYHAVEN_PKCS11_MODULE", default_value = DEFAULT_MODULE)]
    pub pkcs11_module: PathBuf,
    /// Label of the token holding the KEKs.
    #[arg(
        long,
        env = "KEYHAVEN_TOKEN_LABEL",
        required_unless_present = "token_serial"
    )]
    pub token_label: Option<String>,
    /// Serial number of the token (instead of its label).
    #[arg(long, env = "KEYHAVEN_TOKEN_SERIAL", conflicts_with = "token_label")]
    pub token_serial: Option<String>,
    /// File holding the user PIN (re-read at every login).
    #[arg(long, env = "KEYHAVEN_PIN_FILE", required_unless_present = "pin_env")]
    pub pin_file: Option<PathBuf>,
    /// Name of an environment variable holding the user PIN.
    #[arg(long, env = "KEYHAVEN_PIN_ENV", conflicts_with = "pin_file")]
    pub pin_env: Option<String>,
}

impl HsmAccessArgs {
    /// The keystore configuration these flags describe, with [`Config::new`]'s defaults
    /// for the rest (the caller sets its KEK label prefix and pool size).
    pub fn config(&self) -> Config {
        let token = match (&self.token_label, &self.token_serial) {
            (_, Some(s)) => TokenSelector::Serial(s.clone()),
            (Some(l), None) => TokenSelector::Label(l.clone()),
            // clap requires one of them.
            (None, None) => TokenSelector::Label(String::new()),
        };
        let pin = match (&self.pin_file, &self.pin_env) {
            (_, Some(v)) => PinSource::Env(v.clone()),
            (Some(f), None) => PinSource::File(f.clone()),
            // clap requires one of them.
            (None, None) => PinSource::Env("KEYHAVEN_PIN".into()),
        };
        Config::new(&self.pkcs11_module, token, pin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        hsm: HsmAccessArgs,
    }

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        let argv = std::iter::once("t").chain(args.iter().copied());
        Cli::try_parse_from(argv).map(|c| c.hsm.config())
    }

    #[test]
    fn flags_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn token_by_label_or_serial_and_pin_from_file_or_env() {
        let cfg = parse(&["--token-label", "t", "--pin-file", "/p"]).unwrap();
        assert_eq!(cfg.token, TokenSelector::Label("t".into()));
        assert_eq!(cfg.pin, PinSource::File("/p".into()));
        assert_eq!(cfg.module, PathBuf::from(DEFAULT_MODULE));
        let cfg = parse(&["--token-serial", "s", "--pin-env", "PIN"]).unwrap();
        assert_eq!(cfg.token, TokenSelector::Serial("s".into()));
        assert_eq!(cfg.pin, PinSource::Env("PIN".into()));
    }

    #[test]
    fn one_token_and_one_pin_source() {
        use clap::error::ErrorKind;
        let e = parse(&["--pin-file", "/p"]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::MissingRequiredArgument);
        let e = parse(&[
            "--token-label",
            "t",
            "--token-serial",
            "s",
            "--pin-file",
            "/p",
        ])
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ArgumentConflict);
        let e = parse(&["--token-label", "t", "--pin-file", "/p", "--pin-env", "P"]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ArgumentConflict);
    }
}
