//! The printed result of `keyhaven-bench broker`: per database and concurrency, Lease and
//! Renew through the broker beside the raw-insert and raw-JWT baselines, with throughput
//! ratios; the broker's memory; and the verdict lines for the broker's targets.

use std::fmt::Write;
use std::time::Duration;

use crate::broker_proc::Memory;
use crate::cli::Db;
use crate::load::Summary;
use crate::report::{closed_loop_bound, mark, ms, us};

/// Lease and Renew throughput target: at least this fraction of the raw-insert baseline, at
/// every measured concurrency.
pub const THROUGHPUT_TARGET: f64 = 0.5;
/// Lease and Renew p99 target...
pub const P99_TARGET: Duration = Duration::from_millis(20);
/// ...judged at this many clients.
pub const P99_CLIENTS: usize = 128;
/// Resident memory target...
pub const RSS_TARGET_MIB: f64 = 100.0;
/// ...with this many active leases.
pub const RSS_LEASES: usize = 100_000;

/// One database at one concurrency: the broker's two operations and both baselines.
#[derive(Debug, Clone)]
pub struct Row {
    /// Database.
    pub db: Db,
    /// Concurrent clients (tokio tasks, each its own identity).
    pub clients: usize,
    /// Lease through the broker.
    pub lease: Summary,
    /// Lease through two broker replicas on one database, the clients' connections spread
    /// over both (PostgreSQL only).
    pub lease_replicas: Option<Summary>,
    /// Renew through the broker.
    pub renew: Summary,
    /// sqlx INSERT + SELECT of one row.
    pub insert: Summary,
    /// Token verification alone.
    pub jwt: Summary,
}

/// The broker's memory on one database.
#[derive(Debug, Clone)]
pub struct MemRow {
    /// Database.
    pub db: Db,
    /// Once ready, before any load.
    pub started: Memory,
    /// After every load cell.
    pub loaded: Memory,
    /// With the filled leases, after a few Lease and Renew calls (`None`: not filled).
    pub filled: Option<Memory>,
    /// Leases inserted.
    pub leases: usize,
    /// `keyhaven_broker_active_leases` as the broker reported it at the reading.
    pub active: Option<i64>,
}

fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0).then(|| a / b)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map_or_else(|| "-".to_owned(), |r| format!("{r:.2}x"))
}

fn clients_text(n: usize) -> String {
    format!("{n} client{}", if n == 1 { "" } else { "s" })
}

impl Row {
    /// The cells with their names, broker first.
    pub fn cells(&self) -> Vec<(&'static str, &Summary)> {
        let mut cells = vec![("Lease", &self.lease)];
        if let Some(two) = &self.lease_replicas {
            cells.push(("Lease x2", two));
        }
        cells.extend([
            ("Renew", &self.renew),
            ("raw-insert", &self.insert),
            ("raw-jwt", &self.jwt),
        ]);
        cells
    }
}

/// The throughput table. Ratio columns are on the broker's rows.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<9} {:>7}  {:<10} {:>9} {:>9} {:>9} {:>7}  {:>9} {:>7}",
        "db", "clients", "target", "ops/s", "p50 µs", "p99 µs", "errors", "vs insert", "vs jwt"
    );
    for row in rows {
        for (name, s) in row.cells() {
            let _ = write!(
                out,
                "{:<9} {:>7}  {:<10} {:>9.0} {:>9.1} {:>9.1} {:>7}",
                row.db,
                row.clients,
                name,
                s.throughput,
                us(s.p50),
                us(s.p99),
                s.errors
            );
            if !name.starts_with("raw-") {
                let _ = write!(
                    out,
                    "  {:>9} {:>7}",
                    fmt_ratio(ratio(s.throughput, row.insert.throughput)),
                    fmt_ratio(ratio(s.throughput, row.jwt.throughput))
                );
            }
            out.push('\n');
        }
    }
    out
}

/// The memory table (MiB).
pub fn memory_table(mem: &[MemRow]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<9} {:>12} {:>11} {:>17} {:>12} {:>14}",
        "db", "RSS at start", "after load", "with N leases", "peak (HWM)", "active leases"
    );
    for m in mem {
        let filled = m.filled.map_or_else(
            || "-".to_owned(),
            |f| format!("{:.1} ({})", mib(f.rss_kib), m.leases),
        );
        let peak = m.filled.unwrap_or(m.loaded).hwm_kib;
        let _ = writeln!(
            out,
            "{:<9} {:>12.1} {:>11.1} {:>17} {:>12.1} {:>14}",
            m.db,
            mib(m.started.rss_kib),
            mib(m.loaded.rss_kib),
            filled,
            mib(peak),
            m.active.map_or_else(|| "-".to_owned(), |n| n.to_string())
        );
    }
    out
}

