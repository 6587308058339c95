//! [`Authenticator`]: from a bearer credential to a [`Caller`] and the audit event that
//! records the attempt. The credential is a ServiceAccount token (verified locally, then, in
//! TokenReview mode, reviewed by the apiserver), a dev token (dev mode only), or the bootstrap
//! admin credential.
//!
//! It decides and describes; it does not write. The service stores the event — at once for a
//! refusal, with the request's own record for a success — and counts refusals in its metrics.

use std::sync::Arc;

use secrecy::{ExposeSecret, SecretString};

use super::{AuthError, TokenReviewError, TokenReviewer, Verifier};
use crate::audit::{now_ms, AuditEvent, EventKind, Outcome};
use crate::identity::Identity;

/// Who is calling, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A workload (or an operator's service account) with a verified token.
    Workload(Identity),
    /// The bootstrap admin credential: every admin capability, for first setup.
    BootstrapAdmin,
}

impl Caller {
    /// The name audit records carry: the service account's subject, or `bootstrap-admin`.
    pub fn audit_name(&self) -> String {
        match self {
            Caller::Workload(i) => i.subject(),
            Caller::BootstrapAdmin => BOOTSTRAP_ADMIN.into(),
        }
    }

    /// The pod the caller's token is bound to, if any.
    pub fn pod(&self) -> Option<String> {
        match self {
            Caller::Workload(i) => i.pod_name.clone(),
            Caller::BootstrapAdmin => None,
        }
    }
}

const BOOTSTRAP_ADMIN: &str = "bootstrap-admin";

/// Why a credential gave no caller.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The token did not verify locally (or could not be checked: no key set).
    #[error("token not accepted")]
    Token(#[source] AuthError),
    /// The token verified locally, but the apiserver's TokenReview refused it or could not be
    /// asked.
    #[error("token not accepted by TokenReview")]
    Review(#[source] TokenReviewError),
}

impl Refusal {
    /// A short, stable label for metrics and the audit record (`expired`, `bad_signature`,
    /// `token_review_denied`, ...).
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Token(e) => e.reason(),
            Refusal::Review(e) => e.reason(),
        }
    }

    /// True when the credential could not be checked (answer UNAVAILABLE, the client may
    /// retry); false when it was refused (UNAUTHENTICATED).
    pub fn is_unavailable(&self) -> bool {
        match self {
            Refusal::Token(e) => e.is_unavailable(),
            Refusal::Review(e) => e.is_unavailable(),
        }
    }
}

/// One authentication attempt: its verdict, and the audit event that records it (identity and
/// pod when known, the refusal's reason otherwise).
#[derive(Debug)]
pub struct Attempt {
    /// The caller, or why there is none.
    pub verdict: Result<Caller, Refusal>,
    /// The record of this attempt, still to be stored.
    pub event: AuditEvent,
}

/// Turns bearer credentials into callers. Cheap to share (`Arc` inside).
#[derive(Clone)]
pub struct Authenticator {
    verifier: Arc<Verifier>,
    dev_verifier: Option<Arc<Verifier>>,
    token_review: Option<Arc<TokenReviewer>>,
    bootstrap: Option<Arc<SecretString>>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("dev_mode", &self.dev_verifier.is_some())
            .field("token_review", &self.token_review.is_some())
            .field("bootstrap_admin", &self.bootstrap.is_some())
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// Accepts ServiceAccount tokens that `verifier` accepts.
    pub fn new(verifier: Arc<Verifier>) -> Self {
        Authenticator {
            verifier,
            dev_verifier: None,
            token_review: None,
            bootstrap: None,
        }
    }

    /// Also trusts dev-mode tokens (`brokerctl dev-token`). For demos and tests only.
    pub fn with_dev_verifier(mut self, v: Arc<Verifier>) -> Self {
        tracing::warn!(
            "DEV MODE: trusting tokens minted with the dev key — never use this in production"
        );
        self.dev_verifier = Some(v);
        self
    }

    /// TokenReview mode: a workload token that verifies locally is also reviewed by the
    /// apiserver (through `reviewer`, which caches verdicts for seconds).
    pub fn with_token_review(mut self, reviewer: Arc<TokenReviewer>) -> Self {
        self.token_review = Some(reviewer);
        self
    }

    /// Accepts this bootstrap admin credential.
    pub fn with_bootstrap_admin(mut self, credential: SecretString) -> Self {
        self.bootstrap = Some(Arc::new(credential));
        self
    }

    /// Whether dev-mode tokens are trusted.
    pub fn dev_mode(&self) -> bool {
        self.dev_verifier.is_some()
    }

    /// Whether `credential` is the bootstrap credential or a token whose successful verdict
    /// is remembered ([`Verifier::is_remembered`]): no signature work to accept it.
    pub fn is_known(&self, credential: &str) -> bool {
        let bootstrap = self
            .bootstrap
            .as_ref()
            .is_some_and(|b| constant_time_eq(credential.as_bytes(), b.expose_secret().as_bytes()));
        bootstrap
            || self.verifier.is_remembered(credential)
            || self
                .dev_verifier
                .as_ref()
                .is_some_and(|d| d.is_remembered(credential))
    }

