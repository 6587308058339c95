//! The keystore: one loaded PKCS#11 module, one token, a fixed pool of sessions that
//! rebuilds itself when the HSM drops them, and the operations Keyhaven needs.
//!
//! Locking: one mutex guards the pool state (module, idle sessions, handle cache); HSM
//! operations run outside it, each on a session checked out of the pool. A `Session` is
//! `Send` but not `Sync`, so a session is only ever used by the thread that checked it out.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Semaphore;
use zeroize::Zeroizing;

use crate::classify::{classify, Op, Recovery};
use crate::config::{Config, TokenSelector};
use crate::error::{Error, Result};
use crate::kek::{self, KekId, KekInfo, KEK_ID_LEN};

/// Length of the AES-GCM IV (96 bits).
pub const GCM_IV_LEN: usize = 12;
/// Length of the AES-GCM tag (128 bits), appended to the ciphertext.
pub const GCM_TAG_LEN: usize = 16;
/// Largest plaintext accepted in one call (single-part HSM operation).
pub const MAX_PLAINTEXT_LEN: usize = 64 * 1024;
/// Largest AAD accepted in one call.
pub const MAX_AAD_LEN: usize = 4 * 1024;

/// Login attempts made by every keystore in this process (tests use it to prove a wrong PIN
/// is not retried).
static PROCESS_LOGIN_ATTEMPTS: AtomicU64 = AtomicU64::new(0);

/// Number of `C_Login` calls made by all keystores of this process so far.
pub fn process_login_attempts() -> u64 {
    PROCESS_LOGIN_ATTEMPTS.load(Ordering::Relaxed)
}

/// The result of an in-HSM AES-GCM encryption: the IV and `ciphertext ‖ tag`.
#[derive(Clone, PartialEq, Eq)]
pub struct Sealed {
    /// The 96-bit IV, drawn from a CSPRNG for every encryption.
    pub iv: [u8; GCM_IV_LEN],
    /// Ciphertext followed by the 16-byte tag.
    pub ciphertext: Vec<u8>,
}

impl std::fmt::Debug for Sealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealed")
            .field("iv_len", &self.iv.len())
            .field("ciphertext_len", &self.ciphertext.len())
            .finish()
    }
}

/// One item of [`Keystore::reencrypt_many`]: the KEK it is encrypted with, the AAD, the IV
/// and `ciphertext ‖ tag`.
pub type Reencrypt = (KekId, Vec<u8>, Vec<u8>, Vec<u8>);

/// Outcome of a passed [`BlockingKeystore::self_test`].
#[derive(Debug, Clone)]
pub struct SelfTestReport {
    /// The KEK used for the encrypt/decrypt probe, if the token holds one.
    pub kek: Option<KekId>,
    /// How long the whole probe took.
    pub latency: Duration,
}

/// Counters describing the pool, for metrics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// `C_Login` calls made by this keystore.
    pub login_attempts: u64,
    /// Successful pool rebuilds after the first connection.
    pub rebuilds: u64,
    /// Pool generation: bumps every time the sessions are thrown away.
    pub generation: u64,
    /// Whether the pool currently holds a logged-in module.
    pub connected: bool,
    /// Sessions currently open in the pool (idle + in use), not counting the login session.
    pub open_sessions: usize,
}

/// A failure inside an operation: either a PKCS#11 error to classify, or one of ours.
enum Failure {
    Ck(CkError, Op),
    Ours(Error),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Ours(e)
    }
}

struct Module {
    slot: Slot,
    /// Kept open for the whole generation so the login state lasts.
    login_session: Session,
}

struct PoolState {
    module: Option<Module>,
    generation: u64,
    idle: Vec<Session>,
    /// Pool sessions of the current generation (idle + checked out).
    open: usize,
    next_attempt: Option<Instant>,
    backoff: Duration,
    last_error: Option<Error>,
    /// The PIN the token last refused: never offered again until the source changes.
    failed_pin: Option<SecretString>,
    handles: HashMap<KekId, ObjectHandle>,
}

struct Lease {
    session: Session,
    generation: u64,
}

/// The synchronous keystore. Every method blocks the calling thread on the HSM; use
/// [`Keystore`] from async code.
pub struct BlockingKeystore {
    cfg: Config,
    token_name: String,
    pkcs11: Pkcs11,
    state: Mutex<PoolState>,
    returned: Condvar,
    login_attempts: AtomicU64,
    rebuilds: AtomicU64,
}

