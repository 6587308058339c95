//! The commands that call the broker: `secrets`, `policy`, `leases`, `lease` / `renew` /
//! `revoke`, `audit`, `keys status` / `rotate` / `retire`.

use std::collections::VecDeque;
use std::time::Duration;

use keyhaven_proto::broker::v1 as pb;
use serde_json::json;
use zeroize::Zeroizing;

use super::cli::{
    AuditCommand, ConnArgs, KeyStatusArgs, LeaseArgs, LeasesCommand, Output, PolicyCommand,
    RenewArgs, RetireArgs, RevokeArgs, SecretsCommand,
};
use super::conn::{remote, Session};
use super::input::{lease_selector, policy_document, secret_path, secret_values};
use super::output::{self, lease_state, now_ms, relative, secs, table, time_ms, time_s};
use super::{Io, Usage};
use keyhaven_broker_core::audit::AuditRecord;

/// Records per `AuditTail` call when reading the whole log to find its end.
const TAIL_PAGE: u32 = 1000;

/// `brokerctl secrets ...`
pub async fn secrets(conn: &ConnArgs, cmd: &SecretsCommand, io: &mut Io<'_>) -> anyhow::Result<()> {
    match cmd {
        SecretsCommand::Put(args) => {
            let path = secret_path(&args.path)?;
            if !args.from_literal.is_empty() {
                io.warn(
                    "--from-literal puts values on the command line, where `ps` and shell \
                     history can see them: use it for non-secret demo values only; prefer \
                     --from-file KEY=PATH",
                )?;
            }
            let values = secret_values(args, &mut *io.stdin)?;
            let keys: Vec<String> = values.0.keys().cloned().collect();
            let r = Session::open(conn)
                .await?
                .admin
                .put_secret(pb::PutSecretRequest {
                    path: path.to_owned(),
                    data: values.to_wire(),
                })
                .await
                .map_err(remote("PutSecret"))?
                .into_inner();
            drop(values);
            match io.output {
                Output::Json => output::json(
                    io.out,
                    &json!({"path": path, "version": r.version, "keys": keys}),
                )?,
                Output::Text => writeln!(
                    io.out,
                    "wrote {path} version {} (keys: {})",
                    r.version,
                    keys.join(", ")
                )?,
            }
        }
        SecretsCommand::List { prefix } => {
            let r = Session::open(conn)
                .await?
                .admin
                .list_secrets(pb::ListSecretsRequest {
                    prefix: prefix.clone().unwrap_or_default(),
                })
                .await
                .map_err(remote("ListSecrets"))?
                .into_inner();
            match io.output {
                Output::Json => output::json(io.out, &json!(r.paths))?,
                Output::Text => {
                    for p in &r.paths {
                        writeln!(io.out, "{}", p.escape_debug())?;
                    }
                }
            }
        }
        SecretsCommand::Metadata { path } => {
            let path = secret_path(path)?;
            let r = Session::open(conn)
                .await?
                .admin
                .secret_metadata(pb::SecretMetadataRequest {
                    path: path.to_owned(),
                })
                .await
                .map_err(remote("SecretMetadata"))?
                .into_inner();
            match io.output {
                Output::Json => {
                    let versions: Vec<_> = r
                        .versions
                        .iter()
                        .map(|v| {
                            json!({
                                "version": v.version,
                                "created_unix_ms": v.created_unix_ms,
                                "deleted_unix_ms": nonzero(v.deleted_unix_ms),
                                "destroyed_unix_ms": nonzero(v.destroyed_unix_ms),
                                "kek_id": v.kek_id,
                            })
                        })
                        .collect();
                    output::json(io.out, &json!({"path": path, "versions": versions}))?
                }
                Output::Text => {
                    let rows: Vec<Vec<String>> = r
                        .versions
                        .iter()
                        .map(|v| {
                            vec![
                                v.version.to_string(),
                                time_ms(v.created_unix_ms),
                                time_ms(v.deleted_unix_ms),
                                time_ms(v.destroyed_unix_ms),
                                dash(&v.kek_id),
                            ]
                        })
                        .collect();
                    table(
                        io.out,
                        &["VERSION", "CREATED", "DELETED", "DESTROYED", "KEK_ID"],
                        &rows,
                    )?
                }
            }
        }
        SecretsCommand::Delete { path } => {
            let path = secret_path(path)?;
            let n = delete(conn, path, false).await?;
            match io.output {
                Output::Json => output::json(
                    io.out,
                    &json!({"path": path, "deleted_versions": n, "destroyed": false}),
                )?,
                Output::Text => writeln!(
                    io.out,
                    "deleted {path}: {n} version(s); history kept (`secrets destroy` erases it)"
                )?,
            }
        }
        SecretsCommand::Destroy { path, yes } => {
            let path = secret_path(path)?;
            if !yes {
                return Err(Usage(format!(
                    "destroy erases every version of {path} irreversibly; add --yes to confirm"
                ))
                .into());
            }
            let n = delete(conn, path, true).await?;
            match io.output {
                Output::Json => output::json(
                    io.out,
                    &json!({"path": path, "destroyed_versions": n, "destroyed": true}),
                )?,
                Output::Text => writeln!(io.out, "destroyed {path}: {n} version(s) erased")?,
            }
        }
    }
    Ok(())
}

