//! The checks `keys retire` (and `keys rotate --complete --retire-old`) pass before a KEK is
//! destroyed: nothing in etcd is stored under it, no running plugin decrypted with it
//! recently, and it is not the primary. Every refusal says what still needs the key and the
//! command that fixes it; a refusal destroys nothing.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Args;

use crate::etcd::{Etcd, EtcdArgs};
use crate::keys::{fetch_report, KeysError};
use crate::plugin::Keyring;
use crate::usage::Inventory;

/// What must be shown before a key is destroyed.
#[derive(Debug, Clone, Args)]
pub struct RetireChecks {
    /// Metrics address (`host:port`) of each running plugin (repeatable, or comma-separated):
    /// retire refuses if any decrypted under the key within `--recent`, or cannot be asked.
    #[arg(
        long = "plugin-addr",
        env = "KEYHAVEN_KMS_PLUGIN_ADDR",
        value_delimiter = ','
    )]
    pub plugin_addrs: Vec<String>,
    /// How recent a Decrypt under the key makes retiring it unsafe.
    #[arg(long, env = "KEYHAVEN_RETIRE_RECENT", default_value = "1h", value_parser = humantime::parse_duration)]
    pub recent: Duration,
    /// Destroy without reading etcd. This is the path that can make the cluster unreadable:
    /// use it only when you have proved by other means that no object (and no backup you
    /// may restore) needs the key.
    #[arg(long)]
    pub skip_usage_check: bool,
}

/// Reminder printed with every retire.
pub const BACKUP_NOTE: &str = "note: etcd backups taken before the migration still need this \
key; once it is destroyed they cannot be restored readable";

/// Runs every check; returns the lines that prove the key unused, or the refusal.
pub async fn check(
    ring: &Keyring,
    key_id: &str,
    checks: &RetireChecks,
    etcd: Option<&Etcd>,
    inventory: Option<&Inventory>,
) -> Result<Vec<String>, KeysError> {
    let refuse = |s: String| Err(KeysError::Refused(s));
    let Some(entry) = ring.get(key_id) else {
        return refuse(format!(
            "no KEK with key_id {key_id} on this token (see `kms-plugin keys list`)"
        ));
    };
    if ring.primary().map(|p| &p.key_id) == Some(&entry.key_id) {
        return refuse(format!(
            "{key_id} is the primary KEK: rotate first (`kms-plugin keys rotate --complete`)"
        ));
    }
    let mut proof = Vec::new();
    for addr in &checks.plugin_addrs {
        let report = fetch_report(addr).map_err(|e| {
            KeysError::Refused(format!(
                "cannot ask the plugin whether it still decrypts under {key_id} ({e}); \
                 refusing to retire. Check --plugin-addr, or drop it for a plugin that is gone."
            ))
        })?;
        let last = report
            .keys
            .iter()
            .find(|k| k.key_id == key_id)
            .and_then(|k| k.last_decrypt_unix);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        match last {
            Some(t) if now.saturating_sub(t) < checks.recent.as_secs() => {
                return refuse(format!(
                    "the plugin at {addr} decrypted under {key_id} {} s ago (within --recent {}): \
                     something still reads data under this key. Run `kms-plugin keys migrate` \
                     (and `kms-plugin keys usage`) and retry after the window",
                    now.saturating_sub(t),
                    humantime::format_duration(checks.recent)
                ));
            }
            Some(t) => proof.push(format!(
                "plugin {addr}: last Decrypt under the key {} s ago",
                now.saturating_sub(t)
            )),
            None => proof.push(format!(
                "plugin {addr}: no Decrypt under the key since it started"
            )),
        }
    }
    if checks.plugin_addrs.is_empty() {
        proof.push(
            "no --plugin-addr given: recent Decrypts by running plugins were not checked".into(),
        );
    }
    if checks.skip_usage_check {
        proof.push(format!(
            "WARNING: --skip-usage-check: etcd was not read; if any object is still stored \
             under {key_id}, the cluster cannot read it after this"
        ));
        return Ok(proof);
    }
    let owned;
    let inv = match (inventory, etcd) {
        (Some(inv), _) => inv,
        (None, Some(etcd)) => {
            owned = Inventory::scan(etcd, true).await.map_err(|e| {
                KeysError::Refused(format!(
                    "cannot read etcd to prove nothing needs {key_id} ({e}); refusing to retire"
                ))
            })?;
            &owned
        }
        (None, None) => {
            return refuse(format!(
                "cannot prove that nothing in etcd needs {key_id}: no etcd access configured. \
                 Give --etcd-endpoints (with --etcd-cacert/--etcd-cert/--etcd-key, the files the \
                 apiserver uses) so retire can count the objects stored under it. \
                 --skip-usage-check destroys it without that proof and can make every Secret \
                 under it unreadable."
            ))
        }
    };
    let by_resource = inv.by_resource(key_id);
    if !by_resource.is_empty() {
        let counts: Vec<String> = by_resource
            .iter()
            .map(|(r, n)| format!("{n} {r}"))
            .collect();
        let resources: Vec<String> = by_resource
            .keys()
            .map(|r| format!("--resource {r}"))
            .collect();
        return refuse(format!(
            "{} objects in etcd are still stored under {key_id} ({}): destroying it would make \
             them unreadable. Re-write them under the primary first: \
             `kms-plugin keys migrate {}` (or `kms-plugin keys rotate --complete`)",
            inv.objects_under(key_id),
            counts.join(", "),
            resources.join(" ")
        ));
    }
    let bad = inv.unparseable_total();
    if bad > 0 {
        return refuse(format!(
            "{bad} KMS v2 values in etcd do not decode, so which key they need is unknown \
             (see `kms-plugin keys usage`): refusing to retire {key_id}"
        ));
    }
    proof.push(format!(
        "etcd revision {}: 0 of {} objects stored under the key",
        inv.stats.revision, inv.stats.keys
    ));
    Ok(proof)
}

