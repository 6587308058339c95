//! `brokerctl db`: connections, roles, status and reconciliation of dynamic credentials.

use std::io::Read;

use keyhaven_broker_core::dbrole::RoleDef;

use super::*;
use crate::cli::db::{DbCommand, DbConnectionCommand, DbRoleCommand};

/// `brokerctl db ...`
pub async fn db(conn: &ConnArgs, cmd: &DbCommand, io: &mut Io<'_>) -> Result<(), CtlError> {
    match cmd {
        DbCommand::Connection {
            command: DbConnectionCommand::Put { name, url_file },
        } => {
            use keyhaven_process::secret_file::{read, Rules};
            let url = read(
                url_file,
                Rules {
                    what: "--url-file",
                    max_bytes: 4096,
                    bearer: false,
                },
            )?;
            let r = Session::open(conn)
                .await?
                .admin
                .put_db_connection(pb::PutDbConnectionRequest {
                    name: name.clone(),
                    url: url.as_bytes().to_vec(),
                })
                .await
                .map_err(CtlError::remote("PutDbConnection"))?
                .into_inner();
            match io.output {
                Output::Json => {
                    output::json(io.out, &json!({"connection": name, "version": r.version}))?
                }
                Output::Text => writeln!(
                    io.out,
                    "connection {name} stored (version {}); the broker logged in with it",
                    r.version
                )?,
            }
        }
        DbCommand::Connection {
            command: DbConnectionCommand::RotateRoot { name },
        } => {
            let r = Session::open(conn)
                .await?
                .admin
                .rotate_db_root(pb::RotateDbRootRequest { name: name.clone() })
                .await
                .map_err(CtlError::remote("RotateDbRoot"))?
                .into_inner();
            match io.output {
                Output::Json => {
                    output::json(io.out, &json!({"connection": name, "version": r.version}))?
                }
                Output::Text => writeln!(
                    io.out,
                    "connection {name}: admin password rotated (version {}); only the broker \
                     knows it now",
                    r.version
                )?,
            }
        }
        DbCommand::Connection {
            command:
                DbConnectionCommand::Delete {
                    name,
                    database_gone,
                },
        } => {
            let r = Session::open(conn)
                .await?
                .admin
                .delete_db_connection(pb::DeleteDbConnectionRequest {
                    name: name.clone(),
                    database_gone: *database_gone,
                })
                .await
                .map_err(CtlError::remote("DeleteDbConnection"))?
                .into_inner();
            match io.output {
                Output::Json => output::json(
                    io.out,
                    &json!({"connection": name, "versions_destroyed": r.versions_destroyed}),
                )?,
                Output::Text => writeln!(
                    io.out,
                    "connection {name} deleted ({} stored version(s) destroyed)",
                    r.versions_destroyed
                )?,
            }
        }
        DbCommand::Role {
            command: DbRoleCommand::Delete { name },
        } => {
            let (connection, role) = role_name(name)?;
            Session::open(conn)
                .await?
                .admin
                .delete_db_role(pb::DeleteDbRoleRequest {
                    connection: connection.into(),
                    role: role.into(),
                })
                .await
                .map_err(CtlError::remote("DeleteDbRole"))?;
            match io.output {
                Output::Json => output::json(io.out, &json!({"role": name, "deleted": true}))?,
                Output::Text => writeln!(io.out, "role {name} deleted")?,
            }
        }
        DbCommand::Role {
            command: DbRoleCommand::Put { name, file },
        } => {
            let (connection, role) = role_name(name)?;
            let yaml = read_document(file, &mut *io.stdin)?;
            RoleDef::parse(&yaml).map_err(|e| Usage(e.to_string()))?;
            Session::open(conn)
                .await?
                .admin
                .put_db_role(pb::PutDbRoleRequest {
                    connection: connection.into(),
                    role: role.into(),
                    yaml,
                })
                .await
                .map_err(CtlError::remote("PutDbRole"))?;
            match io.output {
                Output::Json => output::json(io.out, &json!({"role": name, "stored": true}))?,
                Output::Text => writeln!(io.out, "role {name} stored; lease it as db/{name}")?,
            }
        }
        DbCommand::Role {
            command: DbRoleCommand::List,
        } => {
            let r = Session::open(conn)
                .await?
                .admin
                .list_db_roles(pb::ListDbRolesRequest {})
                .await
                .map_err(CtlError::remote("ListDbRoles"))?
                .into_inner();
            match io.output {
                Output::Json => {
                    let roles: Vec<_> = r
                        .roles
                        .iter()
                        .map(|x| {
                            let def: serde_json::Value =
                                serde_yaml_ng::from_str(&x.yaml).unwrap_or_default();
                            json!({"connection": x.connection, "role": x.role, "definition": def})
                        })
                        .collect();
                    output::json(io.out, &json!({ "roles": roles }))?
                }
                Output::Text => {
                    for x in &r.roles {
                        writeln!(io.out, "# db/{}/{}", x.connection, x.role)?;
                        write!(io.out, "{}", x.yaml)?;
                        if !x.yaml.ends_with('\n') {
                            writeln!(io.out)?;
                        }
                    }
                }
            }
        }
        DbCommand::Status => {
            let r = Session::open(conn)
                .await?
                .admin
                .db_status(pb::DbStatusRequest {})
                .await
                .map_err(CtlError::remote("DbStatus"))?
                .into_inner();
            print_status(&r, io)?;
        }
        DbCommand::Reconcile {
            connection,
            dry_run,
        } => {
            let r = Session::open(conn)
                .await?
                .admin
                .db_reconcile(pb::DbReconcileRequest {
                    connection: connection.clone(),
                    dry_run: *dry_run,
                })
                .await
                .map_err(CtlError::remote("DbReconcile"))?
                .into_inner();
            match io.output {
                Output::Json => output::json(
                    io.out,
                    &json!({"dry_run": dry_run, "dropped_roles": r.dropped_roles,
                            "ended_leases": r.ended_leases}),
                )?,
                Output::Text => {
                    let (drop, end) = if *dry_run {
                        ("would drop role", "would end lease")
                    } else {
                        ("dropped role", "ended lease")
                    };
                    for n in &r.dropped_roles {
                        writeln!(io.out, "{drop} {n} (no live credential)")?;
                    }
                    for l in &r.ended_leases {
                        writeln!(io.out, "{end} {l} (its role is gone)")?;
                    }
                    if r.dropped_roles.is_empty() && r.ended_leases.is_empty() {
                        writeln!(
                            io.out,
                            "in agreement: every marked role has a live credential"
                        )?;
                    }
                }
            }
        }
    }
    Ok(())
}

