//! `kms-plugin keys ...`: KEK management on the same token as a running plugin.

use std::io::Write;

use keyhaven_hsm::BlockingKeystore;

use crate::cli::KeysCommand;
use crate::envelope;
use crate::plugin::{KeyReport, Keyring};

/// Why a keys command did not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// HSM failure.
    #[error("HSM: {0}")]
    Hsm(#[from] keyhaven_hsm::Error),
    /// The operator asked for something we refuse to do.
    #[error("{0}")]
    Refused(String),
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
pub fn run(ks: &BlockingKeystore, cmd: &KeysCommand, out: &mut dyn Write) -> Result<(), KeysError> {
    let w = |out: &mut dyn Write, s: String| {
        let _ = writeln!(out, "{s}");
    };
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
        KeysCommand::Rotate => {
            let k = ks.generate_kek()?;
            let key_id = envelope::key_id(&k.id);
            w(
                out,
                format!("created KEK {} — new primary key_id {key_id}", k.label),
            );
            w(
                out,
                "running plugins adopt it within their rescan interval (send SIGHUP for at once); \
                 then re-write all Secrets and retire the old KEK (docs/kms-plugin.md)"
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
        KeysCommand::Retire { key_id, yes } => {
            let ring = Keyring::from_keks(ks.list_keks()?);
            let Some(entry) = ring.get(key_id) else {
                return Err(KeysError::Refused(format!(
                    "no KEK with key_id {key_id} on this token (see `kms-plugin keys list`)"
                )));
            };
            if ring.primary().map(|p| &p.key_id) == Some(&entry.key_id) {
                return Err(KeysError::Refused(format!(
                    "{key_id} is the primary KEK: rotate first, re-write all Secrets, then retire it"
                )));
            }
            if !yes {
                return Err(KeysError::Refused(format!(
                    "retiring destroys KEK {} ({key_id}) in the HSM; anything still encrypted \
                     with it becomes unreadable. Re-run with --yes to proceed.",
                    entry.kek.label
                )));
            }
            ks.destroy_kek(&entry.kek.id)?;
            w(
                out,
                format!("retired (destroyed) KEK {} ({key_id})", entry.kek.label),
            );
        }
    }
    Ok(())
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