impl std::fmt::Debug for BlockingKeystore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockingKeystore")
            .field("module", &self.cfg.module)
            .field("token", &self.cfg.token)
            .field("pool_size", &self.cfg.pool_size)
            .finish_non_exhaustive()
    }
}

impl BlockingKeystore {
    /// Loads the module, finds the token, logs in. A wrong PIN fails at once with
    /// [`Error::PinIncorrect`] after exactly one `C_Login`.
    pub fn open(cfg: Config) -> Result<Self> {
        cfg.validate()?;
        let token_name = cfg.token.to_string();
        let pkcs11 = Pkcs11::new(&cfg.module)
            .map_err(|e| classify(&e, Op::Initialize, &token_name).error)?;
        let ks = BlockingKeystore {
            token_name,
            pkcs11,
            state: Mutex::new(PoolState {
                module: None,
                generation: 0,
                idle: Vec::new(),
                open: 0,
                next_attempt: None,
                backoff: cfg.recovery.initial_backoff,
                last_error: None,
                failed_pin: None,
                handles: HashMap::new(),
            }),
            returned: Condvar::new(),
            login_attempts: AtomicU64::new(0),
            rebuilds: AtomicU64::new(0),
            cfg,
        };
        {
            let mut st = ks.lock();
            ks.connect(&mut st)?;
        }
        Ok(ks)
    }

    /// The configuration this keystore was opened with.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Pool counters.
    pub fn stats(&self) -> Stats {
        let st = self.lock();
        Stats {
            login_attempts: self.login_attempts.load(Ordering::Relaxed),
            rebuilds: self.rebuilds.load(Ordering::Relaxed),
            generation: st.generation,
            connected: st.module.is_some(),
            open_sessions: st.open,
        }
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        // A panic while holding the lock leaves the state consistent enough (worst case a
        // session is forgotten), so recover from poisoning instead of propagating panics.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    // ---- connection and recovery -------------------------------------------------------

    /// Throws away every session of the current generation and connects afresh.
    fn connect(&self, st: &mut PoolState) -> Result<()> {
        // Old sessions are invalid (or belong to a finalised module): forget them without
        // closing, since after a re-initialisation their handle numbers may name someone
        // else's new sessions.
        st.idle.clear();
        st.module = None;
        st.open = 0;
        st.generation += 1;
        st.handles.clear();
        self.returned.notify_all();

        match self
            .pkcs11
            .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => return Err(classify(&e, Op::Initialize, &self.token_name).error),
        }
        let slot = match self.find_slot() {
            Ok(slot) => slot,
            Err(_) => {
                // Some modules (SoftHSM2 among them) only enumerate tokens at C_Initialize: a
                // token that was removed and put back is invisible until the module is
                // re-initialised. Our sessions are already forgotten, so do that once.
                let _ = self.pkcs11.clone().finalize();
                match self
                    .pkcs11
                    .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
                {
                    Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
                    Err(e) => return Err(classify(&e, Op::Initialize, &self.token_name).error),
                }
                self.find_slot()?
            }
        };
        let session = self
            .pkcs11
            .open_rw_session_no_drop(slot)
            .map_err(|e| classify(&e, Op::OpenSession, &self.token_name).error)?;
        if let Err(e) = self.login(st, &session) {
            let _ = session.close();
            return Err(e);
        }
        st.module = Some(Module {
            slot,
            login_session: session,
        });
        st.next_attempt = None;
        st.backoff = self.cfg.recovery.initial_backoff;
        st.last_error = None;
        if st.generation > 1 {
            self.rebuilds.fetch_add(1, Ordering::Relaxed);
            tracing::info!(token = %self.token_name, generation = st.generation, "HSM session pool rebuilt");
        }
        Ok(())
    }

    fn find_slot(&self) -> Result<Slot> {
        let slots = self
            .pkcs11
            .get_slots_with_token()
            .map_err(|e| classify(&e, Op::OpenSession, &self.token_name).error)?;
        slots
            .into_iter()
            .find(|slot| self.token_matches(*slot))
            .ok_or_else(|| {
                Error::unavailable(
                    Op::OpenSession,
                    format!("no token with {} is present", self.cfg.token),
                )
            })
    }

