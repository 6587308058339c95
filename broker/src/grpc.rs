//! The gRPC edge: `Leases` and `Admin` over TLS (rustls), bearer credentials from the
//! `authorization` metadata, a per-identity rate limit, and the one mapping from
//! [`BrokerError`] to `tonic::Status`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keyhaven_proto::broker::v1 as pb;
use pb::admin_server::Admin;
use pb::leases_server::Leases;
use tonic::{Request, Response, Status};

use crate::audit::Checkpoint;
use crate::crypto::SecretData;
use crate::rate_limit::{PreAuthLimits, RateLimiter};

mod authn;
mod db;
use crate::service::{Broker, BrokerError, HEARTBEAT_STALE, POLICY_BOUND};
use crate::store::{LeaseFilter, LeaseRow};

/// Longest error message sent to a client, in bytes.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 1024;

/// Largest `Leases` request accepted (decoded size): the largest legitimate one is a Renew or
/// Revoke of a lease id of a 512-byte path, under 1 KiB.
pub const MAX_LEASES_MESSAGE_BYTES: usize = 8 * 1024;

/// Largest `Admin` request accepted (decoded size): a secret version or a policy document.
pub const MAX_ADMIN_MESSAGE_BYTES: usize = 4 << 20;

/// The one mapping from a broker failure to what the client sees. Client errors keep our own
/// text about the request; an unavailable or internal failure logs its whole cause chain here
/// and sends a fixed message that says what to do, never the cause (a database message, a
/// PKCS#11 return value, a path on the server).
/// A client error's text is cut to [`MAX_ERROR_MESSAGE_BYTES`], control characters escaped:
/// whatever part of the request a message quotes, it stays small.
impl From<BrokerError> for Status {
    fn from(e: BrokerError) -> Self {
        use tonic::Code;
        let text = || crate::bounded::message(&e.to_string(), MAX_ERROR_MESSAGE_BYTES);
        match &e {
            BrokerError::Unauthenticated(_) => Status::new(Code::Unauthenticated, text()),
            BrokerError::PermissionDenied(_) => Status::new(Code::PermissionDenied, text()),
            BrokerError::NotFound(_) => Status::new(Code::NotFound, text()),
            BrokerError::FailedPrecondition(_) => Status::new(Code::FailedPrecondition, text()),
            BrokerError::InvalidArgument(_) => Status::new(Code::InvalidArgument, text()),
            BrokerError::ResourceExhausted(_) => Status::new(Code::ResourceExhausted, text()),
            BrokerError::Unavailable { what, .. } => {
                tracing::warn!(error = %e.chain(), "request failed: unavailable");
                Status::new(
                    Code::Unavailable,
                    format!("unavailable: {what}; retry with back-off"),
                )
            }
            BrokerError::Internal { .. } => {
                tracing::error!(error = %e.chain(), "request failed: internal error");
                Status::new(
                    Code::Internal,
                    "internal error: the broker's log has the details",
                )
            }
        }
    }
}

/// Shared by both services.
#[derive(Debug, Clone)]
pub struct Edge {
    broker: Arc<Broker>,
    limiter: Arc<RateLimiter>,
    pre_auth: Arc<PreAuthLimits>,
    /// How long a refusal by `pre_auth` is held before it is answered.
    refusal_delay: Duration,
}

impl Edge {
    /// The edge over a broker: `limiter` per identity after authentication, `pre_auth` on
    /// verification work before it, whose refusals are answered after `refusal_delay`.
    pub fn new(
        broker: Arc<Broker>,
        limiter: Arc<RateLimiter>,
        pre_auth: Arc<PreAuthLimits>,
        refusal_delay: Duration,
    ) -> Self {
        Edge {
            broker,
            limiter,
            pre_auth,
            refusal_delay,
        }
    }
}

