//! `brokerctl policy`: apply, list.

use super::*;

/// `brokerctl policy ...`: `apply` validates the document locally before connecting.
pub async fn policy(conn: &ConnArgs, cmd: &PolicyCommand, io: &mut Io<'_>) -> Result<(), CtlError> {
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
                .apply_policies(pb::ApplyPoliciesRequest {
                    yaml,
                    dry_run: false,
                })
                .await
                .map_err(CtlError::remote("ApplyPolicies"))?
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
