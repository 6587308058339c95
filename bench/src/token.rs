//! Throwaway SoftHSM2 tokens for one bench run: their own `softhsm2.conf` and token
//! directory in a temporary directory (removed on drop), random PINs in 0600 files. PINs
//! reach child processes only as file paths, never on a command line.
//!
//! - [`BenchToken`] (`kms`): initialised and given a KEK by the `kms-plugin` binary under test
//!   (`token init`, `keys init`).
//! - [`SoftHsmDir`] (`broker`): tokens initialised in this process (`keyhaven_hsm::init_token`),
//!   one per database, each with a KEK made through `BlockingKeystore::generate_kek` — the
//!   broker has no `keys init` of its own.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::Context;
use keyhaven_hsm::{BlockingKeystore, Config, KekInfo, PinSource, TokenSelector};
use secrecy::SecretString;
use zeroize::Zeroizing;

/// KEK label prefix given to the plugin and to the raw baseline (the plugin's default).
pub const KEK_LABEL_PREFIX: &str = "keyhaven-kms-";

/// The bench's token.
#[derive(Debug)]
pub struct BenchToken {
    dir: tempfile::TempDir,
    /// `softhsm2.conf` pointing at this token's directory.
    pub conf: PathBuf,
    /// Token label.
    pub label: String,
    /// File holding the user PIN (0600).
    pub pin_file: PathBuf,
    /// PKCS#11 module.
    pub module: PathBuf,
}

impl BenchToken {
    /// Makes the token and its first KEK with `plugin` (`kms-plugin token init`, `keys init`).
    pub fn create(plugin: &Path, module: &Path) -> anyhow::Result<BenchToken> {
        let (dir, conf) = softhsm_dir(module)?;
        let token = BenchToken {
            conf,
            label: format!("keyhaven-bench-{}", hex::encode(random_bytes::<4>()?)),
            pin_file: dir.path().join("user.pin"),
            module: module.to_path_buf(),
            dir,
        };
        let so_pin_file = token.dir.path().join("so.pin");
        write_private(&token.pin_file, &random_pin()?)?;
        write_private(&so_pin_file, &random_pin()?)?;

        let mut init = token.command(plugin, 1);
        init.env("KEYHAVEN_SO_PIN_FILE", &so_pin_file)
            .args(["token", "init"]);
        run(init, "kms-plugin token init")?;
        // The SO PIN is not needed again.
        let _ = std::fs::remove_file(&so_pin_file);
        let mut keys = token.command(plugin, 1);
        keys.args(["keys", "init"]);
        run(keys, "kms-plugin keys init")?;
        Ok(token)
    }

    /// The temporary directory (sockets and logs go here too).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `plugin` configured for this token by environment only: every inherited
    /// `KEYHAVEN_*` variable is removed first so the caller's shell cannot change the run.
    pub fn command(&self, plugin: &Path, pool_size: usize) -> Command {
        let mut cmd = Command::new(plugin);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("KEYHAVEN_") {
                cmd.env_remove(name);
            }
        }
        cmd.env("SOFTHSM2_CONF", &self.conf)
            .env("KEYHAVEN_PKCS11_MODULE", &self.module)
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
            &self.module,
            TokenSelector::Label(self.label.clone()),
            PinSource::File(self.pin_file.clone()),
        );
        cfg.pool_size = pool_size;
        cfg.kek_label_prefix = KEK_LABEL_PREFIX.to_owned();
        cfg
    }
}

/// A temporary directory with an empty SoftHSM2 token directory and a `softhsm2.conf`
/// pointing at it; returns the directory and the conf's path.
fn softhsm_dir(module: &Path) -> anyhow::Result<(tempfile::TempDir, PathBuf)> {
    anyhow::ensure!(
        module.exists(),
        "PKCS#11 module {} not found: install SoftHSM2 (`apt-get install -y softhsm2`) \
         or pass --pkcs11-module",
        module.display()
    );
    let dir = tempfile::Builder::new()
        .prefix("keyhaven-bench-")
        .tempdir()
        .context("create a temporary directory")?;
    let tokens = dir.path().join("tokens");
    std::fs::create_dir(&tokens).context("create the token directory")?;
    let conf = dir.path().join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
            tokens.display()
        ),
    )
    .context("write softhsm2.conf")?;
    Ok((dir, conf))
}