impl Edge {
    async fn timed<T>(
        &self,
        method: &'static str,
        fut: impl std::future::Future<Output = Result<Response<T>, Status>>,
    ) -> Result<Response<T>, Status> {
        let t0 = Instant::now();
        let r = fut.await;
        let code = match &r {
            Ok(_) => tonic::Code::Ok,
            Err(s) => s.code(),
        };
        self.broker.metrics().request(method, code, t0.elapsed());
        r
    }
}

fn secs(d: Duration) -> u64 {
    d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0))
}

#[tonic::async_trait]
impl Leases for Edge {
    async fn lease(
        &self,
        req: Request<pb::LeaseRequest>,
    ) -> Result<Response<pb::LeaseResponse>, Status> {
        self.timed("Lease", async move {
            let auth = self.authenticated(&req).await?;
            let r = req.into_inner();
            let ttl = (r.ttl_seconds > 0).then(|| Duration::from_secs(r.ttl_seconds));
            let g = self.broker.lease_authenticated(auth, &r.path, ttl).await?;
            Ok(Response::new(pb::LeaseResponse {
                lease_id: g.lease_id.clone(),
                version: g.version as u64,
                data: g
                    .data
                    .0
                    .iter()
                    .map(|(k, v)| (k.clone(), v.to_vec()))
                    .collect(),
                ttl_seconds: secs(g.ttl),
                renewable_until: g.renewable_until_unix,
            }))
        })
        .await
    }

