//! SoftHSM2 tokens that share nothing with the machine's: a temporary directory holding a
//! `softhsm2.conf` of its own and the token directory it names (removed on drop).
//!
//! - [`SoftHsmDir`]: the configuration and an empty token directory; tokens are then made
//!   in it by `softhsm2-util` ([`SoftHsmDir::init_token`]) or by the code under test.
//! - [`SoftHsm`]: a fresh token for one test, with a random label and a known PIN in a 0600
//!   file, and this process's `SOFTHSM2_CONF` pointing at it.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};

use keyhaven_hsm::{Config, PinSource, TokenSelector};

use crate::process::run;
use crate::{write_private, Error, Result};

/// The user PIN of [`SoftHsm`] tokens. A test value, not a secret.
pub const USER_PIN: &str = "1234-user-pin";
/// The SO PIN of [`SoftHsm`] tokens.
pub const SO_PIN: &str = "5678-so-pin";

/// SoftHSM2 reads `SOFTHSM2_CONF` when the module is initialised, once per process: the
/// [`SoftHsm`] tokens of one process are used one at a time.
static PROCESS_TOKEN: Mutex<()> = Mutex::new(());

/// Where the SoftHSM2 module is: `KEYHAVEN_PKCS11_MODULE`, else Debian's paths.
pub fn module_path() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("KEYHAVEN_PKCS11_MODULE") {
        return Ok(PathBuf::from(p));
    }
    [
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/local/lib/softhsm/libsofthsm2.so",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .ok_or_else(|| Error::NotInstalled {
        what: "SoftHSM2 (libsofthsm2.so)".into(),
        hint:
            "run `apt-get install -y softhsm2` (or set KEYHAVEN_PKCS11_MODULE to a libsofthsm2.so)",
    })
}

/// A temporary directory with an empty SoftHSM2 token directory and a `softhsm2.conf`
/// pointing at it. Removed on drop.
#[derive(Debug)]
pub struct SoftHsmDir {
    dir: tempfile::TempDir,
    /// The `softhsm2.conf`.
    pub conf: PathBuf,
    /// The PKCS#11 module.
    pub module: PathBuf,
}

impl SoftHsmDir {
    /// Makes the directory (named `<prefix>...`) and its `softhsm2.conf`, for `module`.
    pub fn create(module: &Path, prefix: &str) -> Result<SoftHsmDir> {
        if !module.exists() {
            return Err(Error::NotInstalled {
                what: format!("PKCS#11 module {}", module.display()),
                hint: "install SoftHSM2 (`apt-get install -y softhsm2`) or name the module",
            });
        }
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .map_err(|e| Error::io("create a temporary directory", e))?;
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens).map_err(|e| Error::io("create the token directory", e))?;
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
                tokens.display()
            ),
        )
        .map_err(|e| Error::io("write softhsm2.conf", e))?;
        Ok(SoftHsmDir {
            dir,
            conf,
            module: module.to_path_buf(),
        })
    }

    /// The temporary directory (sockets, logs and PIN files may go here too).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The token directory `softhsm2.conf` names.
    pub fn tokens(&self) -> PathBuf {
        self.dir().join("tokens")
    }

    /// Initialises a token in a free slot with `softhsm2-util`. The PINs go on its command
    /// line: use this for test PINs only.
    pub fn init_token(&self, label: &str, so_pin: &str, user_pin: &str) -> Result<()> {
        run(
            self.util()
                .args(["--init-token", "--free", "--label", label])
                .args(["--so-pin", so_pin, "--pin", user_pin]),
            "softhsm2-util --init-token",
        )
        .map(drop)
        .map_err(not_installed)
    }

    fn util(&self) -> Command {
        let mut c = Command::new("softhsm2-util");
        c.env("SOFTHSM2_CONF", &self.conf);
        c
    }
}

/// `softhsm2-util` missing is [`Error::NotInstalled`].
fn not_installed(e: Error) -> Error {
    match e {
        Error::Io { source, .. } if source.kind() == ErrorKind::NotFound => Error::NotInstalled {
            what: "softhsm2-util".into(),
            hint: "run `apt-get install -y softhsm2`",
        },
        e => e,
    }
}

