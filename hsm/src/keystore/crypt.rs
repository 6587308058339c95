//! AES-GCM inside the HSM, random bytes and the self-test probe.

use super::*;

impl BlockingKeystore {
    /// AES-256-GCM encryption inside the HSM with KEK `kek`, a fresh random 96-bit IV and
    /// the caller's AAD.
    pub fn encrypt(&self, kek: &KekId, aad: &[u8], plaintext: &[u8]) -> Result<Sealed> {
        if plaintext.len() > MAX_PLAINTEXT_LEN {
            return Err(Error::invalid_input(format!(
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
            return Err(Error::invalid_input(format!(
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

pub(super) fn check_aad(aad: &[u8]) -> Result<()> {
    if aad.len() > MAX_AAD_LEN {
        return Err(Error::invalid_input(format!(
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
pub(super) fn new_iv() -> Result<[u8; GCM_IV_LEN]> {
    let mut iv = [0u8; GCM_IV_LEN];
    getrandom::fill(&mut iv)
        .map_err(|e| Error::internal_by(Op::Encrypt, "no IV from the OS CSPRNG", e))?;
    Ok(iv)
}
