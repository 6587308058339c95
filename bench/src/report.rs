//! The printed result: one row per (operation, clients, target), throughput ratios of the
//! plugin to each baseline, and the verdict lines for the plugin's targets.

use std::fmt::Write;
use std::time::Duration;

use crate::load::Summary;

/// Decrypt throughput target: at least this fraction of the slower baseline...
pub const THROUGHPUT_TARGET: f64 = 0.7;
/// ...at this many clients (also where the p99 target is judged).
pub const TARGET_CLIENTS: usize = 8;
/// Decrypt p99 target.
pub const P99_TARGET: Duration = Duration::from_millis(2);

/// A KMS operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Encrypt of a 32-byte seed.
    Encrypt,
    /// Decrypt of a ciphertext made beforehand.
    Decrypt,
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            Op::Encrypt => "Encrypt",
            Op::Decrypt => "Decrypt",
        })
    }
}

/// One operation at one concurrency, for all three targets.
#[derive(Debug, Clone)]
pub struct Row {
    /// The operation.
    pub op: Op,
    /// Concurrent clients (tasks for gRPC targets, threads for the raw HSM).
    pub clients: usize,
    /// `kms-plugin serve`.
    pub plugin: Summary,
    /// `BlockingKeystore` directly.
    pub raw: Summary,
    /// Bare tonic echo service.
    pub echo: Summary,
}

fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0).then(|| a / b)
}

impl Row {
    /// The slower baseline (by throughput): its name and summary.
    pub fn slower_baseline(&self) -> (&'static str, &Summary) {
        if self.raw.throughput <= self.echo.throughput {
            ("raw-HSM", &self.raw)
        } else {
            ("echo", &self.echo)
        }
    }

    /// Throughput ratios plugin/raw, plugin/echo, plugin/min(raw, echo).
    pub fn ratios(&self) -> [Option<f64>; 3] {
        let p = self.plugin.throughput;
        [
            ratio(p, self.raw.throughput),
            ratio(p, self.echo.throughput),
            ratio(p, self.slower_baseline().1.throughput),
        ]
    }
}

/// Microseconds.
pub fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map_or_else(|| "-".to_owned(), |r| format!("{r:.2}x"))
}

fn clients_text(n: usize) -> String {
    format!("{n} client{}", if n == 1 { "" } else { "s" })
}

/// The table. Ratio columns are throughput ratios, on the plugin's row.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<8} {:>7}  {:<8} {:>10} {:>9} {:>9} {:>7}  {:>10} {:>11} {:>10}",
        "op",
        "clients",
        "target",
        "ops/s",
        "p50 µs",
        "p99 µs",
        "errors",
        "plugin/raw",
        "plugin/echo",
        "plugin/min"
    );
    for row in rows {
        let [vs_raw, vs_echo, vs_min] = row.ratios();
        for (name, s) in [
            ("plugin", &row.plugin),
            ("raw-HSM", &row.raw),
            ("echo", &row.echo),
        ] {
            let _ = write!(
                out,
                "{:<8} {:>7}  {:<8} {:>10.0} {:>9.1} {:>9.1} {:>7}",
                row.op,
                row.clients,
                name,
                s.throughput,
                us(s.p50),
                us(s.p99),
                s.errors
            );
            if name == "plugin" {
                let _ = write!(
                    out,
                    "  {:>10} {:>11} {:>10}",
                    fmt_ratio(vs_raw),
                    fmt_ratio(vs_echo),
                    fmt_ratio(vs_min)
                );
            }
            out.push('\n');
        }
    }
    out
}

/// Failures seen in any cell, one line each (empty if none).
pub fn errors(rows: &[Row]) -> Vec<String> {
    let mut out = Vec::new();
    for row in rows {
        for (name, s) in [
            ("plugin", &row.plugin),
            ("raw-HSM", &row.raw),
            ("echo", &row.echo),
        ] {
            if s.errors > 0 {
                out.push(format!(
                    "{} {} {name}: {} errors, first: {}",
                    row.op,
                    clients_text(row.clients),
                    s.errors,
                    s.first_error.as_deref().unwrap_or("?")
                ));
            }
        }
    }
    out
}

/// Milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A verdict's word.
pub fn mark(pass: bool) -> &'static str {
    if pass {
        "PASS"
    } else {
        "MISS"
    }
}

fn errors_note(s: &Summary) -> String {
    if s.errors > 0 {
        format!("; the plugin failed {} requests", s.errors)
    } else {
        String::new()
    }
}

/// The two verdict lines. A target with failed plugin requests in its cell is a MISS.
pub fn verdicts(rows: &[Row]) -> [String; 2] {
    let decrypts: Vec<&Row> = rows.iter().filter(|r| r.op == Op::Decrypt).collect();
    let at_target = decrypts.iter().find(|r| r.clients == TARGET_CLIENTS);
    let thr_name = format!(
        "Decrypt throughput at {TARGET_CLIENTS} clients >= {THROUGHPUT_TARGET}x the slower baseline"
    );
    let p99_name = format!("Decrypt p99 < {} ms", P99_TARGET.as_millis());
    let Some(row) = at_target else {
        let na = format!("n/a ({} not measured)", clients_text(TARGET_CLIENTS));
        return [format!("{thr_name}: {na}"), format!("{p99_name}: {na}")];
    };

    let (base_name, base) = row.slower_baseline();
    let r = ratio(row.plugin.throughput, base.throughput).unwrap_or(0.0);
    let other = if base_name == "echo" {
        format!("raw-HSM {:.0} ops/s", row.raw.throughput)
    } else {
        format!("echo {:.0} ops/s", row.echo.throughput)
    };
    let thr = format!(
        "{thr_name}: {} (plugin {:.0} ops/s = {r:.2}x {base_name} {:.0} ops/s; {other}{})",
        mark(r >= THROUGHPUT_TARGET && row.plugin.errors == 0),
        row.plugin.throughput,
        base.throughput,
        errors_note(&row.plugin)
    );

    let others: Vec<String> = decrypts
        .iter()
        .filter(|r| r.clients != TARGET_CLIENTS)
        .map(|r| {
            format!(
                "{}: {:.1} µs {}",
                clients_text(r.clients),
                us(r.plugin.p99),
                if r.plugin.p99 < P99_TARGET {
                    "under"
                } else {
                    "over"
                }
            )
        })
        .collect();
    let p99 = format!(
        "{p99_name}: {} (plugin p99 {:.1} µs at {}{}{})",
        mark(row.plugin.p99 < P99_TARGET && row.plugin.ops > 0 && row.plugin.errors == 0),
        us(row.plugin.p99),
        clients_text(TARGET_CLIENTS),
        if others.is_empty() {
            String::new()
        } else {
            format!("; for information {}", others.join(", "))
        },
        errors_note(&row.plugin)
    );
    [thr, p99]
}

/// For information, not a verdict: on a machine where client, plugin and HSM share the same
/// cores, an ideal plugin that added nothing to the gRPC path (echo) and the HSM operation
/// (raw) would still need the CPU of both per request, so its throughput is bounded by
/// `1 / (1/echo + 1/raw)`. Shows that bound at the target concurrency and how close the
/// plugin comes to it.
pub fn shared_cpu_bound(rows: &[Row]) -> Option<String> {
    let row = rows
        .iter()
        .find(|r| r.op == Op::Decrypt && r.clients == TARGET_CLIENTS)?;
    let (e, r) = (row.echo.throughput, row.raw.throughput);
    if e <= 0.0 || r <= 0.0 {
        return None;
    }
    let bound = 1.0 / (1.0 / e + 1.0 / r);
    Some(format!(
        "Decrypt at {TARGET_CLIENTS} clients, shared-CPU bound 1/(1/echo + 1/raw) = {bound:.0} ops/s \
         (= {:.2}x echo): the plugin reaches {:.2} of it",
        bound / e,
        row.plugin.throughput / bound
    ))
}

