//! Throwaway SoftHSM2 tokens for one bench run, in a `testkit` [`SoftHsmDir`] (its own
//! `softhsm2.conf` and token directory, removed on drop), with random PINs in 0600 files.
//! PINs reach child processes only as file paths, never on a command line.
//!
//! - [`BenchToken`] (`kms`): initialised and given a KEK by the `kms-plugin` binary under test
//!   (`token init`, `keys init`).
//! - [`new_token`] (`broker`): tokens initialised in this process (`keyhaven_hsm::init_token`),
//!   one per database, each with a KEK made through `BlockingKeystore::generate_kek` — the
//!   broker has no `keys init` of its own.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::Context;
use keyhaven_hsm::{BlockingKeystore, Config, KekInfo, PinSource, TokenSelector};
use secrecy::SecretString;
use testkit::process::{clean_command, run};
use testkit::softhsm::SoftHsmDir;
use testkit::write_private;

/// KEK label prefix given to the plugin and to the raw baseline (the plugin's default).
pub const KEK_LABEL_PREFIX: &str = "keyhaven-kms-";

/// The bench's token.
#[derive(Debug)]
pub struct BenchToken {
    softhsm: SoftHsmDir,
    /// Token label.
    pub label: String,
    /// File holding the user PIN (0600).
    pub pin_file: PathBuf,
}

impl BenchToken {
    /// Makes the token and its first KEK with `plugin` (`kms-plugin token init`, `keys init`).
    pub fn create(plugin: &Path, module: &Path) -> anyhow::Result<BenchToken> {
        let softhsm = SoftHsmDir::create(module, "keyhaven-bench-")?;
        let token = BenchToken {
            label: testkit::random::label("keyhaven-bench-")?,
            pin_file: softhsm.dir().join("user.pin"),
            softhsm,
        };
        let so_pin_file = token.dir().join("so.pin");
        write_private(&token.pin_file, &testkit::random::pin()?)?;
        write_private(&so_pin_file, &testkit::random::pin()?)?;

        let mut init = token.command(plugin, 1);
        init.env("KEYHAVEN_SO_PIN_FILE", &so_pin_file)
            .args(["token", "init"]);
        run(&mut init, "kms-plugin token init")?;
        // The SO PIN is not needed again.
        let _ = std::fs::remove_file(&so_pin_file);
        let mut keys = token.command(plugin, 1);
        keys.args(["keys", "init"]);
        run(&mut keys, "kms-plugin keys init")?;
        Ok(token)
    }

    /// The temporary directory (sockets and logs go here too).
    pub fn dir(&self) -> &Path {
        self.softhsm.dir()
    }

    /// `softhsm2.conf` pointing at this token's directory.
    pub fn conf(&self) -> &Path {
        &self.softhsm.conf
    }

    /// `plugin` configured for this token by environment only: every inherited
    /// `KEYHAVEN_*` variable is removed first so the caller's shell cannot change the run.
    pub fn command(&self, plugin: &Path, pool_size: usize) -> Command {
        let mut cmd = clean_command(plugin);
        cmd.env("SOFTHSM2_CONF", &self.softhsm.conf)
            .env("KEYHAVEN_PKCS11_MODULE", &self.softhsm.module)
            .env("KEYHAVEN_TOKEN_LABEL", &self.label)
            .env("KEYHAVEN_PIN_FILE", &self.pin_file)
            .env("KEYHAVEN_KEK_LABEL_PREFIX", KEK_LABEL_PREFIX)
            .env("KEYHAVEN_SESSION_POOL_SIZE", pool_size.to_string())
            .stdin(Stdio::null());
        cmd
    }

    /// Keystore configuration for this token (the raw baseline).
    pub fn hsm_config(&self, pool_size: usize) -> Config {
        let mut cfg = Config::new(
            &self.softhsm.module,
            TokenSelector::Label(self.label.clone()),
            PinSource::File(self.pin_file.clone()),
        );
        cfg.pool_size = pool_size;
        cfg.kek_label_prefix = KEK_LABEL_PREFIX.to_owned();
        cfg
    }
}

/// A token initialised by [`new_token`].
#[derive(Debug)]
pub struct HsmToken {
    /// Token label.
    pub label: String,
    /// File holding the user PIN (0600).
    pub pin_file: PathBuf,
    /// The KEK made on it.
    pub kek: KekInfo,
}

/// Initialises a new token in `softhsm`, in this process, labelled
/// `keyhaven-bench-<name>-<random>`, with random PINs (the user PIN into `pin_file`, mode
/// 0600; the SO PIN only in memory), and generates one KEK whose label starts with
/// `kek_label_prefix`. SoftHSM2 reads `SOFTHSM2_CONF` once per process, so one run has one
/// `softhsm` and a token per database inside it; the caller points `SOFTHSM2_CONF` at
/// `softhsm.conf` before the first token is made. Blocking.
pub fn new_token(
    softhsm: &SoftHsmDir,
    name: &str,
    pin_file: PathBuf,
    kek_label_prefix: &str,
) -> anyhow::Result<HsmToken> {
    anyhow::ensure!(
        std::env::var_os("SOFTHSM2_CONF").as_deref() == Some(softhsm.conf.as_os_str()),
        "SOFTHSM2_CONF must point at {} before a token is made",
        softhsm.conf.display()
    );
    let label = testkit::random::label(&format!("keyhaven-bench-{name}-"))?;
    let user_pin = testkit::random::pin()?;
    write_private(&pin_file, &user_pin)?;
    let so_pin = testkit::random::pin()?;
    keyhaven_hsm::init_token(
        &softhsm.module,
        &label,
        &SecretString::from(so_pin.as_str()),
        &SecretString::from(user_pin.as_str()),
    )
    .with_context(|| format!("initialise SoftHSM2 token {label}"))?;
    let mut cfg = Config::new(
        &softhsm.module,
        TokenSelector::Label(label.clone()),
        PinSource::File(pin_file.clone()),
    );
    cfg.pool_size = 1;
    cfg.kek_label_prefix = kek_label_prefix.to_owned();
    let ks = BlockingKeystore::open(cfg).with_context(|| format!("open token {label}"))?;
    let kek = ks
        .generate_kek()
        .with_context(|| format!("generate a KEK on {label}"))?;
    Ok(HsmToken {
        label,
        pin_file,
        kek,
    })
}
