//! Authentication at the edge: the bearer credential from the `authorization` metadata, the
//! limits before authentication (per peer address and per replica, for credentials that need
//! verification work; a refusal by them is answered after a delay) and the per-identity limit
//! after it.

use tonic::{Request, Status};

use super::Edge;
use crate::audit::Outcome;
use crate::service::{Authenticated, Caller};

impl Edge {
    /// The caller, its authentication record written now.
    pub(super) async fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        let a = self.authenticated(req).await?;
        Ok(a.commit(&self.broker).await?)
    }

    /// Verifies the bearer credential and applies the limits. The authentication's audit
    /// record is deferred: the lease API writes it with the request's own record. A refusal
    /// with no identity (no credential, a bad token, a limit before verification) is
    /// counted for the peer's aggregated record instead.
    pub(super) async fn authenticated<T>(&self, req: &Request<T>) -> Result<Authenticated, Status> {
        let peer = req.remote_addr().map(|a| a.ip());
        let cred = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|v| !v.is_empty());
        let Some(cred) = cred else {
            self.broker
                .auth_failed(peer, "missing_credential", Outcome::Denied);
            return Err(Status::unauthenticated(
                "missing `authorization: Bearer <token>` metadata",
            ));
        };
        if !self.broker.credential_known(cred) {
            if let Err(limited) = self.pre_auth.admit(peer) {
                self.broker
                    .auth_failed(peer, limited.reason(), Outcome::Denied);
                // Held, not answered at once: a client that retries as soon as it is refused
                // makes one attempt per delay per stream, instead of costing the broker a
                // request for every round trip. Costs a timer, no CPU.
                tokio::time::sleep(self.refusal_delay).await;
                return Err(Status::resource_exhausted(
                    "too many authentication attempts with unverified tokens; retry with back-off",
                ));
            }
        }
        let a = self.broker.authenticate_from(peer, cred).await?;
        let key = match &a.caller {
            Caller::Workload(id) => id.subject(),
            Caller::BootstrapAdmin => "bootstrap-admin".into(),
        };
        if !self.limiter.allow(&key) {
            // Still audit the authentication; then refuse.
            a.commit(&self.broker).await?;
            return Err(Status::resource_exhausted(format!(
                "rate limit for {key} exceeded; slow down"
            )));
        }
        Ok(a)
    }
}
