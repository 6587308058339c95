//! Row types and their decoding from either database; the column lists every statement uses.

use super::*;

// Column lists as literal-producing macros, so `concat!` can build whole statements from them.
macro_rules! version_cols {
    () => {
        "path, version, created_ms, deleted_ms, destroyed_ms, kek_id, dek_iv, dek_ct, nonce, ciphertext"
    };
}
macro_rules! lease_cols {
    () => {
        "id, namespace, service_account, pod_name, pod_uid, path, version, \
         created_ms, expires_ms, max_expires_ms, renewals, ended_ms, end_reason"
    };
}
/// A PostgreSQL SELECT of the leases `keyhaven_renew($args)` renewed (migration 0006), in the
/// columns [`renewed_cols`] names.
macro_rules! pg_renew_from {
    ($args:literal) => {
        concat!(
            "SELECT lease_id AS id, lease_expires_ms AS expires_ms, ",
            "lease_max_expires_ms AS max_expires_ms, lease_version AS version, ",
            "latest_version AS latest FROM keyhaven_renew(",
            $args,
            ")"
        )
    };
}
/// What the renewal statements return per lease renewed (`$t`: the leases table's alias).
macro_rules! renewed_cols {
    ($t:literal) => {
        concat!(
            "RETURNING ",
            $t,
            ".id, ",
            $t,
            ".expires_ms, ",
            $t,
            ".max_expires_ms, ",
            $t,
            ".version, (SELECT max(v.version) FROM secret_versions v WHERE v.path = ",
            $t,
            ".path AND v.deleted_ms IS NULL AND v.destroyed_ms IS NULL) AS latest"
        )
    };
}

macro_rules! audit_cols {
    () => {
        "seq, time_ms, kind, identity, pod, path, lease_id, outcome, reason, prev_hash, hash"
    };
}
pub(super) const VERSION_COLS: &str = version_cols!();
pub(super) const LEASE_COLS: &str = lease_cols!();

/// A stored secret version.
#[derive(Debug, Clone)]
pub struct StoredVersion {
    /// Path.
    pub path: String,
    /// Version (1, 2, ...).
    pub version: i64,
    /// Creation time.
    pub created_ms: i64,
    /// Soft-delete time, if deleted.
    pub deleted_ms: Option<i64>,
    /// Destroy time, if destroyed (then `sealed` is `None`).
    pub destroyed_ms: Option<i64>,
    /// The encrypted data, unless destroyed.
    pub sealed: Option<SealedVersion>,
}

/// A lease row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRow {
    /// Lease id.
    pub id: String,
    /// Holder.
    pub identity: Identity,
    /// Secret path.
    pub path: String,
    /// Secret version leased.
    pub version: i64,
    /// Issue time.
    pub created_ms: i64,
    /// Current expiry.
    pub expires_ms: i64,
    /// No renewal past this.
    pub max_expires_ms: i64,
    /// How many times renewed.
    pub renewals: i64,
    /// When it ended (revoked or reaped), if it did.
    pub ended_ms: Option<i64>,
    /// Why it ended.
    pub end_reason: Option<String>,
}

impl LeaseRow {
    /// Whether the lease is usable at `now_ms`.
    pub fn is_active(&self, now_ms: i64) -> bool {
        self.ended_ms.is_none() && self.expires_ms > now_ms
    }
}

/// Which leases a bulk revocation targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseFilter {
    /// One lease.
    Id(String),
    /// Every lease of a service account.
    Identity {
        /// Namespace.
        namespace: String,
        /// Service account.
        service_account: String,
    },
    /// Every lease in a namespace.
    Namespace(String),
    /// Every lease held by a pod (by pod name within a namespace).
    Pod {
        /// Namespace.
        namespace: String,
        /// Pod name.
        pod: String,
    },
    /// Every lease held by one pod object: its name within a namespace **and** its uid (a
    /// later pod of the same name has another uid and keeps its leases).
    PodUid {
        /// Namespace.
        namespace: String,
        /// Pod name.
        pod: String,
        /// Pod uid (`metadata.uid`; the token's `kubernetes.io.pod.uid`).
        uid: String,
    },
    /// Every lease on a path or below it (`team/app` matches `team/app` and `team/app/...`).
    PathPrefix(String),
    /// All leases.
    All,
}

