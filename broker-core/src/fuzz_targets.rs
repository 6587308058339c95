//! Bodies of the fuzz targets over this crate's parsers (`fuzz/` runs them under libFuzzer;
//! `hsm-tests/tests/fuzz_corpus.rs` replays the committed corpora through them on stable).
//! Each takes arbitrary bytes, must never panic, and checks the invariants its parser
//! promises; a broken invariant is a panic, so the fuzzer reports it.

use std::str::FromStr;

use crate::audit::{self, AuditRecord, Checkpoint};
use crate::policy::{PolicySet, DEFAULT_MAX_TTL_CAP};

/// A `policies:` YAML document: parse and validate; a set that validates writes back to YAML
/// that reads back to the same policies.
pub fn policy_document(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(set) = PolicySet::from_yaml(text, DEFAULT_MAX_TTL_CAP) else {
        return;
    };
    let yaml = match set.to_yaml() {
        Ok(y) => y,
        Err(e) => panic!("a valid set does not serialize: {e}"),
    };
    match PolicySet::from_yaml(&yaml, DEFAULT_MAX_TTL_CAP) {
        Ok(again) => assert_eq!(again.policies(), set.policies(), "YAML round trip"),
        Err(e) => panic!("a valid set's YAML is refused: {e}"),
    }
}

/// A JSON-lines audit log: decode each line, verify the chain from genesis; a decoded record
/// re-encodes to a line that decodes to the same record; a `seq:hash` checkpoint parses and
/// prints back.
pub fn audit_log(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut records = Vec::new();
    for line in text.lines() {
        if let Ok(cp) = Checkpoint::from_str(line) {
            assert_eq!(Checkpoint::from_str(&cp.to_string()).ok(), Some(cp));
        }
        let Ok(r) = AuditRecord::from_json_line(line) else {
            continue;
        };
        let again = AuditRecord::from_json_line(&r.to_json_line());
        assert_eq!(again.ok().as_ref(), Some(&r), "JSON line round trip");
        records.push(r);
    }
    if let Ok(report) = audit::verify(&records) {
        // A chain that verifies stays verified when re-chained from its own records' events.
        let mut prev: Option<AuditRecord> = None;
        for r in &records {
            let next = AuditRecord::chain(prev.as_ref(), r.event.clone());
            assert_eq!(
                &next, r,
                "a verified record is the one its predecessor chains to"
            );
            prev = Some(next);
        }
        assert_eq!(
            report.checkpoint(),
            prev.map_or_else(Checkpoint::genesis, |r| r.checkpoint())
        );
    }
}
