//! Admin calls: secrets, policies, operator revocation, listings, audit reads.

use super::policy_sync::{self, REVOKED_BY_POLICY};
use super::*;
use crate::audit::writer::ChangeError;

impl Broker {
    /// Writes a new version of `path`; returns its number.
    pub async fn put_secret(&self, caller: &Caller, path: &str, data: SecretData) -> Result<i64> {
        validate_secret_path(path)
            .map_err(|e| BrokerError::InvalidArgument(format!("path '{}': {e}", echo(path))))?;
        if keyhaven_broker_core::dbrole::is_db_path(path) {
            return Err(BrokerError::InvalidArgument(
                "paths under db/ hold dynamic database credentials: use `brokerctl db connection put` \
                 and `brokerctl db role put`"
                    .into(),
            ));
        }
        self.require(caller, path, Capability::Write, "secret_put")
            .await?;
        self.store_secret_version(caller, path, data, "secret_put")
            .await
    }

    /// Seals and stores a new version of `path` with its audit record (`verb`); the caller
    /// has checked the path and the caller's right to write it.
    pub(super) async fn store_secret_version(
        &self,
        caller: &Caller,
        path: &str,
        data: SecretData,
        verb: &'static str,
    ) -> Result<i64> {
        let r = async {
            // Keys become file names in the sidecar's volume: no separators, no dot names.
            for k in data.0.keys() {
                let ok = !k.is_empty()
                    && k.len() <= 253
                    && k != "."
                    && k != ".."
                    && k.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
                if !ok {
                    return Err(BrokerError::InvalidArgument(format!(
                        "secret key '{}' must be 1-253 characters of [-._A-Za-z0-9] and not . or ..",
                        echo(k)
                    )));
                }
            }
            let mut kek = self.current_kek()?;
            let mut refreshed = false;
            for _ in 0..5 {
                let v = self.store.latest_version(path).await? + 1;
                let t0 = std::time::Instant::now();
                let sealed = self.envelope.seal(kek, path, v, &data).await;
                self.metrics.hsm("seal", t0.elapsed());
                let sealed = match sealed {
                    // Our primary was retired by another replica after a rotation we have not
                    // seen yet: adopt the newest KEK once and seal again.
                    Err(CryptoError::Hsm(e))
                        if e.kind() == keyhaven_hsm::ErrorKind::KeyNotFound && !refreshed =>
                    {
                        refreshed = true;
                        kek = self.refresh_kek().await?.ok_or_else(no_kek)?;
                        continue;
                    }
                    other => other?,
                };
                // The new version and its record in one transaction.
                let (by, at) = (caller.clone(), path.to_owned());
                let stored = self
                    .commit_change_or_store_error(move |store| async move {
                        let records = store
                            .insert_version_audited(&at, v, now_ms(), &sealed, || {
                                Self::audit_events(
                                    None,
                                    &by,
                                    EventKind::Admin(verb.into()),
                                    Some(&at),
                                    None,
                                    &Ok::<i64, BrokerError>(v),
                                )
                            })
                            .await?;
                        Ok(((), records))
                    })
                    .await;
                match stored {
                    Ok(()) => {
                        self.reads.forget_versions();
                        return Ok(v);
                    }
                    Err(ChangeError::Store(StoreError::Conflict(_))) => continue,
                    Err(ChangeError::Store(StoreError::KekRetired(_))) if !refreshed => {
                        refreshed = true;
                        kek = self.refresh_kek().await?.ok_or_else(no_kek)?;
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Err(BrokerError::unavailable("secret store (too many concurrent writers on one path)"))
        }
        .await;
        match r {
            // Recorded with the new version.
            Ok(v) => Ok(v),
            // Nothing stored: record the refusal.
            Err(e) => {
                self.audited(
                    caller,
                    EventKind::Admin(verb.into()),
                    Some(path),
                    None,
                    Err(e),
                )
                .await
            }
        }
    }

    /// Soft-deletes `path` (history kept) or destroys it (data erased).
    pub async fn delete_secret(&self, caller: &Caller, path: &str, destroy: bool) -> Result<u64> {
        let (cap, verb) = if destroy {
            (Capability::Destroy, "secret_destroy")
        } else {
            (Capability::Delete, "secret_delete")
        };
        if keyhaven_broker_core::dbrole::is_db_path(path) {
            return Err(BrokerError::InvalidArgument(
                "paths under db/ hold dynamic database credentials; they are not deleted as secrets"
                    .into(),
            ));
        }
        self.require(caller, path, cap, verb).await?;
        match self.delete_versions(caller, path, destroy, verb).await {
            Ok(n) => Ok(n),
            // Nothing changed: record the refusal.
            Err(e) => {
                self.audited(
                    caller,
                    EventKind::Admin(verb.into()),
                    Some(path),
                    None,
                    Err(e),
                )
                .await
            }
        }
    }

    /// Soft-deletes or destroys every version of `path` with its audit record (`verb`) in one
    /// transaction, and forgets them here; the caller has checked the caller's right.
    pub(super) async fn delete_versions(
        &self,
        caller: &Caller,
        path: &str,
        destroy: bool,
        verb: &'static str,
    ) -> Result<u64> {
        let (by, at) = (caller.clone(), path.to_owned());
        let r = self
            .commit_change(move |store| async move {
                store
                    .delete_audited(&at, destroy, now_ms(), |n| {
                        Self::audit_events(
                            None,
                            &by,
                            EventKind::Admin(verb.into()),
                            Some(&at),
                            None,
                            &Ok::<u64, BrokerError>(n),
                        )
                    })
                    .await
            })
            .await;
        self.reads.forget_versions();
        if r.is_ok() {
            // The other replicas purge theirs within DEK_POLL (dek_sync).
            self.envelope.cache().purge_path(path);
        }
        r
    }

    /// Replaces the policy set with `yaml` (validated first) and ends every active lease the
    /// new set does not allow: the new document, its generation, the ended leases and their
    /// records are stored in ONE transaction. Every replica enforces the new set within
    /// [`POLICY_BOUND`](super::POLICY_BOUND). A dry run validates and lists the leases that
    /// would end, changing nothing.
    pub async fn apply_policies(
        &self,
        caller: &Caller,
        yaml: &str,
        dry_run: bool,
    ) -> Result<PolicyApply> {
        self.require(caller, "", Capability::Policy, "policy_apply")
            .await?;
        let verb = if dry_run {
            "policy_apply_dry_run"
        } else {
            "policy_apply"
        };
        let kind = EventKind::Admin(verb.into());
        let r = async {
            let set = PolicySet::from_yaml(yaml, self.config.max_ttl_cap)
                .map_err(|e| BrokerError::InvalidArgument(e.to_string()))?;
            let doc = set
                .to_yaml()
                .map_err(|e| BrokerError::internal_by("policy serialisation", e))?;
            let now = now_ms();
            let active = self
                .store
                .list_leases(&LeaseFilter::All, now, false)
                .await?;
            let forbidden: Vec<LeaseRow> = policy_sync::forbidden(&set, &active)
                .into_iter()
                .cloned()
                .collect();
            Ok((set, doc, forbidden, now))
        }
        .await;
        let (set, doc, forbidden, now) = match r {
            Ok(v) => v,
            Err(e) => return self.audited(caller, kind, None, None, Err(e)).await,
        };
        let policies = set.policies().len();
        if dry_run {
            let plan = PolicyApply {
                policies,
                generation: self.store.policy_generation().await?,
                ended: forbidden,
            };
            return self.audited(caller, kind, None, None, Ok(plan)).await;
        }
        let ids: Vec<String> = forbidden.iter().map(|l| l.id.clone()).collect();
        let (by, leases, done) = (caller.clone(), forbidden.clone(), kind.clone());
        let applied = self
            .commit_change(move |store| async move {
                let a = store
                    .apply_policies(&doc, &ids, REVOKED_BY_POLICY, now, |_, ended| {
                        let mut events = policy_sync::ended_events(&leases, ended, Some(&by), now);
                        events.extend(Self::audit_events(
                            None,
                            &by,
                            done,
                            None,
                            None,
                            &Ok::<(), BrokerError>(()),
                        ));
                        events
                    })
                    .await?;
                let records = a.records.clone();
                Ok((a, records))
            })
            .await;
        let applied = match applied {
            Ok(a) => a,
            // Nothing stored (or stored, but the audit file failed: each replica's poller
            // installs it; the caller is told the audit file is unavailable).
            Err(e) => return self.audited(caller, kind, None, None, Err(e)).await,
        };
        self.install_policies(set, applied.generation, now);
        tracing::info!(
            generation = applied.generation,
            ended = applied.ended.len(),
            "policies applied"
        );
        // Leases another replica granted on the old set while this one was applying.
        if let Err(e) = self.sweep_after_policy_change().await {
            tracing::warn!(error = %e.chain(), "post-apply sweep failed; each replica sweeps when it reloads");
        }
        Ok(PolicyApply {
            policies,
            generation: applied.generation,
            ended: forbidden
                .into_iter()
                .filter(|l| applied.ended.contains(&l.id))
                .collect(),
        })
    }

    /// Revokes every active lease matching `filter`; returns their ids.
    pub async fn revoke_leases(
        &self,
        caller: &Caller,
        filter: &LeaseFilter,
    ) -> Result<Vec<String>> {
        let path = match filter {
            LeaseFilter::PathPrefix(p) => p.clone(),
            _ => String::new(),
        };
        self.require(caller, &path, Capability::Revoke, "lease_revoke")
            .await?;
        // Every ended lease's record and the call's own, with the change in one transaction.
        let (by, which, scope) = (caller.clone(), filter.clone(), path.clone());
        let r = self
            .commit_change(move |store| async move {
                let (ended, records) = store
                    .revoke_leases_audited(&which, now_ms(), "revoked:operator", |ended| {
                        let mut events = Vec::with_capacity(ended.len() + 1);
                        for l in ended {
                            events.extend(Self::audit_events(
                                None,
                                &by,
                                EventKind::Revoke,
                                None,
                                Some(&l.id),
                                &Ok::<(), BrokerError>(()),
                            ));
                        }
                        events.extend(Self::audit_events(
                            None,
                            &by,
                            EventKind::Admin("lease_revoke".into()),
                            (!scope.is_empty()).then_some(scope.as_str()),
                            None,
                            &Ok::<(), BrokerError>(()),
                        ));
                        events
                    })
                    .await?;
                Ok((ended.into_iter().map(|l| l.id).collect(), records))
            })
            .await;
        match r {
            Ok(ids) => Ok(ids),
            Err(e) => {
                self.audited(
                    caller,
                    EventKind::Admin("lease_revoke".into()),
                    (!path.is_empty()).then_some(path.as_str()),
                    None,
                    Err(e),
                )
                .await
            }
        }
    }
}

/// What a policy apply did, or, on a dry run, would do.
#[derive(Debug, Clone)]
pub struct PolicyApply {
    /// How many policies the new set has.
    pub policies: usize,
    /// The new policy generation (dry run: the current one).
    pub generation: i64,
    /// The active leases the new set does not allow: ended, or (dry run) to be ended.
    pub ended: Vec<LeaseRow>,
}

/// One KEK's status for operators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KekStatus {
    /// KEK id (hex `CKA_ID`).
    pub kek_id: String,
    /// HSM label.
    pub label: String,
    /// `primary` or `decrypt-only`.
    pub role: &'static str,
    /// DEKs it still wraps (soft-deleted versions included, destroyed ones not).
    pub deks: i64,
    /// Creation time from the label (Unix ms), if the label carries one.
    pub created_ms: Option<i64>,
    /// Encryptions recorded under it: DEKs sealed plus DEKs re-wrapped to it.
    pub encryptions: i64,
}

impl Broker {
    /// Paths under `prefix`.
    pub async fn list_secrets(&self, caller: &Caller, prefix: &str) -> Result<Vec<String>> {
        self.require(
            caller,
            prefix.trim_end_matches('/'),
            Capability::List,
            "secret_list",
        )
        .await?;
        let r = self
            .store
            .list_paths(prefix)
            .await
            .map_err(BrokerError::from);
        self.audited(
            caller,
            EventKind::Admin("secret_list".into()),
            (!prefix.is_empty()).then_some(prefix),
            None,
            r,
        )
        .await
    }

    /// Version history of `path` (no values).
    pub async fn secret_metadata(
        &self,
        caller: &Caller,
        path: &str,
    ) -> Result<Vec<crate::store::StoredVersion>> {
        self.require(caller, path, Capability::List, "secret_metadata")
            .await?;
        let r = self
            .store
            .versions(path)
            .await
            .map_err(BrokerError::from)
            .map(|vs| {
                vs.into_iter()
                    .map(|mut v| {
                        v.sealed = v.sealed.map(|mut s| {
                            // Metadata only: drop the encrypted payloads from the answer.
                            s.ciphertext.clear();
                            s.dek.ciphertext.clear();
                            s
                        });
                        v
                    })
                    .collect()
            });
        self.audited(
            caller,
            EventKind::Admin("secret_metadata".into()),
            Some(path),
            None,
            r,
        )
        .await
    }

    /// The current policy document.
    pub async fn list_policies(&self, caller: &Caller) -> Result<String> {
        self.require(caller, "", Capability::Policy, "policy_list")
            .await?;
        let r = self
            .policies()
            .set
            .to_yaml()
            .map_err(|e| BrokerError::internal_by("policy serialisation", e));
        self.audited(
            caller,
            EventKind::Admin("policy_list".into()),
            None,
            None,
            r,
        )
        .await
    }

    /// Leases matching `filter`.
    pub async fn list_leases(
        &self,
        caller: &Caller,
        filter: &LeaseFilter,
        include_ended: bool,
    ) -> Result<Vec<LeaseRow>> {
        let path = match filter {
            LeaseFilter::PathPrefix(p) => p.clone(),
            _ => String::new(),
        };
        self.require(caller, &path, Capability::Revoke, "lease_list")
            .await?;
        let r = self
            .store
            .list_leases(filter, now_ms(), include_ended)
            .await
            .map_err(BrokerError::from);
        self.audited(caller, EventKind::Admin("lease_list".into()), None, None, r)
            .await
    }

    /// Verifies the stored audit chain (optionally against an anchor kept elsewhere).
    pub async fn audit_verify(
        &self,
        caller: &Caller,
        anchor: Option<&crate::audit::Checkpoint>,
    ) -> Result<Result<crate::audit::VerifyReport, crate::audit::VerifyError>> {
        self.require(caller, "", Capability::Audit, "audit_verify")
            .await?;
        let mut all = Vec::new();
        let mut after = 0;
        loop {
            let page = self.store.audit_records(after, 10_000).await?;
            let Some(last) = page.last() else { break };
            after = last.seq;
            all.extend(page);
        }
        let report = match anchor {
            Some(a) => crate::audit::verify_with_anchor(all, a),
            None => crate::audit::verify(all),
        };
        self.audited(
            caller,
            EventKind::Admin("audit_verify".into()),
            None,
            None,
            Ok(()),
        )
        .await?;
        Ok(report)
    }

    /// Audit records after `after_seq`.
    pub async fn audit_tail(
        &self,
        caller: &Caller,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<AuditRecord>> {
        self.require(caller, "", Capability::Audit, "audit_tail")
            .await?;
        Ok(self
            .store
            .audit_records(after_seq, limit.clamp(1, 10_000))
            .await?)
    }

    /// Every broker KEK with its role and how many DEKs it still wraps (the `keks` of
    /// [`Broker::key_report`]).
    pub async fn key_status(&self, caller: &Caller) -> Result<Vec<KekStatus>> {
        Ok(self.key_report(caller).await?.keks)
    }
}
