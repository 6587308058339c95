//! A fresh SoftHSM2 token per test: its own token directory and `SOFTHSM2_CONF` in a
//! temporary directory, a random label, a known test PIN in a 0600 file. Removed on drop.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};

use keyhaven_hsm::{Config, PinSource, TokenSelector};

/// The user PIN of fixture tokens. A test value, not a secret.
pub const USER_PIN: &str = "1234-user-pin";
/// The SO PIN of fixture tokens.
pub const SO_PIN: &str = "5678-so-pin";

/// SoftHSM2 reads `SOFTHSM2_CONF` when the module is initialised, once per process: tokens
/// of one process are used one at a time.
static PROCESS_TOKEN: Mutex<()> = Mutex::new(());

/// Where the SoftHSM2 module is: `KEYHAVEN_PKCS11_MODULE`, else Debian's paths.
pub fn module_path() -> PathBuf {
    if let Ok(p) = std::env::var("KEYHAVEN_PKCS11_MODULE") {
        return PathBuf::from(p);
    }
    for p in [
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/local/lib/softhsm/libsofthsm2.so",
    ] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!(
        "SoftHSM2 is not installed: run `apt-get install -y softhsm2` \
         (or set KEYHAVEN_PKCS11_MODULE to a libsofthsm2.so)"
    );
}

/// A fresh, initialised SoftHSM2 token for one test.
#[derive(Debug)]
pub struct SoftHsm {
    dir: tempfile::TempDir,
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
    /// Makes a new token and points this process's `SOFTHSM2_CONF` at it.
    pub fn new() -> SoftHsm {
        let guard = PROCESS_TOKEN.lock().unwrap_or_else(|p| p.into_inner());
        let module = module_path();
        let dir = tempfile::Builder::new()
            .prefix("keyhaven-softhsm-")
            .tempdir()
            .expect("temp dir");
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens).expect("token dir");
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
                tokens.display()
            ),
        )
        .expect("write softhsm2.conf");
        let label = format!("kh-test-{:08x}", rand_u32());
        let out = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &conf)
            .args(["--init-token", "--free", "--label", &label])
            .args(["--so-pin", SO_PIN, "--pin", USER_PIN])
            .output()
            .expect("softhsm2-util not found: run `apt-get install -y softhsm2`");
        assert!(
            out.status.success(),
            "softhsm2-util --init-token failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let serial = show_serial(&conf, &label);
        // SoftHSM2 reads this when the module is initialised. Only this test runs in the
        // process at this point (see PROCESS_TOKEN), so the environment write is not racing
        // another reader of SOFTHSM2_CONF.
        std::env::set_var("SOFTHSM2_CONF", &conf);
        let pin_file = dir.path().join("user.pin");
        write_private(&pin_file, USER_PIN);
        SoftHsm {
            dir,
            conf,
            label,
            serial,
            pin_file,
            module,
            _process: guard,
        }
    }

    /// The temporary directory holding the token and its config.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A keystore config for this token, PIN from [`SoftHsm::pin_file`].
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
    pub fn write_pin(&self, pin: &str) {
        write_private(&self.pin_file, pin);
    }

    /// Takes the token away from SoftHSM2 (like unplugging it): moves its directory out of
    /// the token directory. Returns what [`SoftHsm::restore_token`] needs to put it back.
    pub fn remove_token(&self) -> PathBuf {
        let tokens = self.dir().join("tokens");
        let away = self.dir().join("tokens.removed");
        std::fs::rename(&tokens, &away).expect("move token dir away");
        std::fs::create_dir(&tokens).expect("empty token dir");
        away
    }

    /// Puts back a token taken by [`SoftHsm::remove_token`].
    pub fn restore_token(&self, away: PathBuf) {
        let tokens = self.dir().join("tokens");
        std::fs::remove_dir(&tokens).expect("empty token dir");
        std::fs::rename(&away, &tokens).expect("restore token dir");
    }

    /// Environment to give a child process so it uses this token.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![("SOFTHSM2_CONF".to_owned(), self.conf.display().to_string())]
    }
}

impl Default for SoftHsm {
    fn default() -> Self {
        SoftHsm::new()
    }
}

impl Drop for SoftHsm {
    fn drop(&mut self) {
        // Let the next token of this process be read fresh by SoftHSM2.
        let _ = keyhaven_hsm::testing::finalize_module(&self.module);
    }
}

fn write_private(path: &Path, content: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .expect("write file");
    f.write_all(content.as_bytes()).expect("write file");
}

fn show_serial(conf: &Path, label: &str) -> String {
    let out = Command::new("softhsm2-util")
        .env("SOFTHSM2_CONF", conf)
        .arg("--show-slots")
        .output()
        .expect("softhsm2-util --show-slots");
    let text = String::from_utf8_lossy(&out.stdout);
    // Each slot block lists "Label: ..." and "Serial number: ..." for its token.
    let mut serial = None;
    let mut current_serial = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some(s) = line.strip_prefix("Serial number:") {
            current_serial = Some(s.trim().to_owned());
        }
        if let Some(l) = line.strip_prefix("Label:") {
            if l.trim() == label {
                serial = current_serial.clone();
            }
        }
    }
    serial.unwrap_or_else(|| panic!("token {label} not listed by softhsm2-util:\n{text}"))
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.write_u32(std::process::id());
    h.finish() as u32
}
