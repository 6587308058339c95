//! The replica registry: each replica records itself (name, version, start, heartbeat, policy
//! generation, primary KEK) so that operators can see that every replica enforces the same
//! policies and keys (`brokerctl replicas`, `brokerctl policy status`).

use super::*;
use crate::store::ReplicaRow;

/// How often a replica refreshes its row.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
/// A replica whose last heartbeat is older than this is shown as stale.
pub const HEARTBEAT_STALE: Duration = Duration::from_secs(10);
/// Rows of replicas silent for this long are removed.
const FORGET_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

/// A replica as operators see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaStatus {
    /// Its row.
    pub row: ReplicaRow,
    /// No heartbeat for longer than [`HEARTBEAT_STALE`].
    pub stale: bool,
}

impl Broker {
    /// This replica's name (host name and process id).
    pub fn replica_name(&self) -> &str {
        &self.replica
    }

    /// Records this replica's heartbeat row now.
    pub async fn heartbeat(&self) -> Result<()> {
        let kek = *self.kek.read().unwrap_or_else(|p| p.into_inner());
        self.store
            .heartbeat(&ReplicaRow {
                name: self.replica.clone(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                started_ms: self.started_ms,
                heartbeat_ms: now_ms(),
                policy_generation: self.policy_generation(),
                primary_kek: kek.map(|k| k.to_string()),
            })
            .await?;
        Ok(())
    }

    /// The replicas sharing this database and the stored policy generation.
    pub async fn list_replicas(&self, caller: &Caller) -> Result<(Vec<ReplicaStatus>, i64)> {
        self.require(caller, "", Capability::Policy, "replica_list")
            .await?;
        let r = async {
            let now = now_ms();
            let stale_before = now - HEARTBEAT_STALE.as_millis() as i64;
            let rows = self.store.replicas().await?;
            let generation = self.store.policy_generation().await?;
            let list = rows
                .into_iter()
                .map(|row| ReplicaStatus {
                    stale: row.heartbeat_ms < stale_before,
                    row,
                })
                .collect();
            Ok((list, generation))
        }
        .await;
        self.audited(
            caller,
            EventKind::Admin("replica_list".into()),
            None,
            None,
            r,
        )
        .await
    }
}

/// Every replica: records its heartbeat every [`HEARTBEAT_EVERY`] (and, now and then, removes
/// the rows of replicas gone for a day).
pub fn spawn_heartbeat(broker: &Arc<Broker>) {
    let b = Arc::downgrade(broker);
    tokio::spawn(async move {
        let mut beats: u64 = 0;
        let mut failing = false;
        loop {
            let Some(b) = b.upgrade() else { return };
            match b.heartbeat().await {
                Ok(()) => failing = false,
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e.chain(), "replica heartbeat failed");
                }
                Err(_) => {}
            }
            if beats.is_multiple_of(1000) {
                let before = now_ms() - FORGET_AFTER.as_millis() as i64;
                if let Err(e) = b.store().forget_replicas(before).await {
                    tracing::debug!(error = %e, "forgetting old replica rows failed");
                }
            }
            beats += 1;
            drop(b);
            tokio::time::sleep(HEARTBEAT_EVERY).await;
        }
    });
}
