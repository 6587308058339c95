//! KEK rotation: `RotateKey` makes a new KEK in the HSM, which becomes the primary at once in
//! the replica that made it (the others adopt it at their next KEK refresh); a background
//! re-wrap in every replica moves the stored DEKs from older KEKs to the primary in batches;
//! `RetireKey` destroys a KEK once no DEK needs it. Optional automatic rotation by the age of
//! the primary or by the number of encryptions under it, decided by one replica at a time.
//!
//! Only DEKs are re-encrypted (unwrapped with the old KEK and wrapped with the new one, both
//! inside the HSM); secret data never is. Each batch is one database transaction whose updates
//! are guarded by the row's old KEK id and wrapped DEK, so a crash at any point loses nothing
//! and no row moves twice; after a restart the job resumes by finding the rows still wrapped by
//! an older KEK. Moves only ever go from an older KEK (by the creation time in its label) to a
//! newer one, so replicas that have not adopted a new primary yet never move rows back.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, UNIX_EPOCH};

use keyhaven_hsm::{KekId, KekInfo};

use super::{Broker, BrokerError, Caller, KekStatus, Result};
use crate::audit::now_ms;
use crate::audit::writer::ChangeError;
use crate::audit::{AuditEvent, EventKind, Outcome};
use crate::crypto::CryptoError;
use crate::policy::Capability;
use crate::store::{Rewrapped, StoreError};

/// Re-wrap rate and replica count are computed over the batches of this window.
pub const RATE_WINDOW: Duration = Duration::from_secs(60);
/// A re-wrap pass re-reads the KEK list this often and ends early when the primary changed.
const RECHECK: Duration = Duration::from_secs(5);
/// HSM calls a replica's re-wrap keeps in flight (of the keystore's 8 sessions; the others
/// stay free for leases).
pub const REWRAP_HSM_CONCURRENCY: usize = 4;
// The re-wrap joins exactly four lanes (`tokio::join!` takes a fixed number of futures).
const _: () = assert!(REWRAP_HSM_CONCURRENCY == 4);

/// When to rotate the primary KEK without an operator. Both rules off by default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AutoRotation {
    /// Rotate when the primary is older than this (creation time from its label).
    pub after: Option<Duration>,
    /// Rotate when this many encryptions (DEKs sealed plus DEKs re-wrapped to it) are recorded
    /// under the primary.
    pub after_encryptions: Option<u64>,
}

impl AutoRotation {
    /// True when neither rule is set.
    pub fn is_off(&self) -> bool {
        self.after.is_none() && self.after_encryptions.is_none()
    }

    /// The rule in words, for `keys status`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(a) = self.after {
            parts.push(format!(
                "when the primary is older than {}",
                humantime::format_duration(a)
            ));
        }
        if let Some(n) = self.after_encryptions {
            parts.push(format!("when the primary has {n} encryptions"));
        }
        if parts.is_empty() {
            "off".into()
        } else {
            parts.join(" or ")
        }
    }
}

/// This process's name in the re-wrap log: host name (the pod name in Kubernetes) and pid.
pub fn replica_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
        .unwrap_or_else(|| "broker".into());
    format!("{host}/{}", std::process::id())
}

/// Progress of the background re-wrap, over every replica.
#[derive(Debug, Clone, PartialEq)]
pub struct RewrapProgress {
    /// Live DEKs still wrapped by an older KEK the HSM has.
    pub remaining: i64,
    /// DEKs re-wrapped to the primary so far.
    pub moved: i64,
    /// DEKs per second over the batches of the last [`RATE_WINDOW`] (0: none).
    pub rate_per_second: f64,
    /// `remaining / rate`; zero when nothing remains, `None` when there is no recent batch.
    pub eta: Option<Duration>,
    /// Replicas that committed a batch in the last [`RATE_WINDOW`].
    pub replicas: i64,
    /// End of the last recorded batch (Unix ms; 0: none).
    pub last_batch_ms: i64,
    /// Live DEKs under a KEK the HSM does not have: they cannot be opened or moved.
    pub unknown_kek_deks: i64,
}

/// What `keys status` shows.
#[derive(Debug, Clone)]
pub struct KeyReport {
    /// Every broker KEK on the token, oldest first; the last one is the primary.
    pub keks: Vec<KekStatus>,
    /// Re-wrap progress.
    pub rewrap: RewrapProgress,
    /// The answering replica's automatic-rotation rule.
    pub auto_rotation: String,
}