/// Failures seen in any cell, one line each (empty if none).
pub fn errors(rows: &[Row]) -> Vec<String> {
    let mut out = Vec::new();
    for row in rows {
        for (name, s) in row.cells() {
            if s.errors > 0 {
                out.push(format!(
                    "{} {} {name}: {} errors, first: {}",
                    row.db,
                    clients_text(row.clients),
                    s.errors,
                    s.first_error.as_deref().unwrap_or("?")
                ));
            }
        }
    }
    out
}

/// A broker operation the verdicts judge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Lease, through one replica.
    Lease,
    /// Renew, through one replica.
    Renew,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Lease => "Lease",
            Op::Renew => "Renew",
        }
    }

    fn of(self, r: &Row) -> &Summary {
        match self {
            Op::Lease => &r.lease,
            Op::Renew => &r.renew,
        }
    }
}

/// Every verdict line for `db`: throughput and p99 of Lease and of Renew, memory, and (when
/// measured) the two-replica Lease line, which has no target.
pub fn verdicts(db: Db, rows: &[Row], mem: Option<&MemRow>) -> Vec<String> {
    let mut out = Vec::new();
    for op in [Op::Lease, Op::Renew] {
        out.push(throughput_verdict(db, op, rows));
        out.push(p99_verdict(db, op, rows));
    }
    out.push(memory_verdict(db, mem));
    out.extend(replicas_line(db, rows));
    out
}

/// `op`'s throughput against raw-insert, judged at **each** measured concurrency of `db`. A
/// cell with failed requests is a MISS.
pub fn throughput_verdict(db: Db, op: Op, rows: &[Row]) -> String {
    let rows: Vec<&Row> = rows.iter().filter(|r| r.db == db).collect();
    let name = format!(
        "[{db}] {} throughput >= {THROUGHPUT_TARGET}x the raw-insert baseline at every concurrency",
        op.name()
    );
    if rows.is_empty() {
        return format!("{name}: n/a (not measured)");
    }
    let vs_insert = |r: &Row| ratio(op.of(r).throughput, r.insert.throughput);
    let parts: Vec<String> = rows
        .iter()
        .map(|r| {
            let s = op.of(r);
            let failed = if s.errors > 0 {
                format!(", {} failed", s.errors)
            } else {
                String::new()
            };
            format!(
                "{}: {:.0}/{:.0} ops/s = {}{failed}",
                clients_text(r.clients),
                s.throughput,
                r.insert.throughput,
                fmt_ratio(vs_insert(r))
            )
        })
        .collect();
    let pass = rows
        .iter()
        .all(|r| op.of(r).errors == 0 && vs_insert(r).is_some_and(|x| x >= THROUGHPUT_TARGET));
    format!("{name}: {} ({})", mark(pass), parts.join("; "))
}

/// `op`'s p99 at [`P99_CLIENTS`] on `db`; the other concurrencies for information.
pub fn p99_verdict(db: Db, op: Op, rows: &[Row]) -> String {
    let rows: Vec<&Row> = rows.iter().filter(|r| r.db == db).collect();
    let name = format!(
        "[{db}] {} p99 < {} ms at {}",
        op.name(),
        P99_TARGET.as_millis(),
        clients_text(P99_CLIENTS)
    );
    let Some(r) = rows.iter().find(|r| r.clients == P99_CLIENTS) else {
        return format!("{name}: n/a ({} not measured)", clients_text(P99_CLIENTS));
    };
    let s = op.of(r);
    let others: Vec<String> = rows
        .iter()
        .filter(|o| o.clients != P99_CLIENTS)
        .map(|o| format!("{}: {:.1} ms", clients_text(o.clients), ms(op.of(o).p99)))
        .collect();
    format!(
        "{name}: {} (p99 {:.1} ms, p50 {:.1} ms{}{}){}",
        mark(s.p99 < P99_TARGET && s.ops > 0 && s.errors == 0),
        ms(s.p99),
        ms(s.p50),
        if s.errors > 0 {
            format!("; {} failed", s.errors)
        } else {
            String::new()
        },
        if others.is_empty() {
            String::new()
        } else {
            format!("; for information {}", others.join(", "))
        },
        closed_loop_bound(P99_CLIENTS, s.throughput, P99_TARGET)
    )
}

