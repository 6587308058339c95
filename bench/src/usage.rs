//! `keyhaven-bench usage`: the scan rate of `kms-plugin keys usage` over a real etcd filled
//! with values in the apiserver's KMS v2 format, beside a raw paginated range read of the same
//! keys in the same run, and the scan's peak RSS.
//!
//! Each size is measured in alternating rounds (raw, usage, raw, usage, ...); the best round
//! of each is reported, so a noisy neighbour slows both or neither.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use etcd_client::{GetOptions, Txn, TxnOp};
use keyhaven_proto::kms::v2::EncryptedObject;
use testkit::etcd::EtcdMember;

use crate::cli::UsageArgs;
use crate::token::BenchToken;

/// etcd's default `--max-txn-ops` is 128.
const PUTS_PER_TXN: usize = 100;

/// Runs the benchmark and prints the table.
pub fn run(args: &UsageArgs) -> anyhow::Result<()> {
    let plugin = crate::kms::plugin_bin(args.plugin.as_deref())?;
    eprintln!(
        "creating a SoftHSM2 token and two KEKs with {}",
        plugin.display()
    );
    let token = BenchToken::create(&plugin, &args.pkcs11_module)?;
    let mut rotate = token.command(&plugin, 1);
    rotate.args(["keys", "rotate"]).stdout(Stdio::null());
    anyhow::ensure!(rotate.status()?.success(), "kms-plugin keys rotate failed");
    let key_ids = list_key_ids(&token, &plugin)?;
    eprintln!("starting a throwaway etcd member");
    let etcd = EtcdMember::start()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;

    let mut sizes = args.keys.clone();
    sizes.sort_unstable();
    let mut filled = 0usize;
    let mut rows = Vec::new();
    for &n in &sizes {
        eprintln!("filling etcd to {n} keys");
        rt.block_on(fill(&etcd, filled, n, &key_ids, args.value_size))?;
        filled = n;
        let (mut raw, mut usage) = (Duration::MAX, Duration::MAX);
        for round in 0..args.rounds {
            let r = rt.block_on(raw_scan(&etcd, args.page_size, n))?;
            let u = usage_scan(&token, &plugin, &etcd, args.page_size, n)?;
            eprintln!(
                "  {n} keys, round {}: raw {:.0} keys/s, keys usage {:.0} keys/s",
                round + 1,
                n as f64 / r.as_secs_f64(),
                n as f64 / u.as_secs_f64()
            );
            raw = raw.min(r);
            usage = usage.min(u);
        }
        rows.push((n, raw, usage, peak_child_rss_mib()?));
    }

    println!(
        "keys usage over a real etcd ({} B values, page size {}, best of {} alternating rounds)",
        args.value_size, args.page_size, args.rounds
    );
    println!(
        "{:>9} {:>14} {:>16} {:>7} {:>16}",
        "KEYS", "RAW keys/s", "USAGE keys/s", "RATIO", "PEAK RSS MiB"
    );
    for (n, raw, usage, rss) in &rows {
        let (r, u) = (
            *n as f64 / raw.as_secs_f64(),
            *n as f64 / usage.as_secs_f64(),
        );
        println!("{n:>9} {r:>14.0} {u:>16.0} {:>6.2}x {rss:>16.1}", u / r);
    }
    if let Some((n, raw, usage, rss)) = rows.last() {
        let ratio = raw.as_secs_f64() / usage.as_secs_f64();
        println!(
            "\nverdict: scan rate {ratio:.2}x the raw range read at {n} keys (target >= 0.7x): {}",
            if ratio >= 0.7 { "PASS" } else { "MISS" }
        );
        println!(
            "verdict: peak RSS {rss:.1} MiB at {n} keys (target < 64 MiB at 100,000 keys): {}",
            if *n < 100_000 {
                "not measured at 100,000 keys"
            } else if *rss < 64.0 {
                "PASS"
            } else {
                "MISS"
            }
        );
        println!(
            "note: the usage figure is the whole command (process start, HSM login, a count \
             request, the scan); peak RSS is the largest of the bench's finished child processes \
             (getrusage), i.e. the largest scan"
        );
    }
    Ok(())
}

