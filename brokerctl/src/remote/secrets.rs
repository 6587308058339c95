//! `brokerctl secrets`: put, list, show metadata, delete, destroy.

use super::*;

/// `brokerctl secrets ...`
pub async fn secrets(
    conn: &ConnArgs,
    cmd: &SecretsCommand,
    io: &mut Io<'_>,
) -> Result<(), CtlError> {
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
                .map_err(CtlError::remote("PutSecret"))?
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
                .map_err(CtlError::remote("ListSecrets"))?
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
                .map_err(CtlError::remote("SecretMetadata"))?
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

pub(super) async fn delete(conn: &ConnArgs, path: &str, destroy: bool) -> Result<u64, CtlError> {
    Ok(Session::open(conn)
        .await?
        .admin
        .delete_secret(pb::DeleteSecretRequest {
            path: path.to_owned(),
            destroy,
        })
        .await
        .map_err(CtlError::remote("DeleteSecret"))?
        .into_inner()
        .versions)
}