async fn delete(conn: &ConnArgs, path: &str, destroy: bool) -> anyhow::Result<u64> {
    Ok(Session::open(conn)
        .await?
        .admin
        .delete_secret(pb::DeleteSecretRequest {
            path: path.to_owned(),
            destroy,
        })
        .await
        .map_err(remote("DeleteSecret"))?
        .into_inner()
        .versions)
}

/// `brokerctl policy ...`: `apply` validates the document locally before connecting.
pub async fn policy(conn: &ConnArgs, cmd: &PolicyCommand, io: &mut Io<'_>) -> anyhow::Result<()> {
    match cmd {
        PolicyCommand::Apply {
            file,
            max_ttl_cap,
            dry_run,
        } => {
            let (yaml, n) = policy_document(file, *max_ttl_cap, &mut *io.stdin)?;
            if *dry_run {
                match io.output {
                    Output::Json => output::json(io.out, &json!({"valid": true, "policies": n}))?,
                    Output::Text => {
                        writeln!(io.out, "valid: {n} policies (dry run, nothing sent)")?
                    }
                }
                return Ok(());
            }
            let r = Session::open(conn)
                .await?
                .admin
                .apply_policies(pb::ApplyPoliciesRequest { yaml })
                .await
                .map_err(remote("ApplyPolicies"))?
                .into_inner();
            match io.output {
                Output::Json => output::json(io.out, &json!({"applied": r.policies}))?,
                Output::Text => writeln!(
                    io.out,
                    "applied {} policies (they replace the previous set)",
                    r.policies
                )?,
            }
        }
        PolicyCommand::List => {
            let r = Session::open(conn)
                .await?
                .admin
                .list_policies(pb::ListPoliciesRequest {})
                .await
                .map_err(remote("ListPolicies"))?
                .into_inner();
            match io.output {
                Output::Json => {
                    let doc: serde_json::Value = serde_yaml_ng::from_str(&r.yaml).map_err(|e| {
                        anyhow::anyhow!("the broker sent a policy document that is not YAML: {e}")
                    })?;
                    output::json(io.out, &doc)?
                }
                Output::Text => {
                    write!(io.out, "{}", r.yaml)?;
                    if !r.yaml.ends_with('\n') {
                        writeln!(io.out)?;
                    }
                }
            }
        }
    }
    Ok(())
}

