//! A test's gRPC client of a running broker: the workload's Leases service (with a token) and
//! the operator's Admin service (with the bootstrap credential), over one TLS channel.

use keyhaven_proto::broker::v1::admin_client::AdminClient;
use keyhaven_proto::broker::v1::leases_client::LeasesClient;
use keyhaven_proto::broker::v1::*;
use testkit::pki::DevPki;
use tonic::transport::Channel;

use crate::broker::{authed, tls_channel, BrokerProc, BOOTSTRAP};

/// A broker as a workload and an operator reach it.
#[derive(Debug)]
pub struct BrokerClient {
    /// The Admin service (calls made with [`BOOTSTRAP`]).
    pub admin: AdminClient<Channel>,
    /// The Leases service.
    pub leases: LeasesClient<Channel>,
}

impl BrokerClient {
    /// Connects to `b`, trusting the CA of `pki`.
    pub async fn connect(b: &BrokerProc, pki: &DevPki) -> BrokerClient {
        let ch = tls_channel(&b.addr, &pki.ca).await;
        BrokerClient {
            admin: AdminClient::new(ch.clone()),
            leases: LeasesClient::new(ch),
        }
    }

    /// Applies the policy document `yaml` (or asks what it would do, with `dry_run`).
    pub async fn apply(&mut self, yaml: &str, dry_run: bool) -> ApplyPoliciesResponse {
        self.admin
            .apply_policies(authed(
                ApplyPoliciesRequest {
                    yaml: yaml.into(),
                    dry_run,
                },
                BOOTSTRAP,
            ))
            .await
            .expect("apply policies")
            .into_inner()
    }

    /// Puts a secret at `path` (one key, `password`).
    pub async fn put(&mut self, path: &str) {
        self.put_data(path, &[("password", "s3cret-value")]).await;
    }

    /// Puts a secret at `path` with these keys and values.
    pub async fn put_data(&mut self, path: &str, kv: &[(&str, &str)]) {
        let data = kv
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect();
        self.admin
            .put_secret(authed(
                PutSecretRequest {
                    path: path.into(),
                    data,
                },
                BOOTSTRAP,
            ))
            .await
            .expect("put a secret");
    }

    /// Leases `path` with `token` (the policy's TTL).
    pub async fn lease(&mut self, token: &str, path: &str) -> Result<LeaseResponse, tonic::Status> {
        self.leases
            .lease(authed(
                LeaseRequest {
                    path: path.into(),
                    ttl_seconds: 0,
                },
                token,
            ))
            .await
            .map(tonic::Response::into_inner)
    }

    /// Renews lease `id` with `token` (the policy's TTL).
    pub async fn renew(&mut self, token: &str, id: &str) -> Result<RenewResponse, tonic::Status> {
        self.leases
            .renew(authed(
                RenewRequest {
                    lease_id: id.into(),
                    increment_seconds: 0,
                },
                token,
            ))
            .await
            .map(tonic::Response::into_inner)
    }

    /// Revokes lease `id` as its holder (`token`).
    pub async fn revoke(&mut self, token: &str, id: &str) -> Result<(), tonic::Status> {
        self.leases
            .revoke(authed(
                RevokeRequest {
                    lease_id: id.into(),
                },
                token,
            ))
            .await
            .map(drop)
    }

    /// Lease `id` as the operator lists it, ended or not.
    pub async fn lease_info(&mut self, id: &str) -> LeaseInfo {
        let mut l = self
            .admin
            .list_leases(authed(
                ListLeasesRequest {
                    selector: Some(LeaseSelector {
                        lease_id: id.into(),
                        ..Default::default()
                    }),
                    include_ended: true,
                },
                BOOTSTRAP,
            ))
            .await
            .expect("list leases")
            .into_inner()
            .leases;
        assert_eq!(l.len(), 1, "{l:?}");
        l.remove(0)
    }

    /// The replica registry.
    pub async fn replicas(&mut self) -> ListReplicasResponse {
        self.admin
            .list_replicas(authed(ListReplicasRequest {}, BOOTSTRAP))
            .await
            .expect("list replicas")
            .into_inner()
    }

    /// The audit records after `after_seq` (at most 1,000), as the broker reads them from its
    /// database.
    pub async fn audit_tail(&mut self, after_seq: i64) -> Vec<keyhaven_broker::audit::AuditRecord> {
        self.admin
            .audit_tail(authed(
                AuditTailRequest {
                    after_seq,
                    limit: 1000,
                },
                BOOTSTRAP,
            ))
            .await
            .expect("audit tail")
            .into_inner()
            .records
            .iter()
            .map(|l| keyhaven_broker::audit::AuditRecord::from_json_line(l).expect("audit line"))
            .collect()
    }

    /// Asserts that the broker verifies its whole audit chain.
    pub async fn audit_verifies(&mut self) {
        let v = self
            .admin
            .audit_verify(authed(AuditVerifyRequest::default(), BOOTSTRAP))
            .await
            .expect("audit verify")
            .into_inner();
        assert!(v.ok, "{v:?}");
    }
}
