//! Authentication at the service: the [`Authenticator`](crate::auth::Authenticator) decides,
//! this stores the attempt's audit record (with the request's own record for a success; at
//! once for a refusal that names an identity; counted per peer and written once per interval
//! for one that does not, see `auth_failures`) and counts refusals.

use super::*;
use crate::auth::Refusal;

impl Authenticated {
    /// Writes the authentication record now (for requests that have no record of their own
    /// or are refused before they get one), returning the caller.
    pub async fn commit(self, broker: &Broker) -> Result<Caller> {
        if let Some(ev) = self.audit {
            broker.audit(ev).await?;
        }
        Ok(self.caller)
    }
}

impl Broker {
    /// Verifies a bearer credential: a ServiceAccount token (or, in dev mode, a dev token), or
    /// the bootstrap admin credential. Every attempt is audited.
    pub async fn authenticate(&self, credential: &str) -> Result<Caller> {
        self.authenticate_deferred(credential)
            .await?
            .commit(self)
            .await
    }

    /// Like [`Broker::authenticate`], but a successful authentication's audit record is not
    /// written yet: it travels with the request ([`Authenticated`]) and is stored in the same
    /// transaction as the request's own record (one commit per request instead of two).
    /// A refusal is audited at once when it names an identity, else counted for the next
    /// aggregated record ([`Broker::flush_auth_failures`]).
    pub async fn authenticate_deferred(&self, credential: &str) -> Result<Authenticated> {
        self.authenticate_from(None, credential).await
    }

    /// [`Broker::authenticate_deferred`] for a request from `peer`.
    pub async fn authenticate_from(
        &self,
        peer: Option<std::net::IpAddr>,
        credential: &str,
    ) -> Result<Authenticated> {
        let attempt = self.authenticator.authenticate(credential).await;
        match attempt.verdict {
            Ok(caller) => Ok(Authenticated {
                caller,
                audit: Some(attempt.event),
            }),
            Err(refusal) if attempt.event.identity.is_none() => {
                self.auth_failed(peer, refusal.reason(), attempt.event.outcome);
                Err(refusal.into())
            }
            Err(refusal) => {
                self.metrics.auth_failure(refusal.reason());
                self.audit(attempt.event).await?;
                Err(refusal.into())
            }
        }
    }

    /// Whether `credential` is known good without verification work (the bootstrap
    /// credential, or a token whose verdict is remembered): such a request skips the
    /// pre-authentication limits.
    pub fn credential_known(&self, credential: &str) -> bool {
        self.authenticator.is_known(credential)
    }
}

impl From<Refusal> for BrokerError {
    fn from(r: Refusal) -> Self {
        if r.is_unavailable() {
            BrokerError::unavailable_by(
                match &r {
                    Refusal::Token(_) => "token keys",
                    Refusal::Review(_) => "token review",
                },
                r,
            )
        } else {
            BrokerError::Unauthenticated(r.reason().to_owned())
        }
    }
}