/// `brokerctl leases ...`
pub async fn leases(conn: &ConnArgs, cmd: &LeasesCommand, io: &mut Io<'_>) -> anyhow::Result<()> {
    match cmd {
        LeasesCommand::List { selector, all } => {
            let selector = lease_selector(selector)?;
            let r = Session::open(conn)
                .await?
                .admin
                .list_leases(pb::ListLeasesRequest {
                    selector,
                    include_ended: *all,
                })
                .await
                .map_err(remote("ListLeases"))?
                .into_inner();
            let now = now_ms();
            match io.output {
                Output::Json => {
                    let leases: Vec<_> = r
                        .leases
                        .iter()
                        .map(|l| {
                            json!({
                                "lease_id": l.lease_id,
                                "namespace": l.namespace,
                                "service_account": l.service_account,
                                "pod": nonempty(&l.pod),
                                "path": l.path,
                                "version": l.version,
                                "created_unix_ms": l.created_unix_ms,
                                "expires_unix_ms": l.expires_unix_ms,
                                "max_expires_unix_ms": l.max_expires_unix_ms,
                                "renewals": l.renewals,
                                "ended_unix_ms": nonzero(l.ended_unix_ms),
                                "end_reason": nonempty(&l.end_reason),
                                "state": lease_state(l.ended_unix_ms, &l.end_reason, l.expires_unix_ms, now),
                            })
                        })
                        .collect();
                    output::json(io.out, &json!(leases))?
                }
                Output::Text => {
                    let rows: Vec<Vec<String>> = r
                        .leases
                        .iter()
                        .map(|l| {
                            vec![
                                l.lease_id.clone(),
                                format!("{}/{}", l.namespace, l.service_account),
                                dash(&l.pod),
                                l.path.clone(),
                                l.version.to_string(),
                                time_ms(l.expires_unix_ms),
                                l.renewals.to_string(),
                                lease_state(l.ended_unix_ms, &l.end_reason, l.expires_unix_ms, now),
                            ]
                        })
                        .collect();
                    table(
                        io.out,
                        &[
                            "LEASE_ID", "IDENTITY", "POD", "PATH", "VERSION", "EXPIRES",
                            "RENEWALS", "STATE",
                        ],
                        &rows,
                    )?
                }
            }
        }
        LeasesCommand::Revoke {
            selector,
            everything,
            yes,
        } => {
            let selector = lease_selector(selector)?;
            match (&selector, everything, yes) {
                (None, false, _) => {
                    return Err(Usage(
                        "give a selector (--id, --namespace with --serviceaccount or --pod, \
                         --prefix), or --everything --yes to revoke every lease"
                            .into(),
                    )
                    .into())
                }
                (None, true, false) => {
                    return Err(Usage(
                        "--everything revokes every active lease of every workload; add --yes \
                         to confirm"
                            .into(),
                    )
                    .into())
                }
                _ => {}
            }
            let r = Session::open(conn)
                .await?
                .admin
                .revoke_leases(pb::RevokeLeasesRequest { selector })
                .await
                .map_err(remote("RevokeLeases"))?
                .into_inner();
            match io.output {
                Output::Json => output::json(io.out, &json!({"revoked": r.lease_ids}))?,
                Output::Text => {
                    for id in &r.lease_ids {
                        writeln!(io.out, "{}", id.escape_debug())?;
                    }
                    writeln!(io.err, "revoked {} lease(s)", r.lease_ids.len())?;
                }
            }
        }
    }
    Ok(())
}

