//! What workloads send the broker, as async workers over TLS: `Lease` of a secret path with
//! the client's own ServiceAccount token, and `Renew` of a lease the client holds. Every
//! answer is checked (the lease id names the caller and the path, the data is what was put,
//! a renewal extends). Also the operator's setup: the policy and the secrets, through the
//! Admin API with the bootstrap credential.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use keyhaven_broker::auth::DevIssuer;
use keyhaven_proto::broker::v1::admin_client::AdminClient;
use keyhaven_proto::broker::v1::leases_client::LeasesClient;
use keyhaven_proto::broker::v1::{
    ApplyPoliciesRequest, LeaseRequest, PutSecretRequest, RenewRequest,
};
use secrecy::{ExposeSecret, SecretString};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::load::{self, Summary, Window, Worker};

/// Namespace of every load client (the policy allows `bench-*`).
pub const NAMESPACE: &str = "bench-load";
/// Secrets put before the run; clients cycle through them.
pub const SECRETS: usize = 10;
/// Lifetime of the minted client tokens (the run is much shorter).
const TOKEN_TTL: Duration = Duration::from_secs(3600);
/// Policy lease TTL: what Lease grants and what a Renew extends by.
pub const LEASE_TTL: Duration = Duration::from_secs(300);

/// The policy of the run: read on `bench/**` for any service account of a `bench-*`
/// namespace, a 5-minute lease renewable for 12 hours (so no renewal in the run reaches
/// its maximum).
pub const POLICY_YAML: &str = r#"
policies:
- name: bench
  subjects: [{namespace: "bench-*", serviceaccount: "*"}]
  paths: ["bench/**"]
  capabilities: [read]
  ttl: 5m
  max_ttl: 12h
"#;

/// One secret as put: path and values (random bench data, not real secrets).
pub struct BenchSecret {
    /// `bench/secret-<k>`.
    pub path: String,
    /// Its key/value data.
    pub data: BTreeMap<String, Vec<u8>>,
}

impl std::fmt::Debug for BenchSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BenchSecret")
            .field("path", &self.path)
            .field("keys", &self.data.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// [`SECRETS`] secrets with random values: a username and a 32-byte password each.
pub fn secrets() -> anyhow::Result<Vec<BenchSecret>> {
    (0..SECRETS)
        .map(|k| {
            let password = testkit::random::pin()?;
            Ok(BenchSecret {
                path: format!("bench/secret-{k}"),
                data: [
                    ("username".to_owned(), format!("bench-{k}").into_bytes()),
                    ("password".to_owned(), password.as_bytes().to_vec()),
                ]
                .into(),
            })
        })
        .collect()
}

/// One load client: its own service account and token.
pub struct ClientId {
    /// Service account name (`client-<i>`).
    pub service_account: String,
    token: SecretString,
}

impl std::fmt::Debug for ClientId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientId")
            .field("service_account", &self.service_account)
            .finish_non_exhaustive()
    }
}

impl ClientId {
    /// The token (for the JWT baseline).
    pub fn token(&self) -> &str {
        self.token.expose_secret()
    }

    pub(crate) fn bearer(&self) -> anyhow::Result<MetadataValue<Ascii>> {
        bearer(self.token.expose_secret())
    }
}

/// `Bearer <credential>` as metadata, marked sensitive (never shown by `Debug`).
pub(crate) fn bearer(credential: &str) -> anyhow::Result<MetadataValue<Ascii>> {
    let mut v: MetadataValue<Ascii> = format!("Bearer {credential}")
        .parse()
        .map_err(|_| anyhow::anyhow!("credential is not valid metadata"))?;
    v.set_sensitive(true);
    Ok(v)
}

/// Mints a token for each of `n` service accounts `client-0..n` in [`NAMESPACE`], each
/// bound to its own pod.
pub fn mint_clients(issuer: &DevIssuer, n: usize) -> anyhow::Result<Vec<ClientId>> {
    (0..n)
        .map(|i| {
            let sa = format!("client-{i}");
            let token = issuer
                .mint(NAMESPACE, &sa, Some(&format!("{sa}-0")), TOKEN_TTL)
                .context("mint a dev token")?;
            Ok(ClientId {
                service_account: sa,
                token: SecretString::from(token),
            })
        })
        .collect()
}