/// A rotation made.
#[derive(Debug, Clone)]
pub struct Rotated {
    /// The new primary.
    pub kek: KekInfo,
    /// The primary before, if there was one.
    pub previous: Option<KekId>,
    /// Live DEKs under older KEKs at the time of the rotation.
    pub deks_to_rewrap: i64,
}

/// What one re-wrap pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RewrapPass {
    /// Rows moved to the primary.
    pub moved: u64,
    /// Batches committed.
    pub batches: u64,
    /// Rows left where they are because they do not authenticate (altered rows).
    pub skipped: u64,
}

fn hsm(e: keyhaven_hsm::Error) -> BrokerError {
    BrokerError::from(CryptoError::Hsm(e))
}

fn created_ms(k: &KekInfo) -> Option<i64> {
    k.created
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .and_then(|d| i64::try_from(d.as_millis()).ok())
}

/// The record of a key operation's start (`admin:<verb>`, by `caller`, on `kek` when known),
/// stored before the HSM is asked to make or destroy a key.
fn key_intent(caller: &Caller, verb: &str, kek: Option<KekId>) -> Vec<AuditEvent> {
    let path = kek.map(kek_ref);
    Broker::audit_events(
        None,
        caller,
        EventKind::Admin(verb.into()),
        path.as_deref(),
        None,
        &Ok::<(), BrokerError>(()),
    )
}

/// How a KEK appears in audit records (in the `path` field).
fn kek_ref(id: KekId) -> String {
    format!("kek:{id}")
}

/// Warned once per process that `--rotate-after-encryptions` is below the number of live DEKs.
static WARNED_LOW_LIMIT: AtomicBool = AtomicBool::new(false);

impl Broker {
    /// This replica's name in the re-wrap log.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// The broker's KEKs from the HSM (oldest first), adopting the newest as the primary.
    async fn fresh_keks(&self) -> Result<Vec<KekInfo>> {
        let keks = self.envelope().keystore().list_keks().await.map_err(hsm)?;
        *self.kek.write().unwrap_or_else(|p| p.into_inner()) = keks.last().map(|k| k.id);
        Ok(keks)
    }

    /// Live DEKs not wrapped by this replica's primary (for the metrics gauge).
    pub(super) async fn rewrap_remaining(&self) -> Result<i64> {
        let primary = self.current_kek().ok().map(|k| k.to_string());
        Ok(self
            .store()
            .deks_per_kek()
            .await?
            .iter()
            .filter(|(k, _)| Some(k) != primary.as_ref())
            .map(|(_, n)| n)
            .sum())
    }

    /// Every broker KEK (role, creation time, DEKs it wraps, encryptions) and the re-wrap
    /// progress. Needs the `audit` capability.
    pub async fn key_report(&self, caller: &Caller) -> Result<KeyReport> {
        self.require(caller, "", Capability::Audit, "key_status")
            .await?;
        let keks = self.fresh_keks().await?;
        let counts = self.store().deks_per_kek().await?;
        let now = now_ms();
        let n = keks.len();
        let mut out = Vec::with_capacity(n);
        let mut remaining = 0;
        let mut moved = 0;
        for (i, k) in keks.iter().enumerate() {
            let id = k.id.to_string();
            let deks = counts.iter().find(|(c, _)| *c == id).map_or(0, |(_, n)| *n);
            let usage = self.store().kek_usage(k.id).await?;
            let primary = i + 1 == n;
            if primary {
                moved = usage.rewraps_in;
            } else {
                remaining += deks;
            }
            out.push(KekStatus {
                kek_id: id,
                label: k.label.clone(),
                role: if primary { "primary" } else { "decrypt-only" },
                deks,
                created_ms: created_ms(k),
                encryptions: usage.encryptions(),
            });
        }
        let known: HashSet<String> = keks.iter().map(|k| k.id.to_string()).collect();
        let unknown_kek_deks = counts
            .iter()
            .filter(|(c, _)| !known.contains(c))
            .map(|(_, n)| n)
            .sum();
        let window_ms = i64::try_from(RATE_WINDOW.as_millis()).unwrap_or(i64::MAX);
        let act = self.store().rewrap_activity(now - window_ms).await?;
        let rate = if act.rows > 0 {
            // Over the time the recent batches span up to now, at least a second.
            let span_ms = (now - act.first_start_ms).max(1000);
            act.rows as f64 * 1000.0 / span_ms as f64
        } else {
            0.0
        };
        let eta = if remaining == 0 {
            Some(Duration::ZERO)
        } else if rate > 0.0 {
            Some(Duration::from_secs_f64(remaining as f64 / rate))
        } else {
            None
        };
        Ok(KeyReport {
            keks: out,
            rewrap: RewrapProgress {
                remaining,
                moved,
                rate_per_second: rate,
                eta,
                replicas: act.replicas,
                last_batch_ms: act.last_ms,
                unknown_kek_deks,
            },
            auto_rotation: self.config.auto_rotation.describe(),
        })
    }