/// `brokerctl lease PATH`.
pub async fn lease(conn: &ConnArgs, args: &LeaseArgs, io: &mut Io<'_>) -> anyhow::Result<()> {
    let path = secret_path(&args.path)?;
    let ttl_seconds = args
        .ttl
        .map(whole_seconds("--ttl"))
        .transpose()?
        .unwrap_or(0);
    if args.show_values {
        io.warn("--show-values prints secret values to your terminal; use it for demos only")?;
    }
    let r = Session::open(conn)
        .await?
        .leases
        .lease(pb::LeaseRequest {
            path: path.to_owned(),
            ttl_seconds,
        })
        .await
        .map_err(remote("Lease"))?
        .into_inner();
    // Our copies of the values are wiped when this map is dropped.
    let data: std::collections::BTreeMap<String, Zeroizing<Vec<u8>>> = r
        .data
        .into_iter()
        .map(|(k, v)| (k, Zeroizing::new(v)))
        .collect();
    let keys: Vec<&String> = data.keys().collect();
    let until_ms = r.renewable_until.saturating_mul(1000);
    match io.output {
        Output::Json => {
            let mut doc = json!({
                "lease_id": r.lease_id,
                "path": path,
                "version": r.version,
                "ttl_seconds": r.ttl_seconds,
                "renewable_until": time_s(r.renewable_until),
                "renewable_until_unix": r.renewable_until,
                "keys": keys,
            });
            if args.show_values {
                let mut text = serde_json::Map::new();
                let mut b64 = serde_json::Map::new();
                for (k, v) in &data {
                    match std::str::from_utf8(v) {
                        Ok(s) => text.insert(k.clone(), json!(s)),
                        Err(_) => b64.insert(k.clone(), json!(base64_encode(v))),
                    };
                }
                doc["data"] = text.into();
                if !b64.is_empty() {
                    doc["data_base64"] = b64.into();
                }
            }
            output::json(io.out, &doc)?;
        }
        Output::Text => {
            writeln!(io.out, "lease_id:         {}", r.lease_id.escape_debug())?;
            writeln!(io.out, "path:             {path}")?;
            writeln!(io.out, "version:          {}", r.version)?;
            writeln!(io.out, "ttl:              {}", secs(r.ttl_seconds))?;
            writeln!(
                io.out,
                "renewable_until:  {} ({})",
                time_s(r.renewable_until),
                relative(until_ms, now_ms())
            )?;
            let keys: Vec<String> = keys.iter().map(|k| k.escape_debug().to_string()).collect();
            writeln!(io.out, "keys:             {}", keys.join(", "))?;
            if args.show_values {
                for (k, v) in &data {
                    match std::str::from_utf8(v) {
                        Ok(s) => writeln!(io.out, "  {}={}", k.escape_debug(), s.escape_debug())?,
                        Err(_) => writeln!(
                            io.out,
                            "  {} (base64)={}",
                            k.escape_debug(),
                            base64_encode(v)
                        )?,
                    }
                }
            }
        }
    }
    Ok(())
}

/// `brokerctl renew LEASE_ID`.
pub async fn renew(conn: &ConnArgs, args: &RenewArgs, io: &mut Io<'_>) -> anyhow::Result<()> {
    let lease_id = lease_id(&args.lease_id)?;
    let increment_seconds = args
        .increment
        .map(whole_seconds("--increment"))
        .transpose()?
        .unwrap_or(0);
    let r = Session::open(conn)
        .await?
        .leases
        .renew(pb::RenewRequest {
            lease_id: lease_id.to_owned(),
            increment_seconds,
        })
        .await
        .map_err(remote("Renew"))?
        .into_inner();
    match io.output {
        Output::Json => output::json(
            io.out,
            &json!({
                "lease_id": lease_id,
                "ttl_seconds": r.ttl_seconds,
                "renewable_until": time_s(r.renewable_until),
                "renewable_until_unix": r.renewable_until,
                "newer_version": r.newer_version,
            }),
        )?,
        Output::Text => {
            writeln!(io.out, "renewed {lease_id}: ttl {}", secs(r.ttl_seconds))?;
            writeln!(
                io.out,
                "renewable_until:  {} ({})",
                time_s(r.renewable_until),
                relative(r.renewable_until.saturating_mul(1000), now_ms())
            )?;
            if r.newer_version {
                writeln!(
                    io.out,
                    "a newer version of the secret exists: lease it again to get it"
                )?;
            }
        }
    }
    Ok(())
}

