//! The printed result of `keyhaven-bench dbcreds`: per concurrency, Lease of a dynamic
//! credential through the broker beside the raw `CREATE ROLE` + `DROP ROLE` loop, with the
//! throughput ratio; how fast the broker's revoker dropped the roles of revoked and of expired
//! credentials; and the verdict lines.

use std::fmt::Write;
use std::time::Duration;

use crate::cli::Db;
use crate::load::Summary;
use crate::report::{mark, ms, us};

/// Lease throughput target: at least this fraction of the raw loop, at every concurrency.
pub const THROUGHPUT_TARGET: f64 = 0.5;

/// One concurrency: the broker's Lease and the raw loop.
#[derive(Debug, Clone)]
pub struct Row {
    /// Concurrent clients (tokio tasks, each its own identity; raw: its own connection).
    pub clients: usize,
    /// Lease of `db/CONN/ROLE` through the broker: one role created per Lease.
    pub lease: Summary,
    /// `CREATE ROLE` then `DROP ROLE` straight to the database: one pair per operation.
    pub raw: Summary,
}

impl Row {
    /// Lease throughput over the raw loop's.
    pub fn ratio(&self) -> Option<f64> {
        (self.raw.throughput > 0.0).then(|| self.lease.throughput / self.raw.throughput)
    }
}

/// Roles the broker had to drop, and how long it took until none was left.
#[derive(Debug, Clone)]
pub struct Drain {
    /// What ended the credentials: `revoked` (RevokeLeases) or `expired` (their TTL).
    pub cause: &'static str,
    /// Roles to drop (the `kh_` roles in the database when their leases ended).
    pub roles: i64,
    /// Credentials per second while they were issued (expired only).
    pub issue_rate: Option<f64>,
    /// From the end of the leases (the RevokeLeases call; the common expiry) to the first
    /// role gone.
    pub first: Option<Duration>,
    /// From the same moment to no role left; `None` if some were left when the bench
    /// stopped waiting.
    pub all: Option<Duration>,
    /// Roles left when the bench stopped waiting (0 when all went).
    pub left: i64,
    /// How long the bench watched.
    pub watched: Duration,
}

impl Drain {
    /// Roles dropped per second, from the end of the leases to the last one gone (or to the
    /// end of the watch, counting the ones that went).
    pub fn rate(&self) -> Option<f64> {
        let (dropped, t) = match self.all {
            Some(t) => (self.roles, t),
            None => (self.roles - self.left, self.watched),
        };
        (t > Duration::ZERO && dropped > 0).then(|| dropped as f64 / t.as_secs_f64())
    }
}

fn clients_text(n: usize) -> String {
    format!("{n} client{}", if n == 1 { "" } else { "s" })
}

fn secs(d: Option<Duration>) -> String {
    d.map_or_else(|| "-".to_owned(), |d| format!("{:.2}", d.as_secs_f64()))
}

fn num(r: Option<f64>) -> String {
    r.map_or_else(|| "-".to_owned(), |r| format!("{r:.0}"))
}

/// The throughput table; the ratio is on the Lease rows.
pub fn table(db: Db, rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<9} {:>7}  {:<9} {:>9} {:>9} {:>9} {:>7}  {:>7}",
        "store", "clients", "target", "ops/s", "p50 µs", "p99 µs", "errors", "vs raw"
    );
    for row in rows {
        for (name, s) in [("Lease", &row.lease), ("raw-role", &row.raw)] {
            let _ = write!(
                out,
                "{:<9} {:>7}  {:<9} {:>9.0} {:>9.1} {:>9.1} {:>7}",
                db,
                row.clients,
                name,
                s.throughput,
                us(s.p50),
                us(s.p99),
                s.errors
            );
            if name == "Lease" {
                let _ = write!(
                    out,
                    "  {:>7}",
                    row.ratio()
                        .map_or_else(|| "-".to_owned(), |r| format!("{r:.2}x"))
                );
            }
            out.push('\n');
        }
    }
    out
}

/// The revocation table.
pub fn drain_table(drains: &[Drain]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<8} {:>7} {:>9} {:>12} {:>12} {:>10} {:>6}",
        "ended", "roles", "issued/s", "first gone s", "all gone s", "dropped/s", "left"
    );
    for d in drains {
        let _ = writeln!(
            out,
            "{:<8} {:>7} {:>9} {:>12} {:>12} {:>10} {:>6}",
            d.cause,
            d.roles,
            num(d.issue_rate),
            secs(d.first),
            secs(d.all),
            num(d.rate()),
            d.left
        );
    }
    out
}

/// Failures seen in any cell, one line each (empty if none).
pub fn errors(rows: &[Row]) -> Vec<String> {
    let mut out = Vec::new();
    for row in rows {
        for (name, s) in [("Lease", &row.lease), ("raw-role", &row.raw)] {
            if s.errors > 0 {
                out.push(format!(
                    "{} {name}: {} errors, first: {}",
                    clients_text(row.clients),
                    s.errors,
                    s.first_error.as_deref().unwrap_or("?")
                ));
            }
        }
    }
    out
}

