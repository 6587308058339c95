//! Tests of the audit log types, chain and verification.

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
        (EventKind::AuthFailures(150), "auth_failures:150"),
        (
            EventKind::AuthFailures(u64::MAX),
            "auth_failures:18446744073709551615",
        ),
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
    for bad in [
        "auth_failures:",
        "auth_failures:007",
        "auth_failures:+1",
        "auth_failures:-1",
    ] {
        assert_eq!(bad.parse::<EventKind>(), Err(ParseError::Kind), "{bad}");
    }
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
        format!(
            "#1 2023-11-14T22:13:20.123Z lease denied identity=team/app path=a\\\\nb…[sha256:{} len:3] reason=no_policy",
            hex::encode(Sha256::digest(b"a\nb"))
        ),
        "a control character is stored in the digest form, escaped; display escapes again"
    );
    for t in [-1, i64::MAX, i64::MIN] {
        let r = AuditRecord::chain(None, AuditEvent::new(t, EventKind::Expire, Outcome::Ok));
        assert!(r.to_string().contains(&format!("@{t}ms")));
    }
}
