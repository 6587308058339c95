//! One policy set on every replica: the loaded set carries the generation it was stored
//! under; every replica polls the database's generation and reloads when it moves, and no
//! decision is made on a set that was not confirmed current within [`POLICY_BOUND`].
//!
//! A policy apply ends the leases the new set no longer allows in its own transaction. A
//! replica that granted a lease on the old set in the moments before it saw the new one ends
//! that lease itself when it reloads (the sweep), so no lease the new set forbids survives it
//! by more than the bound.

use std::sync::atomic::Ordering;

use super::*;

/// A replica decides only on a policy set confirmed current at most this long ago.
pub const POLICY_BOUND: Duration = Duration::from_secs(1);
/// How often each replica compares its policy generation with the database's.
pub const POLICY_POLL: Duration = Duration::from_millis(250);
/// On reload, a replica re-checks the active leases created since this long before the apply
/// (the bound, plus room for clock differences between replicas).
pub const SWEEP_MARGIN: Duration = Duration::from_secs(30);

/// The end reason of a lease that a policy change no longer allows.
pub const REVOKED_BY_POLICY: &str = "revoked:policy";

/// The policy set a replica enforces, and the generation it was stored under (0: none yet).
#[derive(Debug, Default)]
pub(super) struct LoadedPolicies {
    pub(super) set: PolicySet,
    pub(super) generation: i64,
}

impl Broker {
    /// The generation of the policy set this replica enforces.
    pub fn policy_generation(&self) -> i64 {
        self.policies().generation
    }

    /// Re-reads the policies from the store (the set and its generation). Returns the
    /// generation and, when it moved, when the new set was applied.
    pub async fn reload_policies(&self) -> Result<i64> {
        let checked_at = now_ms();
        let (set, generation) = match self.store.load_policies().await? {
            Some(stored) => (
                PolicySet::from_yaml(&stored.yaml, self.config.max_ttl_cap)
                    .map_err(|e| BrokerError::internal_by("stored policies invalid", e))?,
                stored.generation,
            ),
            None => (PolicySet::default(), 0),
        };
        self.install_policies(set, generation, checked_at);
        Ok(generation)
    }

    /// Installs `set` as generation `generation` (unless a newer one is installed already),
    /// confirmed current at `checked_at`.
    pub(super) fn install_policies(&self, set: PolicySet, generation: i64, checked_at: i64) {
        {
            let mut p = self.policies.write().unwrap_or_else(|p| p.into_inner());
            if generation >= p.generation {
                *p = LoadedPolicies { set, generation };
            }
        }
        self.metrics.policy_generation.set(self.policy_generation());
        self.policy_confirmed_ms
            .fetch_max(checked_at, Ordering::Relaxed);
    }

    /// Compares this replica's policy generation with the database's; reloads (and sweeps)
    /// when it moved. Returns true when it reloaded.
    pub async fn check_policies(&self) -> Result<bool> {
        let checked_at = now_ms();
        let current = self.store.policy_generation().await?;
        if current == self.policy_generation() {
            self.policy_confirmed_ms
                .fetch_max(checked_at, Ordering::Relaxed);
            return Ok(false);
        }
        let before = self.policy_generation();
        let generation = self.reload_policies().await?;
        tracing::info!(from = before, to = generation, "policies reloaded");
        self.sweep_after_policy_change().await?;
        Ok(true)
    }

    /// Makes sure the policy set is current within [`POLICY_BOUND`] before a decision: the
    /// poller normally keeps it so; when it has not (stalled, or the database was away), this
    /// checks now, and fails rather than decide on a set of unknown age.
    pub(super) async fn fresh_policies(&self) -> Result<()> {
        let fresh = || {
            now_ms() - self.policy_confirmed_ms.load(Ordering::Relaxed)
                <= (POLICY_BOUND / 2).as_millis() as i64
        };
        if fresh() {
            return Ok(());
        }
        // One check at a time: the requests that arrive meanwhile wait for it instead of each
        // asking the database (under load the poller's own check can be late).
        let _one = self.policy_check.lock().await;
        if fresh() {
            return Ok(());
        }
        self.check_policies().await.map(drop)
    }