/// Resident memory with [`RSS_LEASES`] active leases.
pub fn memory_verdict(db: Db, mem: Option<&MemRow>) -> String {
    let name = format!("[{db}] broker RSS < {RSS_TARGET_MIB} MiB with {RSS_LEASES} active leases");
    let Some(m) = mem else {
        return format!("{name}: n/a (not measured)");
    };
    match m.filled {
        Some(f) if m.leases >= RSS_LEASES => {
            let active_ok = m.active.is_some_and(|a| a >= RSS_LEASES as i64);
            format!(
                "{name}: {} (VmRSS {:.1} MiB, peak VmHWM {:.1} MiB; {} active per /metrics{})",
                mark(mib(f.rss_kib) < RSS_TARGET_MIB && active_ok),
                mib(f.rss_kib),
                mib(f.hwm_kib),
                m.active.map_or_else(|| "?".to_owned(), |a| a.to_string()),
                if active_ok {
                    ""
                } else {
                    ", fewer than the target"
                }
            )
        }
        _ => format!(
            "{name}: n/a (--leases {}; VmRSS after load {:.1} MiB)",
            m.leases,
            mib(m.loaded.rss_kib)
        ),
    }
}

/// Lease through two replicas beside one, per concurrency (no target: for information).
pub fn replicas_line(db: Db, rows: &[Row]) -> Option<String> {
    let parts: Vec<String> = rows
        .iter()
        .filter(|r| r.db == db)
        .filter_map(|r| {
            let two = r.lease_replicas.as_ref()?;
            Some(format!(
                "{}: {:.0} vs {:.0} ops/s = {}, p99 {:.1} vs {:.1} ms",
                clients_text(r.clients),
                two.throughput,
                r.lease.throughput,
                fmt_ratio(ratio(two.throughput, r.lease.throughput)),
                ms(two.p99),
                ms(r.lease.p99)
            ))
        })
        .collect();
    (!parts.is_empty()).then(|| {
        format!(
            "[{db}] Lease with 2 replicas beside 1 (for information): {}",
            parts.join("; ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(throughput: f64, p99_ms: u64) -> Summary {
        Summary {
            ops: 100,
            throughput,
            p50: Duration::from_millis(p99_ms / 2),
            p99: Duration::from_millis(p99_ms),
            ..Summary::default()
        }
    }

    fn row(db: Db, clients: usize, lease: f64, p99_ms: u64, insert: f64) -> Row {
        Row {
            db,
            clients,
            lease: s(lease, p99_ms),
            lease_replicas: None,
            renew: s(lease * 1.5, p99_ms),
            insert: s(insert, 1),
            jwt: s(10_000.0, 1),
        }
    }

    fn mem(rss_mib: u64, leases: usize, active: i64) -> MemRow {
        let m = |mib: u64| Memory {
            rss_kib: mib * 1024,
            hwm_kib: mib * 1024 + 512,
        };
        MemRow {
            db: Db::Sqlite,
            started: m(10),
            loaded: m(rss_mib),
            filled: (leases > 0).then(|| m(rss_mib)),
            leases,
            active: Some(active),
        }
    }

    #[test]
    fn throughput_verdict_needs_every_concurrency() {
        let rows = [
            row(Db::Sqlite, 1, 600.0, 2, 1000.0),
            row(Db::Sqlite, 16, 500.0, 8, 1000.0),
            row(Db::Postgres, 1, 100.0, 2, 1000.0),
        ];
        let thr = throughput_verdict(Db::Sqlite, Op::Lease, &rows);
        let p99 = p99_verdict(Db::Sqlite, Op::Lease, &rows);
        assert!(
            thr.contains(": PASS (1 client: 600/1000 ops/s = 0.60x; 16 clients: 500/1000"),
            "{thr}"
        );
        assert!(p99.ends_with("n/a (128 clients not measured)"), "{p99}");
        let thr = throughput_verdict(Db::Postgres, Op::Lease, &rows);
        assert!(
            thr.contains(": MISS (1 client: 100/1000 ops/s = 0.10x)"),
            "{thr}"
        );
        let mut failing = rows.clone();
        failing[1].lease.errors = 2;
        let thr = throughput_verdict(Db::Sqlite, Op::Lease, &failing);
        assert!(thr.contains("MISS") && thr.contains("2 failed"), "{thr}");
        // Renew is judged on its own cells: 1.5x Lease here.
        let thr = throughput_verdict(Db::Sqlite, Op::Renew, &failing);
        assert!(
            thr.contains("Renew throughput") && thr.contains(": PASS (1 client: 900/1000"),
            "{thr}"
        );
        let all = verdicts(Db::Sqlite, &[], None);
        let [thr, p99, _, _, rss] = &all[..] else {
            panic!("{all:?}")
        };
        assert!(
            thr.ends_with("n/a (not measured)") && p99.contains("n/a"),
            "{thr}"
        );
        assert!(rss.ends_with("n/a (not measured)"), "{rss}");
    }

    #[test]
    fn p99_verdict_at_128_clients() {
        let rows = [
            row(Db::Postgres, 16, 900.0, 5, 1000.0),
            row(Db::Postgres, 128, 9000.0, 19, 1000.0),
        ];
        let p99 = p99_verdict(Db::Postgres, Op::Lease, &rows);
        assert!(p99.contains(": PASS (p99 19.0 ms, p50 9.0 ms"), "{p99}");
        assert!(
            p99.ends_with("for information 16 clients: 5.0 ms)"),
            "{p99}"
        );
        let slow = [row(Db::Postgres, 128, 900.0, 20, 1000.0)];
        let p99 = p99_verdict(Db::Postgres, Op::Lease, &slow);
        assert!(p99.contains(": MISS (p99 20.0 ms"), "{p99}");
        // 128 clients at 900 ops/s wait 142 ms on average: the bound is printed.
        assert!(
            p99.ends_with(
                "closed-loop bound: mean latency = 128 / 900 ops/s = 142.2 ms >= the target, \
                 which needs > 6400 ops/s at this concurrency"
            ),
            "{p99}"
        );
        let fast = [row(Db::Postgres, 128, 9000.0, 25, 1000.0)];
        let p99 = p99_verdict(Db::Postgres, Op::Lease, &fast);
        assert!(p99.contains(": MISS") && !p99.contains("bound"), "{p99}");
        let p99 = p99_verdict(Db::Postgres, Op::Renew, &slow);
        assert!(p99.starts_with("[postgres] Renew p99"), "{p99}");
    }

    #[test]
    fn memory_verdict_against_the_target() {
        let rss = memory_verdict(Db::Sqlite, Some(&mem(60, 100_000, 100_050)));
        assert!(
            rss.contains(": PASS (VmRSS 60.0 MiB, peak VmHWM 60.5 MiB; 100050 active"),
            "{rss}"
        );
        let rss = memory_verdict(Db::Sqlite, Some(&mem(120, 100_000, 100_050)));
        assert!(rss.contains(": MISS (VmRSS 120.0 MiB"), "{rss}");
        let rss = memory_verdict(Db::Sqlite, Some(&mem(60, 100_000, 10)));
        assert!(
            rss.contains(": MISS") && rss.contains("fewer than the target"),
            "{rss}"
        );
        let rss = memory_verdict(Db::Sqlite, Some(&mem(60, 0, 0)));
        assert!(
            rss.ends_with("n/a (--leases 0; VmRSS after load 60.0 MiB)"),
            "{rss}"
        );
        let t = memory_table(&[mem(60, 100_000, 100_050)]);
        assert!(
            t.lines()
                .nth(1)
                .is_some_and(|l| l.contains("60.0 (100000)")),
            "{t}"
        );
    }

    #[test]
    fn two_replica_lease_is_a_table_line_and_an_information_line() {
        let mut r = row(Db::Postgres, 16, 500.0, 8, 1000.0);
        assert_eq!(replicas_line(Db::Postgres, &[r.clone()]), None);
        r.lease_replicas = Some(s(750.0, 12));
        let t = table(&[r.clone()]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(
            lines[2].contains("Lease x2") && lines[2].ends_with("0.75x   0.07x"),
            "{t}"
        );
        let line = replicas_line(Db::Postgres, &[r.clone()]).unwrap();
        assert!(
            line.ends_with("16 clients: 750 vs 500 ops/s = 1.50x, p99 12.0 vs 8.0 ms"),
            "{line}"
        );
        assert_eq!(verdicts(Db::Postgres, &[r], None).len(), 6);
    }

    #[test]
    fn table_has_four_lines_per_row_and_ratios_on_broker_lines() {
        let t = table(&[row(Db::Sqlite, 16, 500.0, 8, 1000.0)]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 5);
        assert!(
            lines[1].contains("Lease") && lines[1].ends_with("0.50x   0.05x"),
            "{t}"
        );
        assert!(
            lines[2].contains("Renew") && lines[2].ends_with("0.75x   0.07x"),
            "{t}"
        );
        assert!(
            lines[3].contains("raw-insert") && !lines[3].contains('x'),
            "{t}"
        );
    }
}