    /// Whether `slot` holds our token right now.
    fn token_matches(&self, slot: Slot) -> bool {
        let Ok(info) = self.pkcs11.get_token_info(slot) else {
            return false;
        };
        match &self.cfg.token {
            TokenSelector::Label(l) => info.label().trim_end() == l.trim_end(),
            TokenSelector::Serial(s) => info.serial_number().trim() == s.trim(),
        }
    }

    fn login(&self, st: &mut PoolState, session: &Session) -> Result<()> {
        let pin = self.cfg.pin.read()?;
        if let Some(failed) = &st.failed_pin {
            if failed.expose_secret() == pin.expose_secret() {
                return Err(Error::PinIncorrect {
                    token: self.token_name.clone(),
                });
            }
        }
        self.login_attempts.fetch_add(1, Ordering::Relaxed);
        PROCESS_LOGIN_ATTEMPTS.fetch_add(1, Ordering::Relaxed);
        match session.login(UserType::User, Some(&pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {
                st.failed_pin = None;
                Ok(())
            }
            Err(e) => {
                let c = classify(&e, Op::Login, &self.token_name);
                if c.error.kind() == crate::ErrorKind::PinIncorrect {
                    tracing::error!(token = %self.token_name, "HSM refused the PIN; not retrying until the PIN source changes");
                    st.failed_pin = Some(pin);
                }
                Err(c.error)
            }
        }
    }

    /// Rebuilds the pool unless a previous failure's backoff is still running.
    fn rebuild(&self, st: &mut PoolState) -> Result<()> {
        if let Some(at) = st.next_attempt {
            if Instant::now() < at {
                return Err(st.last_error.clone().unwrap_or_else(|| {
                    Error::unavailable(Op::OpenSession, "HSM reconnect backing off")
                }));
            }
        }
        match self.connect(st) {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::warn!(token = %self.token_name, error = %e, backoff_ms = st.backoff.as_millis() as u64, "HSM reconnect failed");
                st.next_attempt = Some(Instant::now() + st.backoff);
                st.backoff = (st.backoff * 2).min(self.cfg.recovery.max_backoff);
                st.last_error = Some(e.clone());
                Err(e)
            }
        }
    }

    /// Does what `recovery` asks, unless another thread already rebuilt since `seen_gen`.
    fn recover(&self, st: &mut PoolState, recovery: Recovery, seen_gen: u64) -> Result<()> {
        if seen_gen != st.generation && st.module.is_some() {
            return Ok(());
        }
        match recovery {
            Recovery::None => Ok(()),
            Recovery::RefreshHandles => {
                st.handles.clear();
                Ok(())
            }
            Recovery::Relogin => {
                st.handles.clear();
                let Some(module) = st.module.take() else {
                    return self.rebuild(st);
                };
                let res = self.login(st, &module.login_session);
                st.module = Some(module);
                match res {
                    Ok(()) => Ok(()),
                    Err(e) if e.is_retryable() => self.rebuild(st),
                    Err(e) => Err(e),
                }
            }
            Recovery::Reopen | Recovery::Reinitialize => self.rebuild(st),
        }
    }

    // ---- the pool ------------------------------------------------------------------------

