//! Tamper-evident audit log: the record types, the hash chain, its verification and the
//! JSON-lines file sink.
//!
//! This module is pure, storage-agnostic logic. The database layer stores [`AuditRecord`]s
//! (one row each: `seq, time_ms, kind, identity, pod, path, lease_id, outcome, reason,
//! prev_hash, hash`) and appends under a lock or transaction; it calls [`AuditRecord::after`]
//! (or [`AuditRecord::chain`]) with the current head to make the next record, and
//! [`ChainVerifier`] / [`verify`] to check what it reads back.
//!
//! # What is recorded
//! Time, kind of call, identity (`namespace/serviceaccount`), pod, path, lease id, outcome and
//! a *reason*. Never a secret value, a token, a PIN or a free-form error message: `reason` is
//! a short machine code (`token_expired`, `no_policy`, `db_unavailable`...).
//! [`AuditEvent::validate`] checks that shape and refuses fields that look like a JWT.
//!
//! # The chain
//! Record `seq` (1, 2, 3, ...) carries the hash of record `seq - 1` as `prev_hash`
//! ([`GENESIS`], 64 zeros, for record 1) and its own hash:
//!
//! ```text
//! hash = hex(SHA-256( "keyhaven.audit.v1\0"
//!                     ‖ i64_be(seq) ‖ str(prev_hash)
//!                     ‖ i64_be(time_ms) ‖ str(kind)
//!                     ‖ opt(identity) ‖ opt(pod) ‖ opt(path) ‖ opt(lease_id)
//!                     ‖ str(outcome) ‖ opt(reason) ))
//! str(s)       = u64_be(byte length of s) ‖ UTF-8 bytes of s
//! opt(None)    = 0x00
//! opt(Some(s)) = 0x01 ‖ str(s)
//! ```
//!
//! Every field is present, in that fixed order, and length-prefixed, so the encoding is
//! injective: two different records never hash the same input, and `None` differs from
//! `Some("")`. It does not depend on JSON or on any map ordering. `kind` and `outcome` are
//! their stable text forms ([`EventKind::as_text`], [`Outcome::as_str`]); hashes are lowercase
//! hex. Changing any of this is a format change: bump the tag.
//!
//! # What verification proves, and what it does not
//! Reading records in `seq` order, [`ChainVerifier`] finds an edited record (its hash does not
//! match its contents), a deleted one (a gap in `seq`, or a `prev_hash` that does not link), an
//! inserted, duplicated or reordered one (a `seq` out of order or a broken link). A plain hash
//! chain has no key, so someone who can rewrite the store can also recompute every hash from
//! the point they changed to the end, and can drop records from the tail. An **anchor** — a
//! [`Checkpoint`] (`seq` and hash of some record) kept outside the store, e.g. printed by
//! `brokerctl audit verify` and saved by the operator — catches both: with an anchor,
//! verification fails if the log no longer reaches the anchor's `seq` (truncation) or holds
//! a different record there (rewrite).
//!
//! Not here: storage, locking, and what the broker does when appending fails (the request
//! fails; that is the caller's rule).

use std::borrow::Borrow;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// `prev_hash` of the first record: 64 zeros (the hex form of 32 zero bytes).
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Domain-separation tag that starts every hashed message; names the format version.
const HASH_TAG: &[u8] = b"keyhaven.audit.v1\0";

/// Longest accepted `reason` code or admin verb, in bytes.
pub const MAX_CODE_LEN: usize = 64;

/// Longest accepted identity, pod, path or lease id, in bytes.
pub const MAX_FIELD_LEN: usize = 1024;

/// Current time in Unix milliseconds (0 if the clock is before 1970).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

// ---- kinds and outcomes ---------------------------------------------------------------------

/// What kind of call an event records. Stored as text: see [`EventKind::as_text`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// A token was presented (`authenticate`).
    Authenticate,
    /// A lease was asked for (`lease`).
    Lease,
    /// A lease renewal was asked for (`renew`).
    Renew,
    /// A lease revocation (`revoke`), by its holder or by an operator.
    Revoke,
    /// The reaper expired a lease (`expire`).
    Expire,
    /// An admin call, with its verb as a short code (`admin:<verb>`, e.g. `admin:policy_apply`).
    Admin(String),
}

impl EventKind {
    /// The stable text form stored in the `kind` column and hashed: `authenticate`, `lease`,
    /// `renew`, `revoke`, `expire`, or `admin:<verb>`.
    pub fn as_text(&self) -> std::borrow::Cow<'static, str> {
        use std::borrow::Cow;
        match self {
            EventKind::Authenticate => Cow::Borrowed("authenticate"),
            EventKind::Lease => Cow::Borrowed("lease"),
            EventKind::Renew => Cow::Borrowed("renew"),
            EventKind::Revoke => Cow::Borrowed("revoke"),
            EventKind::Expire => Cow::Borrowed("expire"),
            EventKind::Admin(verb) => Cow::Owned(format!("admin:{verb}")),
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_text())
    }
}

impl FromStr for EventKind {
    type Err = ParseError;

    /// Parses the text form; the inverse of [`EventKind::as_text`] for every value.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "authenticate" => EventKind::Authenticate,
            "lease" => EventKind::Lease,
            "renew" => EventKind::Renew,
            "revoke" => EventKind::Revoke,
            "expire" => EventKind::Expire,
            _ => match s.strip_prefix("admin:") {
                Some(verb) => EventKind::Admin(verb.to_owned()),
                None => return Err(ParseError::Kind),
            },
        })
    }
}

impl Serialize for EventKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.as_text())
    }
}

impl<'de> Deserialize<'de> for EventKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// How a call ended. Stored as text: see [`Outcome::as_str`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Done as asked (`ok`).
    Ok,
    /// Refused: authentication failed or policy said no (`denied`); `reason` says why.
    Denied,
    /// The broker could not do it (`error`): HSM or database unavailable, internal failure.
    Error,
}

impl Outcome {
    /// The stable text form stored in the `outcome` column and hashed.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Denied => "denied",
            Outcome::Error => "error",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Outcome {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ok" => Ok(Outcome::Ok),
            "denied" => Ok(Outcome::Denied),
            "error" => Ok(Outcome::Error),
            _ => Err(ParseError::Outcome),
        }
    }
}