/// `brokerctl revoke LEASE_ID`.
pub async fn revoke(conn: &ConnArgs, args: &RevokeArgs, io: &mut Io<'_>) -> anyhow::Result<()> {
    let lease_id = lease_id(&args.lease_id)?;
    Session::open(conn)
        .await?
        .leases
        .revoke(pb::RevokeRequest {
            lease_id: lease_id.to_owned(),
        })
        .await
        .map_err(remote("Revoke"))?;
    match io.output {
        Output::Json => output::json(io.out, &json!({"revoked": [lease_id]}))?,
        Output::Text => writeln!(io.out, "revoked {lease_id}")?,
    }
    Ok(())
}

/// `brokerctl audit ...`
pub async fn audit(conn: &ConnArgs, cmd: &AuditCommand, io: &mut Io<'_>) -> anyhow::Result<()> {
    match cmd {
        AuditCommand::Verify { anchor } => {
            let r = Session::open(conn)
                .await?
                .admin
                .audit_verify(pb::AuditVerifyRequest {
                    anchor: anchor.as_ref().map(ToString::to_string).unwrap_or_default(),
                })
                .await
                .map_err(remote("AuditVerify"))?
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
                    super::conn::one_line(&r.error)
                };
                anyhow::bail!("audit log verification FAILED: {why}");
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

async fn tail_page(s: &mut Session, after_seq: i64, limit: u32) -> anyhow::Result<Vec<String>> {
    Ok(s.admin
        .audit_tail(pb::AuditTailRequest { after_seq, limit })
        .await
        .map_err(remote("AuditTail"))?
        .into_inner()
        .records)
}

/// The last `n` records, found by reading the log page by page (the API counts from the
/// start), and the seq of the very last record (0 for an empty log).
async fn last_records(s: &mut Session, n: usize) -> anyhow::Result<(Vec<String>, i64)> {
    let mut ring: VecDeque<String> = VecDeque::with_capacity(n.min(10_000));
    let mut after = 0;
    loop {
        let page = tail_page(s, after, TAIL_PAGE).await?;
        let full = page.len() >= TAIL_PAGE as usize;
        for line in page {
            let seq = record_seq(&line).ok_or_else(|| {
                anyhow::anyhow!("the broker sent an audit record without a seq after {after}")
            })?;
            if seq <= after {
                anyhow::bail!(
                    "the broker sent audit records out of order (seq {seq} after {after})"
                );
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
fn print_records(records: &[String], mut last: i64, io: &mut Io<'_>) -> anyhow::Result<i64> {
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

fn record_seq(line: &str) -> Option<i64> {
    serde_json::from_str::<serde_json::Value>(line)
        .ok()?
        .get("seq")?
        .as_i64()
}

/// `brokerctl keys status [--wait]`.
pub async fn key_status(
    conn: &ConnArgs,
    args: &KeyStatusArgs,
    io: &mut Io<'_>,
) -> anyhow::Result<()> {
    let mut s = Session::open(conn).await?;
    let mut drew_bar = false;
    let r = loop {
        let r = s
            .admin
            .key_status(pb::KeyStatusRequest {})
            .await
            .map_err(remote("KeyStatus"))?
            .into_inner();
        let w = r.rewrap.unwrap_or_default();
        if !args.wait || w.remaining == 0 {
            break r;
        }
        if io.output == Output::Text {
            if io.terminal {
                write!(io.out, "\r\x1b[2K{}", rewrap_line(&w, true))?;
                drew_bar = true;
            } else {
                writeln!(io.out, "{}", rewrap_line(&w, false))?;
            }
            io.out.flush()?;
        }
        tokio::time::sleep(args.interval).await;
    };
    if drew_bar {
        writeln!(io.out)?;
    }
    let w = r.rewrap.unwrap_or_default();
    match io.output {
        Output::Json => {
            let keks: Vec<_> = r
                .keks
                .iter()
                .map(|k| {
                    json!({
                        "kek_id": k.kek_id,
                        "label": k.label,
                        "role": k.role,
                        "created_unix_ms": (k.created_unix_ms != 0).then_some(k.created_unix_ms),
                        "deks": k.deks,
                        "encryptions": k.encryptions,
                    })
                })
                .collect();
            let total = w.moved + w.remaining;
            output::json(
                io.out,
                &json!({
                    "keks": keks,
                    "rewrap": {
                        "remaining": w.remaining,
                        "moved": w.moved,
                        "percent_done": percent(w.moved, total),
                        "rate_per_second": w.rate_per_second,
                        "eta_seconds": (w.eta_seconds >= 0).then_some(w.eta_seconds),
                        "replicas": w.replicas,
                        "last_batch_unix_ms": (w.last_batch_unix_ms != 0).then_some(w.last_batch_unix_ms),
                        "unknown_kek_deks": w.unknown_kek_deks,
                    },
                    "auto_rotation": r.auto_rotation,
                }),
            )?
        }
        Output::Text => {
            if r.keks.is_empty() {
                writeln!(
                    io.err,
                    "the broker has no KEK: create one with `brokerctl keys init`"
                )?;
            }
            let rows: Vec<Vec<String>> = r
                .keks
                .iter()
                .map(|k| {
                    vec![
                        k.kek_id.clone(),
                        k.label.clone(),
                        k.role.clone(),
                        time_ms(k.created_unix_ms),
                        k.deks.to_string(),
                        k.encryptions.to_string(),
                    ]
                })
                .collect();
            table(
                io.out,
                &["KEK_ID", "LABEL", "ROLE", "CREATED", "DEKS", "ENCRYPTIONS"],
                &rows,
            )?;
            writeln!(io.out)?;
            writeln!(io.out, "{}", rewrap_line(&w, io.terminal))?;
            writeln!(io.out, "automatic rotation: {}", r.auto_rotation)?;
            if w.unknown_kek_deks > 0 {
                io.warn(&format!(
                    "{} DEK(s) are wrapped by a KEK that is not on the HSM token: they can be \
                     neither opened nor re-wrapped",
                    w.unknown_kek_deks
                ))?;
            }
        }
    }
    Ok(())
}

fn percent(done: u64, total: u64) -> f64 {
    if total == 0 {
        100.0
    } else {
        (done as f64 * 1000.0 / total as f64).floor() / 10.0
    }
}

/// One line of re-wrap progress; with a progress bar when `bar`.
pub(super) fn rewrap_line(w: &pb::RewrapProgress, bar: bool) -> String {
    const WIDTH: usize = 30;
    let total = w.moved + w.remaining;
    if w.remaining == 0 {
        return format!(
            "re-wrap: done, every live DEK is wrapped by the primary KEK ({} moved to it)",
            w.moved
        );
    }
    let pct = percent(w.moved, total);
    let mut line = String::from("re-wrap: ");
    if bar {
        let filled = ((pct / 100.0) * WIDTH as f64).floor() as usize;
        line.push('[');
        line.extend(std::iter::repeat_n('#', filled.min(WIDTH)));
        line.extend(std::iter::repeat_n('-', WIDTH - filled.min(WIDTH)));
        line.push_str(&format!("] {pct:5.1}%  "));
    }
    line.push_str(&format!("{} moved, {} to go", w.moved, w.remaining));
    if !bar {
        line.push_str(&format!(" ({pct:.1}% done)"));
    }
    if w.rate_per_second > 0.0 {
        line.push_str(&format!(
            ", {:.0} DEKs/s from {} replica{}",
            w.rate_per_second,
            w.replicas,
            if w.replicas == 1 { "" } else { "s" }
        ));
    } else {
        line.push_str(", no batch in the last minute");
    }
    if w.eta_seconds >= 0 {
        line.push_str(&format!(", ETA {}", secs(w.eta_seconds.unsigned_abs())));
    } else {
        line.push_str(", ETA unknown");
    }
    line
}

/// `brokerctl keys rotate`.
pub async fn key_rotate(conn: &ConnArgs, io: &mut Io<'_>) -> anyhow::Result<()> {
    let r = Session::open(conn)
        .await?
        .admin
        .rotate_key(pb::RotateKeyRequest {})
        .await
        .map_err(remote("RotateKey"))?
        .into_inner();
    match io.output {
        Output::Json => output::json(
            io.out,
            &json!({
                "kek_id": r.kek_id,
                "label": r.label,
                "previous_kek_id": (!r.previous_kek_id.is_empty()).then_some(&r.previous_kek_id),
                "deks_to_rewrap": r.deks_to_rewrap,
            }),
        )?,
        Output::Text => {
            writeln!(
                io.err,
                "created broker KEK {}: it is the primary now; {} DEK(s) under older KEKs are \
                 re-wrapped to it in the background (watch `brokerctl keys status`)",
                r.label, r.deks_to_rewrap
            )?;
            writeln!(io.out, "{}", r.kek_id)?;
        }
    }
    Ok(())
}

/// `brokerctl keys retire <id> --yes`.
pub async fn key_retire(conn: &ConnArgs, args: &RetireArgs, io: &mut Io<'_>) -> anyhow::Result<()> {
    let id = args.kek_id.trim();
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Usage(format!(
            "'{}' is not a KEK id: 32 hex digits, as `brokerctl keys status` shows",
            id.escape_debug()
        ))
        .into());
    }
    if !args.yes {
        return Err(Usage(format!(
            "`keys retire` destroys KEK {id} in the HSM: anything still wrapped by it (an old \
             database backup, say) can never be opened again. Check `brokerctl keys status` \
             (role decrypt-only, DEKS 0), then add --yes"
        ))
        .into());
    }
    let r = Session::open(conn)
        .await?
        .admin
        .retire_key(pb::RetireKeyRequest {
            kek_id: id.to_ascii_lowercase(),
        })
        .await
        .map_err(remote("RetireKey"))?
        .into_inner();
    match io.output {
        Output::Json => output::json(
            io.out,
            &json!({"kek_id": r.kek_id, "label": r.label, "retired": true}),
        )?,
        Output::Text => writeln!(
            io.out,
            "retired (destroyed in the HSM) broker KEK {} ({})",
            r.kek_id, r.label
        )?,
    }
    Ok(())
}

fn lease_id(id: &str) -> Result<&str, Usage> {
    if id.is_empty() || id.chars().any(char::is_control) {
        return Err(Usage(
            "the lease id is empty or has control characters".into(),
        ));
    }
    Ok(id)
}

/// A flag's duration in whole seconds (at least 1).
fn whole_seconds(flag: &'static str) -> impl Fn(Duration) -> Result<u64, Usage> {
    move |d| {
        if d.subsec_nanos() != 0 || d.as_secs() == 0 {
            return Err(Usage(format!(
                "{flag} must be a whole number of seconds, at least 1s (e.g. 90s, 5m)"
            )));
        }
        Ok(d.as_secs())
    }
}

fn base64_encode(v: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(v)
}

fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_owned()
    }
}

fn nonzero(v: i64) -> serde_json::Value {
    if v == 0 {
        serde_json::Value::Null
    } else {
        json!(v)
    }
}

fn nonempty(s: &str) -> serde_json::Value {
    if s.is_empty() {
        serde_json::Value::Null
    } else {
        json!(s)
    }
}

/// Whether an error is a broker refusal with this code.
#[cfg(test)]
pub fn is_code(e: &anyhow::Error, code: tonic::Code) -> bool {
    e.downcast_ref::<super::conn::RemoteError>()
        .is_some_and(|r| r.code == code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_must_be_whole_seconds() {
        assert_eq!(
            whole_seconds("--ttl")(Duration::from_secs(300)).unwrap(),
            300
        );
        assert!(whole_seconds("--ttl")(Duration::from_millis(1500)).is_err());
        assert!(whole_seconds("--ttl")(Duration::ZERO).is_err());
    }

    #[test]
    fn record_seq_reads_the_json_line() {
        assert_eq!(record_seq(r#"{"seq": 42, "hash": "x"}"#), Some(42));
        assert_eq!(record_seq("garbage"), None);
        assert_eq!(
            super::super::conn::code_name(tonic::Code::NotFound),
            "NOT_FOUND"
        );
    }
}