/// The broker's TLS endpoint, verified against the run's CA.
pub fn endpoint(url: &str, ca: &Path) -> anyhow::Result<Endpoint> {
    let ca = std::fs::read(ca).with_context(|| format!("read {}", ca.display()))?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name(testkit::pki::SERVER_NAME);
    Endpoint::from_shared(url.to_owned())
        .context("broker endpoint")?
        .connect_timeout(Duration::from_secs(5))
        .tls_config(tls)
        .context("TLS config")
}

/// `clients` Leases clients, `per_channel` to a connection (one TLS connection each), the
/// connections spread over `eps` (one per broker replica) in turn.
pub(crate) async fn clients(
    eps: &[Endpoint],
    clients: usize,
    per_channel: usize,
) -> anyhow::Result<Vec<LeasesClient<Channel>>> {
    let per_channel = per_channel.max(1);
    let mut channels = Vec::new();
    for (_, ep) in (0..clients.div_ceil(per_channel)).zip(eps.iter().cycle()) {
        channels.push(ep.connect().await.context("connect to the broker")?);
    }
    Ok((0..clients)
        .map(|i| LeasesClient::new(channels[i / per_channel].clone()))
        .collect())
}

pub(crate) fn status_text(s: &tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

pub(crate) fn authed<T>(msg: T, auth: &MetadataValue<Ascii>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert("authorization", auth.clone());
    r
}

/// The operator's setup: applies [`POLICY_YAML`] and puts every secret (version 1).
pub async fn setup(
    ep: &Endpoint,
    bootstrap: &SecretString,
    secrets: &[BenchSecret],
) -> anyhow::Result<()> {
    let auth = bearer(bootstrap.expose_secret())?;
    let mut admin = AdminClient::new(ep.connect().await.context("connect to the broker")?);
    admin
        .apply_policies(authed(
            ApplyPoliciesRequest {
                yaml: POLICY_YAML.to_owned(),
                ..Default::default()
            },
            &auth,
        ))
        .await
        .map_err(|s| anyhow::anyhow!("ApplyPolicies: {}", status_text(&s)))?;
    for s in secrets {
        let v = admin
            .put_secret(authed(
                PutSecretRequest {
                    path: s.path.clone(),
                    data: s.data.clone().into_iter().collect(),
                },
                &auth,
            ))
            .await
            .map_err(|e| anyhow::anyhow!("PutSecret {}: {}", s.path, status_text(&e)))?
            .into_inner()
            .version;
        anyhow::ensure!(v == 1, "PutSecret {} made version {v}, not 1", s.path);
    }
    Ok(())
}

/// One Lease, checked: the lease id names this caller and path, the data is what was put.
async fn lease_checked(
    client: &mut LeasesClient<Channel>,
    auth: &MetadataValue<Ascii>,
    prefix: &str,
    secret: &BenchSecret,
) -> Result<String, String> {
    let r = client
        .lease(authed(
            LeaseRequest {
                path: secret.path.clone(),
                ttl_seconds: 0,
            },
            auth,
        ))
        .await
        .map_err(|s| status_text(&s))?
        .into_inner();
    let data: BTreeMap<&str, &[u8]> = r
        .data
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_slice()))
        .collect();
    let want: BTreeMap<&str, &[u8]> = secret
        .data
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_slice()))
        .collect();
    let id_ok = r
        .lease_id
        .strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix(secret.path.as_str()))
        .is_some_and(|rest| rest.len() > 1);
    if !id_ok || r.version != 1 || data != want || r.ttl_seconds == 0 {
        return Err(format!(
            "Lease {} answered lease {:?}, version {}, ttl {} s, {} keys{}",
            secret.path,
            r.lease_id,
            r.version,
            r.ttl_seconds,
            r.data.len(),
            if data == want { "" } else { " (wrong data)" }
        ));
    }
    Ok(r.lease_id)
}

