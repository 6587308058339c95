//! `brokerctl policy`: apply (or its dry run), list, status.

use super::*;

/// `brokerctl policy ...`: `apply` validates the document locally before connecting.
pub async fn policy(conn: &ConnArgs, cmd: &PolicyCommand, io: &mut Io<'_>) -> Result<(), CtlError> {
    match cmd {
        PolicyCommand::Apply {
            file,
            max_ttl_cap,
            dry_run,
            validate_only,
        } => {
            let (yaml, n) = policy_document(file, *max_ttl_cap, &mut *io.stdin)?;
            if *validate_only {
                match io.output {
                    Output::Json => output::json(io.out, &json!({"valid": true, "policies": n}))?,
                    Output::Text => writeln!(io.out, "valid: {n} policies (nothing sent)")?,
                }
                return Ok(());
            }
            let r = Session::open(conn)
                .await?
                .admin
                .apply_policies(pb::ApplyPoliciesRequest {
                    yaml,
                    dry_run: *dry_run,
                })
                .await
                .map_err(CtlError::remote("ApplyPolicies"))?
                .into_inner();
            print_apply(&r, *dry_run, io)?;
        }
        PolicyCommand::Status => {
            let r = super::replicas::list(conn).await?;
            super::replicas::print(&r, true, io)?;
        }
        PolicyCommand::List => {
            let r = Session::open(conn)
                .await?
                .admin
                .list_policies(pb::ListPoliciesRequest {})
                .await
                .map_err(CtlError::remote("ListPolicies"))?
                .into_inner();
            match io.output {
                Output::Json => {
                    let doc: serde_json::Value =
                        serde_yaml_ng::from_str(&r.yaml).map_err(CtlError::BadPolicyYaml)?;
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

/// What an apply did, or (dry run) would do: the active leases the new set ends.
fn print_apply(
    r: &pb::ApplyPoliciesResponse,
    dry_run: bool,
    io: &mut Io<'_>,
) -> Result<(), CtlError> {
    let ended: Vec<serde_json::Value> = r
        .ended
        .iter()
        .map(|l| {
            json!({
                "lease_id": l.lease_id,
                "namespace": l.namespace,
                "service_account": l.service_account,
                "pod": nonempty(&l.pod),
                "path": l.path,
            })
        })
        .collect();
    match io.output {
        Output::Json => output::json(
            io.out,
            &json!({
                "dry_run": dry_run,
                "policies": r.policies,
                "generation": r.generation,
                (if dry_run { "would_end" } else { "ended" }): ended,
            }),
        )?,
        Output::Text => {
            if dry_run {
                writeln!(
                    io.out,
                    "valid: {} policies; applying them would end {} active lease(s) (dry run, nothing changed; policy generation stays {})",
                    r.policies,
                    r.ended.len(),
                    r.generation
                )?;
            } else {
                writeln!(
                    io.out,
                    "applied {} policies (they replace the previous set): policy generation {}; every replica enforces it within the bound (`brokerctl policy status`); {} active lease(s) it no longer allows ended",
                    r.policies,
                    r.generation,
                    r.ended.len()
                )?;
            }
            if !r.ended.is_empty() {
                let rows: Vec<Vec<String>> =
                    r.ended.iter().map(super::leases::lease_cells).collect();
                table(io.out, &["LEASE_ID", "IDENTITY", "POD", "PATH"], &rows)?;
            }
        }
    }
    Ok(())
}
