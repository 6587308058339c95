//! `brokerctl leases` (operator) and `lease` / `renew` / `revoke` (holder).

use super::*;

/// `brokerctl leases ...`
pub async fn leases(conn: &ConnArgs, cmd: &LeasesCommand, io: &mut Io<'_>) -> Result<(), CtlError> {
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
                .map_err(CtlError::remote("ListLeases"))?
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
                            let mut row = lease_cells(l);
                            row.extend([
                                l.version.to_string(),
                                time_ms(l.expires_unix_ms),
                                l.renewals.to_string(),
                                lease_state(l.ended_unix_ms, &l.end_reason, l.expires_unix_ms, now),
                            ]);
                            row
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
                .map_err(CtlError::remote("RevokeLeases"))?
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
/// A lease's first table cells: id, identity, pod, path.
pub(super) fn lease_cells(l: &keyhaven_proto::broker::v1::LeaseInfo) -> Vec<String> {
    vec![
        l.lease_id.clone(),
        format!("{}/{}", l.namespace, l.service_account),
        dash(&l.pod),
        l.path.clone(),
    ]
}

pub async fn lease(conn: &ConnArgs, args: &LeaseArgs, io: &mut Io<'_>) -> Result<(), CtlError> {
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
        .map_err(CtlError::remote("Lease"))?
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
pub async fn renew(conn: &ConnArgs, args: &RenewArgs, io: &mut Io<'_>) -> Result<(), CtlError> {
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
        .map_err(CtlError::remote("Renew"))?
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
pub async fn revoke(conn: &ConnArgs, args: &RevokeArgs, io: &mut Io<'_>) -> Result<(), CtlError> {
    let lease_id = lease_id(&args.lease_id)?;
    Session::open(conn)
        .await?
        .leases
        .revoke(pb::RevokeRequest {
            lease_id: lease_id.to_owned(),
        })
        .await
        .map_err(CtlError::remote("Revoke"))?;
    match io.output {
        Output::Json => output::json(io.out, &json!({"revoked": [lease_id]}))?,
        Output::Text => writeln!(io.out, "revoked {lease_id}")?,
    }
    Ok(())
}