struct LeaseWorker {
    client: LeasesClient<Channel>,
    auth: MetadataValue<Ascii>,
    prefix: String,
    secrets: Arc<Vec<BenchSecret>>,
    next: usize,
}

impl Worker for LeaseWorker {
    async fn call(&mut self) -> Result<(), String> {
        let s = &self.secrets[self.next % self.secrets.len()];
        self.next = self.next.wrapping_add(1);
        lease_checked(&mut self.client, &self.auth, &self.prefix, s)
            .await
            .map(|_| ())
    }
}

struct RenewWorker {
    client: LeasesClient<Channel>,
    auth: MetadataValue<Ascii>,
    lease_id: String,
}

impl Worker for RenewWorker {
    async fn call(&mut self) -> Result<(), String> {
        let r = self
            .client
            .renew(authed(
                RenewRequest {
                    lease_id: self.lease_id.clone(),
                    increment_seconds: 0,
                },
                &self.auth,
            ))
            .await
            .map_err(|s| status_text(&s))?
            .into_inner();
        // The policy TTL (rounded up to whole seconds), and no newer version was put.
        if r.ttl_seconds == 0 || r.ttl_seconds > LEASE_TTL.as_secs() + 1 || r.newer_version {
            return Err(format!(
                "Renew answered ttl {} s, newer_version {}",
                r.ttl_seconds, r.newer_version
            ));
        }
        Ok(())
    }
}

pub(crate) fn prefix(c: &ClientId) -> String {
    format!("{NAMESPACE}/{}/", c.service_account)
}

/// Lease load: the first `n` clients, each leasing the secrets in turn (client `i` starts
/// at secret `i`) with its own token, for `window`; their connections spread over `eps`.
pub async fn lease(
    eps: &[Endpoint],
    ids: &[ClientId],
    n: usize,
    per_channel: usize,
    secrets: &Arc<Vec<BenchSecret>>,
    window: Window,
) -> anyhow::Result<Summary> {
    let workers = clients(eps, n, per_channel)
        .await?
        .into_iter()
        .zip(ids)
        .enumerate()
        .map(|(i, (client, id))| {
            Ok(LeaseWorker {
                client,
                auth: id.bearer()?,
                prefix: prefix(id),
                secrets: secrets.clone(),
                next: i,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    load::drive_async(workers, window).await
}

/// Renew load: the first `n` clients each take one lease (before the window, not
/// measured), then renew it back to back for `window`.
pub async fn renew(
    eps: &[Endpoint],
    ids: &[ClientId],
    n: usize,
    per_channel: usize,
    secrets: &[BenchSecret],
    window: Window,
) -> anyhow::Result<Summary> {
    let mut workers = Vec::with_capacity(n);
    for (i, (mut client, id)) in clients(eps, n, per_channel)
        .await?
        .into_iter()
        .zip(ids)
        .enumerate()
    {
        let auth = id.bearer()?;
        let secret = &secrets[i % secrets.len()];
        let lease_id = lease_checked(&mut client, &auth, &prefix(id), secret)
            .await
            .map_err(|e| anyhow::anyhow!("lease to renew: {e}"))?;
        workers.push(RenewWorker {
            client,
            auth,
            lease_id,
        });
    }
    load::drive_async(workers, window).await
}

/// A few checked Leases and Renews by the first client (the memory reading follows them).
pub async fn touch(
    ep: &Endpoint,
    id: &ClientId,
    secrets: &[BenchSecret],
    rounds: usize,
) -> anyhow::Result<()> {
    let mut client = LeasesClient::new(ep.connect().await.context("connect to the broker")?);
    let auth = id.bearer()?;
    for k in 0..rounds {
        let lease_id = lease_checked(&mut client, &auth, &prefix(id), &secrets[k % secrets.len()])
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut w = RenewWorker {
            client: client.clone(),
            auth: auth.clone(),
            lease_id,
        };
        w.call().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    Ok(())
}
