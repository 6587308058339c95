//! `kms-plugin keys ...`: KEK management on the same token as a running plugin, and the
//! commands that finish a rotation (usage, migrate, guarded retire, rotate --complete).

use std::io::Write;

use keyhaven_hsm::BlockingKeystore;

use crate::apiserver::{self, ApiserverError};
use crate::cli::{KeysCommand, MigrateCommand, OutputFormat};
use crate::envelope;
use crate::etcd::{Etcd, EtcdError};
use crate::migrate::Migration;
use crate::plugin::{KeyReport, Keyring};
use crate::rotation::Rotation;
use crate::usage::Inventory;

/// Why a keys command did not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// HSM failure.
    #[error("HSM: {0}")]
    Hsm(#[from] keyhaven_hsm::Error),
    /// The operator asked for something we refuse to do.
    #[error("{0}")]
    Refused(String),
    /// Reading etcd failed.
    #[error("{0}")]
    Etcd(#[from] EtcdError),
    /// Talking to the apiserver failed.
    #[error("{0}")]
    Apiserver(#[from] ApiserverError),
    /// Some objects could not be migrated (each was listed).
    #[error("{0}")]
    Incomplete(String),
    /// Talking to the running plugin failed.
    #[error("asking the running plugin at {addr}: {reason}")]
    Plugin {
        /// Address asked.
        addr: String,
        /// What failed.
        reason: String,
    },
}

/// Runs one keys command, writing human output to `out`.
pub async fn run(
    ks: &BlockingKeystore,
    cmd: &KeysCommand,
    out: &mut dyn Write,
) -> Result<(), KeysError> {
    match cmd {
        KeysCommand::Init => {
            let ring = Keyring::from_keks(ks.list_keks()?);
            match ring.primary() {
                Some(p) => w(
                    out,
                    format!("already initialised; primary key_id {}", p.key_id),
                ),
                None => {
                    let k = ks.generate_kek()?;
                    w(
                        out,
                        format!(
                            "created KEK {} with key_id {}",
                            k.label,
                            envelope::key_id(&k.id)
                        ),
                    );
                }
            }
        }
        KeysCommand::Rotate(r) if r.complete => {
            Rotation {
                ks,
                etcd: &r.etcd,
                kube: &r.kube,
                migrate: &r.migrate,
                checks: &r.checks,
                opts: &r.complete_args,
            }
            .run(out)
            .await?;
        }
        KeysCommand::Rotate(_) => {
            let k = ks.generate_kek()?;
            let key_id = envelope::key_id(&k.id);
            w(
                out,
                format!("created KEK {} — new primary key_id {key_id}", k.label),
            );
            w(
                out,
                "running plugins adopt it within their rescan interval (send SIGHUP for at once); \
                 then `kms-plugin keys migrate` and `kms-plugin keys retire` (or use \
                 `keys rotate --complete`, which does it all)"
                    .into(),
            );
        }
        KeysCommand::List { plugin_addr, json } => {
            let ring = Keyring::from_keks(ks.list_keks()?);
            let report = match plugin_addr {
                Some(a) => Some(fetch_report(a)?),
                None => None,
            };
            let primary = ring.primary().map(|k| k.key_id.clone());
            let rows: Vec<serde_json::Value> = ring
                .keys
                .iter()
                .map(|k| {
                    let last = report.as_ref().and_then(|r| {
                        r.keys
                            .iter()
                            .find(|e| e.key_id == k.key_id)
                            .and_then(|e| e.last_decrypt_unix)
                    });
                    serde_json::json!({
                        "label": k.kek.label,
                        "key_id": k.key_id,
                        "created": k.kek.created.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
                        "role": if Some(&k.key_id) == primary.as_ref() { "primary" } else { "decrypt-only" },
                        "last_decrypt": last.map(|s| humantime::format_rfc3339_seconds(
                            std::time::UNIX_EPOCH + std::time::Duration::from_secs(s)).to_string()),
                    })
                })
                .collect();
            if *json {
                w(out, serde_json::Value::Array(rows).to_string());
            } else if rows.is_empty() {
                w(
                    out,
                    "no KEKs on the token: run `kms-plugin keys init`".into(),
                );
            } else {
                w(
                    out,
                    format!(
                        "{:<13} {:<49} {:<21} {:<21} LABEL",
                        "ROLE", "KEY_ID", "CREATED", "LAST DECRYPT"
                    ),
                );
                for r in rows {
                    let s = |k: &str| r[k].as_str().unwrap_or("-").to_string();
                    w(
                        out,
                        format!(
                            "{:<13} {:<49} {:<21} {:<21} {}",
                            s("role"),
                            s("key_id"),
                            s("created"),
                            if report.is_some() {
                                s("last_decrypt")
                            } else {
                                "(no plugin)".into()
                            },
                            s("label")
                        ),
                    );
                }
            }
        }
        KeysCommand::Retire(r) => {
            crate::retire::run(ks, &r.key_id, r.yes, &r.etcd, &r.checks, out).await?;
        }
        KeysCommand::Usage { etcd, output } => {
            if !etcd.configured() {
                return Err(KeysError::Refused(
                    "keys usage reads etcd: give --etcd-endpoints (and --etcd-cacert/--etcd-cert/\
                     --etcd-key, the files the apiserver uses for etcd)"
                        .into(),
                ));
            }
            let ring = Keyring::from_keks(ks.list_keks()?);
            let conn = Etcd::connect(etcd).await?;
            let inv = Inventory::scan(&conn, *output == OutputFormat::Table).await?;
            let report = inv.report(&ring);
            match output {
                OutputFormat::Json => w(
                    out,
                    serde_json::to_string_pretty(&report).unwrap_or_default(),
                ),
                OutputFormat::Table => {
                    let _ = write!(out, "{}", report.table(conn.prefix()));
                }
            }
        }
        KeysCommand::Migrate(m) => migrate(ks, m, out).await?,
    }
    Ok(())
}

/// `keys migrate`: refuses until the apiserver writes under the primary, then re-writes.
async fn migrate(
    ks: &BlockingKeystore,
    m: &MigrateCommand,
    out: &mut dyn Write,
) -> Result<(), KeysError> {
    let ring = Keyring::from_keks(ks.list_keks()?);
    let primary = ring.primary().map(|k| k.key_id.clone()).ok_or_else(|| {
        KeysError::Refused("no KEK on the token: run `kms-plugin keys init`".into())
    })?;
    let etcd = match m.etcd.configured() {
        true => Some(Etcd::connect(&m.etcd).await?),
        false => None,
    };
    let client = apiserver::client(&m.kube).await?;
    let mut resources = Vec::new();
    for name in &m.migrate.resources {
        resources.push(apiserver::resolve(&client, name).await?);
    }
    let seen = apiserver::write_canary(&client, &m.kube, etcd.as_ref(), &primary).await?;
    if !seen.is_under(&primary) {
        return Err(KeysError::Refused(format!(
            "the apiserver does not write under the current primary {primary} yet ({}): a \
             re-write now would keep every object under the old key. Make sure every plugin \
             serves it (`kms-plugin keys list --plugin-addr ...`; SIGHUP adopts at once), wait \
             for the apiserver's next Status poll (about 60 s), and run again.",
            seen.describe()
        )));
    }
    w(
        out,
        format!("apiserver writes under {primary}: {}", seen.describe()),
    );
    let migration = Migration::new(&client, etcd.as_ref(), &primary, &m.migrate, true);
    let mut failed = 0;
    for r in &resources {
        let s = migration.run(r).await?;
        w(out, s.line());
        for (id, why) in &s.failed {
            w(out, format!("  failed {id}: {why}"));
        }
        failed += s.failed.len();
    }
    if failed > 0 {
        return Err(KeysError::Incomplete(format!(
            "{failed} objects could not be re-written (listed above); run again to retry them"
        )));
    }
    if etcd.is_none() {
        w(
            out,
            "done; without etcd access nothing was skipped. Prove it with `kms-plugin keys usage`."
                .into(),
        );
    }
    Ok(())
}

fn w(out: &mut dyn Write, s: String) {
    let _ = writeln!(out, "{s}");
}

/// Reads `/keys` from a running plugin's metrics listener.
pub fn fetch_report(addr: &str) -> Result<KeyReport, KeysError> {
    let url = if addr.starts_with("http://") {
        format!("{}/keys", addr.trim_end_matches('/'))
    } else {
        format!("http://{addr}/keys")
    };
    let err = |reason: String| KeysError::Plugin {
        addr: addr.to_owned(),
        reason,
    };
    let agent = ureq::Agent::config_builder()
        .timeout_global(Some(std::time::Duration::from_secs(5)))
        .build()
        .new_agent();
    let mut resp = agent.get(&url).call().map_err(|e| err(e.to_string()))?;
    let body = resp
        .body_mut()
        .read_to_string()
        .map_err(|e| err(e.to_string()))?;
    serde_json::from_str(&body).map_err(|e| err(format!("bad /keys answer: {e}")))
}
