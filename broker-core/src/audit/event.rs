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

    /// The event with every text field within its bound, as a record stores it: identity,
    /// pod, path and lease id at most [`MAX_FIELD_LEN`] bytes without control characters or
    /// anything shaped like a token, else their digest form ([`crate::bounded::field`]:
    /// a short escaped prefix, the SHA-256 and the length); a reason or admin verb that is not
    /// a short code ([`is_code`]) becomes `invalid_code:<16 hex digits of its SHA-256>`.
    /// Idempotent. [`AuditRecord::after`] applies it, so every record has at most
    /// [`MAX_RECORD_JSON_BYTES`] bytes as a JSON line, whatever a request sent.
    pub fn bounded(mut self) -> Self {
        fn field(v: &mut Option<String>) {
            if let Some(s) = v {
                if let std::borrow::Cow::Owned(b) = crate::bounded::field(s, MAX_FIELD_LEN) {
                    *s = b;
                }
            }
        }
        fn code(s: &mut String) {
            if !is_code(s) {
                let h = hex::encode(Sha256::digest(s.as_bytes()));
                *s = format!("invalid_code:{}", &h[..16]);
            }
        }
        if let EventKind::Admin(verb) = &mut self.kind {
            code(verb);
        }
        field(&mut self.identity);
        field(&mut self.pod);
        field(&mut self.path);
        field(&mut self.lease_id);
        if let Some(r) = &mut self.reason {
            code(r);
        }
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
pub(crate) fn looks_like_jwt(s: &str) -> bool {
    let is_b64url = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.';
    s.split(|c: char| !is_b64url(c)).any(|run| {
        run.match_indices("eyJ").any(|(i, _)| {
            let rest = &run[i..];
            rest.len() >= 24 && rest.split('.').filter(|p| !p.is_empty()).count() >= 3
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The largest event a request can cause: every field at its bound, all of it characters
    /// JSON escapes, and an admin verb and reason that are not codes.
    fn worst(n: usize) -> AuditEvent {
        let v = "\"\\".repeat(n / 2);
        AuditEvent::new(i64::MIN, EventKind::Admin("X".repeat(n)), Outcome::Denied)
            .with_identity(v.clone())
            .with_pod(v.clone())
            .with_path(v.clone())
            .with_lease_id(v)
            .with_reason("\u{1}".repeat(n))
    }

    #[test]
    fn every_record_has_a_fixed_maximum_size() {
        for n in [MAX_FIELD_LEN, MAX_FIELD_LEN + 2, 4 << 20] {
            let r = AuditRecord::chain(None, worst(n));
            let line = r.to_json_line();
            assert!(line.len() <= MAX_RECORD_JSON_BYTES, "{n}: {}", line.len());
            assert_eq!(r.computed_hash(), r.hash);
            assert!(r.event.validate().is_ok(), "{:?}", r.event.validate());
            // Parsed back, it is the same record; bounding it again changes nothing.
            let back = AuditRecord::from_json_line(&line).unwrap();
            assert_eq!(back, r);
            assert_eq!(back.event.clone().bounded(), back.event);
        }
    }

    #[test]
    fn an_over_long_field_keeps_its_prefix_digest_and_length() {
        let path = format!("team/{}", "a".repeat(1 << 20));
        let r = AuditRecord::chain(
            None,
            AuditEvent::new(1, EventKind::Lease, Outcome::Denied).with_path(path.clone()),
        );
        let p = r.event.path.as_deref().unwrap();
        assert!(p.starts_with("team/aaa"), "{p}");
        assert!(
            p.contains(&hex::encode(Sha256::digest(path.as_bytes()))),
            "{p}"
        );
        assert!(p.ends_with(&format!("len:{}]", path.len())), "{p}");
        // Ordinary fields are stored as they are.
        let ok = AuditEvent::new(1, EventKind::Admin("policy_apply".into()), Outcome::Ok)
            .with_identity("ops/admin")
            .with_path("team/db")
            .with_reason("no_policy");
        assert_eq!(AuditRecord::chain(None, ok.clone()).event, ok);
    }

    #[test]
    fn records_stored_before_bounding_still_verify() {
        // A record as an older broker wrote it: an over-long path, hashed as it was.
        let ev = AuditEvent::new(1, EventKind::Lease, Outcome::Denied).with_path("x".repeat(5000));
        let hash = record_hash(1, GENESIS, &ev);
        let old = AuditRecord {
            seq: 1,
            event: ev,
            prev_hash: GENESIS.to_owned(),
            hash,
        };
        let next = AuditRecord::chain(
            Some(&old),
            AuditEvent::new(2, EventKind::Expire, Outcome::Ok),
        );
        let lines = [old.to_json_line(), next.to_json_line()];
        let parsed: Vec<AuditRecord> = lines
            .iter()
            .map(|l| AuditRecord::from_json_line(l).unwrap())
            .collect();
        let report = verify(&parsed).unwrap();
        assert_eq!(report.records, 2);
    }
}