/// Destroys the KEK once [`check`] has passed.
pub fn destroy(
    ks: &keyhaven_hsm::BlockingKeystore,
    ring: &Keyring,
    key_id: &str,
) -> Result<String, KeysError> {
    let entry = ring
        .get(key_id)
        .ok_or_else(|| KeysError::Refused(format!("no KEK with key_id {key_id} on this token")))?;
    ks.destroy_kek(&entry.kek.id)?;
    Ok(format!(
        "retired (destroyed) KEK {} ({key_id})",
        entry.kek.label
    ))
}

/// `kms-plugin keys retire`: checks, then destroys only with `--yes`.
pub async fn run(
    ks: &keyhaven_hsm::BlockingKeystore,
    key_id: &str,
    yes: bool,
    etcd_args: &EtcdArgs,
    checks: &RetireChecks,
    out: &mut dyn std::io::Write,
) -> Result<(), KeysError> {
    let ring = Keyring::from_keks(ks.list_keks()?);
    let etcd = if etcd_args.configured() && !checks.skip_usage_check {
        Some(Etcd::connect(etcd_args).await.map_err(|e| {
            KeysError::Refused(format!(
                "cannot read etcd to prove nothing needs {key_id} ({e}); refusing to retire"
            ))
        })?)
    } else {
        None
    };
    let proof = check(&ring, key_id, checks, etcd.as_ref(), None).await?;
    for line in &proof {
        let _ = writeln!(out, "{line}");
    }
    let _ = writeln!(out, "{BACKUP_NOTE}");
    if !yes {
        return Err(KeysError::Refused(format!(
            "the checks above passed; retiring destroys KEK {key_id} in the HSM for good. \
             Re-run with --yes to proceed."
        )));
    }
    let line = destroy(ks, &ring, key_id)?;
    let _ = writeln!(out, "{line}");
    Ok(())
}