/// A SoftHSM2 configuration whose tokens this process initialises itself (the broker
/// bench). SoftHSM2 reads `SOFTHSM2_CONF` once per process, so one run has one of these and
/// a token per database inside it.
#[derive(Debug)]
pub struct SoftHsmDir {
    dir: tempfile::TempDir,
    /// `softhsm2.conf` pointing at the token directory.
    pub conf: PathBuf,
    /// PKCS#11 module.
    pub module: PathBuf,
}

/// A token initialised by [`SoftHsmDir::new_token`].
#[derive(Debug)]
pub struct HsmToken {
    /// Token label.
    pub label: String,
    /// File holding the user PIN (0600).
    pub pin_file: PathBuf,
    /// The KEK made on it.
    pub kek: KekInfo,
}

impl SoftHsmDir {
    /// Makes the directory and its `softhsm2.conf`. The caller points this process's
    /// `SOFTHSM2_CONF` at [`SoftHsmDir::conf`] before the first token is made.
    pub fn create(module: &Path) -> anyhow::Result<SoftHsmDir> {
        let (dir, conf) = softhsm_dir(module)?;
        Ok(SoftHsmDir {
            dir,
            conf,
            module: module.to_path_buf(),
        })
    }

    /// The temporary directory (everything else of the run goes here too).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Initialises a new token labelled `keyhaven-bench-<name>-<random>` in this process, with
    /// random PINs (the user PIN into `pin_file`, mode 0600; the SO PIN only in memory), and
    /// generates one KEK whose label starts with `kek_label_prefix`. Blocking.
    pub fn new_token(
        &self,
        name: &str,
        pin_file: PathBuf,
        kek_label_prefix: &str,
    ) -> anyhow::Result<HsmToken> {
        anyhow::ensure!(
            std::env::var_os("SOFTHSM2_CONF").as_deref() == Some(self.conf.as_os_str()),
            "SOFTHSM2_CONF must point at {} before a token is made",
            self.conf.display()
        );
        let label = format!(
            "keyhaven-bench-{name}-{}",
            hex::encode(random_bytes::<4>()?)
        );
        let user_pin = random_pin()?;
        write_private(&pin_file, &user_pin)?;
        let so_pin = random_pin()?;
        keyhaven_hsm::init_token(
            &self.module,
            &label,
            &SecretString::from(so_pin.as_str()),
            &SecretString::from(user_pin.as_str()),
        )
        .with_context(|| format!("initialise SoftHSM2 token {label}"))?;
        let mut cfg = Config::new(
            &self.module,
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
}

/// `N` bytes from the OS CSPRNG.
pub fn random_bytes<const N: usize>() -> anyhow::Result<[u8; N]> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("OS CSPRNG failed: {e}"))?;
    Ok(b)
}

/// 32 hex characters from the OS CSPRNG.
pub fn random_pin() -> anyhow::Result<Zeroizing<String>> {
    let mut bytes = Zeroizing::new([0u8; 16]);
    getrandom::fill(&mut bytes[..]).map_err(|e| anyhow::anyhow!("OS CSPRNG failed: {e}"))?;
    Ok(Zeroizing::new(hex::encode(&bytes[..])))
}

/// Creates `path` (it must not exist) with mode 0600 and writes `content`.
pub fn write_private(path: &Path, content: &str) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    f.write_all(content.as_bytes())
        .with_context(|| format!("write {}", path.display()))
}

/// Runs a command to completion; on failure the error carries its stderr (the plugin never
/// prints PINs).
fn run(mut cmd: Command, what: &str) -> anyhow::Result<()> {
    let out = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("run {what}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}
