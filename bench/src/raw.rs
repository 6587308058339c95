//! Baseline (a): the HSM alone. In-HSM AES-256-GCM through `keyhaven_hsm::BlockingKeystore`
//! (thin wrappers over `C_Encrypt`/`C_Decrypt` on a pooled session) from N OS threads in
//! this process: the same token, KEK, AAD (the key_id) and message sizes as the plugin, and
//! the same session-pool size, so at most `min(N, pool)` HSM calls are in flight in both.
//! No gRPC, no async runtime, no process boundary.

use anyhow::Context;
use keyhaven_hsm::{BlockingKeystore, Config, KekId};
use kms_plugin::envelope;

use crate::load::{self, Summary, Window};
use crate::workload::Envelope;

/// A plugin ciphertext split for a direct `decrypt` call.
#[derive(Debug)]
pub struct RawCiphertext {
    iv: Vec<u8>,
    body: Vec<u8>,
    seed: Vec<u8>,
}

/// Splits the plugin's ciphertexts (format byte ‖ IV ‖ ciphertext‖tag) for the raw calls.
pub fn split(envelopes: &[Envelope]) -> anyhow::Result<Vec<RawCiphertext>> {
    envelopes
        .iter()
        .map(|e| {
            let (iv, body) = envelope::decode(&e.sealed.ciphertext)
                .context("the plugin's ciphertext is not in envelope format 1")?;
            Ok(RawCiphertext {
                iv: iv.to_vec(),
                body: body.to_vec(),
                seed: e.seed.clone(),
            })
        })
        .collect()
}

/// The raw-HSM baseline: a keystore of its own on the plugin's token.
#[derive(Debug)]
pub struct RawHsm {
    ks: BlockingKeystore,
    kek: KekId,
    aad: Vec<u8>,
}

impl RawHsm {
    /// Opens the token (blocking) and finds the KEK the plugin reports as `key_id`.
    pub fn open(cfg: Config, key_id: &str) -> anyhow::Result<RawHsm> {
        let ks = BlockingKeystore::open(cfg).context("open the raw-HSM keystore")?;
        let kek = ks.newest_kek()?.context("no KEK on the bench token")?.id;
        anyhow::ensure!(
            envelope::key_id(&kek) == key_id,
            "the newest KEK on the token ({}) is not the plugin's key_id {key_id}",
            envelope::key_id(&kek)
        );
        Ok(RawHsm {
            ks,
            kek,
            aad: key_id.as_bytes().to_vec(),
        })
    }

    /// Session-pool size of this keystore.
    pub fn pool_size(&self) -> usize {
        self.ks.config().pool_size
    }

    /// Decrypts one plugin ciphertext directly: proves both sides do the same work.
    pub fn check(&self, ct: &[RawCiphertext]) -> anyhow::Result<()> {
        let c = ct.first().context("no ciphertexts")?;
        let pt = self.ks.decrypt(&self.kek, &self.aad, &c.iv, &c.body)?;
        anyhow::ensure!(
            pt.as_slice() == c.seed.as_slice(),
            "raw HSM decrypt of a plugin ciphertext did not give the seed back"
        );
        Ok(())
    }

    /// Encrypt load: `threads` threads encrypting seeds for `window`.
    pub fn encrypt(
        &self,
        threads: usize,
        window: Window,
        seeds: &[Vec<u8>],
    ) -> anyhow::Result<Summary> {
        load::drive_threads(threads, window, |t, seq| {
            let seed = &seeds[pick(t, seq, threads, seeds.len())];
            let sealed = self
                .ks
                .encrypt(&self.kek, &self.aad, seed)
                .map_err(|e| e.to_string())?;
            if sealed.ciphertext.len() != seed.len() + keyhaven_hsm::GCM_TAG_LEN {
                return Err("encrypt returned a ciphertext of the wrong length".into());
            }
            Ok(())
        })
    }

    /// Decrypt load: `threads` threads decrypting the plugin's ciphertexts for `window`.
    pub fn decrypt(
        &self,
        threads: usize,
        window: Window,
        cts: &[RawCiphertext],
    ) -> anyhow::Result<Summary> {
        load::drive_threads(threads, window, |t, seq| {
            let c = &cts[pick(t, seq, threads, cts.len())];
            let pt = self
                .ks
                .decrypt(&self.kek, &self.aad, &c.iv, &c.body)
                .map_err(|e| e.to_string())?;
            if pt.as_slice() != c.seed.as_slice() {
                return Err("decrypt returned the wrong plaintext".into());
            }
            Ok(())
        })
    }
}

/// Item for thread `t`'s `seq`-th call: threads walk the list interleaved.
fn pick(t: usize, seq: u64, threads: usize, len: usize) -> usize {
    ((seq as usize).wrapping_mul(threads).wrapping_add(t)) % len.max(1)
}
