//! [`Keystore`]: the async face of the pool, each call on a blocking thread under a semaphore.

use super::*;

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
            .map_err(|e| Error::internal_by(Op::Initialize, "open task failed", e))??;
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

    pub(super) async fn call<T, F>(&self, op: Op, f: F) -> Result<T>
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
        .map_err(|e| Error::internal_by(op, "blocking task failed", e))?
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
    /// stored keys): each item is [`BlockingKeystore::decrypt`]ed
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
                .map(|r| {
                    let plain = k.decrypt(&r.from, &r.aad, &r.iv, &r.ciphertext)?;
                    k.encrypt(&to, &r.aad, &plain)
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