    /// Makes a new KEK in the HSM; it is the primary of this replica at once, and the
    /// background re-wrap moves the stored DEKs to it. Needs the `keys` capability; audited
    /// (`admin:key_rotate`, path `kek:<new id>`).
    pub async fn rotate_key(&self, caller: &Caller) -> Result<Rotated> {
        self.require(caller, "", Capability::Keys, "key_rotate")
            .await?;
        let r = async {
            // Not at the same time as another replica's automatic rotation.
            let _guard = self.store().rotation_lock(true).await?;
            self.rotate_locked(key_intent(caller, "key_rotate_begin", None))
                .await
        }
        .await;
        let path = r.as_ref().ok().map(|x| kek_ref(x.kek.id));
        self.audited(
            caller,
            EventKind::Admin("key_rotate".into()),
            path.as_deref(),
            None,
            r,
        )
        .await
    }

    /// The rotation itself; the caller holds the rotation lock. `intent` is recorded before
    /// the HSM makes the KEK (no record, no KEK); the caller records the outcome.
    async fn rotate_locked(&self, intent: Vec<AuditEvent>) -> Result<Rotated> {
        let previous = self.fresh_keks().await?.last().map(|k| k.id);
        self.submit(intent, None).await?;
        let kek = self
            .envelope()
            .keystore()
            .generate_kek()
            .await
            .map_err(hsm)?;
        let keks = self.fresh_keks().await?;
        if keks.last().map(|k| k.id) != Some(kek.id) {
            tracing::error!(kek = %kek.id, "the new KEK is not the newest broker KEK on the token");
            return Err(BrokerError::internal(
                "KEK rotation (the new KEK is not the newest on the token)",
            ));
        }
        let new_id = kek.id.to_string();
        let known: HashSet<String> = keks.iter().map(|k| k.id.to_string()).collect();
        let deks_to_rewrap = self
            .store()
            .deks_per_kek()
            .await?
            .iter()
            .filter(|(c, _)| *c != new_id && known.contains(c))
            .map(|(_, n)| n)
            .sum();
        self.metrics().kek_rotations.inc();
        tracing::info!(
            kek = %kek.id,
            label = %kek.label,
            previous = %previous.map(|p| p.to_string()).unwrap_or_default(),
            deks_to_rewrap,
            "rotated the broker KEK: new secret versions use it, the re-wrap moves the others"
        );
        Ok(Rotated {
            kek,
            previous,
            deks_to_rewrap,
        })
    }

    /// Destroys KEK `kek_id` in the HSM. Refused (`FAILED_PRECONDITION`) while it is the
    /// primary or still wraps a live DEK (soft-deleted versions count, destroyed ones do not);
    /// `NOT_FOUND` if the token has no such broker KEK. Needs the `keys` capability; audited
    /// (`admin:key_retire`, path `kek:<id>`) whether refused or done.
    pub async fn retire_key(&self, caller: &Caller, kek_id: &str) -> Result<KekInfo> {
        self.require(caller, "", Capability::Keys, "key_retire")
            .await?;
        let id = KekId::from_hex(kek_id.trim());
        let r = match id {
            Some(id) => self.retire(caller, id).await,
            None => Err(BrokerError::InvalidArgument(format!(
                "'{}' is not a KEK id (32 hex digits, as `brokerctl keys status` shows)",
                crate::bounded::echo(kek_id)
            ))),
        };
        let path = id.map(kek_ref);
        self.audited(
            caller,
            EventKind::Admin("key_retire".into()),
            path.as_deref(),
            None,
            r,
        )
        .await
    }

