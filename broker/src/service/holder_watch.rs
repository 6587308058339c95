//! Leases die with their holder: every replica watches the pods and service accounts of the
//! cluster (`kube`'s watcher: a list, then a watch from the list's resourceVersion; a new
//! list on 410 Gone) and ends the active leases of a deleted pod — matched by namespace, pod
//! name **and pod uid**, as the token's `kubernetes.io` claims recorded them on the lease —
//! or of a deleted service account, each with its `revoke` record in one transaction.
//!
//! No deletion is missed: a deletion the watch did not see (it happened while the watch was
//! broken, or ending the leases failed) shows at the next full list as a holder that is no
//! longer listed, and every list ends the leases of the holders it does not contain. A list
//! is made at start, after 410 Gone, after a failure to end leases, and every
//! `relist_every` (which also catches a lease made after its pod's deletion with a token
//! that still verifies).
//!
//! Every replica acts on every deletion. Acting twice is harmless and recorded once: the
//! update ends only leases still active, and the records are made, in the same transaction,
//! for exactly the leases it ended (the audit transaction's lock orders the replicas).

use std::collections::HashSet;
use std::pin::pin;
use std::sync::Weak;

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt as _;

use super::*;
use crate::metrics::Resource;

/// The end reason of a lease whose pod was deleted.
pub const REVOKED_POD_DELETED: &str = "revoked:pod_deleted";
/// The end reason of a lease whose service account was deleted.
pub const REVOKED_SERVICEACCOUNT_DELETED: &str = "revoked:serviceaccount_deleted";
/// Default interval between full lists while the watch is healthy.
pub const DEFAULT_RELIST_EVERY: Duration = Duration::from_secs(300);
/// Pause before a new list after ending leases failed (the database was away).
const RETRY_AFTER: Duration = Duration::from_secs(2);

/// What holds a lease, as the apiserver names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Holder {
    /// A pod object: a pod re-created under the same name has another uid.
    Pod {
        /// Namespace.
        namespace: String,
        /// Pod name.
        name: String,
        /// `metadata.uid`.
        uid: String,
    },
    /// A service account (leases record its name, not its uid).
    ServiceAccount {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
}

impl Holder {
    /// The end reason of the leases of this holder once it is deleted.
    pub fn end_reason(&self) -> &'static str {
        match self {
            Holder::Pod { .. } => REVOKED_POD_DELETED,
            Holder::ServiceAccount { .. } => REVOKED_SERVICEACCOUNT_DELETED,
        }
    }

    fn filter(&self) -> LeaseFilter {
        match self.clone() {
            Holder::Pod {
                namespace,
                name,
                uid,
            } => LeaseFilter::PodUid {
                namespace,
                pod: name,
                uid,
            },
            Holder::ServiceAccount { namespace, name } => LeaseFilter::Identity {
                namespace,
                service_account: name,
            },
        }
    }
}

/// The two kinds of holder watched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HolderKind {
    /// `pods`.
    Pods,
    /// `serviceaccounts`.
    ServiceAccounts,
}

impl HolderKind {
    /// The resource's plural name.
    pub fn resource(self) -> &'static str {
        match self {
            HolderKind::Pods => "pods",
            HolderKind::ServiceAccounts => "serviceaccounts",
        }
    }

    fn holder(self, m: &ObjectMeta) -> Option<Holder> {
        let (namespace, name) = (m.namespace.clone()?, m.name.clone()?);
        Some(match self {
            HolderKind::Pods => Holder::Pod {
                namespace,
                name,
                uid: m.uid.clone()?,
            },
            HolderKind::ServiceAccounts => Holder::ServiceAccount { namespace, name },
        })
    }

    /// The holder of `l` of this kind, when the lease records one (a lease made with a token
    /// not bound to a pod has no pod).
    fn of_lease(self, l: &LeaseRow) -> Option<Holder> {
        let id = &l.identity;
        Some(match self {
            HolderKind::Pods => Holder::Pod {
                namespace: id.namespace.clone(),
                name: id.pod_name.clone()?,
                uid: id.pod_uid.clone()?,
            },
            HolderKind::ServiceAccounts => Holder::ServiceAccount {
                namespace: id.namespace.clone(),
                name: id.service_account.clone(),
            },
        })
    }
}

impl Broker {
    /// Ends the active leases of `holder`, deleted, each with its `revoke` record (in the
    /// holder's name, reason [`Holder::end_reason`]) in one transaction. Returns their ids:
    /// none when another replica (or an earlier event) ended them already.
    pub async fn end_leases_of_deleted(&self, holder: &Holder) -> Result<Vec<String>> {
        let (filter, reason) = (holder.filter(), holder.end_reason());
        let now = now_ms();
        let ended: Vec<String> = self
            .commit_change(move |store| async move {
                let (ended, records) = store
                    .revoke_leases_audited(&filter, now, reason, |ended| {
                        ended.iter().map(|l| end_event(l, reason, now)).collect()
                    })
                    .await?;
                Ok((ended.into_iter().map(|l| l.id).collect(), records))
            })
            .await?;
        self.count_ended(reason, ended.len());
        Ok(ended)
    }