    fn checkout(&self) -> Result<Lease> {
        let deadline = Instant::now() + self.cfg.recovery.checkout_timeout;
        let mut st = self.lock();
        loop {
            if st.module.is_none() {
                self.rebuild(&mut st)?;
            }
            if let Some(session) = st.idle.pop() {
                return Ok(Lease {
                    session,
                    generation: st.generation,
                });
            }
            if st.open < self.cfg.pool_size {
                let slot = match &st.module {
                    Some(m) => m.slot,
                    None => continue,
                };
                match self.pkcs11.open_rw_session_no_drop(slot) {
                    Ok(session) => {
                        st.open += 1;
                        return Ok(Lease {
                            session,
                            generation: st.generation,
                        });
                    }
                    Err(e) => {
                        let c = classify(&e, Op::OpenSession, &self.token_name);
                        if c.recovery == Recovery::None || Instant::now() >= deadline {
                            return Err(c.error);
                        }
                        let gen = st.generation;
                        self.recover(&mut st, c.recovery, gen)?;
                        continue;
                    }
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::unavailable(
                    Op::OpenSession,
                    format!(
                        "no free HSM session within {:?} (pool size {})",
                        self.cfg.recovery.checkout_timeout, self.cfg.pool_size
                    ),
                ));
            }
            st = self
                .returned
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn checkin(&self, lease: Lease) {
        let mut st = self.lock();
        if lease.generation == st.generation && st.module.is_some() {
            st.idle.push(lease.session);
        }
        // else: a session of a dead generation, forgotten (see `connect`).
        drop(st);
        self.returned.notify_one();
    }

    /// Runs `f` on a pooled session, recovering from session-level failures and retrying.
    fn run<T>(&self, mut f: impl FnMut(&Session) -> Result<T, Failure>) -> Result<T> {
        let mut attempt: u32 = 0;
        loop {
            let lease = self.checkout()?;
            let generation = lease.generation;
            let (op, err) = match f(&lease.session) {
                Ok(v) => {
                    self.checkin(lease);
                    return Ok(v);
                }
                Err(Failure::Ours(e)) => {
                    self.checkin(lease);
                    return Err(e);
                }
                Err(Failure::Ck(err, op)) => (op, err),
            };
            let mut c = classify(&err, op, &self.token_name);
            if c.ambiguous_decrypt_failure {
                // SoftHSM2 reports a failed tag check as CKR_GENERAL_ERROR. Only call it
                // invalid ciphertext if the session itself is fine.
                match lease.session.get_session_info() {
                    Ok(_) => {
                        self.checkin(lease);
                        return Err(Error::InvalidCiphertext);
                    }
                    Err(e) => c = classify(&e, op, &self.token_name),
                }
            }
            if c.recovery == Recovery::None {
                self.checkin(lease);
                return Err(c.error);
            }
            tracing::warn!(%op, error = %c.error, attempt, "HSM session problem; recovering");
            if c.recovery <= Recovery::Relogin {
                self.checkin(lease);
            } else {
                // The session is dead; forget it (closing a dead handle is pointless and,
                // after a re-initialisation, unsafe).
                drop(lease.session);
            }
            let recovered = {
                let mut st = self.lock();
                self.recover(&mut st, c.recovery, generation)
            };
            attempt += 1;
            if attempt > self.cfg.recovery.max_retries {
                return Err(recovered.err().unwrap_or(c.error));
            }
            if let Err(e) = recovered {
                if !e.is_retryable() {
                    return Err(e);
                }
                std::thread::sleep(self.cfg.recovery.initial_backoff * attempt);
            }
        }
    }

    // ---- keys ----------------------------------------------------------------------------

    fn kek_template(&self) -> Vec<Attribute> {
        vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Token(true),
        ]
    }

    /// Finds the object handle of a KEK by id, using the cache.
    fn handle_for(&self, session: &Session, id: &KekId) -> Result<ObjectHandle, Failure> {
        if let Some(h) = self.lock().handles.get(id) {
            return Ok(*h);
        }
        let mut tpl = self.kek_template();
        tpl.push(Attribute::Id(id.0.to_vec()));
        let found = find(session, &tpl)?;
        match found.as_slice() {
            [h] => {
                self.lock().handles.insert(*id, *h);
                Ok(*h)
            }
            [] => Err(self.not_found(session, format!("KEK id {id}"))),
            _ => Err(Failure::Ours(Error::internal(
                Op::FindKey,
                format!("several KEKs share id {id}"),
            ))),
        }
    }

    fn read_info(&self, session: &Session, h: ObjectHandle) -> Result<Option<KekInfo>, Failure> {
        let attrs = session
            .get_attributes(
                h,
                &[
                    AttributeType::Label,
                    AttributeType::Id,
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                ],
            )
            .map_err(|e| Failure::Ck(e, Op::FindKey))?;
        let (mut label, mut id, mut sensitive, mut extractable) = (None, None, false, true);
        for a in attrs {
            match a {
                Attribute::Label(l) => label = Some(String::from_utf8_lossy(&l).into_owned()),
                Attribute::Id(i) => id = <[u8; KEK_ID_LEN]>::try_from(i.as_slice()).ok(),
                Attribute::Sensitive(s) => sensitive = s,
                Attribute::Extractable(x) => extractable = x,
                _ => {}
            }
        }
        let (Some(label), Some(id)) = (label, id) else {
            return Ok(None);
        };
        if !label.starts_with(&self.cfg.kek_label_prefix) {
            return Ok(None);
        }
        Ok(Some(KekInfo {
            created: kek::created_from_label(&self.cfg.kek_label_prefix, &label),
            label,
            id: KekId(id),
            sensitive,
            extractable,
        }))
    }

    /// A search found nothing. That means "not found" only if we are logged in (private
    /// objects are invisible otherwise) and the token is still there (a removed token
    /// shows no objects on some modules).
    fn not_found(&self, session: &Session, what: String) -> Failure {
        if let Err(f) = ensure_logged_in(session) {
            return f;
        }
        if let Err(f) = self.ensure_token_present(session) {
            return f;
        }
        Failure::Ours(Error::KeyNotFound(what))
    }

    fn ensure_token_present(&self, session: &Session) -> Result<(), Failure> {
        let slot = session
            .get_session_info()
            .map_err(|e| Failure::Ck(e, Op::FindKey))?
            .slot_id();
        if self.token_matches(slot) {
            Ok(())
        } else {
            Err(Failure::Ck(
                CkError::Pkcs11(
                    RvError::TokenNotPresent,
                    cryptoki::context::Function::GetSlotList,
                ),
                Op::FindKey,
            ))
        }
    }

    /// Every KEK on the token whose label has the configured prefix, oldest first.
    pub fn list_keks(&self) -> Result<Vec<KekInfo>> {
        self.run(|s| {
            let mut out = Vec::new();
            for h in find(s, &self.kek_template())? {
                if let Some(info) = self.read_info(s, h)? {
                    out.push(info);
                }
            }
            if out.is_empty() {
                ensure_logged_in(s)?;
                self.ensure_token_present(s)?;
            }
            kek::sort_by_creation(&mut out);
            Ok(out)
        })
    }

    /// The newest KEK (the natural primary), if any.
    pub fn newest_kek(&self) -> Result<Option<KekInfo>> {
        Ok(self.list_keks()?.pop())
    }

    /// Finds a KEK by its label.
    pub fn find_kek_by_label(&self, label: &str) -> Result<KekInfo> {
        self.run(|s| {
            let mut tpl = self.kek_template();
            tpl.push(Attribute::Label(label.as_bytes().to_vec()));
            let found = find(s, &tpl)?;
            let mut infos = Vec::new();
            for h in found {
                if let Some(i) = self.read_info(s, h)? {
                    infos.push(i);
                }
            }
            match infos.len() {
                1 => Ok(infos.remove(0)),
                0 => Err(self.not_found(s, format!("KEK label '{label}'"))),
                _ => Err(Failure::Ours(Error::internal(
                    Op::FindKey,
                    format!("several KEKs share label '{label}'"),
                ))),
            }
        })
    }

    /// Finds a KEK by its id.
    pub fn find_kek_by_id(&self, id: &KekId) -> Result<KekInfo> {
        self.run(|s| {
            let h = self.handle_for(s, id)?;
            self.read_info(s, h)?
                .ok_or_else(|| Failure::Ours(Error::KeyNotFound(format!("KEK id {id}"))))
        })
    }

    /// Generates a new AES-256 KEK inside the HSM: a token object, sensitive, never
    /// extractable, with a random 16-byte `CKA_ID` and a label carrying its creation time.
    pub fn generate_kek(&self) -> Result<KekInfo> {
        let mut suffix = [0u8; 2];
        self.run(|s| {
            s.generate_random_slice(&mut suffix)
                .map_err(|e| Failure::Ck(e, Op::Random))
        })?;
        // The label's time orders KEKs, and the newest is the primary: never go backwards,
        // even if this host's clock is behind the one that made the current newest KEK.
        let mut created = SystemTime::now();
        if let Some(newest) = self.newest_kek()?.and_then(|k| k.created) {
            let after = newest + std::time::Duration::from_millis(1);
            if after > created {
                tracing::warn!(
                    "clock is behind the newest KEK's creation time; using that time + 1 ms"
                );
                created = after;
            }
        }
        let label = kek::new_label(
            &self.cfg.kek_label_prefix,
            created,
            u16::from_be_bytes(suffix),
        );
        self.generate_kek_with_label(&label)
    }

    /// Like [`BlockingKeystore::generate_kek`] with a caller-chosen label, which must start
    /// with the configured prefix. The `CKA_ID` is random all the same, so re-creating a
    /// label never re-creates an id.
    pub fn generate_kek_with_label(&self, label: &str) -> Result<KekInfo> {
        if !label.starts_with(&self.cfg.kek_label_prefix) {
            return Err(Error::InvalidInput(format!(
                "KEK label '{label}' must start with '{}'",
                self.cfg.kek_label_prefix
            )));
        }
        let mut id = [0u8; KEK_ID_LEN];
        self.run(|s| {
            s.generate_random_slice(&mut id)
                .map_err(|e| Failure::Ck(e, Op::Random))
        })?;
        let mut tpl = self.kek_template();
        tpl.extend([
            Attribute::ValueLen(32.into()),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(id.to_vec()),
        ]);
        let kek_id = KekId(id);
        let info = self.run(|s| {
            let h = s
                .generate_key(&Mechanism::AesKeyGen, &tpl)
                .map_err(|e| Failure::Ck(e, Op::GenerateKey))?;
            self.lock().handles.insert(kek_id, h);
            self.read_info(s, h)?.ok_or_else(|| {
                Failure::Ours(Error::internal(Op::GenerateKey, "new KEK not readable"))
            })
        })?;
        tracing::info!(label = %info.label, id = %info.id, "generated KEK");
        Ok(info)
    }

    /// Destroys a KEK in the HSM. Irreversible: only ever called on an explicit request.
    pub fn destroy_kek(&self, id: &KekId) -> Result<()> {
        self.run(|s| {
            let h = self.handle_for(s, id)?;
            s.destroy_object(h)
                .map_err(|e| Failure::Ck(e, Op::DestroyKey))?;
            self.lock().handles.remove(id);
            Ok(())
        })?;
        tracing::warn!(id = %id, "destroyed KEK");
        Ok(())
    }

    // ---- crypto --------------------------------------------------------------------------

    /// AES-256-GCM encryption inside the HSM with KEK `kek`, a fresh random 96-bit IV and
    /// the caller's AAD.
    pub fn encrypt(&self, kek: &KekId, aad: &[u8], plaintext: &[u8]) -> Result<Sealed> {
        if plaintext.len() > MAX_PLAINTEXT_LEN {
            return Err(Error::InvalidInput(format!(
                "plaintext of {} bytes exceeds {MAX_PLAINTEXT_LEN}",
                plaintext.len()
            )));
        }
        check_aad(aad)?;
        let iv = new_iv()?;
        let ciphertext = self.run(|s| {
            let h = self.handle_for(s, kek)?;
            let mut iv_buf = iv;
            let params = GcmParams::new(&mut iv_buf, aad, ((GCM_TAG_LEN * 8) as u64).into())
                .map_err(|e| Failure::Ck(e, Op::Encrypt))?;
            s.encrypt(&Mechanism::AesGcm(params), h, plaintext)
                .map_err(|e| Failure::Ck(e, Op::Encrypt))
        })?;
        Ok(Sealed { iv, ciphertext })
    }

    /// AES-256-GCM decryption inside the HSM. Any change to IV, ciphertext, tag or AAD, or
    /// the wrong KEK, gives [`Error::InvalidCiphertext`].
    pub fn decrypt(
        &self,
        kek: &KekId,
        aad: &[u8],
        iv: &[u8],
        ciphertext: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>> {
        if iv.len() != GCM_IV_LEN || ciphertext.len() < GCM_TAG_LEN {
            return Err(Error::InvalidCiphertext);
        }
        if ciphertext.len() > MAX_PLAINTEXT_LEN + GCM_TAG_LEN {
            return Err(Error::InvalidCiphertext);
        }
        check_aad(aad)?;
        self.run(|s| {
            let h = self.handle_for(s, kek)?;
            let mut iv_buf = [0u8; GCM_IV_LEN];
            iv_buf.copy_from_slice(iv);
            let params = GcmParams::new(&mut iv_buf, aad, ((GCM_TAG_LEN * 8) as u64).into())
                .map_err(|e| Failure::Ck(e, Op::Decrypt))?;
            s.decrypt(&Mechanism::AesGcm(params), h, ciphertext)
                .map(Zeroizing::new)
                .map_err(|e| Failure::Ck(e, Op::Decrypt))
        })
    }

    /// `len` random bytes from the HSM's RNG.
    pub fn random(&self, len: usize) -> Result<Zeroizing<Vec<u8>>> {
        if len > 4096 {
            return Err(Error::InvalidInput(format!(
                "{len} random bytes is too many"
            )));
        }
        let mut buf = Zeroizing::new(vec![0u8; len]);
        self.run(|s| {
            s.generate_random_slice(&mut buf)
                .map_err(|e| Failure::Ck(e, Op::Random))
        })?;
        Ok(buf)
    }

    /// A real round trip through the HSM: random bytes, then (if the token holds a KEK) an
    /// encrypt + decrypt of a random probe with `kek` or the newest KEK.
    pub fn self_test(&self, kek: Option<&KekId>) -> Result<SelfTestReport> {
        let t0 = Instant::now();
        let probe = self.random(32)?;
        let kek = match kek {
            Some(k) => Some(*k),
            None => self.newest_kek()?.map(|i| i.id),
        };
        if let Some(k) = &kek {
            let aad = b"keyhaven-self-test";
            let sealed = self.encrypt(k, aad, &probe)?;
            let back = self.decrypt(k, aad, &sealed.iv, &sealed.ciphertext)?;
            if back.as_slice() != probe.as_slice() {
                return Err(Error::internal(Op::SelfTest, "probe did not round-trip"));
            }
        }
        Ok(SelfTestReport {
            kek,
            latency: t0.elapsed(),
        })
    }
}

impl Drop for BlockingKeystore {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        for s in st.idle.drain(..) {
            let _ = s.close();
        }
        if let Some(m) = st.module.take() {
            let _ = m.login_session.close();
        }
    }
}

fn find(session: &Session, tpl: &[Attribute]) -> Result<Vec<ObjectHandle>, Failure> {
    session
        .find_objects(tpl)
        .map_err(|e| Failure::Ck(e, Op::FindKey))
}

fn ensure_logged_in(session: &Session) -> Result<(), Failure> {
    let info = session
        .get_session_info()
        .map_err(|e| Failure::Ck(e, Op::FindKey))?;
    match info.session_state() {
        SessionState::RwUser | SessionState::RoUser | SessionState::RwSecurityOfficer => Ok(()),
        _ => Err(Failure::Ck(
            CkError::Pkcs11(
                RvError::UserNotLoggedIn,
                cryptoki::context::Function::FindObjects,
            ),
            Op::FindKey,
        )),
    }
}

fn check_aad(aad: &[u8]) -> Result<()> {
    if aad.len() > MAX_AAD_LEN {
        return Err(Error::InvalidInput(format!(
            "AAD of {} bytes exceeds {MAX_AAD_LEN}",
            aad.len()
        )));
    }
    Ok(())
}

/// The IV policy, in one place: 96 bits from the operating system's CSPRNG for every
/// encryption. (SoftHSM2 requires the caller to supply the IV; an HSM that generates its own
/// would be handled here.) With random IVs, one KEK must not see more than 2^32
/// encryptions — rotation policy keeps far below that.
fn new_iv() -> Result<[u8; GCM_IV_LEN]> {
    let mut iv = [0u8; GCM_IV_LEN];
    getrandom::fill(&mut iv)
        .map_err(|e| Error::internal(Op::Encrypt, format!("OS CSPRNG failed: {e}")))?;
    Ok(iv)
}

/// The async keystore: cheap to clone, every call runs on tokio's blocking pool, and at
/// most `pool_size` calls are in flight (the rest wait asynchronously).
#[derive(Clone)]
pub struct Keystore {
    inner: Arc<BlockingKeystore>,
    permits: Arc<Semaphore>,
}

impl std::fmt::Debug for Keystore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

impl Keystore {
    /// Opens the keystore (see [`BlockingKeystore::open`]) without blocking the reactor.
    pub async fn open(cfg: Config) -> Result<Self> {
        let ks = tokio::task::spawn_blocking(move || BlockingKeystore::open(cfg))
            .await
            .map_err(|e| Error::internal(Op::Initialize, format!("open task failed: {e}")))??;
        Ok(Self::from_blocking(ks))
    }

