//! `brokerctl audit`: verify, tail.

use super::*;

/// Records per `AuditTail` call when reading the whole log to find its end.
pub(super) const TAIL_PAGE: u32 = 1000;

/// `brokerctl audit ...`
pub async fn audit(conn: &ConnArgs, cmd: &AuditCommand, io: &mut Io<'_>) -> Result<(), CtlError> {
    match cmd {
        AuditCommand::Verify { anchor } => {
            let r = Session::open(conn)
                .await?
                .admin
                .audit_verify(pb::AuditVerifyRequest {
                    anchor: anchor.as_ref().map(ToString::to_string).unwrap_or_default(),
                })
                .await
                .map_err(CtlError::remote("AuditVerify"))?
                .into_inner();
            match io.output {
                Output::Json => output::json(
                    io.out,
                    &json!({
                        "ok": r.ok,
                        "records": r.records,
                        "checkpoint": nonempty(&r.checkpoint),
                        "error": nonempty(&r.error),
                    }),
                )?,
                Output::Text if r.ok => {
                    writeln!(io.out, "audit log OK: {} records verified", r.records)?;
                    writeln!(io.out, "checkpoint: {}", r.checkpoint)?;
                }
                Output::Text => {}
            }
            if !r.ok {
                let why = if r.error.is_empty() {
                    "no reason given".to_owned()
                } else {
                    crate::error::one_line(&r.error)
                };
                return Err(CtlError::AuditBroken(why));
            }
        }
        AuditCommand::Tail {
            after,
            limit,
            follow,
            interval,
        } => {
            let limit = (*limit).max(1);
            let s = &mut Session::open(conn).await?;
            let mut last = match after {
                Some(after) => {
                    let page = tail_page(s, *after, limit).await?;
                    print_records(&page, *after, io)?
                }
                None => {
                    let (records, last) = last_records(s, limit as usize).await?;
                    print_records(&records, 0, io)?;
                    last
                }
            };
            if *follow {
                loop {
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => break,
                        _ = tokio::time::sleep(*interval) => {}
                    }
                    // Drain everything new before sleeping again.
                    loop {
                        let page = tail_page(s, last, TAIL_PAGE).await?;
                        let n = page.len();
                        last = print_records(&page, last, io)?;
                        io.out.flush()?;
                        if n < TAIL_PAGE as usize {
                            break;
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

pub(super) async fn tail_page(
    s: &mut Session,
    after_seq: i64,
    limit: u32,
) -> Result<Vec<String>, CtlError> {
    Ok(s.admin
        .audit_tail(pb::AuditTailRequest { after_seq, limit })
        .await
        .map_err(CtlError::remote("AuditTail"))?
        .into_inner()
        .records)
}

/// The last `n` records, found by reading the log page by page (the API counts from the
/// start), and the seq of the very last record (0 for an empty log).
pub(super) async fn last_records(
    s: &mut Session,
    n: usize,
) -> Result<(Vec<String>, i64), CtlError> {
    let mut ring: VecDeque<String> = VecDeque::with_capacity(n.min(10_000));
    let mut after = 0;
    loop {
        let page = tail_page(s, after, TAIL_PAGE).await?;
        let full = page.len() >= TAIL_PAGE as usize;
        for line in page {
            let seq = record_seq(&line).ok_or_else(|| {
                CtlError::BadResponse(format!(
                    "the broker sent an audit record without a seq after {after}"
                ))
            })?;
            if seq <= after {
                return Err(CtlError::BadResponse(format!(
                    "the broker sent audit records out of order (seq {seq} after {after})"
                )));
            }
            after = seq;
            if ring.len() == n {
                ring.pop_front();
            }
            ring.push_back(line);
        }
        if !full {
            return Ok((ring.into(), after));
        }
    }
}

/// Prints records (JSON lines as sent, or one human line each); returns the last seq seen.
pub(super) fn print_records(
    records: &[String],
    mut last: i64,
    io: &mut Io<'_>,
) -> Result<i64, CtlError> {
    for line in records {
        if let Some(seq) = record_seq(line) {
            last = last.max(seq);
        }
        match io.output {
            Output::Json => writeln!(io.out, "{}", line.trim_end())?,
            Output::Text => match AuditRecord::from_json_line(line) {
                Ok(rec) => writeln!(io.out, "{rec}")?,
                Err(e) => writeln!(io.out, "? unreadable record ({e}): {}", line.escape_debug())?,
            },
        }
    }
    Ok(last)
}

pub(super) fn record_seq(line: &str) -> Option<i64> {
    serde_json::from_str::<serde_json::Value>(line)
        .ok()?
        .get("seq")?
        .as_i64()
}
