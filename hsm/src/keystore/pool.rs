//! The session pool: loading the module, finding the token, logging in, checking sessions
//! out and in, and recovering from dead sessions with back-off.

use super::*;

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
        Self::open_refusing(cfg, None).map_err(|(e, _)| e)
    }

    /// [`BlockingKeystore::open`], never offering `refused` (a PIN the token refused before)
    /// to the token. On a refused PIN the error comes with the PIN the token refused, for the
    /// caller to pass back at its next attempt (see [`crate::login`]).
    pub(crate) fn open_refusing(
        cfg: Config,
        refused: Option<SecretString>,
    ) -> std::result::Result<Self, (Error, Option<SecretString>)> {
        cfg.validate().map_err(|e| (e, None))?;
        let token_name = cfg.token.to_string();
        let pkcs11 = Pkcs11::new(&cfg.module).map_err(|e| {
            let e = Error::config_by(
                format!("cannot load the PKCS#11 module {}", cfg.module.display()),
                e,
            );
            (e, None)
        })?;
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
                failed_pin: refused,
                handles: HashMap::new(),
            }),
            returned: Condvar::new(),
            login_attempts: AtomicU64::new(0),
            rebuilds: AtomicU64::new(0),
            cfg,
        };
        {
            let mut st = ks.lock();
            if let Err(e) = ks.connect(&mut st) {
                return Err((e, st.failed_pin.take()));
            }
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

    pub(super) fn lock(&self) -> MutexGuard<'_, PoolState> {
        // A panic while holding the lock leaves the state consistent enough (worst case a
        // session is forgotten), so recover from poisoning instead of propagating panics.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Throws away every session of the current generation and connects afresh.
    pub(super) fn connect(&self, st: &mut PoolState) -> Result<()> {
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
            Err(e) => return Err(classify(e, Op::Initialize, &self.token_name).error),
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
                    Err(e) => return Err(classify(e, Op::Initialize, &self.token_name).error),
                }
                self.find_slot()?
            }
        };
        let session = self
            .pkcs11
            .open_rw_session_no_drop(slot)
            .map_err(|e| classify(e, Op::OpenSession, &self.token_name).error)?;
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

    pub(super) fn find_slot(&self) -> Result<Slot> {
        let slots = self
            .pkcs11
            .get_slots_with_token()
            .map_err(|e| classify(e, Op::OpenSession, &self.token_name).error)?;
        slots
            .into_iter()
            .find(|slot| self.token_matches(*slot))
            .ok_or_else(|| {
                Error::unavailable(Op::OpenSession, "token not present")
                    .with_cause(Cause::NoSuchToken(self.cfg.token.clone()))
            })
    }

    /// Whether `slot` holds our token right now.
    pub(super) fn token_matches(&self, slot: Slot) -> bool {
        let Ok(info) = self.pkcs11.get_token_info(slot) else {
            return false;
        };
        match &self.cfg.token {
            TokenSelector::Label(l) => info.label().trim_end() == l.trim_end(),
            TokenSelector::Serial(s) => info.serial_number().trim() == s.trim(),
        }
    }

    pub(super) fn login(&self, st: &mut PoolState, session: &Session) -> Result<()> {
        let pin = self.cfg.pin.read()?;
        if let Some(failed) = &st.failed_pin {
            if failed.expose_secret() == pin.expose_secret() {
                tracing::debug!(token = %self.token_name, "the PIN source still holds the PIN the token refused; not offering it");
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
                let c = classify(e, Op::Login, &self.token_name);
                if c.error.is_pin_refusal() {
                    tracing::error!(token = %self.token_name, "HSM refused the PIN; not retrying until the PIN source changes");
                    st.failed_pin = Some(pin);
                }
                Err(c.error)
            }
        }
    }

    /// Rebuilds the pool unless a previous failure's backoff is still running.
    pub(super) fn rebuild(&self, st: &mut PoolState) -> Result<()> {
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
                tracing::warn!(token = %self.token_name, error = %e.chain(), backoff_ms = st.backoff.as_millis() as u64, "HSM reconnect failed");
                st.next_attempt = Some(Instant::now() + st.backoff);
                st.backoff = (st.backoff * 2).min(self.cfg.recovery.max_backoff);
                st.last_error = Some(e.clone());
                Err(e)
            }
        }
    }

    /// Does what `recovery` asks, unless another thread already rebuilt since `seen_gen`.
    pub(super) fn recover(
        &self,
        st: &mut PoolState,
        recovery: Recovery,
        seen_gen: u64,
    ) -> Result<()> {
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

    pub(super) fn checkout(&self) -> Result<Checkout> {
        let deadline = Instant::now() + self.cfg.recovery.checkout_timeout;
        let mut st = self.lock();
        loop {
            if st.module.is_none() {
                self.rebuild(&mut st)?;
            }
            if let Some(session) = st.idle.pop() {
                return Ok(Checkout {
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
                        return Ok(Checkout {
                            session,
                            generation: st.generation,
                        });
                    }
                    Err(e) => {
                        let c = classify(e, Op::OpenSession, &self.token_name);
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
                tracing::warn!(
                    token = %self.token_name,
                    timeout = ?self.cfg.recovery.checkout_timeout,
                    pool_size = self.cfg.pool_size,
                    "no free HSM session within the checkout timeout"
                );
                return Err(Error::unavailable(
                    Op::OpenSession,
                    "no free HSM session within the checkout timeout",
                ));
            }
            st = self
                .returned
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    pub(super) fn checkin(&self, checkout: Checkout) {
        let mut st = self.lock();
        if checkout.generation == st.generation && st.module.is_some() {
            st.idle.push(checkout.session);
        }
        // else: a session of a dead generation, forgotten (see `connect`).
        drop(st);
        self.returned.notify_one();
    }

    /// Runs `f` on a pooled session, recovering from session-level failures and retrying.
    pub(super) fn run<T>(&self, mut f: impl FnMut(&Session) -> Result<T, Failure>) -> Result<T> {
        let mut attempt: u32 = 0;
        loop {
            let checkout = self.checkout()?;
            let generation = checkout.generation;
            let (op, err) = match f(&checkout.session) {
                Ok(v) => {
                    self.checkin(checkout);
                    return Ok(v);
                }
                Err(Failure::Ours(e)) => {
                    self.checkin(checkout);
                    return Err(e);
                }
                Err(Failure::Ck(err, op)) => (op, err),
            };
            let mut c = classify(err, op, &self.token_name);
            if c.ambiguous_decrypt_failure {
                // SoftHSM2 reports a failed tag check as CKR_GENERAL_ERROR. Only call it
                // invalid ciphertext if the session itself is fine.
                match checkout.session.get_session_info() {
                    Ok(_) => {
                        self.checkin(checkout);
                        return Err(Error::InvalidCiphertext);
                    }
                    Err(e) => c = classify(e, op, &self.token_name),
                }
            }
            if c.recovery == Recovery::None {
                self.checkin(checkout);
                return Err(c.error);
            }
            tracing::warn!(%op, error = %c.error.chain(), attempt, "HSM session problem; recovering");
            if c.recovery <= Recovery::Relogin {
                self.checkin(checkout);
            } else {
                // The session is dead; forget it (closing a dead handle is pointless and,
                // after a re-initialisation, unsafe).
                drop(checkout.session);
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

pub(super) fn ensure_logged_in(session: &Session) -> Result<(), Failure> {
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
