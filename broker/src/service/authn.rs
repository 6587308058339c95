//! Authentication: a ServiceAccount token (or a dev token), or the bootstrap admin
//! credential, each attempt audited.

use super::*;

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
    /// Failed authentications are audited at once, as always.
    pub async fn authenticate_deferred(&self, credential: &str) -> Result<Authenticated> {
        if let Some(b) = &self.bootstrap {
            if constant_time_eq(credential.as_bytes(), b.expose_secret().as_bytes()) {
                return Ok(Authenticated {
                    caller: Caller::BootstrapAdmin,
                    audit: Some(
                        AuditEvent::new(now_ms(), EventKind::Authenticate, Outcome::Ok)
                            .with_identity("bootstrap-admin"),
                    ),
                });
            }
        }
        let mut result = self.verifier.verify(credential).await;
        if let (Err(_), Some(dev)) = (&result, &self.dev_verifier) {
            if let Ok(id) = dev.verify(credential).await {
                result = Ok(id);
            }
        }
        match result {
            Ok(id) => {
                if let Some(reviewer) = &self.token_review {
                    if let Err(e) = reviewer.review(credential, &id).await {
                        self.metrics.auth_failure(e.reason());
                        let outcome = if e.is_unavailable() {
                            tracing::warn!(identity = %id, error = %e, "token review failed");
                            Outcome::Error
                        } else {
                            tracing::info!(identity = %id, error = %e, "token refused by TokenReview");
                            Outcome::Denied
                        };
                        let mut ev = AuditEvent::new(now_ms(), EventKind::Authenticate, outcome)
                            .with_identity(id.subject())
                            .with_reason(e.reason());
                        if let Some(p) = &id.pod_name {
                            ev = ev.with_pod(p.clone());
                        }
                        self.audit(ev).await?;
                        return Err(if e.is_unavailable() {
                            BrokerError::unavailable("token review")
                        } else {
                            BrokerError::Unauthenticated(e.reason().to_owned())
                        });
                    }
                }
                let mut ev = AuditEvent::new(now_ms(), EventKind::Authenticate, Outcome::Ok)
                    .with_identity(id.subject());
                if let Some(p) = &id.pod_name {
                    ev = ev.with_pod(p.clone());
                }
                Ok(Authenticated {
                    caller: Caller::Workload(id),
                    audit: Some(ev),
                })
            }
            Err(e) => {
                self.metrics.auth_failure(e.reason());
                let outcome = if e.is_unavailable() {
                    Outcome::Error
                } else {
                    Outcome::Denied
                };
                self.audit(
                    AuditEvent::new(now_ms(), EventKind::Authenticate, outcome)
                        .with_reason(e.reason()),
                )
                .await?;
                Err(auth_error(&e))
            }
        }
    }
}

fn auth_error(e: &AuthError) -> BrokerError {
    if e.is_unavailable() {
        BrokerError::unavailable("token keys")
    } else {
        BrokerError::Unauthenticated(e.reason().to_owned())
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use sha2::Digest;
    // Compare digests so neither length nor content leaks through timing.
    let (x, y) = (sha2::Sha256::digest(a), sha2::Sha256::digest(b));
    x.iter()
        .zip(y.iter())
        .fold(0u8, |acc, (p, q)| acc | (p ^ q))
        == 0
}