/// The bound closed-loop clients put on latency, printed beside the p99 verdict: `clients`
/// each waiting for its answer before the next request make the mean latency clients /
/// throughput (Little's law), and the p99 is at least that. Empty when the bound is below the
/// target (it then says nothing about the verdict).
pub fn closed_loop_bound(clients: usize, throughput: f64, target: Duration) -> String {
    if throughput <= 0.0 {
        return String::new();
    }
    let mean = Duration::from_secs_f64(clients as f64 / throughput);
    if mean < target {
        return String::new();
    }
    format!(
        "; closed-loop bound: mean latency = {clients} / {throughput:.0} ops/s = {:.1} ms \
         >= the target, which needs > {:.0} ops/s at this concurrency",
        ms(mean),
        clients as f64 / target.as_secs_f64()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_cpu_bound_is_the_harmonic_sum() {
        let dec = row(8, s(20_000.0, 500), s(60_000.0, 20), s(40_000.0, 300));
        let line = shared_cpu_bound(std::slice::from_ref(&dec)).unwrap_or_default();
        assert!(line.contains("= 24000 ops/s"), "{line}");
        assert!(line.contains("(= 0.60x echo)"), "{line}");
        assert!(line.contains("reaches 0.83 of it"), "{line}");
        let mut enc = dec.clone();
        enc.op = Op::Encrypt;
        assert!(shared_cpu_bound(&[enc]).is_none());
        assert!(shared_cpu_bound(&[row(64, s(1.0, 1), s(1.0, 1), s(1.0, 1))]).is_none());
    }

    fn s(throughput: f64, p99_us: u64) -> Summary {
        Summary {
            ops: 100,
            throughput,
            p99: Duration::from_micros(p99_us),
            ..Summary::default()
        }
    }

    fn row(clients: usize, plugin: Summary, raw: Summary, echo: Summary) -> Row {
        Row {
            op: Op::Decrypt,
            clients,
            plugin,
            raw,
            echo,
        }
    }

    #[test]
    fn ratios_use_the_slower_baseline() {
        let r = row(8, s(700.0, 1), s(1000.0, 1), s(4000.0, 1));
        assert_eq!(r.slower_baseline().0, "raw-HSM");
        let [a, b, c] = r.ratios();
        assert_eq!((a, b, c), (Some(0.7), Some(0.175), Some(0.7)));
        let r = row(8, s(700.0, 1), s(4000.0, 1), s(1000.0, 1));
        assert_eq!(r.slower_baseline().0, "echo");
        assert_eq!(r.ratios()[0], Some(0.175));
        let r = row(8, s(1.0, 1), s(0.0, 1), s(0.0, 1));
        assert_eq!(r.ratios(), [None, None, None]);
    }

    #[test]
    fn verdicts_pass_miss_and_na() {
        let rows = [
            row(1, s(500.0, 300), s(600.0, 200), s(9000.0, 100)),
            row(8, s(750.0, 1500), s(1000.0, 900), s(20000.0, 400)),
            row(64, s(760.0, 9000), s(1000.0, 5000), s(20000.0, 3000)),
        ];
        let [thr, p99] = verdicts(&rows);
        assert!(
            thr.contains(": PASS (plugin 750 ops/s = 0.75x raw-HSM 1000 ops/s"),
            "{thr}"
        );
        assert!(
            p99.contains(": PASS (plugin p99 1500.0 µs at 8 clients"),
            "{p99}"
        );
        assert!(p99.contains("64 clients: 9000.0 µs over"), "{p99}");

        let mut slow = rows.clone();
        slow[1].plugin = s(600.0, 2000);
        let [thr, p99] = verdicts(&slow);
        assert!(thr.contains(": MISS (plugin 600 ops/s = 0.60x"), "{thr}");
        assert!(p99.contains(": MISS"), "{p99}");

        let mut failing = rows.clone();
        failing[1].plugin.errors = 3;
        let [thr, _] = verdicts(&failing);
        assert!(
            thr.contains("MISS") && thr.contains("failed 3 requests"),
            "{thr}"
        );

        let [thr, p99] = verdicts(&rows[..1]);
        assert!(thr.ends_with("n/a (8 clients not measured)"), "{thr}");
        assert!(p99.ends_with("n/a (8 clients not measured)"), "{p99}");
    }

    #[test]
    fn table_has_a_line_per_target_and_ratios_on_the_plugin_line() {
        let t = table(&[row(8, s(750.0, 1500), s(1000.0, 900), s(3000.0, 400))]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[1].contains("plugin") && lines[1].ends_with("0.75x       0.25x      0.75x"));
        assert!(lines[2].contains("raw-HSM") && !lines[2].contains('x'));
    }
}