    async fn retire(&self, caller: &Caller, id: KekId) -> Result<KekInfo> {
        let keks = self.fresh_keks().await?;
        let info = keks.iter().find(|k| k.id == id).cloned().ok_or_else(|| {
            BrokerError::NotFound(format!(
                "no broker KEK {id} on the HSM token (already retired, or not a broker KEK)"
            ))
        })?;
        if keks.last().map(|k| k.id) == Some(id) {
            return Err(BrokerError::FailedPrecondition(format!(
                "KEK {id} is the primary: rotate first (`brokerctl keys rotate`), wait until \
                 `brokerctl keys status` shows the re-wrap done, then retire it"
            )));
        }
        // From here on no DEK can be wrapped by it again (every wrap checks the mark under
        // the KEK lock), and none is wrapped by it now. The mark is stored with the record of
        // the retirement's start: no record, no mark, and no destruction in the HSM.
        let intent = key_intent(caller, "key_retire_begin", Some(id));
        let marked = self
            .commit_change_or_store_error(move |store| async move {
                let records = store
                    .mark_kek_retired_audited(id, now_ms(), || intent)
                    .await?;
                Ok(((), records))
            })
            .await;
        match marked {
            Ok(()) => {}
            Err(ChangeError::Store(StoreError::KekInUse { deks, .. })) => {
                return Err(BrokerError::FailedPrecondition(format!(
                    "KEK {id} still wraps {deks} DEK(s) (soft-deleted versions count too): wait \
                     until `brokerctl keys status` shows the re-wrap done, then retry"
                )))
            }
            Err(e) => return Err(e.into()),
        }
        self.envelope()
            .keystore()
            .destroy_kek(id)
            .await
            .map_err(hsm)?;
        tracing::warn!(kek = %id, label = %info.label, "retired broker KEK: destroyed in the HSM");
        Ok(info)
    }

    /// One re-wrap pass: re-reads the KEK list (adopting the newest as primary), then moves
    /// batches of up to `batch` live DEKs from older KEKs to the primary until none is left
    /// (rows that do not authenticate are left and counted as skipped), sleeping `pause` between
    /// batches. Several replicas may run passes at once. Stops at the first database or HSM
    /// failure, or a KEK gone from the token (the batch in flight is rolled back); the next
    /// pass picks up what is left.
    pub async fn rewrap_pass(&self, batch: i64, pause: Duration) -> Result<RewrapPass> {
        let mut report = RewrapPass::default();
        let keks = self.fresh_keks().await?;
        let Some(primary) = keks.last().map(|k| k.id) else {
            return Ok(report);
        };
        let from: Vec<KekId> = keks
            .iter()
            .map(|k| k.id)
            .filter(|k| *k != primary)
            .collect();
        if from.is_empty() {
            return Ok(report);
        }
        let batch = batch.clamp(1, 10_000);
        let mut cursor: Option<(String, i64)> = None;
        let mut checked = Instant::now();
        loop {
            let claim = self
                .store()
                .claim_rewrap(
                    &from,
                    primary,
                    cursor.as_ref().map(|(p, v)| (p.as_str(), *v)),
                    batch,
                )
                .await?;
            let Some(last) = claim.rows.last() else {
                break;
            };
            cursor = Some((last.path.clone(), last.version));
            let mut moved = Vec::with_capacity(claim.rows.len());
            // REWRAP_HSM_CONCURRENCY lanes, each re-wrapping every 4th row in one HSM task; the
            // results are put back in row order.
            let lane = |k: usize| {
                let items: Vec<(usize, (&str, i64, &crate::crypto::WrappedDek))> = claim
                    .rows
                    .iter()
                    .enumerate()
                    .skip(k)
                    .step_by(REWRAP_HSM_CONCURRENCY)
                    .map(|(i, r)| (i, (r.path.as_str(), r.version, &r.dek)))
                    .collect();
                async move {
                    let (idx, calls): (Vec<usize>, Vec<_>) = items.into_iter().unzip();
                    if calls.is_empty() {
                        return Ok(Vec::new());
                    }
                    let out = self.envelope().rewrap_many(&calls, primary).await?;
                    Ok::<_, CryptoError>(idx.into_iter().zip(out).collect::<Vec<_>>())
                }
            };
            let (l0, l1, l2, l3) = tokio::join!(lane(0), lane(1), lane(2), lane(3));
            // An HSM failure of a whole lane: dropping the claim rolls the batch back.
            let mut results: Vec<_> = l0?.into_iter().chain(l1?).chain(l2?).chain(l3?).collect();
            results.sort_by_key(|(i, _)| *i);
            for (i, result) in results {
                let row = &claim.rows[i];
                match result {
                    Ok(new) => moved.push(Rewrapped {
                        path: row.path.clone(),
                        version: row.version,
                        old: row.dek.clone(),
                        new,
                    }),
                    Err(CryptoError::Integrity { path, version }) => {
                        tracing::warn!(path = %path, version, "re-wrap: the stored DEK does not authenticate; left as it is");
                        report.skipped += 1;
                    }
                    // A KEK of the pass vanished (or the HSM failed): dropping the claim rolls
                    // the batch back, and the next pass starts from a fresh KEK list.
                    Err(e) => return Err(e.into()),
                }
            }
            let n = claim.commit(&moved, &self.replica, now_ms()).await?;
            for m in &moved {
                self.envelope().cache().rekey(&m.old, &m.new);
            }
            report.moved += n;
            report.batches += 1;
            self.metrics().rewrapped_deks.inc_by(n);
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            if checked.elapsed() >= RECHECK {
                checked = Instant::now();
                let newest = self.fresh_keks().await?.last().map(|k| k.id);
                if newest != Some(primary) {
                    // Rotated again meanwhile: the next pass moves everything to the newest.
                    break;
                }
            }
        }
        if report.moved > 0 || report.skipped > 0 {
            tracing::info!(
                moved = report.moved,
                batches = report.batches,
                skipped = report.skipped,
                to = %primary,
                "re-wrap pass done"
            );
        }
        Ok(report)
    }

