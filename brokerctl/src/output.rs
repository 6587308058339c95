//! Formatting: aligned tables, times, durations, and JSON documents.

use std::io::Write;
use std::time::{Duration, UNIX_EPOCH};

/// Writes `rows` under `headers`, columns padded to the widest cell, two spaces apart.
/// Cells are printed with control characters escaped.
pub fn table(out: &mut dyn Write, headers: &[&str], rows: &[Vec<String>]) -> std::io::Result<()> {
    let clean: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| c.escape_debug().to_string()).collect())
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &clean {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |out: &mut dyn Write, cells: &mut dyn Iterator<Item = &str>| {
        let mut s = String::new();
        for (i, cell) in cells.enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            s.push_str(cell);
            let pad = widths.get(i).copied().unwrap_or(0);
            s.extend(std::iter::repeat_n(
                ' ',
                pad.saturating_sub(cell.chars().count()),
            ));
        }
        writeln!(out, "{}", s.trim_end())
    };
    line(out, &mut headers.iter().copied())?;
    for row in &clean {
        line(out, &mut row.iter().map(String::as_str))?;
    }
    Ok(())
}

/// Pretty JSON and a newline.
pub fn json(out: &mut dyn Write, value: &serde_json::Value) -> std::io::Result<()> {
    serde_json::to_writer_pretty(&mut *out, value)?;
    writeln!(out)
}

/// RFC 3339 UTC (seconds) of a Unix time in milliseconds; `-` for 0, `@<ms>ms` out of range.
pub fn time_ms(ms: i64) -> String {
    if ms == 0 {
        return "-".into();
    }
    match u64::try_from(ms) {
        // humantime formats years up to 9999.
        Ok(u) if u < 253_402_300_800_000 => {
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(u)).to_string()
        }
        _ => format!("@{ms}ms"),
    }
}

/// As [`time_ms`] for Unix seconds.
pub fn time_s(s: i64) -> String {
    time_ms(s.saturating_mul(1000))
}

pub use keyhaven_broker_core::audit::now_ms;

/// A whole-second duration like `5m 30s`.
pub fn secs(s: u64) -> String {
    if s == 0 {
        return "0s".into();
    }
    humantime::format_duration(Duration::from_secs(s)).to_string()
}

/// `in 5m`, `3m ago` or `now` for a time in ms relative to `now_ms`.
pub fn relative(at_ms: i64, now_ms: i64) -> String {
    // Nearest second, so that a fresh 1h lease reads `in 1h`, not `in 59m 59s`.
    let diff_ms = at_ms.saturating_sub(now_ms);
    let diff = (diff_ms.saturating_add(500 * diff_ms.signum())) / 1000;
    match diff {
        0 => "now".into(),
        d if d > 0 => format!("in {}", secs(d.unsigned_abs())),
        d => format!("{} ago", secs(d.unsigned_abs())),
    }
}

/// A lease's state for `leases list`: `active`, `expired`, or the end reason.
pub fn lease_state(ended_ms: i64, end_reason: &str, expires_ms: i64, now_ms: i64) -> String {
    if ended_ms != 0 {
        if end_reason.is_empty() {
            "ended".into()
        } else {
            end_reason.to_owned()
        }
    } else if expires_ms <= now_ms {
        "expired".into()
    } else {
        "active".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_escape() {
        let mut out = Vec::new();
        table(
            &mut out,
            &["ID", "LABEL"],
            &[
                vec!["abc".into(), "x".into()],
                vec!["a".into(), "two\nlines".into()],
            ],
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text, "ID   LABEL\nabc  x\na    two\\nlines\n");
    }

    #[test]
    fn times_and_durations() {
        assert_eq!(time_ms(0), "-");
        assert_eq!(time_ms(1_700_000_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(time_s(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(time_ms(-5), "@-5ms");
        assert_eq!(secs(330), "5m 30s");
        assert_eq!(secs(0), "0s");
        assert_eq!(relative(10_000 + 300_000, 10_000), "in 5m");
        assert_eq!(relative(10_000, 70_000), "1m ago");
        assert_eq!(relative(3_600_000, 300), "in 1h");
        assert_eq!(relative(1_000, 1_400), "now");
        assert_eq!(lease_state(0, "", 2, 1), "active");
        assert_eq!(lease_state(0, "", 1, 1), "expired");
        assert_eq!(lease_state(5, "revoked", 9, 1), "revoked");
    }
}