    /// Ends the active leases, created since shortly before the current set was applied, that
    /// the current set does not allow: leases this or another replica granted on the old set
    /// in the moments before it saw the new one. Audited as the reaper does (the holder's
    /// identity), with reason [`REVOKED_BY_POLICY`]. Returns how many it ended.
    pub async fn sweep_after_policy_change(&self) -> Result<usize> {
        let Some(stored) = self.store.load_policies().await? else {
            return Ok(0);
        };
        let now = now_ms();
        let since = stored.updated_ms - SWEEP_MARGIN.as_millis() as i64;
        let leases = self.store.active_leases_since(since, now).await?;
        let forbidden = forbidden(&self.policies().set, &leases);
        if forbidden.is_empty() {
            return Ok(0);
        }
        let forbidden: Vec<LeaseRow> = forbidden.into_iter().cloned().collect();
        let ended = self.end_leases(forbidden, None, now).await?;
        if !ended.is_empty() {
            tracing::info!(
                ended = ended.len(),
                "leases no longer allowed by the policies ended"
            );
        }
        Ok(ended.len())
    }

    /// Ends one lease that the policies no longer allow (a refused renewal), with its record,
    /// in one transaction.
    pub(super) async fn end_forbidden_lease(&self, lease: &LeaseRow) -> Result<()> {
        self.end_leases(vec![lease.clone()], None, now_ms())
            .await
            .map(drop)
    }

    /// Ends those of `leases` still active as [`REVOKED_BY_POLICY`], each with its `revoke`
    /// record (by `by`, or in the holder's name), in one transaction. Returns the ended ids.
    async fn end_leases(
        &self,
        leases: Vec<LeaseRow>,
        by: Option<Caller>,
        now: i64,
    ) -> Result<Vec<String>> {
        let ids: Vec<String> = leases.iter().map(|l| l.id.clone()).collect();
        self.commit_change(move |store| async move {
            store
                .end_leases_audited(&ids, REVOKED_BY_POLICY, now, |ended| {
                    ended_events(&leases, ended, by.as_ref(), now)
                })
                .await
        })
        .await
    }
}

/// The leases among `leases` that `set` does not let their holder read.
pub(super) fn forbidden<'a>(set: &PolicySet, leases: &'a [LeaseRow]) -> Vec<&'a LeaseRow> {
    leases
        .iter()
        .filter(|l| {
            !set.evaluate(&l.identity, &l.path, Capability::Read)
                .is_allowed()
        })
        .collect()
}

/// The `revoke` records of those of `leases` that were `ended`.
pub(super) fn ended_events(
    leases: &[LeaseRow],
    ended: &[String],
    by: Option<&Caller>,
    now: i64,
) -> Vec<AuditEvent> {
    leases
        .iter()
        .filter(|l| ended.contains(&l.id))
        .map(|l| lease_end_event(l, by, now))
        .collect()
}

/// The `revoke` record of a lease ended by a policy change: by `by` (the operator who applied
/// it) or, when `None`, in the holder's name as the reaper records expiries.
pub(super) fn lease_end_event(l: &LeaseRow, by: Option<&Caller>, now: i64) -> AuditEvent {
    let mut ev = AuditEvent::new(now, EventKind::Revoke, Outcome::Ok)
        .with_path(l.path.clone())
        .with_lease_id(l.id.clone())
        .with_reason(REVOKED_BY_POLICY);
    match by {
        Some(c) => {
            ev = ev.with_identity(c.audit_name());
            if let Some(p) = c.pod() {
                ev = ev.with_pod(p);
            }
        }
        None => {
            ev = ev.with_identity(l.identity.subject());
            if let Some(p) = &l.identity.pod_name {
                ev = ev.with_pod(p.clone());
            }
        }
    }
    ev
}

/// Every replica: compares the policy generation every [`POLICY_POLL`] (reloading and sweeping
/// when it moved).
pub fn spawn_policy_watch(broker: &Arc<Broker>) {
    let b = Arc::downgrade(broker);
    tokio::spawn(async move {
        let mut failing = false;
        loop {
            tokio::time::sleep(POLICY_POLL).await;
            let Some(b) = b.upgrade() else { return };
            match b.check_policies().await {
                Ok(_) => {
                    if failing {
                        tracing::info!("policy generation check works again");
                    }
                    failing = false;
                }
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e.chain(), "policy generation check failed; decisions wait for it");
                }
                Err(_) => {}
            }
        }
    });
}
