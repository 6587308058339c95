//! Verification of the chain, with or without an anchor.

use super::*;

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