    /// After a full list of `kind` that started at `listed_from_ms`: ends the active leases,
    /// made before then, whose holder of that kind is not in `listed` (deleted before the
    /// list), each with its record, in one transaction. Leases made since might belong to a
    /// holder created after the list was taken: the next list judges them.
    pub async fn end_leases_of_unlisted(
        &self,
        kind: HolderKind,
        listed: &HashSet<Holder>,
        listed_from_ms: i64,
    ) -> Result<Vec<String>> {
        let now = now_ms();
        let gone: Vec<LeaseRow> = self
            .store
            .list_leases(&LeaseFilter::All, now, false)
            .await?
            .into_iter()
            .filter(|l| l.created_ms < listed_from_ms)
            .filter(|l| kind.of_lease(l).is_some_and(|h| !listed.contains(&h)))
            .collect();
        if gone.is_empty() {
            return Ok(Vec::new());
        }
        let reason = match kind {
            HolderKind::Pods => REVOKED_POD_DELETED,
            HolderKind::ServiceAccounts => REVOKED_SERVICEACCOUNT_DELETED,
        };
        let ids: Vec<String> = gone.iter().map(|l| l.id.clone()).collect();
        let ended = self
            .commit_change(move |store| async move {
                store
                    .end_leases_audited(&ids, reason, now, |ended| {
                        gone.iter()
                            .filter(|l| ended.contains(&l.id))
                            .map(|l| end_event(l, reason, now))
                            .collect()
                    })
                    .await
            })
            .await?;
        self.count_ended(reason, ended.len());
        Ok(ended)
    }

    fn count_ended(&self, reason: &str, n: usize) {
        if n > 0 {
            self.metrics
                .holder_gone_ended
                .get_or_create(&crate::metrics::Reason {
                    reason: reason.to_owned(),
                })
                .inc_by(n as u64);
        }
    }
}

/// The `revoke` record of a lease whose holder was deleted: in the holder's name, as the
/// reaper records expiries.
fn end_event(l: &LeaseRow, reason: &str, now: i64) -> AuditEvent {
    let mut ev = AuditEvent::new(now, EventKind::Revoke, Outcome::Ok)
        .with_identity(l.identity.subject())
        .with_path(l.path.clone())
        .with_lease_id(l.id.clone())
        .with_reason(reason);
    if let Some(p) = &l.identity.pod_name {
        ev = ev.with_pod(p.clone());
    }
    ev
}

/// How the watch runs.
#[derive(Debug, Clone)]
pub struct HolderWatchConfig {
    /// A full list at least this often while the watch is healthy.
    pub relist_every: Duration,
}

impl Default for HolderWatchConfig {
    fn default() -> Self {
        HolderWatchConfig {
            relist_every: DEFAULT_RELIST_EVERY,
        }
    }
}

/// Every replica with a Kubernetes API: watches pods and service accounts in all namespaces
/// through `client` and ends the leases of those deleted. Stops when the broker is dropped.
pub fn spawn_holder_watch(broker: &Arc<Broker>, client: kube::Client, config: HolderWatchConfig) {
    // Metadata only: names and uids are all it needs, so pod specs never cross the wire.
    let pods: Api<PartialObjectMeta<Pod>> = Api::all(client.clone());
    let accounts: Api<PartialObjectMeta<ServiceAccount>> = Api::all(client);
    tokio::spawn(watch(
        Arc::downgrade(broker),
        pods,
        HolderKind::Pods,
        config.clone(),
    ));
    tokio::spawn(watch(
        Arc::downgrade(broker),
        accounts,
        HolderKind::ServiceAccounts,
        config,
    ));
}

/// Why one run of the watch ended.
enum Stop {
    /// Time for a periodic list, or ending leases failed: list again (after a pause then).
    Relist(Option<Duration>),
    /// The broker is gone.
    Done,
}

async fn watch<K>(
    b: Weak<Broker>,
    api: Api<PartialObjectMeta<K>>,
    kind: HolderKind,
    config: HolderWatchConfig,
) where
    K: kube::Resource<DynamicType = ()> + Clone + std::fmt::Debug + Send + Sync + 'static,
{
    loop {
        match watch_once(&b, api.clone(), kind, &config).await {
            Stop::Done => return,
            Stop::Relist(pause) => {
                if let Some(p) = pause {
                    tokio::time::sleep(p).await;
                }
            }
        }
    }
}

