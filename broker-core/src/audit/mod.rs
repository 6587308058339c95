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
//! [`AuditRecord::after`] bounds every event first ([`AuditEvent::bounded`]): a field too long,
//! with control characters or shaped like a token is stored as its digest form (a short
//! escaped prefix, its SHA-256 and length), so a record never exceeds
//! [`MAX_RECORD_JSON_BYTES`]. The hashed encoding below is unchanged by this: records made
//! before it verify as they always did.
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

/// Longest JSON line of one record (its largest database row is about half of it): four
/// fields of [`MAX_FIELD_LEN`] bytes, each at most doubled by JSON escaping (control
/// characters never reach a record unescaped, see [`AuditEvent::bounded`]), two codes, two
/// hashes, the numbers and the keys.
pub const MAX_RECORD_JSON_BYTES: usize = 4 * 2 * MAX_FIELD_LEN + 2 * MAX_CODE_LEN + 1024;

/// Current time in Unix milliseconds (0 if the clock is before 1970).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

mod event;
mod jsonl;
mod kinds;
mod record;
mod verify;

pub use event::*;
pub use jsonl::*;
pub use kinds::*;
pub use record::*;
pub use verify::*;

#[cfg(test)]
mod tests;
