//! Secrets at rest: every secret version is encrypted with its own random 256-bit DEK
//! (AES-256-GCM, `aes-gcm`), and the DEK is stored only wrapped by an HSM KEK (AES-GCM inside
//! the HSM, through `keyhaven-hsm`). Both AADs bind the row (path and version), so a row moved
//! or copied elsewhere fails to open. A bounded, expiring cache of unwrapped DEKs keeps the HSM
//! off most reads; cached DEKs are zeroized when evicted or dropped.

use std::collections::BTreeMap;
use std::sync::Arc;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use keyhaven_hsm::{KekId, Keystore};
use zeroize::{Zeroize, Zeroizing};

mod dek_cache;
pub use dek_cache::{CacheStats, DekCache};

/// Length of a DEK.
pub const DEK_LEN: usize = 32;
/// Length of the AES-GCM nonce used with a DEK.
pub const NONCE_LEN: usize = 12;

/// A secret version's key/value map. Values are zeroized on drop.
#[derive(Default, Clone, PartialEq, Eq)]
pub struct SecretData(pub BTreeMap<String, Zeroizing<Vec<u8>>>);

impl std::fmt::Debug for SecretData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys are names, not values: show them, never the values.
        f.debug_struct("SecretData")
            .field("keys", &self.0.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl SecretData {
    /// Builds from plain pairs.
    pub fn from_pairs<K: Into<String>, V: Into<Vec<u8>>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        SecretData(
            pairs
                .into_iter()
                .map(|(k, v)| (k.into(), Zeroizing::new(v.into())))
                .collect(),
        )
    }

    /// Unambiguous encoding: for each entry in key order, u32 key length, key, u32 value
    /// length, value (big endian).
    fn encode(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::new());
        for (k, v) in &self.0 {
            out.extend_from_slice(&(k.len() as u32).to_be_bytes());
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(&(v.len() as u32).to_be_bytes());
            out.extend_from_slice(v);
        }
        out
    }

    fn decode(mut b: &[u8]) -> Option<Self> {
        let mut map = BTreeMap::new();
        let take = |b: &mut &[u8]| -> Option<Vec<u8>> {
            if b.len() < 4 {
                return None;
            }
            let n = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
            if b.len() < 4 + n {
                return None;
            }
            let v = b[4..4 + n].to_vec();
            *b = &b[4 + n..];
            Some(v)
        };
        while !b.is_empty() {
            let k = String::from_utf8(take(&mut b)?).ok()?;
            let v = Zeroizing::new(take(&mut b)?);
            map.insert(k, v);
        }
        Some(SecretData(map))
    }
}

/// A DEK wrapped by an HSM KEK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrappedDek {
    /// The KEK that wraps it.
    pub kek_id: KekId,
    /// IV of the in-HSM AES-GCM.
    pub iv: Vec<u8>,
    /// Wrapped DEK ‖ tag.
    pub ciphertext: Vec<u8>,
}

/// One encrypted secret version as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedVersion {
    /// Nonce used with the DEK.
    pub nonce: Vec<u8>,
    /// Encrypted data ‖ tag.
    pub ciphertext: Vec<u8>,
    /// The DEK, wrapped.
    pub dek: WrappedDek,
}

/// Why a secret could not be sealed or opened.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CryptoError {
    /// The stored row does not authenticate: it was altered, moved or truncated.
    #[error("integrity check failed for {path} version {version}: the stored row was altered")]
    Integrity {
        /// Secret path.
        path: String,
        /// Version.
        version: i64,
    },
    /// The HSM failed (unavailable, KEK missing...); the HSM error is the `source`.
    #[error("HSM")]
    Hsm(#[from] keyhaven_hsm::Error),
    /// No KEK to wrap new DEKs with.
    #[error("no broker KEK on the HSM token")]
    NoKek,
    /// The operating system's CSPRNG failed.
    #[error("random number generator failed")]
    Rng,
}

fn data_aad(path: &str, version: i64) -> Vec<u8> {
    format!("keyhaven-secret-v1\0{path}\0{version}").into_bytes()
}