impl Serialize for Outcome {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Outcome {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A `kind`, `outcome` or checkpoint text is not one we write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Unknown `kind` text.
    #[error("unknown audit event kind")]
    Kind,
    /// Unknown `outcome` text.
    #[error("unknown audit outcome")]
    Outcome,
    /// Not a `seq:hash` checkpoint.
    #[error("not an audit checkpoint (expected <seq>:<64 lowercase hex digits>)")]
    Checkpoint,
}

// ---- events ---------------------------------------------------------------------------------

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

// ---- records and the chain -------------------------------------------------------------------

/// The position of one record in the chain: its `seq` and `hash`. [`Checkpoint::genesis`]
/// stands before the first record. Kept outside the store it is an *anchor*.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The record's sequence number (0 for genesis).
    pub seq: i64,
    /// The record's hash, lowercase hex ([`GENESIS`] for genesis).
    pub hash: String,
}

impl Checkpoint {
    /// Before the first record: seq 0, hash [`GENESIS`].
    pub fn genesis() -> Self {
        Checkpoint {
            seq: 0,
            hash: GENESIS.to_owned(),
        }
    }
}

impl fmt::Display for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.seq, self.hash)
    }
}

impl FromStr for Checkpoint {
    type Err = ParseError;

    /// Parses the `seq:hash` form that `Display` writes (e.g. for a `--anchor` flag); the
    /// hash must be 64 lowercase hex digits.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (seq, hash) = s.split_once(':').ok_or(ParseError::Checkpoint)?;
        let seq: i64 = seq.parse().map_err(|_| ParseError::Checkpoint)?;
        let hex_ok =
            hash.len() == 64 && hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if seq < 0 || !hex_ok {
            return Err(ParseError::Checkpoint);
        }
        Ok(Checkpoint {
            seq,
            hash: hash.to_owned(),
        })
    }
}

/// An event placed in the chain: one row of the `audit` table, one line of the JSONL file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// Position in the log: 1, 2, 3, ... with no gaps.
    pub seq: i64,
    /// What happened.
    pub event: AuditEvent,
    /// Hash of the record before (lowercase hex; [`GENESIS`] for seq 1).
    pub prev_hash: String,
    /// Hash of this record (lowercase hex), see the module docs.
    pub hash: String,
}

impl AuditRecord {
    /// The record that follows `prev` (or the first record when `prev` is `None`).
    pub fn chain(prev: Option<&AuditRecord>, event: AuditEvent) -> AuditRecord {
        match prev {
            Some(p) => Self::after(&p.checkpoint(), event),
            None => Self::after(&Checkpoint::genesis(), event),
        }
    }

    /// The record that follows the record at `head` (the stored log's last `seq` and `hash`,
    /// or [`Checkpoint::genesis`] for an empty log).
    pub fn after(head: &Checkpoint, event: AuditEvent) -> AuditRecord {
        // 2^63 records cannot be written; a saturated seq would fail verification anyway.
        let seq = head.seq.saturating_add(1);
        let hash = record_hash(seq, &head.hash, &event);
        AuditRecord {
            seq,
            event,
            prev_hash: head.hash.clone(),
            hash,
        }
    }

    /// This record's position, to chain the next one after it or to keep as an anchor.
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            seq: self.seq,
            hash: self.hash.clone(),
        }
    }

    /// The hash this record's contents call for (compare with `self.hash`).
    pub fn computed_hash(&self) -> String {
        record_hash(self.seq, &self.prev_hash, &self.event)
    }

    /// One line of JSON (no trailing newline) with the table's columns as keys, `null` for
    /// absent fields.
    pub fn to_json_line(&self) -> String {
        // Serializing strings and integers into a String cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses one line written by [`AuditRecord::to_json_line`]. Unknown keys are refused
    /// (they would not be covered by the hash). Does not check the hash: verify for that.
    pub fn from_json_line(line: &str) -> Result<AuditRecord, serde_json::Error> {
        serde_json::from_str(line)
    }
}

/// The chain hash of a record (see the module docs for the exact input).
pub fn record_hash(seq: i64, prev_hash: &str, event: &AuditEvent) -> String {
    let mut h = Sha256::new();
    h.update(HASH_TAG);
    h.update(seq.to_be_bytes());
    put_str(&mut h, prev_hash);
    h.update(event.time_ms.to_be_bytes());
    put_str(&mut h, &event.kind.as_text());
    put_opt(&mut h, event.identity.as_deref());
    put_opt(&mut h, event.pod.as_deref());
    put_opt(&mut h, event.path.as_deref());
    put_opt(&mut h, event.lease_id.as_deref());
    put_str(&mut h, event.outcome.as_str());
    put_opt(&mut h, event.reason.as_deref());
    hex::encode(h.finalize())
}

fn put_str(h: &mut Sha256, s: &str) {
    h.update((s.len() as u64).to_be_bytes());
    h.update(s.as_bytes());
}

fn put_opt(h: &mut Sha256, s: Option<&str>) {
    match s {
        None => h.update([0u8]),
        Some(s) => {
            h.update([1u8]);
            put_str(h, s);
        }
    }
}

/// The JSON-lines form, borrowed for writing.
#[derive(Serialize)]
struct JsonRecordRef<'a> {
    seq: i64,
    time_ms: i64,
    kind: &'a str,
    identity: Option<&'a str>,
    pod: Option<&'a str>,
    path: Option<&'a str>,
    lease_id: Option<&'a str>,
    outcome: &'a str,
    reason: Option<&'a str>,
    prev_hash: &'a str,
    hash: &'a str,
}

/// The JSON-lines form, owned for reading.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonRecord {
    seq: i64,
    time_ms: i64,
    kind: EventKind,
    identity: Option<String>,
    pod: Option<String>,
    path: Option<String>,
    lease_id: Option<String>,
    outcome: Outcome,
    reason: Option<String>,
    prev_hash: String,
    hash: String,
}