fn list_key_ids(token: &BenchToken, plugin: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let out = token
        .command(plugin, 1)
        .args(["keys", "list", "--json"])
        .output()?;
    anyhow::ensure!(out.status.success(), "kms-plugin keys list failed");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(v.as_array()
        .context("keys list --json")?
        .iter()
        .filter_map(|k| k["key_id"].as_str().map(str::to_owned))
        .collect())
}

/// Writes keys `from..to`: Secrets under the token's keys in turn, every 20th a ConfigMap
/// stored in plain protobuf.
async fn fill(
    etcd: &EtcdMember,
    from: usize,
    to: usize,
    key_ids: &[String],
    value_size: usize,
) -> anyhow::Result<()> {
    let mut c = etcd.client().await?;
    let mut i = from;
    while i < to {
        let mut ops = Vec::with_capacity(PUTS_PER_TXN);
        for j in i..(i + PUTS_PER_TXN).min(to) {
            let (key, value) = if j % 20 == 19 {
                (
                    format!("/registry/configmaps/ns{}/cm{j:07}", j % 50),
                    [b"k8s\0".as_slice(), &vec![7u8; value_size]].concat(),
                )
            } else {
                let o = EncryptedObject {
                    encrypted_data: vec![(j % 251) as u8; value_size],
                    key_id: key_ids[j % key_ids.len()].clone(),
                    encrypted_dek_source: vec![1; 61],
                    annotations: [("version.encryption.keyhaven.dev".to_string(), b"1".to_vec())]
                        .into(),
                    encrypted_dek_source_type: 1,
                };
                (
                    format!("/registry/secrets/ns{}/s{j:07}", j % 50),
                    kms_plugin::storage::encode_kms_v2("keyhaven", &o),
                )
            };
            ops.push(TxnOp::put(key, value, None));
        }
        i += ops.len();
        c.txn(Txn::new().and_then(ops)).await?;
    }
    Ok(())
}

/// The baseline: the same keys and values read page by page, nothing else.
async fn raw_scan(etcd: &EtcdMember, page: u32, expect: usize) -> anyhow::Result<Duration> {
    let mut c = etcd.client().await?;
    let mut kv = c.kv_client().max_decoding_message_size(32 << 20);
    let _ = &mut c;
    let t0 = Instant::now();
    let end = kms_plugin::etcd::prefix_end(b"/registry/");
    let mut from = b"/registry/".to_vec();
    let (mut n, mut bytes, mut rev) = (0usize, 0usize, 0i64);
    loop {
        let mut o = GetOptions::new()
            .with_range(end.clone())
            .with_limit(i64::from(page))
            .with_serializable();
        if rev > 0 {
            o = o.with_revision(rev);
        }
        let r = kv.get(from.clone(), Some(o)).await?;
        if rev == 0 {
            rev = r.header().map(|h| h.revision()).unwrap_or(0);
        }
        for x in r.kvs() {
            n += 1;
            bytes += x.value().len();
        }
        match r.kvs().last() {
            Some(last) if r.more() => {
                from = last.key().to_vec();
                from.push(0);
            }
            _ => break,
        }
    }
    let took = t0.elapsed();
    anyhow::ensure!(
        n == expect && bytes > 0,
        "raw scan read {n} keys, expected {expect}"
    );
    Ok(took)
}

/// `kms-plugin keys usage -o json`, timed as a whole; checks it counted every key.
fn usage_scan(
    token: &BenchToken,
    plugin: &std::path::Path,
    etcd: &EtcdMember,
    page: u32,
    expect: usize,
) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    let out = token
        .command(plugin, 1)
        .args([
            "keys",
            "usage",
            "-o",
            "json",
            "--etcd-page-size",
            &page.to_string(),
        ])
        .args(etcd.args())
        .stderr(Stdio::null())
        .output()?;
    let took = t0.elapsed();
    anyhow::ensure!(out.status.success(), "kms-plugin keys usage failed");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    anyhow::ensure!(
        v["keys_scanned"].as_u64() == Some(expect as u64),
        "keys usage scanned {}, expected {expect}",
        v["keys_scanned"]
    );
    Ok(took)
}

/// Largest peak RSS of the finished child processes so far (MiB).
fn peak_child_rss_mib() -> anyhow::Result<f64> {
    let u = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)?;
    // Linux reports ru_maxrss in KiB.
    Ok(u.max_rss() as f64 / 1024.0)
}