/// The AAD of a DEK's in-HSM wrapping: binds it to its row (path and version).
pub fn dek_aad(path: &str, version: i64) -> Vec<u8> {
    format!("keyhaven-dek-v1\0{path}\0{version}").into_bytes()
}

/// Told the duration of each HSM call (`wrap`, `unwrap`, `rewrap`), e.g. for a histogram.
pub type HsmObserver = Arc<dyn Fn(&'static str, std::time::Duration) + Send + Sync>;

/// Seals and opens secret versions with per-version DEKs wrapped by HSM KEKs.
pub struct Envelope {
    keystore: Keystore,
    cache: DekCache,
    observer: Option<HsmObserver>,
}

impl std::fmt::Debug for Envelope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Envelope")
            .field("keystore", &self.keystore)
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

impl Envelope {
    /// An envelope over an open keystore (its KEK prefix is the broker's).
    pub fn new(keystore: Keystore, cache: DekCache) -> Self {
        Envelope {
            keystore,
            cache,
            observer: None,
        }
    }

    /// Reports the duration of every HSM call (not DEK-cache hits) to `observer`.
    pub fn set_hsm_observer(&mut self, observer: HsmObserver) {
        self.observer = Some(observer);
    }

    fn observe(&self, op: &'static str, t0: std::time::Instant) {
        if let Some(o) = &self.observer {
            o(op, t0.elapsed());
        }
    }

    /// The keystore.
    pub fn keystore(&self) -> &Keystore {
        &self.keystore
    }

    /// The DEK cache.
    pub fn cache(&self) -> &DekCache {
        &self.cache
    }

    /// Encrypts `data` as version `version` of `path` under a fresh DEK wrapped by `kek`.
    pub async fn seal(
        &self,
        kek: KekId,
        path: &str,
        version: i64,
        data: &SecretData,
    ) -> Result<SealedVersion, CryptoError> {
        let mut dek = Zeroizing::new([0u8; DEK_LEN]);
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut dek[..]).map_err(|_| CryptoError::Rng)?;
        getrandom::fill(&mut nonce).map_err(|_| CryptoError::Rng)?;
        let plain = data.encode();
        let cipher = Aes256Gcm::new_from_slice(&dek[..]).map_err(|_| CryptoError::Integrity {
            path: path.into(),
            version,
        })?;
        let ciphertext = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &plain,
                    aad: &data_aad(path, version),
                },
            )
            .map_err(|_| CryptoError::Integrity {
                path: path.into(),
                version,
            })?;
        let t0 = std::time::Instant::now();
        let sealed = self
            .keystore
            .encrypt(kek, &dek_aad(path, version), &dek[..])
            .await;
        self.observe("wrap", t0);
        let sealed = sealed?;
        let wrapped = WrappedDek {
            kek_id: kek,
            iv: sealed.iv.to_vec(),
            ciphertext: sealed.ciphertext,
        };
        self.cache.put(path, &wrapped, &dek);
        Ok(SealedVersion {
            nonce: nonce.to_vec(),
            ciphertext,
            dek: wrapped,
        })
    }

    /// Unwraps the DEK of a stored version (cache first, then the HSM).
    pub async fn unwrap_dek(
        &self,
        path: &str,
        version: i64,
        w: &WrappedDek,
    ) -> Result<Zeroizing<[u8; DEK_LEN]>, CryptoError> {
        if let Some(d) = self.cache.get(w) {
            return Ok(d);
        }
        let integrity = || CryptoError::Integrity {
            path: path.into(),
            version,
        };
        let t0 = std::time::Instant::now();
        let plain = self
            .keystore
            .decrypt(w.kek_id, &dek_aad(path, version), &w.iv, &w.ciphertext)
            .await;
        self.observe("unwrap", t0);
        let plain = plain.map_err(|e| match e.kind() {
            keyhaven_hsm::ErrorKind::InvalidCiphertext => integrity(),
            _ => CryptoError::Hsm(e),
        })?;
        if plain.len() != DEK_LEN {
            return Err(integrity());
        }
        let mut dek = Zeroizing::new([0u8; DEK_LEN]);
        dek.copy_from_slice(&plain);
        self.cache.put(path, w, &dek);
        Ok(dek)
    }

    /// Decrypts a stored version. Any change to the row gives [`CryptoError::Integrity`].
    pub async fn open(
        &self,
        path: &str,
        version: i64,
        sealed: &SealedVersion,
    ) -> Result<SecretData, CryptoError> {
        let integrity = || CryptoError::Integrity {
            path: path.into(),
            version,
        };
        if sealed.nonce.len() != NONCE_LEN {
            return Err(integrity());
        }
        let dek = self.unwrap_dek(path, version, &sealed.dek).await?;
        let cipher = Aes256Gcm::new_from_slice(&dek[..]).map_err(|_| integrity())?;
        let mut plain = cipher
            .decrypt(
                Nonce::from_slice(&sealed.nonce),
                Payload {
                    msg: &sealed.ciphertext,
                    aad: &data_aad(path, version),
                },
            )
            .map_err(|_| integrity())?;
        let data = SecretData::decode(&plain).ok_or_else(integrity);
        plain.zeroize();
        data
    }

    /// Re-wraps DEKs under another KEK without touching the data (rotation): each
    /// `(path, version, wrapped DEK)` is unwrapped with its KEK and wrapped with `new_kek`,
    /// both inside the HSM, all in one HSM task. One result per item, in order. The DEK cache
    /// is not filled (a re-wrap pass must not evict the DEKs leases are using); once a new form
    /// is stored, [`DekCache::rekey`] moves a cached entry over.
    pub async fn rewrap_many(
        &self,
        items: &[(&str, i64, &WrappedDek)],
        new_kek: KekId,
    ) -> Result<Vec<Result<WrappedDek, CryptoError>>, CryptoError> {
        let calls = items
            .iter()
            .map(|(path, version, w)| keyhaven_hsm::Reencrypt {
                from: w.kek_id,
                aad: dek_aad(path, *version),
                iv: w.iv.clone(),
                ciphertext: w.ciphertext.clone(),
            })
            .collect();
        let t0 = std::time::Instant::now();
        let results = self.keystore.reencrypt_many(new_kek, calls).await;
        self.observe("rewrap", t0);
        let results = results?;
        Ok(items
            .iter()
            .zip(results)
            .map(|((path, version, _), r)| {
                let integrity = || CryptoError::Integrity {
                    path: (*path).into(),
                    version: *version,
                };
                let sealed = r.map_err(|e| match e.kind() {
                    keyhaven_hsm::ErrorKind::InvalidCiphertext => integrity(),
                    _ => CryptoError::Hsm(e),
                })?;
                if sealed.ciphertext.len() != DEK_LEN + keyhaven_hsm::GCM_TAG_LEN {
                    // What the old KEK unwrapped was not a DEK: the row was altered.
                    return Err(integrity());
                }
                Ok(WrappedDek {
                    kek_id: new_kek,
                    iv: sealed.iv.to_vec(),
                    ciphertext: sealed.ciphertext,
                })
            })
            .collect())
    }

    /// Re-wraps one DEK under another KEK (see [`Envelope::rewrap_many`]).
    pub async fn rewrap(
        &self,
        path: &str,
        version: i64,
        w: &WrappedDek,
        new_kek: KekId,
    ) -> Result<WrappedDek, CryptoError> {
        self.rewrap_many(&[(path, version, w)], new_kek)
            .await?
            .pop()
            .unwrap_or_else(|| {
                Err(CryptoError::Integrity {
                    path: path.into(),
                    version,
                })
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_round_trips_and_rejects_garbage() {
        let d = SecretData::from_pairs([("user", b"app".to_vec()), ("password", b"".to_vec())]);
        let e = d.encode();
        assert_eq!(SecretData::decode(&e).unwrap(), d);
        assert!(SecretData::decode(&e[..e.len() - 1]).is_none());
        assert!(SecretData::decode(&[0, 0, 0, 9, b'x']).is_none());
        assert_eq!(SecretData::decode(&[]).unwrap(), SecretData::default());
        assert!(!format!("{d:?}").contains("app"));
    }
}