impl Serialize for AuditRecord {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let e = &self.event;
        let kind = e.kind.as_text();
        JsonRecordRef {
            seq: self.seq,
            time_ms: e.time_ms,
            kind: &kind,
            identity: e.identity.as_deref(),
            pod: e.pod.as_deref(),
            path: e.path.as_deref(),
            lease_id: e.lease_id.as_deref(),
            outcome: e.outcome.as_str(),
            reason: e.reason.as_deref(),
            prev_hash: &self.prev_hash,
            hash: &self.hash,
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for AuditRecord {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let r = JsonRecord::deserialize(d)?;
        Ok(AuditRecord {
            seq: r.seq,
            event: AuditEvent {
                time_ms: r.time_ms,
                kind: r.kind,
                identity: r.identity,
                pod: r.pod,
                path: r.path,
                lease_id: r.lease_id,
                outcome: r.outcome,
                reason: r.reason,
            },
            prev_hash: r.prev_hash,
            hash: r.hash,
        })
    }
}

impl fmt::Display for AuditRecord {
    /// One human line for `brokerctl audit tail`: seq, UTC time, kind, outcome, then the
    /// present fields as `key=value`, control characters and quotes escaped.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let e = &self.event;
        write!(f, "#{} ", self.seq)?;
        // humantime formats 1970..=9999 only.
        match u64::try_from(e.time_ms) {
            Ok(ms) if ms < 253_402_300_800_000 => write!(
                f,
                "{}",
                humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms))
            )?,
            _ => write!(f, "@{}ms", e.time_ms)?,
        }
        write!(f, " {} {}", e.kind.as_text().escape_debug(), e.outcome)?;
        let fields = [
            ("identity", &e.identity),
            ("pod", &e.pod),
            ("path", &e.path),
            ("lease", &e.lease_id),
            ("reason", &e.reason),
        ];
        for (name, value) in fields {
            if let Some(v) = value {
                write!(f, " {name}={}", v.escape_debug())?;
            }
        }
        Ok(())
    }
}

// ---- verification ---------------------------------------------------------------------------

/// What a successful verification covered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// How many records were checked.
    pub records: u64,
    /// `seq` of the last record checked (the start's when none were).
    pub last_seq: i64,
    /// Hash of the last record checked (the start's when none were).
    pub last_hash: String,
}

impl VerifyReport {
    /// The verified head, to keep as an anchor or to start the next window from.
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            seq: self.last_seq,
            hash: self.last_hash.clone(),
        }
    }
}