/// A fresh, initialised SoftHSM2 token for one test: a random label, [`SO_PIN`] and
/// [`USER_PIN`], the user PIN in a 0600 file.
///
/// Making one points this process's `SOFTHSM2_CONF` at it. SoftHSM2 reads that variable once,
/// when the module is initialised, so a process holds one `SoftHsm` at a time: `new` waits
/// for the previous one to be dropped (under `cargo test` the HSM tests of one binary run
/// one after another; `cargo nextest` runs each test in its own process), and drop finalises
/// the module so the next token is read fresh.
#[derive(Debug)]
pub struct SoftHsm {
    softhsm: SoftHsmDir,
    /// The `softhsm2.conf` of this token.
    pub conf: PathBuf,
    /// Token label.
    pub label: String,
    /// Token serial number as SoftHSM2 reports it.
    pub serial: String,
    /// File holding [`USER_PIN`], mode 0600.
    pub pin_file: PathBuf,
    /// The module path.
    pub module: PathBuf,
    _process: MutexGuard<'static, ()>,
}

impl SoftHsm {
    /// Makes a new token with the module at [`module_path`] and points this process's
    /// `SOFTHSM2_CONF` at it.
    pub fn new() -> Result<SoftHsm> {
        let guard = PROCESS_TOKEN.lock().unwrap_or_else(|p| p.into_inner());
        let softhsm = SoftHsmDir::create(&module_path()?, "keyhaven-softhsm-")?;
        let label = crate::random::label("kh-test-")?;
        softhsm.init_token(&label, SO_PIN, USER_PIN)?;
        // SoftHSM2 reads this when the module is initialised. Only this token's test uses
        // SoftHSM2 in the process at this point (see PROCESS_TOKEN), so the environment
        // write is not racing another reader of SOFTHSM2_CONF.
        std::env::set_var("SOFTHSM2_CONF", &softhsm.conf);
        // Through PKCS#11, in this process: the module is not initialised here (the previous
        // token's drop finalised it), so it reads the variable just set, and `token_serial`
        // finalises it again after the lookup.
        let serial = keyhaven_hsm::token_serial(&softhsm.module, &label)?;
        let pin_file = softhsm.dir().join("user.pin");
        write_private(&pin_file, USER_PIN)?;
        Ok(SoftHsm {
            conf: softhsm.conf.clone(),
            module: softhsm.module.clone(),
            softhsm,
            label,
            serial,
            pin_file,
            _process: guard,
        })
    }

    /// The temporary directory holding the token and its config.
    pub fn dir(&self) -> &Path {
        self.softhsm.dir()
    }

    /// A keystore config for this token, PIN from [`SoftHsm::pin_file`], 4 sessions.
    pub fn config(&self) -> Config {
        let mut cfg = Config::new(
            &self.module,
            TokenSelector::Label(self.label.clone()),
            PinSource::File(self.pin_file.clone()),
        );
        cfg.pool_size = 4;
        cfg
    }

    /// Replaces the PIN in the PIN file (to simulate a wrong or rotated PIN).
    pub fn write_pin(&self, pin: &str) -> Result<()> {
        write_private(&self.pin_file, pin)
    }

    /// Takes the token away from SoftHSM2 (like unplugging it): moves its directory out of
    /// the token directory. Returns what [`SoftHsm::restore_token`] needs to put it back.
    pub fn remove_token(&self) -> Result<PathBuf> {
        let tokens = self.softhsm.tokens();
        let away = self.dir().join("tokens.removed");
        std::fs::rename(&tokens, &away).map_err(|e| Error::io("move the token dir away", e))?;
        std::fs::create_dir(&tokens).map_err(|e| Error::io("make an empty token dir", e))?;
        Ok(away)
    }

    /// Puts back a token taken by [`SoftHsm::remove_token`].
    pub fn restore_token(&self, away: PathBuf) -> Result<()> {
        let tokens = self.softhsm.tokens();
        std::fs::remove_dir(&tokens).map_err(|e| Error::io("remove the empty token dir", e))?;
        std::fs::rename(&away, &tokens).map_err(|e| Error::io("restore the token dir", e))
    }

    /// Environment to give a child process so it uses this token.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![("SOFTHSM2_CONF".to_owned(), self.conf.display().to_string())]
    }
}

impl Drop for SoftHsm {
    fn drop(&mut self) {
        // Let the next token of this process be read fresh by SoftHSM2.
        let _ = keyhaven_hsm::testing::finalize_module(&self.module);
    }
}
