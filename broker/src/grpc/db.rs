//! The `Admin` calls of dynamic database credentials, mapped to [`Broker`] methods.

use zeroize::Zeroizing;

use super::*;

/// Longest connection URL accepted.
const MAX_URL_BYTES: usize = 4096;

impl Edge {
    pub(super) async fn put_db_connection(
        &self,
        req: Request<pb::PutDbConnectionRequest>,
    ) -> Result<Response<pb::PutDbConnectionResponse>, Status> {
        self.timed("PutDbConnection", async move {
            let caller = self.caller(&req).await?;
            let r = req.into_inner();
            let url = Zeroizing::new(r.url);
            if url.len() > MAX_URL_BYTES {
                return Err(BrokerError::InvalidArgument(format!(
                    "a connection URL is at most {MAX_URL_BYTES} bytes"
                ))
                .into());
            }
            let url = Zeroizing::new(
                std::str::from_utf8(&url)
                    .map_err(|_| BrokerError::InvalidArgument("the URL is not UTF-8".into()))?
                    .to_owned(),
            );
            let version = self.broker.put_db_connection(&caller, &r.name, url).await?;
            Ok(Response::new(pb::PutDbConnectionResponse {
                version: version as u64,
            }))
        })
        .await
    }

    pub(super) async fn put_db_role(
        &self,
        req: Request<pb::PutDbRoleRequest>,
    ) -> Result<Response<pb::PutDbRoleResponse>, Status> {
        self.timed("PutDbRole", async move {
            let caller = self.caller(&req).await?;
            let r = req.into_inner();
            self.broker
                .put_db_role(&caller, &r.connection, &r.role, &r.yaml)
                .await?;
            Ok(Response::new(pb::PutDbRoleResponse {}))
        })
        .await
    }

    pub(super) async fn list_db_roles(
        &self,
        req: Request<pb::ListDbRolesRequest>,
    ) -> Result<Response<pb::ListDbRolesResponse>, Status> {
        self.timed("ListDbRoles", async move {
            let caller = self.caller(&req).await?;
            let roles = self.broker.list_db_roles(&caller).await?;
            Ok(Response::new(pb::ListDbRolesResponse {
                roles: roles
                    .into_iter()
                    .map(|(connection, role, yaml)| pb::DbRoleInfo {
                        connection,
                        role,
                        yaml,
                    })
                    .collect(),
            }))
        })
        .await
    }

    pub(super) async fn db_status(
        &self,
        req: Request<pb::DbStatusRequest>,
    ) -> Result<Response<pb::DbStatusResponse>, Status> {
        self.timed("DbStatus", async move {
            let caller = self.caller(&req).await?;
            let s = self.broker.db_status(&caller).await?;
            Ok(Response::new(pb::DbStatusResponse {
                counts: s
                    .counts
                    .into_iter()
                    .map(|c| pb::DbCredentialCount {
                        connection: c.connection,
                        role: c.role,
                        state: c.state,
                        count: c.count.max(0) as u64,
                    })
                    .collect(),
                pending_drops: s
                    .pending_drops
                    .into_iter()
                    .map(|c| pb::DbPendingDrop {
                        lease_id: c.lease_id,
                        connection: c.connection,
                        role: c.role,
                        username: c.username,
                        attempts: c.attempts.max(0) as u64,
                        next_attempt_unix_ms: c.next_attempt_ms,
                        last_error: c.last_error.unwrap_or_default(),
                    })
                    .collect(),
                marker: s.marker,
            }))
        })
        .await
    }

    pub(super) async fn db_reconcile(
        &self,
        req: Request<pb::DbReconcileRequest>,
    ) -> Result<Response<pb::DbReconcileResponse>, Status> {
        self.timed("DbReconcile", async move {
            let caller = self.caller(&req).await?;
            let r = req.into_inner();
            let out = self
                .broker
                .reconcile_db_by(&caller, &r.connection, r.dry_run)
                .await?;
            Ok(Response::new(pb::DbReconcileResponse {
                dropped_roles: out.dropped_roles,
                ended_leases: out.ended_leases,
            }))
        })
        .await
    }

    pub(super) async fn rotate_db_root(
        &self,
        req: Request<pb::RotateDbRootRequest>,
    ) -> Result<Response<pb::RotateDbRootResponse>, Status> {
        self.timed("RotateDbRoot", async move {
            let caller = self.caller(&req).await?;
            let version = self
                .broker
                .rotate_db_root(&caller, &req.get_ref().name)
                .await?;
            Ok(Response::new(pb::RotateDbRootResponse {
                version: version as u64,
            }))
        })
        .await
    }

    pub(super) async fn delete_db_role(
        &self,
        req: Request<pb::DeleteDbRoleRequest>,
    ) -> Result<Response<pb::DeleteDbRoleResponse>, Status> {
        self.timed("DeleteDbRole", async move {
            let caller = self.caller(&req).await?;
            let r = req.into_inner();
            self.broker
                .delete_db_role(&caller, &r.connection, &r.role)
                .await?;
            Ok(Response::new(pb::DeleteDbRoleResponse {}))
        })
        .await
    }

    pub(super) async fn delete_db_connection(
        &self,
        req: Request<pb::DeleteDbConnectionRequest>,
    ) -> Result<Response<pb::DeleteDbConnectionResponse>, Status> {
        self.timed("DeleteDbConnection", async move {
            let caller = self.caller(&req).await?;
            let r = req.into_inner();
            let n = self
                .broker
                .delete_db_connection(&caller, &r.name, r.database_gone)
                .await?;
            Ok(Response::new(pb::DeleteDbConnectionResponse {
                versions_destroyed: n,
            }))
        })
        .await
    }
}