    /// Wraps an already opened blocking keystore.
    pub fn from_blocking(ks: BlockingKeystore) -> Self {
        let permits = Arc::new(Semaphore::new(ks.cfg.pool_size));
        Keystore {
            inner: Arc::new(ks),
            permits,
        }
    }

    /// The blocking face of the same keystore (for threads, CLIs and benchmarks).
    pub fn blocking(&self) -> &BlockingKeystore {
        &self.inner
    }

    async fn call<T, F>(&self, op: Op, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&BlockingKeystore) -> Result<T> + Send + 'static,
    {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::unavailable(op, "keystore closed"))?;
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            f(&inner)
        })
        .await
        .map_err(|e| Error::internal(op, format!("blocking task failed: {e}")))?
    }

    /// See [`BlockingKeystore::list_keks`].
    pub async fn list_keks(&self) -> Result<Vec<KekInfo>> {
        self.call(Op::FindKey, |k| k.list_keks()).await
    }

    /// See [`BlockingKeystore::find_kek_by_label`].
    pub async fn find_kek_by_label(&self, label: &str) -> Result<KekInfo> {
        let label = label.to_owned();
        self.call(Op::FindKey, move |k| k.find_kek_by_label(&label))
            .await
    }

    /// See [`BlockingKeystore::find_kek_by_id`].
    pub async fn find_kek_by_id(&self, id: KekId) -> Result<KekInfo> {
        self.call(Op::FindKey, move |k| k.find_kek_by_id(&id)).await
    }

    /// See [`BlockingKeystore::generate_kek`].
    pub async fn generate_kek(&self) -> Result<KekInfo> {
        self.call(Op::GenerateKey, |k| k.generate_kek()).await
    }

    /// See [`BlockingKeystore::destroy_kek`].
    pub async fn destroy_kek(&self, id: KekId) -> Result<()> {
        self.call(Op::DestroyKey, move |k| k.destroy_kek(&id)).await
    }

    /// See [`BlockingKeystore::encrypt`].
    pub async fn encrypt(&self, kek: KekId, aad: &[u8], plaintext: &[u8]) -> Result<Sealed> {
        let aad = aad.to_vec();
        let plaintext = Zeroizing::new(plaintext.to_vec());
        self.call(Op::Encrypt, move |k| k.encrypt(&kek, &aad, &plaintext))
            .await
    }

    /// See [`BlockingKeystore::decrypt`].
    pub async fn decrypt(
        &self,
        kek: KekId,
        aad: &[u8],
        iv: &[u8],
        ciphertext: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>> {
        let (aad, iv, ct) = (aad.to_vec(), iv.to_vec(), ciphertext.to_vec());
        self.call(Op::Decrypt, move |k| k.decrypt(&kek, &aad, &iv, &ct))
            .await
    }

    /// Re-encrypts ciphertexts to KEK `to` in one blocking task (for key rotation: re-wrapping
    /// stored keys): each item `(from, aad, iv, ciphertext)` is [`BlockingKeystore::decrypt`]ed
    /// with KEK `from` and [`BlockingKeystore::encrypt`]ed with `to` under the same AAD. The
    /// plaintexts stay inside the task and are zeroized there. One result per item, in order.
    pub async fn reencrypt_many(
        &self,
        to: KekId,
        items: Vec<Reencrypt>,
    ) -> Result<Vec<Result<Sealed>>> {
        self.call(Op::Decrypt, move |k| {
            Ok(items
                .iter()
                .map(|(from, aad, iv, ct)| {
                    let plain = k.decrypt(from, aad, iv, ct)?;
                    k.encrypt(&to, aad, &plain)
                })
                .collect())
        })
        .await
    }

    /// See [`BlockingKeystore::random`].
    pub async fn random(&self, len: usize) -> Result<Zeroizing<Vec<u8>>> {
        self.call(Op::Random, move |k| k.random(len)).await
    }

    /// See [`BlockingKeystore::self_test`].
    pub async fn self_test(&self, kek: Option<KekId>) -> Result<SelfTestReport> {
        self.call(Op::SelfTest, move |k| k.self_test(kek.as_ref()))
            .await
    }

    /// See [`BlockingKeystore::stats`].
    pub fn stats(&self) -> Stats {
        self.inner.stats()
    }
}