impl LeaseFilter {
    /// SQL condition and its text parameters (placeholders start at `$first`).
    pub(super) fn sql(&self, first: usize) -> (String, Vec<String>) {
        match self {
            LeaseFilter::Id(id) => (format!("id = ${first}"), vec![id.clone()]),
            LeaseFilter::Identity {
                namespace,
                service_account,
            } => (
                format!("namespace = ${first} AND service_account = ${}", first + 1),
                vec![namespace.clone(), service_account.clone()],
            ),
            LeaseFilter::Namespace(namespace) => {
                (format!("namespace = ${first}"), vec![namespace.clone()])
            }
            LeaseFilter::Pod { namespace, pod } => (
                format!("namespace = ${first} AND pod_name = ${}", first + 1),
                vec![namespace.clone(), pod.clone()],
            ),
            LeaseFilter::PodUid {
                namespace,
                pod,
                uid,
            } => (
                format!(
                    "namespace = ${first} AND pod_name = ${} AND pod_uid = ${}",
                    first + 1,
                    first + 2
                ),
                vec![namespace.clone(), pod.clone(), uid.clone()],
            ),
            LeaseFilter::PathPrefix(p) => {
                let p = p.trim_end_matches('/').to_owned();
                // Prefix match on whole segments, without LIKE (no escaping pitfalls).
                (
                    format!(
                        "(path = ${first} OR substr(path, 1, length(${first}) + 1) = ${} )",
                        first + 1
                    ),
                    vec![p.clone(), format!("{p}/")],
                )
            }
            LeaseFilter::All => ("1 = 1".into(), vec![]),
        }
    }
}

pub(super) trait RowExt {
    fn text(&self, col: &str) -> Result<String>;
    fn opt_text(&self, col: &str) -> Result<Option<String>>;
    fn int(&self, col: &str) -> Result<i64>;
    fn opt_int(&self, col: &str) -> Result<Option<i64>>;
    fn opt_blob(&self, col: &str) -> Result<Option<Vec<u8>>>;
}

macro_rules! row_ext {
    ($t:ty) => {
        impl RowExt for $t {
            fn text(&self, col: &str) -> Result<String> {
                self.try_get(col)
                    .map_err(|e| StoreError::Corrupt(format!("{col}: {e}")))
            }
            fn opt_text(&self, col: &str) -> Result<Option<String>> {
                self.try_get(col)
                    .map_err(|e| StoreError::Corrupt(format!("{col}: {e}")))
            }
            fn int(&self, col: &str) -> Result<i64> {
                self.try_get(col)
                    .map_err(|e| StoreError::Corrupt(format!("{col}: {e}")))
            }
            fn opt_int(&self, col: &str) -> Result<Option<i64>> {
                self.try_get(col)
                    .map_err(|e| StoreError::Corrupt(format!("{col}: {e}")))
            }
            fn opt_blob(&self, col: &str) -> Result<Option<Vec<u8>>> {
                self.try_get(col)
                    .map_err(|e| StoreError::Corrupt(format!("{col}: {e}")))
            }
        }
    };
}
row_ext!(SqliteRow);
row_ext!(PgRow);

pub(super) fn version_from_row(r: &impl RowExt) -> Result<StoredVersion> {
    let path = r.text("path")?;
    let version = r.int("version")?;
    let kek = r.text("kek_id")?;
    let kek_id = KekId::from_hex(&kek)
        .ok_or_else(|| StoreError::Corrupt(format!("kek_id of {path}#{version}")))?;
    let parts = (
        r.opt_blob("dek_iv")?,
        r.opt_blob("dek_ct")?,
        r.opt_blob("nonce")?,
        r.opt_blob("ciphertext")?,
    );
    let sealed = match parts {
        (Some(iv), Some(ct), Some(nonce), Some(data)) => Some(SealedVersion {
            nonce,
            ciphertext: data,
            dek: WrappedDek {
                kek_id,
                iv,
                ciphertext: ct,
            },
        }),
        (None, None, None, None) => None,
        _ => return Err(StoreError::Corrupt(format!("partial row {path}#{version}"))),
    };
    Ok(StoredVersion {
        path,
        version,
        created_ms: r.int("created_ms")?,
        deleted_ms: r.opt_int("deleted_ms")?,
        destroyed_ms: r.opt_int("destroyed_ms")?,
        sealed,
    })
}

pub(super) fn lease_from_row(r: &impl RowExt) -> Result<LeaseRow> {
    Ok(LeaseRow {
        id: r.text("id")?,
        identity: Identity {
            namespace: r.text("namespace")?,
            service_account: r.text("service_account")?,
            pod_name: r.opt_text("pod_name")?,
            pod_uid: r.opt_text("pod_uid")?,
        },
        path: r.text("path")?,
        version: r.int("version")?,
        created_ms: r.int("created_ms")?,
        expires_ms: r.int("expires_ms")?,
        max_expires_ms: r.int("max_expires_ms")?,
        renewals: r.int("renewals")?,
        ended_ms: r.opt_int("ended_ms")?,
        end_reason: r.opt_text("end_reason")?,
    })
}
