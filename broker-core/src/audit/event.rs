//! [`AuditEvent`]: what one audited call records, and the checks on its shape.

use super::*;

/// One audited call, before it is placed in the chain. Holds no secret: see the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    /// When, in Unix milliseconds.
    pub time_ms: i64,
    /// What kind of call.
    pub kind: EventKind,
    /// Who asked: `namespace/serviceaccount` (see `Identity::subject`), if known.
    pub identity: Option<String>,
    /// The caller's pod name, if known.
    pub pod: Option<String>,
    /// The secret path, or the path prefix of a bulk revocation, if any.
    pub path: Option<String>,
    /// The lease id, if any.
    pub lease_id: Option<String>,
    /// How it ended.
    pub outcome: Outcome,
    /// Why, as a short code (`token_expired`, `no_policy`...) — never a message, value or token.
    pub reason: Option<String>,
}

impl AuditEvent {
    /// An event with no identity, pod, path, lease or reason yet (add them with `with_*`).
    pub fn new(time_ms: i64, kind: EventKind, outcome: Outcome) -> Self {
        AuditEvent {
            time_ms,
            kind,
            identity: None,
            pod: None,
            path: None,
            lease_id: None,
            outcome,
            reason: None,
        }
    }

    /// Sets the identity (`namespace/serviceaccount`).
    pub fn with_identity(mut self, identity: impl Into<String>) -> Self {
        self.identity = Some(identity.into());
        self
    }

    /// Sets the pod name.
    pub fn with_pod(mut self, pod: impl Into<String>) -> Self {
        self.pod = Some(pod.into());
        self
    }

    /// Sets the path.
    pub fn with_path(mut self, path: impl Into<String>) -> Self {
        self.path = Some(path.into());
        self
    }

    /// Sets the lease id.
    pub fn with_lease_id(mut self, lease_id: impl Into<String>) -> Self {
        self.lease_id = Some(lease_id.into());
        self
    }

    /// Sets the reason code.
    pub fn with_reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    /// Checks the event is fit to record: `reason` and an admin verb are short codes
    /// ([`is_code`]); identity, pod, path and lease id are at most [`MAX_FIELD_LEN`] bytes
    /// without control characters; and no field looks like a JWT. A guard against a caller
    /// passing an error message or a token by mistake, not a proof that nothing is secret.
    pub fn validate(&self) -> Result<(), InvalidEvent> {
        if let EventKind::Admin(verb) = &self.kind {
            if !is_code(verb) {
                return Err(InvalidEvent::AdminVerb);
            }
        }
        if let Some(r) = &self.reason {
            if looks_like_jwt(r) {
                return Err(InvalidEvent::LooksLikeToken("reason"));
            }
            if !is_code(r) {
                return Err(InvalidEvent::Reason);
            }
        }
        let fields = [
            ("identity", &self.identity),
            ("pod", &self.pod),
            ("path", &self.path),
            ("lease_id", &self.lease_id),
        ];
        for (name, value) in fields {
            let Some(v) = value else { continue };
            if v.len() > MAX_FIELD_LEN || v.chars().any(char::is_control) {
                return Err(InvalidEvent::Field(name));
            }
            if looks_like_jwt(v) {
                return Err(InvalidEvent::LooksLikeToken(name));
            }
        }
        Ok(())
    }
}

/// Why [`AuditEvent::validate`] refused an event. Never carries the offending value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidEvent {
    /// `reason` is not a short code.
    #[error("audit reason is not a short code ([a-z0-9_.:-], 1..={MAX_CODE_LEN} bytes)")]
    Reason,
    /// The admin verb is not a short code.
    #[error("audit admin verb is not a short code ([a-z0-9_.:-], 1..={MAX_CODE_LEN} bytes)")]
    AdminVerb,
    /// A field is too long or holds control characters.
    #[error("audit field `{0}` is too long or holds control characters")]
    Field(&'static str),
    /// A field looks like a JWT.
    #[error("audit field `{0}` looks like a token")]
    LooksLikeToken(&'static str),
}

/// Whether `s` is a short code: 1..=[`MAX_CODE_LEN`] bytes of `a-z`, `0-9`, `_`, `-`, `.`, `:`.
pub fn is_code(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_CODE_LEN
        && s.bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' | b':'))
}

/// Whether `s` contains something shaped like a compact JWS/JWT: a base64url run starting
/// with `eyJ` (the encoding of `{"`) followed by at least two more dot-separated segments.
fn looks_like_jwt(s: &str) -> bool {
    let is_b64url = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.';
    s.split(|c: char| !is_b64url(c)).any(|run| {
        run.match_indices("eyJ").any(|(i, _)| {
            let rest = &run[i..];
            rest.len() >= 24 && rest.split('.').filter(|p| !p.is_empty()).count() >= 3
        })
    })
}