    async fn renew(
        &self,
        req: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::RenewResponse>, Status> {
        self.timed("Renew", async move {
            let auth = self.authenticated(&req).await?;
            let r = req.into_inner();
            let inc = (r.increment_seconds > 0).then(|| Duration::from_secs(r.increment_seconds));
            let n = self
                .broker
                .renew_authenticated(auth, &r.lease_id, inc)
                .await?;
            Ok(Response::new(pb::RenewResponse {
                ttl_seconds: secs(n.ttl),
                renewable_until: n.renewable_until_unix,
                newer_version: n.newer_version,
            }))
        })
        .await
    }

    async fn revoke(
        &self,
        req: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        self.timed("Revoke", async move {
            let auth = self.authenticated(&req).await?;
            self.broker
                .revoke_authenticated(auth, &req.into_inner().lease_id)
                .await?;
            Ok(Response::new(pb::RevokeResponse {}))
        })
        .await
    }
}

/// Maps the wire selector to a filter (exactly one kind; none = all).
pub fn selector_filter(s: Option<pb::LeaseSelector>) -> Result<LeaseFilter, Status> {
    let Some(s) = s else {
        return Ok(LeaseFilter::All);
    };
    let bad = || {
        Status::invalid_argument(
            "selector: give one of lease_id, namespace, namespace+service_account, namespace+pod, path_prefix",
        )
    };
    match (
        s.lease_id.is_empty(),
        s.namespace.is_empty(),
        s.service_account.is_empty(),
        s.pod.is_empty(),
        s.path_prefix.is_empty(),
    ) {
        (true, true, true, true, true) => Ok(LeaseFilter::All),
        (false, true, true, true, true) => Ok(LeaseFilter::Id(s.lease_id)),
        (true, false, true, true, true) => Ok(LeaseFilter::Namespace(s.namespace)),
        (true, false, false, true, true) => Ok(LeaseFilter::Identity {
            namespace: s.namespace,
            service_account: s.service_account,
        }),
        (true, false, true, false, true) => Ok(LeaseFilter::Pod {
            namespace: s.namespace,
            pod: s.pod,
        }),
        (true, true, true, true, false) => Ok(LeaseFilter::PathPrefix(s.path_prefix)),
        _ => Err(bad()),
    }
}

fn lease_info(l: LeaseRow) -> pb::LeaseInfo {
    pb::LeaseInfo {
        lease_id: l.id,
        namespace: l.identity.namespace,
        service_account: l.identity.service_account,
        pod: l.identity.pod_name.unwrap_or_default(),
        path: l.path,
        version: l.version as u64,
        created_unix_ms: l.created_ms,
        expires_unix_ms: l.expires_ms,
        max_expires_unix_ms: l.max_expires_ms,
        renewals: l.renewals as u64,
        ended_unix_ms: l.ended_ms.unwrap_or(0),
        end_reason: l.end_reason.unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl Admin for Edge {
    async fn put_db_connection(
        &self,
        req: Request<pb::PutDbConnectionRequest>,
    ) -> Result<Response<pb::PutDbConnectionResponse>, Status> {
        Edge::put_db_connection(self, req).await
    }

    async fn put_db_role(
        &self,
        req: Request<pb::PutDbRoleRequest>,
    ) -> Result<Response<pb::PutDbRoleResponse>, Status> {
        Edge::put_db_role(self, req).await
    }

    async fn list_db_roles(
        &self,
        req: Request<pb::ListDbRolesRequest>,
    ) -> Result<Response<pb::ListDbRolesResponse>, Status> {
        Edge::list_db_roles(self, req).await
    }

    async fn db_status(
        &self,
        req: Request<pb::DbStatusRequest>,
    ) -> Result<Response<pb::DbStatusResponse>, Status> {
        Edge::db_status(self, req).await
    }

    async fn db_reconcile(
        &self,
        req: Request<pb::DbReconcileRequest>,
    ) -> Result<Response<pb::DbReconcileResponse>, Status> {
        Edge::db_reconcile(self, req).await
    }

    async fn rotate_db_root(
        &self,
        req: Request<pb::RotateDbRootRequest>,
    ) -> Result<Response<pb::RotateDbRootResponse>, Status> {
        Edge::rotate_db_root(self, req).await
    }

    async fn delete_db_role(
        &self,
        req: Request<pb::DeleteDbRoleRequest>,
    ) -> Result<Response<pb::DeleteDbRoleResponse>, Status> {
        Edge::delete_db_role(self, req).await
    }

    async fn delete_db_connection(
        &self,
        req: Request<pb::DeleteDbConnectionRequest>,
    ) -> Result<Response<pb::DeleteDbConnectionResponse>, Status> {
        Edge::delete_db_connection(self, req).await
    }

    async fn put_secret(
        &self,
        req: Request<pb::PutSecretRequest>,
    ) -> Result<Response<pb::PutSecretResponse>, Status> {
        self.timed("PutSecret", async move {
            let caller = self.caller(&req).await?;
            let r = req.into_inner();
            let v = self
                .broker
                .put_secret(&caller, &r.path, SecretData::from_pairs(r.data))
                .await?;
            Ok(Response::new(pb::PutSecretResponse { version: v as u64 }))
        })
        .await
    }

    async fn list_secrets(
        &self,
        req: Request<pb::ListSecretsRequest>,
    ) -> Result<Response<pb::ListSecretsResponse>, Status> {
        self.timed("ListSecrets", async move {
            let caller = self.caller(&req).await?;
            let paths = self
                .broker
                .list_secrets(&caller, &req.into_inner().prefix)
                .await?;
            Ok(Response::new(pb::ListSecretsResponse { paths }))
        })
        .await
    }

    async fn secret_metadata(
        &self,
        req: Request<pb::SecretMetadataRequest>,
    ) -> Result<Response<pb::SecretMetadataResponse>, Status> {
        self.timed("SecretMetadata", async move {
            let caller = self.caller(&req).await?;
            let vs = self
                .broker
                .secret_metadata(&caller, &req.into_inner().path)
                .await?;
            Ok(Response::new(pb::SecretMetadataResponse {
                versions: vs
                    .into_iter()
                    .map(|v| pb::SecretVersionMeta {
                        version: v.version as u64,
                        created_unix_ms: v.created_ms,
                        deleted_unix_ms: v.deleted_ms.unwrap_or(0),
                        destroyed_unix_ms: v.destroyed_ms.unwrap_or(0),
                        kek_id: v
                            .sealed
                            .map(|s| s.dek.kek_id.to_string())
                            .unwrap_or_default(),
                    })
                    .collect(),
            }))
        })
        .await
    }

    async fn delete_secret(
        &self,
        req: Request<pb::DeleteSecretRequest>,
    ) -> Result<Response<pb::DeleteSecretResponse>, Status> {
        self.timed("DeleteSecret", async move {
            let caller = self.caller(&req).await?;
            let r = req.into_inner();
            let n = self
                .broker
                .delete_secret(&caller, &r.path, r.destroy)
                .await?;
            Ok(Response::new(pb::DeleteSecretResponse { versions: n }))
        })
        .await
    }

    async fn apply_policies(
        &self,
        req: Request<pb::ApplyPoliciesRequest>,
    ) -> Result<Response<pb::ApplyPoliciesResponse>, Status> {
        self.timed("ApplyPolicies", async move {
            let caller = self.caller(&req).await?;
            let r = req.into_inner();
            let a = self
                .broker
                .apply_policies(&caller, &r.yaml, r.dry_run)
                .await?;
            Ok(Response::new(pb::ApplyPoliciesResponse {
                policies: a.policies as u64,
                generation: a.generation,
                ended: a.ended.into_iter().map(lease_info).collect(),
            }))
        })
        .await
    }

    async fn list_replicas(
        &self,
        req: Request<pb::ListReplicasRequest>,
    ) -> Result<Response<pb::ListReplicasResponse>, Status> {
        self.timed("ListReplicas", async move {
            let caller = self.caller(&req).await?;
            let (list, policy_generation) = self.broker.list_replicas(&caller).await?;
            Ok(Response::new(pb::ListReplicasResponse {
                replicas: list
                    .into_iter()
                    .map(|r| pb::Replica {
                        name: r.row.name,
                        version: r.row.version,
                        started_unix_ms: r.row.started_ms,
                        heartbeat_unix_ms: r.row.heartbeat_ms,
                        policy_generation: r.row.policy_generation,
                        primary_kek_id: r.row.primary_kek.unwrap_or_default(),
                        stale: r.stale,
                    })
                    .collect(),
                policy_generation,
                stale_after_ms: HEARTBEAT_STALE.as_millis() as i64,
                policy_bound_ms: POLICY_BOUND.as_millis() as i64,
            }))
        })
        .await
    }

    async fn list_policies(
        &self,
        req: Request<pb::ListPoliciesRequest>,
    ) -> Result<Response<pb::ListPoliciesResponse>, Status> {
        self.timed("ListPolicies", async move {
            let caller = self.caller(&req).await?;
            let yaml = self.broker.list_policies(&caller).await?;
            Ok(Response::new(pb::ListPoliciesResponse { yaml }))
        })
        .await
    }

    async fn list_leases(
        &self,
        req: Request<pb::ListLeasesRequest>,
    ) -> Result<Response<pb::ListLeasesResponse>, Status> {
        self.timed("ListLeases", async move {
            let caller = self.caller(&req).await?;
            let r = req.into_inner();
            let filter = selector_filter(r.selector)?;
            let leases = self
                .broker
                .list_leases(&caller, &filter, r.include_ended)
                .await?;
            Ok(Response::new(pb::ListLeasesResponse {
                leases: leases.into_iter().map(lease_info).collect(),
            }))
        })
        .await
    }

    async fn revoke_leases(
        &self,
        req: Request<pb::RevokeLeasesRequest>,
    ) -> Result<Response<pb::RevokeLeasesResponse>, Status> {
        self.timed("RevokeLeases", async move {
            let caller = self.caller(&req).await?;
            let filter = selector_filter(req.into_inner().selector)?;
            let lease_ids = self.broker.revoke_leases(&caller, &filter).await?;
            Ok(Response::new(pb::RevokeLeasesResponse { lease_ids }))
        })
        .await
    }

    async fn audit_verify(
        &self,
        req: Request<pb::AuditVerifyRequest>,
    ) -> Result<Response<pb::AuditVerifyResponse>, Status> {
        self.timed("AuditVerify", async move {
            let caller = self.caller(&req).await?;
            let anchor = req.into_inner().anchor;
            let anchor: Option<Checkpoint> = if anchor.is_empty() {
                None
            } else {
                Some(
                    anchor
                        .parse()
                        .map_err(|_| Status::invalid_argument("anchor must be seq:hash"))?,
                )
            };
            let r = self.broker.audit_verify(&caller, anchor.as_ref()).await?;
            Ok(Response::new(match r {
                Ok(rep) => pb::AuditVerifyResponse {
                    ok: true,
                    records: rep.records,
                    checkpoint: rep.checkpoint().to_string(),
                    error: String::new(),
                },
                Err(e) => pb::AuditVerifyResponse {
                    ok: false,
                    records: 0,
                    checkpoint: String::new(),
                    error: e.to_string(),
                },
            }))
        })
        .await
    }

    async fn audit_tail(
        &self,
        req: Request<pb::AuditTailRequest>,
    ) -> Result<Response<pb::AuditTailResponse>, Status> {
        self.timed("AuditTail", async move {
            let caller = self.caller(&req).await?;
            let r = req.into_inner();
            let limit = if r.limit == 0 {
                100
            } else {
                i64::from(r.limit)
            };
            let recs = self.broker.audit_tail(&caller, r.after_seq, limit).await?;
            Ok(Response::new(pb::AuditTailResponse {
                records: recs.iter().map(|r| r.to_json_line()).collect(),
            }))
        })
        .await
    }

    async fn key_status(
        &self,
        req: Request<pb::KeyStatusRequest>,
    ) -> Result<Response<pb::KeyStatusResponse>, Status> {
        self.timed("KeyStatus", async move {
            let caller = self.caller(&req).await?;
            let r = self.broker.key_report(&caller).await?;
            let w = r.rewrap;
            Ok(Response::new(pb::KeyStatusResponse {
                keks: r
                    .keks
                    .into_iter()
                    .map(|k| pb::KekStatus {
                        kek_id: k.kek_id,
                        label: k.label,
                        role: k.role.into(),
                        deks: k.deks.max(0) as u64,
                        created_unix_ms: k.created_ms.unwrap_or(0),
                        encryptions: k.encryptions.max(0) as u64,
                    })
                    .collect(),
                rewrap: Some(pb::RewrapProgress {
                    remaining: w.remaining.max(0) as u64,
                    moved: w.moved.max(0) as u64,
                    rate_per_second: w.rate_per_second,
                    eta_seconds: w
                        .eta
                        .map_or(-1, |d| i64::try_from(secs(d)).unwrap_or(i64::MAX)),
                    replicas: w.replicas.max(0) as u64,
                    last_batch_unix_ms: w.last_batch_ms,
                    unknown_kek_deks: w.unknown_kek_deks.max(0) as u64,
                }),
                auto_rotation: r.auto_rotation,
            }))
        })
        .await
    }

    async fn rotate_key(
        &self,
        req: Request<pb::RotateKeyRequest>,
    ) -> Result<Response<pb::RotateKeyResponse>, Status> {
        self.timed("RotateKey", async move {
            let caller = self.caller(&req).await?;
            let r = self.broker.rotate_key(&caller).await?;
            Ok(Response::new(pb::RotateKeyResponse {
                kek_id: r.kek.id.to_string(),
                label: r.kek.label,
                previous_kek_id: r.previous.map(|p| p.to_string()).unwrap_or_default(),
                deks_to_rewrap: r.deks_to_rewrap.max(0) as u64,
            }))
        })
        .await
    }

    async fn retire_key(
        &self,
        req: Request<pb::RetireKeyRequest>,
    ) -> Result<Response<pb::RetireKeyResponse>, Status> {
        self.timed("RetireKey", async move {
            let caller = self.caller(&req).await?;
            let k = self
                .broker
                .retire_key(&caller, &req.into_inner().kek_id)
                .await?;
            Ok(Response::new(pb::RetireKeyResponse {
                kek_id: k.id.to_string(),
                label: k.label,
            }))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cause as a database or HSM would word it: nothing of it may reach a client.
    #[derive(Debug, thiserror::Error)]
    #[error(
        "password authentication failed for user \"keyhaven\" at /var/lib/pg: CKR_PIN_INCORRECT"
    )]
    struct Leaky;

    const LEAKS: [&str; 3] = [
        "password authentication",
        "/var/lib/pg",
        "CKR_PIN_INCORRECT",
    ];

    #[test]
    fn every_code_sends_a_fixed_message_and_no_cause() {
        let store_down: BrokerError =
            crate::store::StoreError::Unavailable("connection refused to 10.0.0.7:5432".into())
                .into();
        let cases = [
            (
                BrokerError::Unauthenticated("token expired".into()),
                tonic::Code::Unauthenticated,
            ),
            (
                BrokerError::PermissionDenied("no policy grants read on a/b".into()),
                tonic::Code::PermissionDenied,
            ),
            (
                BrokerError::NotFound("lease x".into()),
                tonic::Code::NotFound,
            ),
            (
                BrokerError::FailedPrecondition("lease x expired".into()),
                tonic::Code::FailedPrecondition,
            ),
            (
                BrokerError::InvalidArgument("path is empty".into()),
                tonic::Code::InvalidArgument,
            ),
            (
                BrokerError::unavailable_by("database", Leaky),
                tonic::Code::Unavailable,
            ),
            (
                BrokerError::internal_by("secret encryption", Leaky),
                tonic::Code::Internal,
            ),
            (store_down, tonic::Code::Unavailable),
        ];
        for (e, code) in cases {
            let chain = e.chain();
            let s = Status::from(e);
            assert_eq!(s.code(), code);
            for leak in LEAKS
                .iter()
                .chain(["10.0.0.7", "connection refused"].iter())
            {
                assert!(
                    !s.message().contains(leak),
                    "{code:?} leaked {leak:?}: {}",
                    s.message()
                );
            }
            if matches!(code, tonic::Code::Unavailable) {
                assert!(s.message().contains("retry"), "{}", s.message());
                assert!(
                    chain.contains("refused") || chain.contains("CKR_PIN_INCORRECT"),
                    "the log keeps the cause: {chain}"
                );
            }
            if matches!(code, tonic::Code::Internal) {
                assert_eq!(
                    s.message(),
                    "internal error: the broker's log has the details"
                );
                assert!(chain.contains("CKR_PIN_INCORRECT"), "{chain}");
            }
        }
    }

    #[test]
    fn selectors_map_to_exactly_one_filter() {
        assert_eq!(selector_filter(None).unwrap(), LeaseFilter::All);
        let s = |f: fn(&mut pb::LeaseSelector)| {
            let mut x = pb::LeaseSelector::default();
            f(&mut x);
            selector_filter(Some(x))
        };
        assert_eq!(
            s(|x| x.lease_id = "l".into()).unwrap(),
            LeaseFilter::Id("l".into())
        );
        assert_eq!(
            s(|x| x.path_prefix = "a/b".into()).unwrap(),
            LeaseFilter::PathPrefix("a/b".into())
        );
        assert!(matches!(
            s(|x| {
                x.namespace = "n".into();
                x.pod = "p".into();
            })
            .unwrap(),
            LeaseFilter::Pod { .. }
        ));
        assert_eq!(
            s(|x| x.namespace = "n".into()).unwrap(),
            LeaseFilter::Namespace("n".into())
        );
        assert!(s(|x| x.service_account = "s".into()).is_err());
        assert!(s(|x| {
            x.lease_id = "l".into();
            x.path_prefix = "p".into();
        })
        .is_err());
    }
}