/// The verdict line of the throughput target (judged at every concurrency, a cell with
/// failed requests is a MISS), the p99s for information, and a line per drain (no target).
pub fn verdicts(rows: &[Row], drains: &[Drain]) -> Vec<String> {
    let ratios: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{}: {:.0}/s vs {:.0}/s = {}{}",
                clients_text(r.clients),
                r.lease.throughput,
                r.raw.throughput,
                r.ratio()
                    .map_or_else(|| "-".to_owned(), |x| format!("{x:.2}x")),
                if r.lease.errors > 0 {
                    format!(", {} failed", r.lease.errors)
                } else {
                    String::new()
                }
            )
        })
        .collect();
    let pass = !rows.is_empty()
        && rows.iter().all(|r| {
            r.lease.errors == 0 && r.lease.ops > 0 && r.ratio().unwrap_or(0.0) >= THROUGHPUT_TARGET
        });
    let mut out = vec![format!(
        "credentials issued per second >= {THROUGHPUT_TARGET}x the raw CREATE ROLE + DROP ROLE \
         loop at every concurrency: {} ({})",
        mark(pass),
        ratios.join("; ")
    )];
    let p99: Vec<String> = rows
        .iter()
        .map(|r| format!("{} {:.1} ms", clients_text(r.clients), ms(r.lease.p99)))
        .collect();
    out.push(format!(
        "Lease p99 (for information, no target): {}",
        p99.join(", ")
    ));
    let raw_1 = rows
        .iter()
        .find(|r| r.clients == 1)
        .map(|r| r.raw.throughput);
    for d in drains {
        let done = match d.all {
            Some(t) => format!(
                "all {} roles gone {:.1} s after the leases {}",
                d.roles,
                t.as_secs_f64(),
                if d.cause == "expired" {
                    "expired"
                } else {
                    "were revoked"
                }
            ),
            None => format!(
                "{} of {} roles still there after {:.1} s",
                d.left,
                d.roles,
                d.watched.as_secs_f64()
            ),
        };
        out.push(format!(
            "roles of {} credentials dropped per second (for information, no target): {} \
             ({done}{})",
            d.cause,
            num(d.rate()),
            raw_1.map_or_else(String::new, |r| format!(
                "; the raw loop creates and drops {r:.0} roles/s on 1 connection"
            ))
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(throughput: f64, p99_ms: u64) -> Summary {
        Summary {
            ops: 100,
            throughput,
            p99: Duration::from_millis(p99_ms),
            ..Summary::default()
        }
    }

    fn row(clients: usize, lease: f64, raw: f64) -> Row {
        Row {
            clients,
            lease: s(lease, 5),
            raw: s(raw, 2),
        }
    }

    #[test]
    fn throughput_verdict_needs_every_concurrency() {
        let rows = [row(1, 300.0, 500.0), row(16, 600.0, 1000.0)];
        let v = verdicts(&rows, &[]);
        assert!(
            v[0].contains(": PASS (1 client: 300/s vs 500/s = 0.60x"),
            "{}",
            v[0]
        );
        assert!(
            v[1].contains("1 client 5.0 ms, 16 clients 5.0 ms"),
            "{}",
            v[1]
        );
        let low = [row(1, 300.0, 500.0), row(16, 400.0, 1000.0)];
        assert!(verdicts(&low, &[])[0].contains(": MISS"));
        let mut failing = rows.clone();
        failing[0].lease.errors = 2;
        let v = verdicts(&failing, &[]);
        assert!(
            v[0].contains(": MISS") && v[0].contains("2 failed"),
            "{}",
            v[0]
        );
        assert!(verdicts(&[], &[])[0].contains(": MISS"));
    }

    #[test]
    fn drain_rate_counts_what_went() {
        let mut d = Drain {
            cause: "expired",
            roles: 10_000,
            issue_rate: Some(250.0),
            first: Some(Duration::from_secs(1)),
            all: Some(Duration::from_secs(200)),
            left: 0,
            watched: Duration::from_secs(201),
        };
        assert_eq!(d.rate(), Some(50.0));
        let v = verdicts(&[row(1, 300.0, 500.0)], std::slice::from_ref(&d));
        assert!(v[2].contains(": 50 (all 10000 roles gone 200.0 s after the leases expired"));
        assert!(v[2].contains("creates and drops 500 roles/s"), "{}", v[2]);
        d.all = None;
        d.left = 4_000;
        d.watched = Duration::from_secs(100);
        assert_eq!(d.rate(), Some(60.0));
        assert!(drain_table(&[d.clone()])
            .lines()
            .nth(1)
            .is_some_and(|l| { l.starts_with("expired") && l.ends_with(" 60   4000") }));
        d.left = d.roles;
        assert_eq!(d.rate(), None);
    }

    #[test]
    fn table_has_the_ratio_on_the_lease_line() {
        let t = table(Db::Sqlite, &[row(16, 600.0, 1000.0)]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(
            lines[1].contains("Lease") && lines[1].ends_with("0.60x"),
            "{t}"
        );
        assert!(
            lines[2].contains("raw-role") && !lines[2].contains('x'),
            "{t}"
        );
    }
}