/// One watcher, from its first list until the next periodic list is due or acting failed.
async fn watch_once<K>(
    b: &Weak<Broker>,
    api: Api<PartialObjectMeta<K>>,
    kind: HolderKind,
    config: &HolderWatchConfig,
) -> Stop
where
    K: kube::Resource<DynamicType = ()> + Clone + std::fmt::Debug + Send + Sync + 'static,
{
    let label = Resource {
        resource: kind.resource(),
    };
    let mut events = pin!(watcher(api, watcher::Config::default()).default_backoff());
    let relist_at = tokio::time::Instant::now() + config.relist_every;
    // The holders listed so far by the list in progress, and when it started.
    let mut listing: Option<(HashSet<Holder>, i64)> = None;
    let mut failing = false;
    loop {
        let ev = match tokio::time::timeout_at(relist_at, events.next()).await {
            Err(_) => return Stop::Relist(None),
            // The watcher's stream does not end; if it did, list again.
            Ok(None) => return Stop::Relist(Some(RETRY_AFTER)),
            Ok(Some(ev)) => ev,
        };
        let Some(b) = b.upgrade() else {
            return Stop::Done;
        };
        let acted = match ev {
            Ok(Event::Init) => {
                b.metrics.holder_watch_lists.get_or_create(&label).inc();
                listing = Some((HashSet::new(), now_ms()));
                Ok(())
            }
            Ok(Event::InitApply(o)) => {
                if let (Some((listed, _)), Some(h)) = (&mut listing, kind.holder(&o.metadata)) {
                    listed.insert(h);
                }
                Ok(())
            }
            Ok(Event::InitDone) => match listing.take() {
                Some((listed, from)) => {
                    if failing {
                        tracing::info!(resource = kind.resource(), "watch works again");
                        failing = false;
                    }
                    tracing::debug!(resource = kind.resource(), listed = listed.len(), "listed");
                    b.end_leases_of_unlisted(kind, &listed, from)
                        .await
                        .map(|ended| log_ended(kind, None, &ended))
                }
                None => Ok(()),
            },
            Ok(Event::Apply(_)) => Ok(()),
            Ok(Event::Delete(o)) => match kind.holder(&o.metadata) {
                Some(h) => b
                    .end_leases_of_deleted(&h)
                    .await
                    .map(|ended| log_ended(kind, Some(&h), &ended)),
                None => Ok(()),
            },
            Err(e) => {
                b.metrics.holder_watch_errors.get_or_create(&label).inc();
                if !failing {
                    failing = true;
                    tracing::warn!(
                        resource = kind.resource(),
                        error = %keyhaven_hsm::error_chain(&e),
                        "watch of the apiserver failed; it retries with backoff (a new list once it works finds the deletions missed meanwhile)"
                    );
                }
                Ok(())
            }
        };
        if let Err(e) = acted {
            b.metrics.holder_watch_errors.get_or_create(&label).inc();
            tracing::warn!(
                resource = kind.resource(),
                error = %e.chain(),
                "ending the leases of deleted holders failed; listing again to find them"
            );
            return Stop::Relist(Some(RETRY_AFTER));
        }
    }
}

fn log_ended(kind: HolderKind, deleted: Option<&Holder>, ended: &[String]) {
    if ended.is_empty() {
        return;
    }
    match deleted {
        Some(h) => {
            tracing::info!(holder = ?h, ended = ended.len(), leases = ?ended, "leases of a deleted holder ended")
        }
        None => tracing::info!(
            resource = kind.resource(),
            ended = ended.len(),
            leases = ?ended,
            "leases of holders no longer listed ended"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(pod: Option<(&str, Option<&str>)>) -> LeaseRow {
        LeaseRow {
            id: "l".into(),
            identity: Identity {
                namespace: "shop".into(),
                service_account: "web".into(),
                pod_name: pod.map(|p| p.0.to_owned()),
                pod_uid: pod.and_then(|p| p.1.map(str::to_owned)),
            },
            path: "shop/db".into(),
            version: 1,
            created_ms: 0,
            expires_ms: 1,
            max_expires_ms: 1,
            renewals: 0,
            ended_ms: None,
            end_reason: None,
        }
    }

    #[test]
    fn a_lease_names_its_pod_only_with_name_and_uid() {
        let pod = Holder::Pod {
            namespace: "shop".into(),
            name: "web-0".into(),
            uid: "u1".into(),
        };
        assert_eq!(
            HolderKind::Pods.of_lease(&lease(Some(("web-0", Some("u1"))))),
            Some(pod.clone())
        );
        assert_eq!(
            HolderKind::Pods.of_lease(&lease(Some(("web-0", None)))),
            None
        );
        assert_eq!(HolderKind::Pods.of_lease(&lease(None)), None);
        assert_eq!(
            HolderKind::ServiceAccounts.of_lease(&lease(None)),
            Some(Holder::ServiceAccount {
                namespace: "shop".into(),
                name: "web".into()
            })
        );
        assert_eq!(
            pod.filter(),
            LeaseFilter::PodUid {
                namespace: "shop".into(),
                pod: "web-0".into(),
                uid: "u1".into()
            }
        );
        assert_eq!(pod.end_reason(), REVOKED_POD_DELETED);
    }

    #[test]
    fn an_object_without_a_uid_is_no_pod() {
        let mut m = ObjectMeta {
            namespace: Some("shop".into()),
            name: Some("web-0".into()),
            ..ObjectMeta::default()
        };
        assert_eq!(HolderKind::Pods.holder(&m), None);
        m.uid = Some("u1".into());
        assert!(HolderKind::Pods.holder(&m).is_some());
        assert!(HolderKind::ServiceAccounts.holder(&m).is_some());
    }
}