/// `CONNECTION/ROLE` split.
fn role_name(name: &str) -> Result<(&str, &str), CtlError> {
    name.split_once('/')
        .filter(|(c, r)| !c.is_empty() && !r.is_empty() && !r.contains('/'))
        .ok_or_else(|| Usage("the role is named CONNECTION/ROLE".into()).into())
}

fn read_document(file: &std::path::Path, stdin: &mut dyn Read) -> Result<String, CtlError> {
    let mut text = String::new();
    let limit = keyhaven_broker_core::dbrole::MAX_DEFINITION_BYTES as u64 + 1;
    if file.as_os_str() == "-" {
        stdin.take(limit).read_to_string(&mut text)?;
    } else {
        std::fs::File::open(file)
            .map_err(|e| Usage(format!("cannot read {}: {e}", file.display())))?
            .take(limit)
            .read_to_string(&mut text)?;
    }
    Ok(text)
}

fn print_status(r: &pb::DbStatusResponse, io: &mut Io<'_>) -> Result<(), CtlError> {
    match io.output {
        Output::Json => {
            let counts: Vec<_> = r
                .counts
                .iter()
                .map(|c| json!({"connection": c.connection, "role": c.role, "state": c.state, "count": c.count}))
                .collect();
            let drops: Vec<_> = r
                .pending_drops
                .iter()
                .map(|d| {
                    json!({"lease_id": d.lease_id, "connection": d.connection, "role": d.role,
                           "username": d.username, "attempts": d.attempts,
                           "next_attempt_unix_ms": d.next_attempt_unix_ms,
                           "last_error": (!d.last_error.is_empty()).then_some(&d.last_error)})
                })
                .collect();
            output::json(
                io.out,
                &json!({"credentials": counts, "pending_drops": drops, "marker": r.marker}),
            )?
        }
        Output::Text => {
            let rows: Vec<Vec<String>> = r
                .counts
                .iter()
                .map(|c| {
                    vec![
                        format!("db/{}/{}", c.connection, c.role),
                        c.state.clone(),
                        c.count.to_string(),
                    ]
                })
                .collect();
            table(io.out, &["ROLE", "STATE", "CREDENTIALS"], &rows)?;
            writeln!(io.out, "roles marked: kh_*, comment '{}'", r.marker)?;
            if r.pending_drops.is_empty() {
                writeln!(io.out, "no role waiting to be dropped")?;
            } else {
                writeln!(io.out, "waiting to be dropped:")?;
                let rows: Vec<Vec<String>> = r
                    .pending_drops
                    .iter()
                    .map(|d| {
                        vec![
                            d.username.clone(),
                            format!("db/{}/{}", d.connection, d.role),
                            d.attempts.to_string(),
                            if d.last_error.is_empty() {
                                "-".into()
                            } else {
                                d.last_error.clone()
                            },
                        ]
                    })
                    .collect();
                table(
                    io.out,
                    &["USERNAME", "ROLE", "ATTEMPTS", "LAST ERROR"],
                    &rows,
                )?;
            }
        }
    }
    Ok(())
}
