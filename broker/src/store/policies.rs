//! The policy document and its generation; a policy change and the leases it ends are stored
//! in one transaction with their audit records.

use super::*;

/// The stored policy document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPolicies {
    /// The document (YAML).
    pub yaml: String,
    /// Bumped by every apply: 1 for the first document.
    pub generation: i64,
    /// When it was applied.
    pub updated_ms: i64,
}

/// What [`Store::apply_policies`] stored.
#[derive(Debug, Clone)]
pub struct PolicyApplied {
    /// The new policy generation.
    pub generation: i64,
    /// The leases it ended (those of the given ones that were still active).
    pub ended: Vec<String>,
    /// The audit records, in order.
    pub records: Vec<AuditRecord>,
}

/// The policy generation: 0 before the first apply.
const POLICY_GENERATION_SQL: &str =
    "SELECT COALESCE((SELECT generation FROM policies WHERE id = 1), 0)";

/// Ends the still active leases among `$ids` inside `$tx`; evaluates to the ids it ended.
macro_rules! end_leases_in {
    ($tx:ident, $db:ty, $ids:expr, $now_ms:expr, $reason:expr) => {{
        let mut ended: Vec<String> = Vec::new();
        for chunk in $ids.chunks(ROWS_PER_INSERT) {
            let mut q = sqlx::QueryBuilder::<$db>::new("UPDATE leases SET ended_ms = ");
            q.push_bind($now_ms)
                .push(", end_reason = ")
                .push_bind($reason)
                .push(" WHERE ended_ms IS NULL AND expires_ms > ")
                .push_bind($now_ms)
                .push(" AND id IN (");
            let mut list = q.separated(", ");
            for id in chunk {
                list.push_bind(id.as_str());
            }
            q.push(") RETURNING id");
            let rows = q.build().persistent(false).fetch_all(&mut *$tx).await?;
            for r in &rows {
                ended.push(r.text("id")?);
            }
        }
        ended
    }};
}

impl Store {
    /// The stored policy document, if any.
    pub async fn load_policies(&self) -> Result<Option<StoredPolicies>> {
        let row = on_pool!(self, p => match sqlx::query(
            "SELECT yaml, generation, updated_ms FROM policies WHERE id = 1")
            .fetch_optional(p).await? {
            Some(r) => Some(StoredPolicies {
                yaml: r.text("yaml")?,
                generation: r.int("generation")?,
                updated_ms: r.int("updated_ms")?,
            }),
            None => None,
        });
        Ok(row)
    }

    /// The policy generation (0 before the first apply): one indexed read of one row, what
    /// every replica polls.
    pub async fn policy_generation(&self) -> Result<i64> {
        Ok(
            on_pool!(self, p => sqlx::query_scalar::<_, i64>(POLICY_GENERATION_SQL)
            .fetch_one(p).await)?,
        )
    }

    /// Stores `yaml` as the policy document (generation one more than the stored one), ends
    /// the leases among `end` that are still active (`end_reason`), and appends the records
    /// `events(generation, ended)` gives — all in ONE transaction: the change exists if and
    /// only if its records do.
    pub async fn apply_policies(
        &self,
        yaml: &str,
        end: &[String],
        end_reason: &str,
        now_ms: i64,
        events: impl FnOnce(i64, &[String]) -> Vec<AuditEvent>,
    ) -> Result<PolicyApplied> {
        in_audit_tx!(self, tx, Db => {
            let generation: i64 = sqlx::query_scalar(
                "INSERT INTO policies (id, yaml, updated_ms, generation) VALUES (1, $1, $2, 1) \
                 ON CONFLICT (id) DO UPDATE SET yaml = excluded.yaml, \
                 updated_ms = excluded.updated_ms, generation = policies.generation + 1 \
                 RETURNING generation")
                .bind(yaml).bind(now_ms).fetch_one(&mut *tx).await?;
            let ended = end_leases_in!(tx, Db, end, now_ms, end_reason);
            let records = append_chain_in!(tx, Db, events(generation, &ended));
            tx.commit().await?;
            Ok(PolicyApplied { generation, ended, records })
        })
    }

    /// Ends the leases among `ids` that are still active (`reason`) and appends the records
    /// `events(ended)` gives, in ONE transaction. Returns the ended ids and the records.
    pub async fn end_leases_audited(
        &self,
        ids: &[String],
        reason: &str,
        now_ms: i64,
        events: impl FnOnce(&[String]) -> Vec<AuditEvent>,
    ) -> Result<(Vec<String>, Vec<AuditRecord>)> {
        in_audit_tx!(self, tx, Db => {
            let ended = end_leases_in!(tx, Db, ids, now_ms, reason);
            if ended.is_empty() {
                return Ok((ended, Vec::new()));
            }
            let records = append_chain_in!(tx, Db, events(&ended));
            tx.commit().await?;
            Ok((ended, records))
        })
    }

    /// Active leases created at or after `since_ms`.
    pub async fn active_leases_since(&self, since_ms: i64, now_ms: i64) -> Result<Vec<LeaseRow>> {
        let sql = format!(
            "SELECT {LEASE_COLS} FROM leases \
             WHERE ended_ms IS NULL AND expires_ms > $1 AND created_ms >= $2"
        );
        on_pool!(self, p => sqlx::query(&sql).bind(now_ms).bind(since_ms)
            .fetch_all(p).await?.iter().map(lease_from_row).collect())
    }
}
