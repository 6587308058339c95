//! `kms-plugin keys usage`: which key_id every object in etcd needs, counted by resource and
//! provider, beside what is not under KMS v2 at all — the proof `keys retire` asks for.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::etcd::{Etcd, EtcdError, ScanStats};
use crate::plugin::Keyring;
use crate::progress::Progress;
use crate::storage::{classify, resource_of, Stored};

/// Counts of everything one scan saw.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    /// KMS v2 objects by (resource, provider, key_id).
    pub kms_v2: BTreeMap<(String, String, String), u64>,
    /// Objects under another format, by (resource, format).
    pub other: BTreeMap<(String, &'static str), u64>,
    /// Values that start like KMS v2 but do not decode, by (resource, reason).
    pub unparseable: BTreeMap<(String, &'static str), u64>,
    /// What the scan read.
    pub stats: ScanStats,
    /// How long the scan took.
    pub elapsed: Duration,
}

impl Inventory {
    /// Scans everything under the etcd prefix.
    pub async fn scan(etcd: &Etcd, show_progress: bool) -> Result<Inventory, EtcdError> {
        let t0 = Instant::now();
        let progress = if show_progress {
            Some(Progress::new("keys", Some(etcd.count(None).await?)))
        } else {
            None
        };
        let mut inv = Inventory::default();
        let prefix = etcd.prefix().to_owned();
        inv.stats = etcd
            .scan(None, |key, value| {
                inv.add(&prefix, key, value);
                if let Some(p) = &progress {
                    p.inc(1);
                }
            })
            .await?;
        inv.elapsed = t0.elapsed();
        Ok(inv)
    }

    /// Counts one key/value.
    pub fn add(&mut self, prefix: &str, key: &[u8], value: &[u8]) {
        let resource = resource_of(key, prefix)
            .map(|c| c.into_owned())
            .unwrap_or_else(|| "(outside prefix)".into());
        match classify(value) {
            Stored::KmsV2 { provider, key_id } => {
                *self.kms_v2.entry((resource, provider, key_id)).or_default() += 1
            }
            Stored::Unparseable(why) => *self.unparseable.entry((resource, why)).or_default() += 1,
            other => *self.other.entry((resource, other.format())).or_default() += 1,
        }
    }

    /// Objects under `key_id` (any provider), by resource.
    pub fn by_resource(&self, key_id: &str) -> BTreeMap<&str, u64> {
        let mut m = BTreeMap::new();
        for ((res, _, k), n) in &self.kms_v2 {
            if k == key_id {
                *m.entry(res.as_str()).or_default() += n;
            }
        }
        m
    }

    /// Objects under `key_id` in all.
    pub fn objects_under(&self, key_id: &str) -> u64 {
        self.by_resource(key_id).values().sum()
    }

    /// KMS v2 values that do not decode (their key_id is unknown).
    pub fn unparseable_total(&self) -> u64 {
        self.unparseable.values().sum()
    }

    /// Every key_id some object needs.
    pub fn key_ids(&self) -> BTreeSet<&str> {
        self.kms_v2.keys().map(|(_, _, k)| k.as_str()).collect()
    }

    /// The report `keys usage` prints, marked against this token's keys.
    pub fn report(&self, ring: &Keyring) -> UsageReport {
        let primary = ring.primary().map(|k| k.key_id.as_str());
        let role = |k: &str| {
            if Some(k) == primary {
                "primary"
            } else if ring.get(k).is_some() {
                "decrypt-only"
            } else {
                "not-on-token"
            }
        };
        UsageReport {
            revision: self.stats.revision,
            keys_scanned: self.stats.keys,
            bytes_scanned: self.stats.bytes,
            seconds: self.elapsed.as_secs_f64(),
            kms_v2: self
                .kms_v2
                .iter()
                .map(|((resource, provider, key_id), n)| KmsRow {
                    resource: resource.clone(),
                    provider: provider.clone(),
                    key_id: key_id.clone(),
                    objects: *n,
                    role: role(key_id),
                })
                .collect(),
            other_formats: self
                .other
                .iter()
                .map(|((resource, format), n)| OtherRow {
                    resource: resource.clone(),
                    format,
                    objects: *n,
                })
                .collect(),
            unparseable: self
                .unparseable
                .iter()
                .map(|((resource, format), n)| OtherRow {
                    resource: resource.clone(),
                    format,
                    objects: *n,
                })
                .collect(),
            token_keys: ring
                .keys
                .iter()
                .map(|k| TokenKey {
                    key_id: k.key_id.clone(),
                    role: role(&k.key_id),
                    objects: self.objects_under(&k.key_id),
                })
                .collect(),
            foreign_key_ids: self
                .key_ids()
                .into_iter()
                .filter(|k| ring.get(k).is_none())
                .map(str::to_owned)
                .collect(),
        }
    }
}

/// `keys usage -o json`.
#[derive(Debug, Clone, Serialize)]
pub struct UsageReport {
    /// The etcd revision the whole scan read at.
    pub revision: i64,
    /// Keys read.
    pub keys_scanned: u64,
    /// Bytes of values read.
    pub bytes_scanned: u64,
    /// Scan time.
    pub seconds: f64,
    /// KMS v2 objects by resource, provider and key_id.
    pub kms_v2: Vec<KmsRow>,
    /// Objects under any other format.
    pub other_formats: Vec<OtherRow>,
    /// KMS v2 values that do not decode.
    pub unparseable: Vec<OtherRow>,
    /// This token's keys, each with the objects that need it.
    pub token_keys: Vec<TokenKey>,
    /// key_ids objects need that this token does not hold.
    pub foreign_key_ids: Vec<String>,
}

/// One KMS v2 count.
#[derive(Debug, Clone, Serialize)]
pub struct KmsRow {
    /// `secrets`, `configmaps`, `widgets.example.com`, ...
    pub resource: String,
    /// Provider name from the value's prefix.
    pub provider: String,
    /// key_id from the `EncryptedObject`.
    pub key_id: String,
    /// How many objects.
    pub objects: u64,
    /// `primary`, `decrypt-only` or `not-on-token`.
    pub role: &'static str,
}

/// One count of another format (or of unparseable values, with the reason as format).
#[derive(Debug, Clone, Serialize)]
pub struct OtherRow {
    /// Resource.
    pub resource: String,
    /// Format name or reason.
    pub format: &'static str,
    /// How many objects.
    pub objects: u64,
}

/// One of this token's keys.
#[derive(Debug, Clone, Serialize)]
pub struct TokenKey {
    /// key_id.
    pub key_id: String,
    /// `primary` or `decrypt-only`.
    pub role: &'static str,
    /// Objects that need it.
    pub objects: u64,
}

impl UsageReport {
    /// The human table.
    pub fn table(&self, prefix: &str) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "etcd revision {}: {} keys ({:.1} MiB) under {prefix}/ read in {:.1} s",
            self.revision,
            self.keys_scanned,
            self.bytes_scanned as f64 / (1 << 20) as f64,
            self.seconds
        );
        let _ = writeln!(s, "\nKMS v2 objects by key_id:");
        if self.kms_v2.is_empty() {
            let _ = writeln!(s, "  (none)");
        } else {
            let _ = writeln!(
                s,
                "  {:<24} {:<12} {:<49} {:>9}  ROLE",
                "RESOURCE", "PROVIDER", "KEY_ID", "OBJECTS"
            );
            for r in &self.kms_v2 {
                let _ = writeln!(
                    s,
                    "  {:<24} {:<12} {:<49} {:>9}  {}",
                    r.resource, r.provider, r.key_id, r.objects, r.role
                );
            }
        }
        for (title, rows) in [
            ("Objects not under KMS v2", &self.other_formats),
            (
                "KMS v2 values that do not decode (key_id unknown)",
                &self.unparseable,
            ),
        ] {
            if rows.is_empty() {
                continue;
            }
            let _ = writeln!(s, "\n{title}:");
            let _ = writeln!(s, "  {:<24} {:<36} {:>9}", "RESOURCE", "FORMAT", "OBJECTS");
            for r in rows {
                let _ = writeln!(s, "  {:<24} {:<36} {:>9}", r.resource, r.format, r.objects);
            }
        }
        let _ = writeln!(s, "\nThis token's keys:");
        if self.token_keys.is_empty() {
            let _ = writeln!(s, "  (none: run `kms-plugin keys init`)");
        }
        for k in &self.token_keys {
            let note = match (k.role, k.objects) {
                ("primary", _) => "",
                (_, 0) => "  unused: can be retired",
                _ => "  still needed: run `kms-plugin keys migrate` first",
            };
            let _ = writeln!(
                s,
                "  {:<13} {:<49} {:>9}{note}",
                k.role, k.key_id, k.objects
            );
        }
        if !self.foreign_key_ids.is_empty() {
            let _ = writeln!(
                s,
                "\nkey_ids in etcd that this token does not hold (another provider, or a key \
                 already gone): {}",
                self.foreign_key_ids.join(", ")
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::encode_kms_v2;
    use keyhaven_proto::kms::v2::EncryptedObject;

    fn v(key_id: &str) -> Vec<u8> {
        encode_kms_v2(
            "keyhaven",
            &EncryptedObject {
                encrypted_data: vec![1; 10],
                key_id: key_id.into(),
                encrypted_dek_source: vec![2; 61],
                ..Default::default()
            },
        )
    }

    #[test]
    fn counts_by_resource_and_key() {
        let mut inv = Inventory::default();
        inv.add("/registry", b"/registry/secrets/a/x", &v("k1"));
        inv.add("/registry", b"/registry/secrets/b/y", &v("k1"));
        inv.add("/registry", b"/registry/configmaps/a/z", &v("k1"));
        inv.add("/registry", b"/registry/secrets/a/w", &v("k2"));
        inv.add("/registry", b"/registry/pods/a/p", b"k8s\0xx");
        inv.add(
            "/registry",
            b"/registry/secrets/a/bad",
            b"k8s:enc:kms:v2:keyhaven:\x0a",
        );
        assert_eq!(inv.objects_under("k1"), 3);
        assert_eq!(inv.by_resource("k1").get("secrets"), Some(&2));
        assert_eq!(inv.objects_under("k3"), 0);
        assert_eq!(inv.unparseable_total(), 1);
        let r = inv.report(&Keyring::default());
        assert_eq!(r.foreign_key_ids, vec!["k1".to_string(), "k2".to_string()]);
        assert!(r.table("/registry").contains("identity-protobuf"));
    }
}