    /// Checks the automatic-rotation rule and, if it is due, rotates, audited as
    /// `admin:key_rotate` by `broker:auto-rotation` with the reason (`age` or `encryptions`).
    /// One replica at a time decides (the rotation lock: an advisory lock on PostgreSQL);
    /// the rule is checked again under the lock against a fresh KEK list, so replicas racing
    /// on the same due rotation make exactly one.
    pub async fn auto_rotate(&self) -> Result<Option<Rotated>> {
        if self.config.auto_rotation.is_off() || self.rotation_due().await?.is_none() {
            return Ok(None);
        }
        let Some(guard) = self.store().rotation_lock(false).await? else {
            return Ok(None);
        };
        let Some(reason) = self.rotation_due().await? else {
            return Ok(None);
        };
        let intent = AuditEvent::new(
            now_ms(),
            EventKind::Admin("key_rotate_begin".into()),
            Outcome::Ok,
        )
        .with_identity("broker:auto-rotation")
        .with_reason(reason);
        let r = self.rotate_locked(vec![intent]).await;
        drop(guard);
        let mut ev = AuditEvent::new(
            now_ms(),
            EventKind::Admin("key_rotate".into()),
            if r.is_ok() {
                Outcome::Ok
            } else {
                Outcome::Error
            },
        )
        .with_identity("broker:auto-rotation")
        .with_reason(reason);
        if let Ok(x) = &r {
            ev = ev.with_path(kek_ref(x.kek.id));
        }
        self.audit(ev).await?;
        r.map(Some)
    }

    /// Which automatic-rotation rule is due, if any. Never while a re-wrap is still running.
    async fn rotation_due(&self) -> Result<Option<&'static str>> {
        let cfg = &self.config.auto_rotation;
        let keks = self.fresh_keks().await?;
        let Some(primary) = keks.last() else {
            return Ok(None);
        };
        let counts = self.store().deks_per_kek().await?;
        let primary_id = primary.id.to_string();
        let known: HashSet<String> = keks.iter().map(|k| k.id.to_string()).collect();
        let remaining: i64 = counts
            .iter()
            .filter(|(c, _)| *c != primary_id && known.contains(c))
            .map(|(_, n)| n)
            .sum();
        if remaining > 0 {
            return Ok(None);
        }
        if let (Some(after), Some(created)) = (cfg.after, primary.created) {
            if created.elapsed().is_ok_and(|age| age >= after) {
                return Ok(Some("age"));
            }
        }
        if let Some(limit) = cfg.after_encryptions {
            let used = self.store().kek_usage(primary.id).await?.encryptions();
            if u64::try_from(used).unwrap_or(0) >= limit {
                let live: i64 = counts.iter().map(|(_, n)| n).sum();
                if u64::try_from(live).unwrap_or(0) >= limit {
                    // The re-wrap after a rotation alone would reach the limit again:
                    // rotating would never end.
                    if !WARNED_LOW_LIMIT.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            limit,
                            live_deks = live,
                            "--rotate-after-encryptions is not above the number of live DEKs; \
                             not rotating by count (raise the limit)"
                        );
                    }
                    return Ok(None);
                }
                return Ok(Some("encryptions"));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_rotation_describes_itself() {
        assert!(AutoRotation::default().is_off());
        assert_eq!(AutoRotation::default().describe(), "off");
        let a = AutoRotation {
            after: Some(Duration::from_secs(30 * 86_400)),
            after_encryptions: Some(1_000_000),
        };
        assert!(!a.is_off());
        assert_eq!(
            a.describe(),
            "when the primary is older than 30days or when the primary has 1000000 encryptions"
        );
        assert!(replica_name().contains('/'));
    }
}
