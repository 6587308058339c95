//! [`AuditRecord`]s and [`Checkpoint`]s: the hash chain and its serialised forms.

use super::*;

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
    /// or [`Checkpoint::genesis`] for an empty log). The event is [`AuditEvent::bounded`]
    /// first: no record holds more than a fixed size of what a request sent.
    pub fn after(head: &Checkpoint, event: AuditEvent) -> AuditRecord {
        let event = event.bounded();
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
