//! `brokerctl replicas` and `brokerctl policy status`: the replica registry.

use super::*;

/// The registry, from any replica.
pub(super) async fn list(conn: &ConnArgs) -> Result<pb::ListReplicasResponse, CtlError> {
    Ok(Session::open(conn)
        .await?
        .admin
        .list_replicas(pb::ListReplicasRequest {})
        .await
        .map_err(CtlError::remote("ListReplicas"))?
        .into_inner())
}

/// `brokerctl replicas`.
pub async fn replicas(conn: &ConnArgs, io: &mut Io<'_>) -> Result<(), CtlError> {
    let r = list(conn).await?;
    print(&r, false, io)
}

/// A replica's state: `stale` (no heartbeat within the bound), `behind` (enforces an older
/// policy generation than the stored one), or `ok`.
fn state(r: &pb::Replica, stored_generation: i64) -> &'static str {
    if r.stale {
        "stale"
    } else if r.policy_generation < stored_generation {
        "behind"
    } else {
        "ok"
    }
}

/// Prints the registry; `policy_view` leads with the stored policy generation and the bound.
pub(super) fn print(
    r: &pb::ListReplicasResponse,
    policy_view: bool,
    io: &mut Io<'_>,
) -> Result<(), CtlError> {
    let now = now_ms();
    match io.output {
        Output::Json => {
            let replicas: Vec<serde_json::Value> = r
                .replicas
                .iter()
                .map(|x| {
                    json!({
                        "name": x.name,
                        "version": x.version,
                        "started_unix_ms": x.started_unix_ms,
                        "heartbeat_unix_ms": x.heartbeat_unix_ms,
                        "policy_generation": x.policy_generation,
                        "primary_kek_id": nonempty(&x.primary_kek_id),
                        "state": state(x, r.policy_generation),
                    })
                })
                .collect();
            output::json(
                io.out,
                &json!({
                    "policy_generation": r.policy_generation,
                    "policy_bound_ms": r.policy_bound_ms,
                    "stale_after_ms": r.stale_after_ms,
                    "replicas": replicas,
                }),
            )?
        }
        Output::Text => {
            if policy_view {
                writeln!(
                    io.out,
                    "stored policy generation: {} (every live replica enforces it within {} ms of the apply)",
                    r.policy_generation, r.policy_bound_ms
                )?;
            }
            let rows: Vec<Vec<String>> = r
                .replicas
                .iter()
                .map(|x| {
                    vec![
                        x.name.clone(),
                        x.version.clone(),
                        relative(x.started_unix_ms, now),
                        relative(x.heartbeat_unix_ms, now),
                        x.policy_generation.to_string(),
                        dash(&x.primary_kek_id),
                        state(x, r.policy_generation).to_string(),
                    ]
                })
                .collect();
            table(
                io.out,
                &[
                    "REPLICA",
                    "VERSION",
                    "STARTED",
                    "HEARTBEAT",
                    "POLICY_GEN",
                    "PRIMARY_KEK",
                    "STATE",
                ],
                &rows,
            )?;
            let stale = r.replicas.iter().filter(|x| x.stale).count();
            if stale > 0 {
                io.warn(&format!(
                    "{stale} replica(s) without a heartbeat for over {} ms: stopped, or cut off from the database (rows of replicas gone for a day are removed)",
                    r.stale_after_ms
                ))?;
            }
        }
    }
    Ok(())
}
