//! [`StoreError`]: why a storage call failed.

/// Why a storage call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or timed out; retry later.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// A uniqueness constraint was hit (e.g. two writers took the same version).
    #[error("conflict: {0}")]
    Conflict(String),
    /// A stored row is not what we wrote (bad column contents).
    #[error("corrupt row: {0}")]
    Corrupt(String),
    /// The KEK is retired (or being retired): no DEK may be wrapped by it any more.
    #[error("KEK {0} is retired")]
    KekRetired(String),
    /// The KEK still wraps this many live DEKs (soft-deleted versions included).
    #[error("KEK {kek_id} still wraps {deks} DEKs")]
    KekInUse {
        /// The KEK.
        kek_id: String,
        /// Live DEKs it wraps.
        deks: i64,
    },
    /// A guarded audit append found the secrets generation moved on: a secret version the
    /// batch hands out may be outdated. Nothing was written.
    #[error("secrets changed (generation {current}, the batch was read under {read})")]
    StaleGeneration {
        /// The generation in the database.
        current: i64,
        /// The generation the batch's versions were read under.
        read: i64,
    },
    /// Anything else the database said.
    #[error("database error: {0}")]
    Other(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e.to_string()),
            sqlx::Error::Database(db) => {
                if db.is_unique_violation()
                    || db.code().as_deref() == Some(super::audit::RENEWALS_CHANGED)
                {
                    StoreError::Conflict(db.message().to_owned())
                } else if matches!(db.code().as_deref(), Some(c) if c.starts_with("08") || c.starts_with("57P") || c == "5" || c == "6")
                {
                    // PostgreSQL class 08 (connection) and 57P (shutdown); SQLite BUSY/LOCKED.
                    StoreError::Unavailable(db.message().to_owned())
                } else {
                    StoreError::Other(db.message().to_owned())
                }
            }
            _ => StoreError::Other(e.to_string()),
        }
    }
}

impl StoreError {
    /// True when retrying later may succeed.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// Result alias.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;
