//! What the kube-apiserver sends, as async workers: Encrypt of a 32-byte DEK seed, and
//! Decrypt of a ciphertext made beforehand, carrying the key_id and annotations Encrypt
//! returned. Every answer is checked (Decrypt must give the seed back). The same code
//! drives the plugin and the echo baseline.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use keyhaven_proto::kms::v2::{DecryptRequest, EncryptRequest, EncryptResponse};

use crate::grpc::{self, KmsClient};
use crate::load::{self, Summary, Window, Worker};

/// Length of the apiserver's DEK seed.
pub const SEED_LEN: usize = 32;

/// One seed and what Encrypt made of it.
#[derive(Clone)]
pub struct Envelope {
    /// The plaintext seed.
    pub seed: Vec<u8>,
    /// Encrypt's answer: ciphertext, key_id, annotations.
    pub sealed: EncryptResponse,
}

impl std::fmt::Debug for Envelope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Envelope")
            .field("ciphertext_len", &self.sealed.ciphertext.len())
            .field("key_id", &self.sealed.key_id)
            .finish_non_exhaustive()
    }
}

/// `n` random seeds.
pub fn seeds(n: usize) -> anyhow::Result<Vec<Vec<u8>>> {
    (0..n)
        .map(|_| Ok(testkit::random::bytes::<SEED_LEN>()?.to_vec()))
        .collect()
}

/// An apiserver-like request uid (a UUID's length) for client `i`.
fn uid(i: usize) -> String {
    format!("00000000-0000-4000-8000-{i:012x}")
}

fn status_text(s: &tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

/// Encrypts every seed once through `client` and checks one Decrypt round trip.
pub async fn seal(client: &mut KmsClient, seeds: &[Vec<u8>]) -> anyhow::Result<Vec<Envelope>> {
    let mut out = Vec::with_capacity(seeds.len());
    for (i, seed) in seeds.iter().enumerate() {
        let sealed = client
            .encrypt(EncryptRequest {
                plaintext: seed.clone(),
                uid: uid(i),
            })
            .await
            .map_err(|s| anyhow::anyhow!("Encrypt: {}", status_text(&s)))?
            .into_inner();
        out.push(Envelope {
            seed: seed.clone(),
            sealed,
        });
    }
    let first = out.first().context("no seeds")?;
    let back = client
        .decrypt(decrypt_request(first, uid(0)))
        .await
        .map_err(|s| anyhow::anyhow!("Decrypt: {}", status_text(&s)))?
        .into_inner();
    anyhow::ensure!(
        back.plaintext == first.seed,
        "Decrypt did not give back the seed Encrypt was given"
    );
    Ok(out)
}

fn decrypt_request(e: &Envelope, uid: String) -> DecryptRequest {
    DecryptRequest {
        ciphertext: e.sealed.ciphertext.clone(),
        uid,
        key_id: e.sealed.key_id.clone(),
        annotations: e.sealed.annotations.clone(),
    }
}

struct EncryptWorker {
    client: KmsClient,
    seeds: Arc<Vec<Vec<u8>>>,
    key_id: Arc<str>,
    next: usize,
    stride: usize,
    uid: String,
}

impl Worker for EncryptWorker {
    async fn call(&mut self) -> Result<(), String> {
        let seed = self.seeds[self.next % self.seeds.len()].clone();
        self.next = self.next.wrapping_add(self.stride);
        let r = self
            .client
            .encrypt(EncryptRequest {
                plaintext: seed,
                uid: self.uid.clone(),
            })
            .await
            .map_err(|s| status_text(&s))?
            .into_inner();
        if r.ciphertext.is_empty() || *r.key_id != *self.key_id {
            return Err(format!(
                "Encrypt answered {} ciphertext bytes under key_id {:?}",
                r.ciphertext.len(),
                r.key_id
            ));
        }
        Ok(())
    }
}

struct DecryptWorker {
    client: KmsClient,
    envelopes: Arc<Vec<Envelope>>,
    next: usize,
    stride: usize,
    uid: String,
}

impl Worker for DecryptWorker {
    async fn call(&mut self) -> Result<(), String> {
        let e = &self.envelopes[self.next % self.envelopes.len()];
        self.next = self.next.wrapping_add(self.stride);
        let r = self
            .client
            .decrypt(decrypt_request(e, self.uid.clone()))
            .await
            .map_err(|s| status_text(&s))?
            .into_inner();
        if r.plaintext != e.seed {
            return Err("Decrypt returned the wrong plaintext".into());
        }
        Ok(())
    }
}

/// Encrypt load: `clients` concurrent clients on the socket for `window`.
pub async fn encrypt(
    socket: &Path,
    clients: usize,
    per_channel: usize,
    seeds: &Arc<Vec<Vec<u8>>>,
    key_id: &Arc<str>,
    window: Window,
) -> anyhow::Result<Summary> {
    let workers = grpc::clients(socket, clients, per_channel)
        .await?
        .into_iter()
        .enumerate()
        .map(|(i, client)| EncryptWorker {
            client,
            seeds: seeds.clone(),
            key_id: key_id.clone(),
            next: i,
            stride: clients,
            uid: uid(i),
        })
        .collect();
    load::drive_async(workers, window).await
}

/// Decrypt load: `clients` concurrent clients on the socket for `window`.
pub async fn decrypt(
    socket: &Path,
    clients: usize,
    per_channel: usize,
    envelopes: &Arc<Vec<Envelope>>,
    window: Window,
) -> anyhow::Result<Summary> {
    let workers = grpc::clients(socket, clients, per_channel)
        .await?
        .into_iter()
        .enumerate()
        .map(|(i, client)| DecryptWorker {
            client,
            envelopes: envelopes.clone(),
            next: i,
            stride: clients,
            uid: uid(i),
        })
        .collect();
    load::drive_async(workers, window).await
}