/// Where and how the log fails verification. Carries positions, never record contents.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// Record `seq`'s contents do not match its hash: the record was edited.
    #[error("audit record {seq}: contents do not match its hash (edited)")]
    HashMismatch {
        /// The edited record.
        seq: i64,
    },
    /// Record `seq`'s `prev_hash` is not the hash of the record before it (or of the start):
    /// a record before it was deleted, inserted or rewritten.
    #[error("audit record {seq}: does not link to the record before it (deleted, inserted or rewritten record)")]
    BrokenLink {
        /// The first record that does not link.
        seq: i64,
    },
    /// Expected record `expected`, found a later one: records `expected..found` are missing.
    #[error("audit record {expected} missing: next record is {found} (deleted records)")]
    Gap {
        /// The first missing `seq`.
        expected: i64,
        /// The `seq` found in its place.
        found: i64,
    },
    /// Expected record `expected`, found an earlier or repeated `seq`.
    #[error("audit record {expected} expected, found {found} (inserted, duplicated or reordered record)")]
    OutOfOrder {
        /// The `seq` that should come here.
        expected: i64,
        /// The `seq` found instead.
        found: i64,
    },
    /// The log ends before the anchor's record: its tail was cut off.
    #[error(
        "audit log ends at record {last_seq} but the anchor is record {anchor_seq} (truncated)"
    )]
    Truncated {
        /// The anchor's `seq`.
        anchor_seq: i64,
        /// The last `seq` present (the start's when no record was read).
        last_seq: i64,
    },
    /// The record at the anchor's `seq` has a different hash: history was rewritten.
    #[error("audit record {seq} does not match the anchor (rewritten)")]
    AnchorMismatch {
        /// The anchor's `seq`.
        seq: i64,
    },
    /// The anchor lies before the window's start, so this window cannot confirm it.
    #[error("anchor record {anchor_seq} lies before the verified window, which starts after record {start_seq}")]
    AnchorBeforeStart {
        /// The anchor's `seq`.
        anchor_seq: i64,
        /// The start checkpoint's `seq`.
        start_seq: i64,
    },
    /// A line of a JSON-lines file is not a record.
    #[error("audit file line {line}: not an audit record")]
    Malformed {
        /// 1-based line number.
        line: u64,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// The audit file could not be read.
    #[error("audit file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

impl VerifyError {
    /// The `seq` at which the chain breaks (for a gap or disorder, the `seq` that should have
    /// been there), when the error is about one position.
    pub fn seq(&self) -> Option<i64> {
        match self {
            VerifyError::HashMismatch { seq }
            | VerifyError::BrokenLink { seq }
            | VerifyError::AnchorMismatch { seq } => Some(*seq),
            VerifyError::Gap { expected, .. } | VerifyError::OutOfOrder { expected, .. } => {
                Some(*expected)
            }
            VerifyError::Truncated { anchor_seq, .. } => Some(*anchor_seq),
            VerifyError::AnchorBeforeStart { .. }
            | VerifyError::Malformed { .. }
            | VerifyError::Io { .. } => None,
        }
    }
}

/// Streaming verifier: feed records in `seq` order with [`ChainVerifier::push`] (e.g. rows
/// as they come from a database cursor), then [`ChainVerifier::finish`]. Stops being useful
/// after the first error.
#[derive(Debug, Clone)]
pub struct ChainVerifier {
    start: Checkpoint,
    head: Checkpoint,
    records: u64,
    anchor: Option<Checkpoint>,
}

impl Default for ChainVerifier {
    fn default() -> Self {
        Self::new()
    }
}

impl ChainVerifier {
    /// Verifies a whole log, from genesis.
    pub fn new() -> Self {
        Self::after(Checkpoint::genesis())
    }

    /// Verifies a window that starts right after a trusted checkpoint: the first record must
    /// be `start.seq + 1` with `prev_hash == start.hash`.
    pub fn after(start: Checkpoint) -> Self {
        ChainVerifier {
            head: start.clone(),
            start,
            records: 0,
            anchor: None,
        }
    }

    /// Also requires the log to reach `anchor.seq` and to hold exactly `anchor.hash` there.
    /// Records after the anchor are fine (the log grew since the anchor was taken).
    pub fn with_anchor(mut self, anchor: Checkpoint) -> Self {
        self.anchor = Some(anchor);
        self
    }

    /// Checks the next record: its `seq` follows, its `prev_hash` links, its hash matches.
    pub fn push(&mut self, record: &AuditRecord) -> Result<(), VerifyError> {
        let Some(expected) = self.head.seq.checked_add(1) else {
            return Err(VerifyError::OutOfOrder {
                expected: i64::MAX,
                found: record.seq,
            });
        };
        if record.seq > expected {
            return Err(VerifyError::Gap {
                expected,
                found: record.seq,
            });
        }
        if record.seq < expected {
            return Err(VerifyError::OutOfOrder {
                expected,
                found: record.seq,
            });
        }
        if record.prev_hash != self.head.hash {
            return Err(VerifyError::BrokenLink { seq: record.seq });
        }
        if record.computed_hash() != record.hash {
            return Err(VerifyError::HashMismatch { seq: record.seq });
        }
        if let Some(a) = &self.anchor {
            if a.seq == record.seq && a.hash != record.hash {
                return Err(VerifyError::AnchorMismatch { seq: a.seq });
            }
        }
        self.head = record.checkpoint();
        self.records += 1;
        Ok(())
    }

    /// Ends verification: checks the anchor, if any, was reached.
    pub fn finish(self) -> Result<VerifyReport, VerifyError> {
        if let Some(a) = &self.anchor {
            if a.seq < self.start.seq {
                return Err(VerifyError::AnchorBeforeStart {
                    anchor_seq: a.seq,
                    start_seq: self.start.seq,
                });
            }
            if a.seq > self.head.seq {
                return Err(VerifyError::Truncated {
                    anchor_seq: a.seq,
                    last_seq: self.head.seq,
                });
            }
            // Anchors after the start were compared in `push`; an anchor at the start here.
            if a.seq == self.start.seq && a.hash != self.start.hash {
                return Err(VerifyError::AnchorMismatch { seq: a.seq });
            }
        }
        Ok(VerifyReport {
            records: self.records,
            last_seq: self.head.seq,
            last_hash: self.head.hash,
        })
    }
}

/// Verifies a whole log, records in `seq` order, from genesis. Without an anchor, a cut-off
/// tail is not detected: see [`verify_with_anchor`].
pub fn verify<I>(records: I) -> Result<VerifyReport, VerifyError>
where
    I: IntoIterator,
    I::Item: Borrow<AuditRecord>,
{
    verify_window(&Checkpoint::genesis(), records, None)
}

/// Verifies a whole log and that it still reaches `anchor` with the same hash there.
pub fn verify_with_anchor<I>(records: I, anchor: &Checkpoint) -> Result<VerifyReport, VerifyError>
where
    I: IntoIterator,
    I::Item: Borrow<AuditRecord>,
{
    verify_window(&Checkpoint::genesis(), records, Some(anchor))
}

/// Verifies records that follow the trusted checkpoint `start`, optionally up to `anchor`.
pub fn verify_window<I>(
    start: &Checkpoint,
    records: I,
    anchor: Option<&Checkpoint>,
) -> Result<VerifyReport, VerifyError>
where
    I: IntoIterator,
    I::Item: Borrow<AuditRecord>,
{
    let mut v = ChainVerifier::after(start.clone());
    if let Some(a) = anchor {
        v = v.with_anchor(a.clone());
    }
    for r in records {
        v.push(r.borrow())?;
    }
    v.finish()
}

// ---- JSON-lines file --------------------------------------------------------------------------

/// Appends records to a JSON-lines file, one line per record, each write followed by an fsync.
/// The file is created with mode 0600 (an existing file keeps its mode). Does not check that
/// appended records chain: the caller appends the records it stored, in order.
#[derive(Debug)]
pub struct JsonlSink {
    file: File,
    path: PathBuf,
}

impl JsonlSink {
    /// Opens `path` for appending, creating it (mode 0600, and the directory entry synced)
    /// if missing.
    pub fn open(path: impl AsRef<Path>) -> io::Result<JsonlSink> {
        let path = path.as_ref().to_path_buf();
        let mut opts = OpenOptions::new();
        opts.append(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let file = match opts.open(&path) {
            Ok(f) => {
                // Make the new file's directory entry durable too.
                if let Some(dir) = path.parent() {
                    let dir = if dir.as_os_str().is_empty() {
                        Path::new(".")
                    } else {
                        dir
                    };
                    File::open(dir)?.sync_all()?;
                }
                f
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                OpenOptions::new().append(true).open(&path)?
            }
            Err(e) => return Err(e),
        };
        Ok(JsonlSink { file, path })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `record` as one line and syncs it to disk before returning.
    pub fn append(&mut self, record: &AuditRecord) -> io::Result<()> {
        let mut line = record.to_json_line();
        line.push('\n');
        // One write of the whole line: with O_APPEND it lands contiguously at the end.
        self.file.write_all(line.as_bytes())?;
        self.file.sync_data()
    }
}

/// Verifies a JSON-lines audit file from genesis.
pub fn verify_jsonl(path: impl AsRef<Path>) -> Result<VerifyReport, VerifyError> {
    verify_jsonl_window(path, &Checkpoint::genesis(), None)
}

/// Verifies a JSON-lines audit file whose first line follows `start` (a file started when
/// the database already held records), optionally up to `anchor`.
pub fn verify_jsonl_window(
    path: impl AsRef<Path>,
    start: &Checkpoint,
    anchor: Option<&Checkpoint>,
) -> Result<VerifyReport, VerifyError> {
    let path = path.as_ref();
    let io_err = |source| VerifyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io_err)?;
    let mut v = ChainVerifier::after(start.clone());
    if let Some(a) = anchor {
        v = v.with_anchor(a.clone());
    }
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(io_err)?;
        let record =
            AuditRecord::from_json_line(&line).map_err(|source| VerifyError::Malformed {
                line: i as u64 + 1,
                source,
            })?;
        v.push(&record)?;
    }
    v.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(i: i64) -> AuditEvent {
        let kinds = [
            EventKind::Authenticate,
            EventKind::Lease,
            EventKind::Renew,
            EventKind::Revoke,
            EventKind::Expire,
            EventKind::Admin("policy_apply".into()),
        ];
        let outcomes = [Outcome::Ok, Outcome::Denied, Outcome::Error];
        let mut e = AuditEvent::new(
            1_700_000_000_000 + i * 1000,
            kinds[(i as usize) % kinds.len()].clone(),
            outcomes[(i as usize) % outcomes.len()],
        )
        .with_identity(format!("ns{}/sa", i % 3));
        if i % 2 == 0 {
            e = e.with_pod(format!("pod-{i}")).with_path("team/app/db");
        }
        if i % 3 != 0 {
            e = e.with_lease_id(format!("ns/sa/team/app/db/{i:032x}"));
        }
        if e.outcome != Outcome::Ok {
            e = e.with_reason("no_policy");
        }
        e
    }

    fn log(n: i64) -> Vec<AuditRecord> {
        let mut out: Vec<AuditRecord> = Vec::new();
        for i in 0..n {
            let r = AuditRecord::chain(out.last(), event(i));
            out.push(r);
        }
        out
    }

    /// A named in-place change to one field of a record.
    type Edit = (&'static str, fn(&mut AuditRecord));

    /// Every way of editing one field of a record in place, without fixing any hash.
    fn edits() -> Vec<Edit> {
        vec![
            ("seq up", |r| r.seq += 1000),
            ("seq down", |r| r.seq -= 1),
            ("time", |r| r.event.time_ms += 1),
            ("kind", |r| {
                r.event.kind = match r.event.kind {
                    EventKind::Lease => EventKind::Renew,
                    _ => EventKind::Lease,
                }
            }),
            ("admin verb", |r| {
                r.event.kind = match &r.event.kind {
                    EventKind::Admin(v) => EventKind::Admin(format!("{v}x")),
                    _ => EventKind::Admin(String::new()),
                }
            }),
            ("identity", |r| {
                r.event.identity = Some("kube-system/admin".into())
            }),
            ("identity removed", |r| r.event.identity = None),
            ("pod", |r| {
                r.event.pod = match r.event.pod.take() {
                    None => Some(String::new()),
                    Some(_) => None,
                }
            }),
            ("path", |r| r.event.path = Some("team/other/db".into())),
            ("lease", |r| {
                r.event.lease_id = match r.event.lease_id.take() {
                    None => Some("x".into()),
                    Some(l) => Some(format!("{l}0")),
                }
            }),
            ("outcome", |r| {
                r.event.outcome = match r.event.outcome {
                    Outcome::Ok => Outcome::Denied,
                    _ => Outcome::Ok,
                }
            }),
            ("reason", |r| {
                r.event.reason = match r.event.reason.take() {
                    None => Some(String::new()),
                    Some(_) => None,
                }
            }),
            ("prev_hash", |r| r.prev_hash = GENESIS.replace('0', "1")),
            ("hash", |r| r.hash = GENESIS.into()),
        ]
    }

    #[test]
    fn chain_of_100_verifies() {
        let records = log(100);
        assert_eq!(records[0].seq, 1);
        assert_eq!(records[0].prev_hash, GENESIS);
        for w in records.windows(2) {
            assert_eq!(w[1].seq, w[0].seq + 1);
            assert_eq!(w[1].prev_hash, w[0].hash);
        }
        let report = verify(&records).unwrap();
        assert_eq!(report.records, 100);
        assert_eq!(report.last_seq, 100);
        assert_eq!(report.last_hash, records[99].hash);
        assert_eq!(report.checkpoint(), records[99].checkpoint());
        // by value too
        assert_eq!(verify(records.clone()).unwrap(), report);
    }

    #[test]
    fn empty_log_verifies_to_genesis() {
        let report = verify(Vec::<AuditRecord>::new()).unwrap();
        assert_eq!(report.records, 0);
        assert_eq!(report.checkpoint(), Checkpoint::genesis());
    }

    #[test]
    fn editing_any_field_of_any_record_is_detected_at_that_seq() {
        let records = log(100);
        for k in 0..records.len() {
            for (name, edit) in edits() {
                let mut tampered = records.clone();
                edit(&mut tampered[k]);
                assert_ne!(tampered[k], records[k], "{name} did not change record");
                let err = verify(&tampered).unwrap_err();
                assert_eq!(err.seq(), Some(k as i64 + 1), "{name} at {k}: {err}");
                let expected_kind = match name {
                    "seq up" => matches!(err, VerifyError::Gap { .. }),
                    "seq down" => matches!(err, VerifyError::OutOfOrder { .. }),
                    "prev_hash" => matches!(err, VerifyError::BrokenLink { .. }),
                    _ => matches!(err, VerifyError::HashMismatch { .. }),
                };
                assert!(expected_kind, "{name} at {k}: {err:?}");
            }
        }
    }

    #[test]
    fn edit_with_recomputed_hash_breaks_the_next_link() {
        let records = log(100);
        let mut tampered = records.clone();
        tampered[41].event.outcome = Outcome::Ok;
        tampered[41].event.reason = None;
        tampered[41].hash = tampered[41].computed_hash();
        let err = verify(&tampered).unwrap_err();
        assert!(
            matches!(err, VerifyError::BrokenLink { seq: 43 }),
            "{err:?}"
        );
    }

    #[test]
    fn rewritten_tail_is_detected_only_with_an_anchor() {
        let records = log(100);
        let anchor = records[99].checkpoint();
        let mut tampered = records.clone();
        tampered[99].event.path = Some("forged".into());
        tampered[99].hash = tampered[99].computed_hash();
        // A keyless chain cannot see a rewrite of the last record on its own...
        assert!(verify(&tampered).is_ok());
        // ...an anchor kept elsewhere does.
        let err = verify_with_anchor(&tampered, &anchor).unwrap_err();
        assert!(
            matches!(err, VerifyError::AnchorMismatch { seq: 100 }),
            "{err:?}"
        );
    }

    #[test]
    fn deleting_a_middle_record_is_detected() {
        let mut records = log(100);
        records.remove(49);
        let err = verify(&records).unwrap_err();
        assert!(
            matches!(
                err,
                VerifyError::Gap {
                    expected: 50,
                    found: 51
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn deleting_a_middle_record_and_renumbering_is_detected() {
        let mut records = log(100);
        records.remove(49);
        for r in &mut records[49..] {
            r.seq -= 1;
        }
        let err = verify(&records).unwrap_err();
        // The renumbered record 50 still points at the deleted record's hash.
        assert!(
            matches!(err, VerifyError::BrokenLink { seq: 50 }),
            "{err:?}"
        );
    }

    #[test]
    fn deleting_the_first_record_is_detected_without_anchor() {
        let mut records = log(100);
        records.remove(0);
        let err = verify(&records).unwrap_err();
        assert!(
            matches!(
                err,
                VerifyError::Gap {
                    expected: 1,
                    found: 2
                }
            ),
            "{err:?}"
        );
        // Renumbered so seq starts at 1 again: its prev is not genesis.
        for r in &mut records {
            r.seq -= 1;
        }
        let err = verify(&records).unwrap_err();
        assert!(matches!(err, VerifyError::BrokenLink { seq: 1 }), "{err:?}");
    }

    #[test]
    fn inserting_a_forged_record_is_detected() {
        let records = log(100);
        // Forged record 31, correctly chained after record 30 and with a correct hash of its own.
        let forged = AuditRecord::after(
            &records[29].checkpoint(),
            AuditEvent::new(records[29].event.time_ms + 1, EventKind::Lease, Outcome::Ok)
                .with_identity("attacker/sa")
                .with_path("team/app/db"),
        );
        assert_eq!(forged.seq, 31);
        assert_eq!(forged.computed_hash(), forged.hash);

        // Inserted as is: the old record 31 now follows it.
        let mut tampered = records.clone();
        tampered.insert(30, forged.clone());
        let err = verify(&tampered).unwrap_err();
        assert!(
            matches!(
                err,
                VerifyError::OutOfOrder {
                    expected: 32,
                    found: 31
                }
            ),
            "{err:?}"
        );

        // Inserted and everything after renumbered: the old record 31 (now 32) does not link.
        let mut tampered = records.clone();
        tampered.insert(30, forged.clone());
        for r in &mut tampered[31..] {
            r.seq += 1;
        }
        let err = verify(&tampered).unwrap_err();
        assert!(
            matches!(err, VerifyError::BrokenLink { seq: 32 }),
            "{err:?}"
        );

        // Replacing record 31 by the forgery: record 32 does not link.
        let mut tampered = records.clone();
        tampered[30] = forged;
        let err = verify(&tampered).unwrap_err();
        assert!(
            matches!(err, VerifyError::BrokenLink { seq: 32 }),
            "{err:?}"
        );
    }

    #[test]
    fn duplicated_record_is_detected() {
        let mut records = log(20);
        let dup = records[9].clone();
        records.insert(10, dup);
        let err = verify(&records).unwrap_err();
        assert!(
            matches!(
                err,
                VerifyError::OutOfOrder {
                    expected: 11,
                    found: 10
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn reordering_is_detected() {
        let records = log(100);
        let mut swapped = records.clone();
        swapped.swap(10, 11);
        let err = verify(&swapped).unwrap_err();
        assert!(
            matches!(
                err,
                VerifyError::Gap {
                    expected: 11,
                    found: 12
                }
            ),
            "{err:?}"
        );

        // Swapped and their seqs swapped back into order: links and hashes break.
        let (a, b) = (swapped[10].seq, swapped[11].seq);
        swapped[10].seq = b;
        swapped[11].seq = a;
        let err = verify(&swapped).unwrap_err();
        assert!(
            matches!(err, VerifyError::BrokenLink { seq: 11 }),
            "{err:?}"
        );
    }

    #[test]
    fn truncation_is_detected_with_an_anchor() {
        let records = log(100);
        let anchor = records[99].checkpoint();
        // Without an anchor a cut tail looks like a shorter log.
        assert_eq!(verify(&records[..90]).unwrap().last_seq, 90);

        let err = verify_with_anchor(&records[..90], &anchor).unwrap_err();
        assert!(
            matches!(
                err,
                VerifyError::Truncated {
                    anchor_seq: 100,
                    last_seq: 90
                }
            ),
            "{err:?}"
        );
        let err = verify_with_anchor(Vec::<AuditRecord>::new(), &anchor).unwrap_err();
        assert!(
            matches!(
                err,
                VerifyError::Truncated {
                    anchor_seq: 100,
                    last_seq: 0
                }
            ),
            "{err:?}"
        );

        // The whole log, and a log that grew after the anchor was taken, both pass.
        assert_eq!(verify_with_anchor(&records, &anchor).unwrap().last_seq, 100);
        let mid = records[59].checkpoint();
        assert_eq!(verify_with_anchor(&records, &mid).unwrap().last_seq, 100);
        // The genesis anchor is always reached.
        assert!(verify_with_anchor(&records, &Checkpoint::genesis()).is_ok());
        let bad_genesis = Checkpoint {
            seq: 0,
            hash: "ff".repeat(32),
        };
        let err = verify_with_anchor(Vec::<AuditRecord>::new(), &bad_genesis).unwrap_err();
        assert!(
            matches!(err, VerifyError::AnchorMismatch { seq: 0 }),
            "{err:?}"
        );
    }

    #[test]
    fn window_after_a_checkpoint_verifies() {
        let records = log(100);
        let start = records[49].checkpoint();
        let report = verify_window(&start, &records[50..], None).unwrap();
        assert_eq!(report.records, 50);
        assert_eq!(report.last_seq, 100);

        let anchor = records[79].checkpoint();
        assert!(verify_window(&start, &records[50..], Some(&anchor)).is_ok());
        let err = verify_window(&start, &records[50..70], Some(&anchor)).unwrap_err();
        assert!(
            matches!(
                err,
                VerifyError::Truncated {
                    anchor_seq: 80,
                    last_seq: 70
                }
            ),
            "{err:?}"
        );

        // First record of the window deleted: gap at 51.
        let err = verify_window(&start, &records[51..], None).unwrap_err();
        assert!(
            matches!(
                err,
                VerifyError::Gap {
                    expected: 51,
                    found: 52
                }
            ),
            "{err:?}"
        );

        // A wrong checkpoint hash: the first record does not link.
        let wrong = Checkpoint {
            seq: 50,
            hash: records[48].hash.clone(),
        };
        let err = verify_window(&wrong, &records[50..], None).unwrap_err();
        assert!(
            matches!(err, VerifyError::BrokenLink { seq: 51 }),
            "{err:?}"
        );

        // An anchor before the window cannot be confirmed by it.
        let early = records[9].checkpoint();
        let err = verify_window(&start, &records[50..], Some(&early)).unwrap_err();
        assert!(
            matches!(
                err,
                VerifyError::AnchorBeforeStart {
                    anchor_seq: 10,
                    start_seq: 50
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn checkpoint_text_round_trips() {
        let c = log(3)[2].checkpoint();
        let text = c.to_string();
        assert_eq!(text, format!("3:{}", c.hash));
        assert_eq!(text.parse::<Checkpoint>().unwrap(), c);
        assert_eq!(
            format!("0:{GENESIS}").parse::<Checkpoint>().unwrap(),
            Checkpoint::genesis()
        );
        for bad in [
            "",
            "3",
            "x:00",
            "-1:00",
            "3:abc",
            &text.to_uppercase(),
            &format!("{text}0"),
        ] {
            assert_eq!(
                bad.parse::<Checkpoint>(),
                Err(ParseError::Checkpoint),
                "{bad}"
            );
        }
    }

    #[test]
    fn streaming_verifier_matches_verify() {
        let records = log(30);
        let mut v = ChainVerifier::new().with_anchor(records[19].checkpoint());
        for r in &records {
            v.push(r).unwrap();
        }
        assert_eq!(v.finish().unwrap(), verify(&records).unwrap());
    }

    #[test]
    fn none_and_empty_string_hash_differently() {
        let base = AuditEvent::new(1, EventKind::Lease, Outcome::Ok);
        let setters: [fn(&mut AuditEvent, Option<String>); 5] = [
            |e, v| e.identity = v,
            |e, v| e.pod = v,
            |e, v| e.path = v,
            |e, v| e.lease_id = v,
            |e, v| e.reason = v,
        ];
        for set in setters {
            let mut none = base.clone();
            set(&mut none, None);
            let mut empty = base.clone();
            set(&mut empty, Some(String::new()));
            assert_ne!(
                record_hash(1, GENESIS, &none),
                record_hash(1, GENESIS, &empty)
            );
        }
    }

    #[test]
    fn field_boundaries_are_unambiguous() {
        let a = AuditEvent::new(1, EventKind::Lease, Outcome::Ok)
            .with_identity("a")
            .with_pod("bc");
        let b = AuditEvent::new(1, EventKind::Lease, Outcome::Ok)
            .with_identity("ab")
            .with_pod("c");
        assert_ne!(record_hash(1, GENESIS, &a), record_hash(1, GENESIS, &b));
        // The same value in two different optional slots.
        let c = AuditEvent::new(1, EventKind::Lease, Outcome::Ok).with_pod("x");
        let d = AuditEvent::new(1, EventKind::Lease, Outcome::Ok).with_path("x");
        assert_ne!(record_hash(1, GENESIS, &c), record_hash(1, GENESIS, &d));
        // seq and prev_hash are covered.
        assert_ne!(record_hash(1, GENESIS, &a), record_hash(2, GENESIS, &a));
        assert_ne!(
            record_hash(1, GENESIS, &a),
            record_hash(1, &"ab".repeat(32), &a)
        );
    }

    #[test]
    fn hash_follows_the_documented_encoding() {
        let e = AuditEvent::new(
            1_700_000_000_123,
            EventKind::Admin("policy_apply".into()),
            Outcome::Denied,
        )
        .with_identity("ops/admin")
        .with_path("")
        .with_reason("no_policy");
        let mut m = Vec::new();
        m.extend_from_slice(b"keyhaven.audit.v1\0");
        m.extend_from_slice(&7i64.to_be_bytes());
        let s = |m: &mut Vec<u8>, v: &str| {
            m.extend_from_slice(&(v.len() as u64).to_be_bytes());
            m.extend_from_slice(v.as_bytes());
        };
        s(&mut m, GENESIS);
        m.extend_from_slice(&1_700_000_000_123i64.to_be_bytes());
        s(&mut m, "admin:policy_apply");
        m.push(1);
        s(&mut m, "ops/admin"); // identity
        m.push(0); // pod
        m.push(1);
        s(&mut m, ""); // path
        m.push(0); // lease
        s(&mut m, "denied");
        m.push(1);
        s(&mut m, "no_policy");
        let expected = hex::encode(Sha256::digest(&m));
        assert_eq!(record_hash(7, GENESIS, &e), expected);
        assert_eq!(expected.len(), 64);
        assert!(expected
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    }

    #[test]
    fn text_forms_are_stable_and_round_trip() {
        let kinds = [
            (EventKind::Authenticate, "authenticate"),
            (EventKind::Lease, "lease"),
            (EventKind::Renew, "renew"),
            (EventKind::Revoke, "revoke"),
            (EventKind::Expire, "expire"),
            (
                EventKind::Admin("policy_apply".into()),
                "admin:policy_apply",
            ),
            (EventKind::Admin(String::new()), "admin:"),
        ];
        for (k, s) in kinds {
            assert_eq!(k.as_text(), s);
            assert_eq!(k.to_string(), s);
            assert_eq!(s.parse::<EventKind>().unwrap(), k);
        }
        for (o, s) in [
            (Outcome::Ok, "ok"),
            (Outcome::Denied, "denied"),
            (Outcome::Error, "error"),
        ] {
            assert_eq!(o.as_str(), s);
            assert_eq!(s.parse::<Outcome>().unwrap(), o);
        }
        assert_eq!("Lease".parse::<EventKind>(), Err(ParseError::Kind));
        assert_eq!("admin".parse::<EventKind>(), Err(ParseError::Kind));
        assert_eq!("allowed".parse::<Outcome>(), Err(ParseError::Outcome));
    }

    #[test]
    fn json_line_round_trips() {
        for r in log(12) {
            let line = r.to_json_line();
            assert!(!line.contains('\n'));
            assert_eq!(AuditRecord::from_json_line(&line).unwrap(), r);
        }
        // None stays null, "" stays "", awkward characters survive.
        let e = AuditEvent::new(5, EventKind::Admin("x".into()), Outcome::Error)
            .with_identity("")
            .with_path("a\n\"b\"\u{2028}é");
        let r = AuditRecord::chain(None, e);
        let line = r.to_json_line();
        assert!(!line.contains('\n'));
        assert!(line.contains(r#""identity":"""#), "{line}");
        assert!(line.contains(r#""pod":null"#), "{line}");
        assert!(
            line.starts_with(r#"{"seq":1,"time_ms":5,"kind":"admin:x","#),
            "{line}"
        );
        let back = AuditRecord::from_json_line(&line).unwrap();
        assert_eq!(back, r);
        assert!(verify([back]).is_ok());

        // Unknown keys, unknown kinds and missing required keys are refused.
        let extra = line.replacen('{', r#"{"value":"s3cret","#, 1);
        assert!(AuditRecord::from_json_line(&extra).is_err());
        let bad_kind = line.replace("admin:x", "Admin");
        assert!(AuditRecord::from_json_line(&bad_kind).is_err());
        let no_hash = line.replace(r#""hash":"#, r#""hsah":"#);
        assert!(AuditRecord::from_json_line(&no_hash).is_err());
    }

    #[test]
    fn jsonl_file_appends_and_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let records = log(40);
        {
            let mut sink = JsonlSink::open(&path).unwrap();
            assert_eq!(sink.path(), path);
            for r in &records[..25] {
                sink.append(r).unwrap();
            }
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert_eq!(verify_jsonl(&path).unwrap().last_seq, 25);
        // Reopening appends after what is there.
        let mut sink = JsonlSink::open(&path).unwrap();
        for r in &records[25..] {
            sink.append(r).unwrap();
        }
        drop(sink);
        let report = verify_jsonl(&path).unwrap();
        assert_eq!(report.records, 40);
        assert_eq!(report.checkpoint(), records[39].checkpoint());

        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 40);

        // A window file that started after record 10, with an anchor.
        let wpath = dir.path().join("window.jsonl");
        let mut w = JsonlSink::open(&wpath).unwrap();
        for r in &records[10..] {
            w.append(r).unwrap();
        }
        let anchor = records[39].checkpoint();
        let report = verify_jsonl_window(&wpath, &records[9].checkpoint(), Some(&anchor)).unwrap();
        assert_eq!(report.records, 30);
        assert!(matches!(
            verify_jsonl(&wpath).unwrap_err(),
            VerifyError::Gap {
                expected: 1,
                found: 11
            }
        ));
    }

    #[test]
    fn jsonl_file_tampering_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let records = log(20);
        let mut sink = JsonlSink::open(&path).unwrap();
        for r in &records {
            sink.append(r).unwrap();
        }
        drop(sink);
        let text = std::fs::read_to_string(&path).unwrap();
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();

        // Edited line 8.
        let mut edited = lines.clone();
        edited[7] = edited[7].replace(r#""outcome":"denied""#, r#""outcome":"ok""#);
        assert_ne!(edited[7], lines[7]);
        std::fs::write(&path, edited.join("\n") + "\n").unwrap();
        assert!(matches!(
            verify_jsonl(&path).unwrap_err(),
            VerifyError::HashMismatch { seq: 8 }
        ));

        // Deleted line 5.
        let mut deleted = lines.clone();
        deleted.remove(4);
        std::fs::write(&path, deleted.join("\n") + "\n").unwrap();
        assert!(matches!(
            verify_jsonl(&path).unwrap_err(),
            VerifyError::Gap {
                expected: 5,
                found: 6
            }
        ));

        // A torn last line (crash mid-write) is reported with its line number.
        let last = lines.pop().unwrap();
        lines.push(last[..last.len() / 2].to_owned());
        std::fs::write(&path, lines.join("\n")).unwrap();
        let err = verify_jsonl(&path).unwrap_err();
        assert!(
            matches!(err, VerifyError::Malformed { line: 20, .. }),
            "{err:?}"
        );

        // A missing file is an I/O error naming it.
        let err = verify_jsonl(dir.path().join("nope.jsonl")).unwrap_err();
        assert!(matches!(err, VerifyError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains("nope.jsonl"));
    }

    #[test]
    fn validate_refuses_messages_and_tokens() {
        let ok = event(1);
        assert_eq!(ok.validate(), Ok(()));
        let admin = AuditEvent::new(1, EventKind::Admin("policy_apply".into()), Outcome::Ok);
        assert_eq!(admin.validate(), Ok(()));

        let jwt = "eyJhbGciOiJSUzI1NiIsImtpZCI6IjEifQ.eyJzdWIiOiJ4In0.c2lnbmF0dXJl";
        let cases = [
            (
                ok.clone().with_reason("token expired at 12:00"),
                InvalidEvent::Reason,
            ),
            (ok.clone().with_reason(""), InvalidEvent::Reason),
            (ok.clone().with_reason("x".repeat(65)), InvalidEvent::Reason),
            (
                ok.clone().with_reason(jwt),
                InvalidEvent::LooksLikeToken("reason"),
            ),
            (
                ok.clone().with_path(format!("team/{jwt}")),
                InvalidEvent::LooksLikeToken("path"),
            ),
            (
                ok.clone().with_lease_id(format!("Bearer {jwt}")),
                InvalidEvent::LooksLikeToken("lease_id"),
            ),
            (ok.clone().with_pod("a\nb"), InvalidEvent::Field("pod")),
            (
                ok.clone().with_identity("a".repeat(MAX_FIELD_LEN + 1)),
                InvalidEvent::Field("identity"),
            ),
            (
                AuditEvent::new(1, EventKind::Admin("Policy Apply".into()), Outcome::Ok),
                InvalidEvent::AdminVerb,
            ),
        ];
        for (e, want) in cases {
            assert_eq!(e.validate(), Err(want), "{e:?}");
            // The error text never repeats the value.
            assert!(!want.to_string().contains("eyJ"));
        }
        // Ordinary values that merely contain the letters are fine.
        assert!(ok.clone().with_path("team/eyJ/db").validate().is_ok());
    }

    #[test]
    fn display_is_one_escaped_line() {
        let e = AuditEvent::new(1_700_000_000_123, EventKind::Lease, Outcome::Denied)
            .with_identity("team/app")
            .with_path("a\nb")
            .with_reason("no_policy");
        let r = AuditRecord::chain(None, e);
        let s = r.to_string();
        assert_eq!(
            s,
            "#1 2023-11-14T22:13:20.123Z lease denied identity=team/app path=a\\nb reason=no_policy"
        );
        for t in [-1, i64::MAX, i64::MIN] {
            let r = AuditRecord::chain(None, AuditEvent::new(t, EventKind::Expire, Outcome::Ok));
            assert!(r.to_string().contains(&format!("@{t}ms")));
        }
    }
}