    /// Checks `credential`. Never logs or returns it.
    pub async fn authenticate(&self, credential: &str) -> Attempt {
        if let Some(b) = &self.bootstrap {
            if constant_time_eq(credential.as_bytes(), b.expose_secret().as_bytes()) {
                return Attempt {
                    verdict: Ok(Caller::BootstrapAdmin),
                    event: event(Outcome::Ok).with_identity(BOOTSTRAP_ADMIN),
                };
            }
        }
        let mut verified = self.verifier.verify(credential).await;
        if let (Err(_), Some(dev)) = (&verified, &self.dev_verifier) {
            if let Ok(id) = dev.verify(credential).await {
                verified = Ok(id);
            }
        }
        let id = match verified {
            Ok(id) => id,
            Err(e) => return refused(Refusal::Token(e), None),
        };
        if let Some(reviewer) = &self.token_review {
            if let Err(e) = reviewer.review(credential, &id).await {
                if e.is_unavailable() {
                    tracing::warn!(identity = %id, error = %e, "token review failed");
                } else {
                    tracing::info!(identity = %id, error = %e, "token refused by TokenReview");
                }
                return refused(Refusal::Review(e), Some(&id));
            }
        }
        Attempt {
            event: with_identity(event(Outcome::Ok), &id),
            verdict: Ok(Caller::Workload(id)),
        }
    }
}

fn event(outcome: Outcome) -> AuditEvent {
    AuditEvent::new(now_ms(), EventKind::Authenticate, outcome)
}

fn with_identity(mut ev: AuditEvent, id: &Identity) -> AuditEvent {
    ev = ev.with_identity(id.subject());
    if let Some(p) = &id.pod_name {
        ev = ev.with_pod(p.clone());
    }
    ev
}

/// A refused attempt; `id` when the token verified locally but its review refused it.
fn refused(refusal: Refusal, id: Option<&Identity>) -> Attempt {
    let outcome = if refusal.is_unavailable() {
        Outcome::Error
    } else {
        Outcome::Denied
    };
    let mut ev = event(outcome).with_reason(refusal.reason());
    if let Some(id) = id {
        ev = with_identity(ev, id);
    }
    Attempt {
        verdict: Err(refusal),
        event: ev,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{dev_jwks_source, dev_verifier_config, DevIssuer};

    fn dev() -> (DevIssuer, Arc<Verifier>) {
        let issuer = DevIssuer::generate().unwrap();
        let verifier = Verifier::new(dev_verifier_config(), dev_jwks_source(&issuer)).unwrap();
        (issuer, Arc::new(verifier))
    }

    #[tokio::test]
    async fn bootstrap_credential_gives_the_bootstrap_admin() {
        let (_, v) = dev();
        let a = Authenticator::new(v).with_bootstrap_admin(SecretString::from("s3cret-boot"));
        let at = a.authenticate("s3cret-boot").await;
        assert_eq!(at.verdict.unwrap(), Caller::BootstrapAdmin);
        assert_eq!(at.event.identity.as_deref(), Some("bootstrap-admin"));
        let at = a.authenticate("s3cret-boo").await;
        assert_eq!(at.verdict.unwrap_err().reason(), "malformed");
        assert_eq!(at.event.outcome, Outcome::Denied);
        assert!(format!("{a:?}").find("s3cret").is_none());
    }

    #[tokio::test]
    async fn a_verified_token_gives_its_workload_and_pod() {
        let (issuer, v) = dev();
        let a = Authenticator::new(v);
        let token = issuer
            .mint(
                "team-a",
                "app",
                Some("app-1"),
                std::time::Duration::from_secs(60),
            )
            .unwrap();
        let at = a.authenticate(&token).await;
        match at.verdict.unwrap() {
            Caller::Workload(id) => assert_eq!(id.subject(), "team-a/app"),
            other => panic!("{other:?}"),
        }
        assert_eq!(at.event.kind, EventKind::Authenticate);
        assert_eq!(at.event.outcome, Outcome::Ok);
        assert_eq!(at.event.pod.as_deref(), Some("app-1"));
    }

    #[tokio::test]
    async fn a_refusal_names_its_reason_and_no_identity() {
        let (issuer, v) = dev();
        let token = issuer
            .mint("team-a", "app", None, std::time::Duration::from_secs(60))
            .unwrap();
        // A second dev issuer's verifier does not trust the first one's key.
        let (_, other) = dev();
        let at = Authenticator::new(other).authenticate(&token).await;
        let r = at.verdict.unwrap_err();
        assert!(!r.is_unavailable());
        assert_eq!(at.event.reason.as_deref(), Some(r.reason()));
        assert_eq!(at.event.identity, None);
        assert_eq!(at.event.outcome, Outcome::Denied);
        // ... unless dev mode trusts it.
        let at = Authenticator::new(Arc::new(
            Verifier::new(
                dev_verifier_config(),
                dev_jwks_source(&DevIssuer::generate().unwrap()),
            )
            .unwrap(),
        ))
        .with_dev_verifier(v)
        .authenticate(&token)
        .await;
        assert!(at.verdict.is_ok());
    }
}
