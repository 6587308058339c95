//! KEK objects on the token: listing, lookup by label or id, generation and destruction.

use super::*;

impl BlockingKeystore {
    pub(super) fn kek_template(&self) -> Vec<Attribute> {
        vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Token(true),
        ]
    }

    /// Finds the object handle of a KEK by id, using the cache.
    pub(super) fn handle_for(
        &self,
        session: &Session,
        id: &KekId,
    ) -> Result<ObjectHandle, Failure> {
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
            _ => {
                tracing::error!(id = %id, "several KEKs share one CKA_ID");
                Err(Failure::Ours(Error::internal(
                    Op::FindKey,
                    "several KEKs share one id",
                )))
            }
        }
    }

    pub(super) fn read_info(
        &self,
        session: &Session,
        h: ObjectHandle,
    ) -> Result<Option<KekInfo>, Failure> {
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
    pub(super) fn not_found(&self, session: &Session, what: String) -> Failure {
        if let Err(f) = ensure_logged_in(session) {
            return f;
        }
        if let Err(f) = self.ensure_token_present(session) {
            return f;
        }
        Failure::Ours(Error::KeyNotFound(what))
    }

    pub(super) fn ensure_token_present(&self, session: &Session) -> Result<(), Failure> {
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
                _ => {
                    tracing::error!(label, "several KEKs share one label");
                    Err(Failure::Ours(Error::internal(
                        Op::FindKey,
                        "several KEKs share one label",
                    )))
                }
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
            return Err(Error::invalid_input(format!(
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
}

pub(super) fn find(session: &Session, tpl: &[Attribute]) -> Result<Vec<ObjectHandle>, Failure> {
    session
        .find_objects(tpl)
        .map_err(|e| Failure::Ck(e, Op::FindKey))
}
