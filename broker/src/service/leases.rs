//! The lease path: Lease, Renew, Revoke by the holder, and the reaper.

use super::*;

impl Broker {
    /// Leases the newest version of `path` for `ttl` (policy default when `None`, capped by the
    /// policy's max TTL).
    pub async fn lease(
        &self,
        caller: &Caller,
        path: &str,
        ttl: Option<Duration>,
    ) -> Result<LeaseGrant> {
        self.lease_with(None, caller, path, ttl).await
    }

    /// [`Broker::lease`] for a request authenticated with [`Broker::authenticate_deferred`].
    pub async fn lease_authenticated(
        &self,
        auth: Authenticated,
        path: &str,
        ttl: Option<Duration>,
    ) -> Result<LeaseGrant> {
        self.lease_with(auth.audit, &auth.caller, path, ttl).await
    }

    async fn lease_with(
        &self,
        auth: Option<AuditEvent>,
        caller: &Caller,
        path: &str,
        ttl: Option<Duration>,
    ) -> Result<LeaseGrant> {
        // Nothing is stored until the audit transaction: the lease row goes in with its record.
        // The version comes from memory when it can; the append then checks that no secret
        // changed since it was read, and if one did, nothing was stored, and the lease is made
        // again from a fresh read.
        let mut remembered = true;
        loop {
            let (r, row, generation) = match self.lease_inner(caller, path, ttl, remembered).await {
                Ok((grant, row, generation)) => (Ok(grant), Some(row), generation),
                Err(e) => (Err(e), None, None),
            };
            let lease_id = r.as_ref().ok().map(|g| g.lease_id.clone());
            let events = Self::audit_events(
                auth.clone(),
                caller,
                EventKind::Lease,
                Some(path),
                lease_id.as_deref(),
                &r,
            );
            let credential = row
                .as_ref()
                .filter(|l| keyhaven_broker_core::dbrole::is_db_path(&l.path))
                .map(|l| l.id.clone());
            let committed = self.submit_at(events, row, generation).await;
            if let Some(lease_id) = &credential {
                self.db_lease_stored(lease_id, committed.is_ok()).await;
            }
            match committed? {
                Committed::Record(_) | Committed::Renewal(..) => return r,
                Committed::Stale => {
                    self.reads.forget_versions();
                    self.metrics.remembered_stale.inc();
                    remembered = false;
                }
            }
        }
    }

    async fn lease_inner(
        &self,
        caller: &Caller,
        path: &str,
        ttl: Option<Duration>,
        remembered: bool,
    ) -> Result<(LeaseGrant, LeaseRow, Option<i64>)> {
        validate_secret_path(path)
            .map_err(|e| BrokerError::InvalidArgument(format!("path '{}': {e}", echo(path))))?;
        let Caller::Workload(id) = caller else {
            return Err(BrokerError::PermissionDenied(
                "the bootstrap credential cannot lease secrets".into(),
            ));
        };
        self.fresh_policies().await?;
        let Decision::Allow {
            ttl: default_ttl,
            max_ttl,
            ..
        } = self.decide(caller, path, Capability::Read)
        else {
            return Err(BrokerError::PermissionDenied(format!(
                "no policy lets {} read {path}",
                id.subject()
            )));
        };
        if keyhaven_broker_core::dbrole::is_db_path(path) {
            let Some((connection, role)) = keyhaven_broker_core::dbrole::role_path(path) else {
                return Err(BrokerError::InvalidArgument(format!(
                    "'{}' is not a credential path: db/CONNECTION/ROLE",
                    echo(path)
                )));
            };
            let (grant, row) = self
                .lease_db(id, path, connection, role, ttl, (default_ttl, max_ttl))
                .await?;
            return Ok((grant, row, None));
        }
        let mut attempts = 0;
        let (row, data, generation) = loop {
            attempts += 1;
            // The retry after a retired KEK reads afresh.
            let (row, generation) = if remembered && attempts == 1 {
                let (row, g) = self.reads.latest_version_remembered(path).await?;
                (row, Some(g))
            } else {
                (self.reads.latest_version(path).await?.map(Arc::new), None)
            };
            let row = row.ok_or_else(|| BrokerError::NotFound(format!("secret {path}")))?;
            let sealed = row
                .sealed
                .as_ref()
                .ok_or_else(|| BrokerError::NotFound(format!("secret {path}")))?;
            let t0 = std::time::Instant::now();
            let data = self.envelope.open(path, row.version, sealed).await;
            self.metrics.hsm("open", t0.elapsed());
            match data {
                // The row was re-wrapped and its old KEK retired between our read and the
                // unwrap: read it again once.
                Err(CryptoError::Hsm(e))
                    if e.kind() == keyhaven_hsm::ErrorKind::KeyNotFound && attempts < 2 =>
                {
                    continue
                }
                other => break (row, other?, generation),
            }
        };
        let ttl = ttl
            .filter(|t| !t.is_zero())
            .unwrap_or(default_ttl)
            .min(max_ttl);
        let lease = new_lease_row(
            new_lease_id(id, path)?,
            id,
            path,
            row.version,
            now_ms(),
            ttl,
            max_ttl,
        );
        Ok((LeaseGrant::of(&lease, data, ttl), lease, generation))
    }

    /// Extends the caller's own lease by `increment` (the policy default when `None`), never
    /// past its max TTL; says whether a newer secret version exists.
    pub async fn renew(
        &self,
        caller: &Caller,
        lease_id: &str,
        increment: Option<Duration>,
    ) -> Result<Renewal> {
        self.renew_with(None, caller, lease_id, increment).await
    }

    /// [`Broker::renew`] for a request authenticated with [`Broker::authenticate_deferred`].
    pub async fn renew_authenticated(
        &self,
        auth: Authenticated,
        lease_id: &str,
        increment: Option<Duration>,
    ) -> Result<Renewal> {
        self.renew_with(auth.audit, &auth.caller, lease_id, increment)
            .await
    }

    async fn renew_with(
        &self,
        auth: Option<AuditEvent>,
        caller: &Caller,
        lease_id: &str,
        increment: Option<Duration>,
    ) -> Result<Renewal> {
        let renewing = match self.renew_check(caller, lease_id, increment).await {
            Ok(r) => r,
            Err(e) => {
                return self
                    .audited_with(
                        auth,
                        None,
                        caller,
                        EventKind::Renew,
                        None,
                        Some(lease_id),
                        Err(e),
                    )
                    .await
            }
        };
        // The lease is extended in the audit writer's transaction, with its record: if it
        // ended since it was read, the refusal is recorded instead.
        let events = Self::audit_events(
            auth,
            caller,
            EventKind::Renew,
            None,
            Some(lease_id),
            &Ok::<(), BrokerError>(()),
        );
        let now = renewing.now_ms;
        let t0 = std::time::Instant::now();
        let written = self.audit_writer.renew(events, renewing).await;
        self.metrics.audit_wait.observe(t0.elapsed().as_secs_f64());
        match written? {
            (_, Some(l)) => {
                if lease_path(lease_id).is_some_and(keyhaven_broker_core::dbrole::is_db_path) {
                    self.db_renewed(lease_id, l.expires_ms).await?;
                }
                Ok(Renewal {
                    ttl: Duration::from_millis(l.expires_ms.saturating_sub(now).max(0) as u64),
                    renewable_until_unix: to_secs(l.max_expires_ms),
                    newer_version: l.latest_version.is_some_and(|v| v > l.version),
                })
            }
            (_, None) => Err(not_renewable(lease_id)),
        }
    }

    async fn own_lease(&self, caller: &Caller, lease_id: &str) -> Result<LeaseRow> {
        let not_found = || BrokerError::NotFound(format!("lease {}", echo(lease_id)));
        let Caller::Workload(id) = caller else {
            return Err(not_found());
        };
        let lease = self
            .reads
            .get_lease(lease_id)
            .await?
            .ok_or_else(not_found)?;
        if lease.identity.namespace != id.namespace
            || lease.identity.service_account != id.service_account
        {
            // Someone else's lease: indistinguishable from no lease.
            return Err(not_found());
        }
        Ok(lease)
    }

    /// Decides a renewal (nothing stored): the caller's own active lease, a grant that still
    /// lets it read the path, room below the max TTL. A lease whose grant is gone ends here.
    async fn renew_check(
        &self,
        caller: &Caller,
        lease_id: &str,
        increment: Option<Duration>,
    ) -> Result<Renewing> {
        let lease = self.own_lease(caller, lease_id).await?;
        let now = now_ms();
        if !lease.is_active(now) {
            return Err(not_renewable(lease_id));
        }
        self.fresh_policies().await?;
        let Decision::Allow {
            ttl: default_ttl, ..
        } = self.decide(caller, &lease.path, Capability::Read)
        else {
            // The grant is gone: the lease ends now, not at its expiry.
            self.end_forbidden_lease(&lease).await?;
            return Err(BrokerError::PermissionDenied(format!(
                "no policy lets this identity read {} any more; lease {} has ended",
                lease.path,
                echo(lease_id)
            )));
        };
        if lease.expires_ms >= lease.max_expires_ms {
            return Err(BrokerError::FailedPrecondition(format!(
                "lease {} is at its maximum TTL",
                echo(lease_id)
            )));
        }
        let inc = increment.filter(|t| !t.is_zero()).unwrap_or(default_ttl);
        let refused = Self::audit_events(
            None,
            caller,
            EventKind::Renew,
            None,
            Some(lease_id),
            &Err::<(), _>(not_renewable(lease_id)),
        )
        .pop()
        .ok_or_else(|| BrokerError::internal("no renewal record"))?;
        Ok(Renewing {
            lease_id: lease_id.to_owned(),
            now_ms: now,
            expires_ms: keyhaven_broker_core::lease_ttl::renewal(now, inc, lease.max_expires_ms),
            refused,
        })
    }

    /// Ends the caller's own lease now.
    pub async fn revoke(&self, caller: &Caller, lease_id: &str) -> Result<()> {
        self.revoke_with(None, caller, lease_id).await
    }

    /// [`Broker::revoke`] for a request authenticated with [`Broker::authenticate_deferred`].
    pub async fn revoke_authenticated(&self, auth: Authenticated, lease_id: &str) -> Result<()> {
        self.revoke_with(auth.audit, &auth.caller, lease_id).await
    }

    async fn revoke_with(
        &self,
        auth: Option<AuditEvent>,
        caller: &Caller,
        lease_id: &str,
    ) -> Result<()> {
        // The lease ends with its record (and the deferred authentication's) or not at all.
        let r = match self.own_lease(caller, lease_id).await {
            Err(e) => Err(e),
            Ok(_) => {
                let (by, id, auth_event) = (caller.clone(), lease_id.to_owned(), auth.clone());
                self.commit_change(move |store| async move {
                    let (_, records) = store
                        .revoke_leases_audited(
                            &LeaseFilter::Id(id.clone()),
                            now_ms(),
                            "revoked:holder",
                            |_| {
                                Self::audit_events(
                                    auth_event,
                                    &by,
                                    EventKind::Revoke,
                                    None,
                                    Some(&id),
                                    &Ok::<(), BrokerError>(()),
                                )
                            },
                        )
                        .await?;
                    Ok(((), records))
                })
                .await
            }
        };
        match r {
            Ok(()) => Ok(()),
            // Nothing changed: record the refusal.
            Err(e) => {
                self.audited_with(
                    auth,
                    None,
                    caller,
                    EventKind::Revoke,
                    None,
                    Some(lease_id),
                    Err(e),
                )
                .await
            }
        }
    }

    /// One reaper pass: ends expired leases (audited as `expire`); returns how many.
    pub async fn reap(&self, batch: i64) -> Result<usize> {
        // Each expiry with its record, in one transaction.
        let ended = self
            .commit_change(move |store| async move {
                let now = now_ms();
                let (ended, records) = store
                    .reap_expired_audited(now, batch, |ended| {
                        ended
                            .iter()
                            .map(|l| {
                                let mut ev = AuditEvent::new(now, EventKind::Expire, Outcome::Ok)
                                    .with_identity(l.identity.subject())
                                    .with_path(l.path.clone())
                                    .with_lease_id(l.id.clone());
                                if let Some(p) = &l.identity.pod_name {
                                    ev = ev.with_pod(p.clone());
                                }
                                ev
                            })
                            .collect()
                    })
                    .await?;
                Ok((ended.len(), records))
            })
            .await?;
        self.metrics.reaped.inc_by(ended as u64);
        Ok(ended)
    }
}

fn not_renewable(lease_id: &str) -> BrokerError {
    BrokerError::FailedPrecondition(format!(
        "lease {} has expired or was revoked",
        echo(lease_id)
    ))
}

/// A new, active lease row of `path` granted at `now_ms` for `ttl`, never past `max_ttl`.
pub(super) fn new_lease_row(
    lease_id: String,
    id: &Identity,
    path: &str,
    version: i64,
    now_ms: i64,
    ttl: Duration,
    max_ttl: Duration,
) -> LeaseRow {
    let (expires_ms, max_expires_ms) = keyhaven_broker_core::lease_ttl::grant(now_ms, ttl, max_ttl);
    LeaseRow {
        id: lease_id,
        identity: id.clone(),
        path: path.to_owned(),
        version,
        created_ms: now_ms,
        expires_ms,
        max_expires_ms,
        renewals: 0,
        ended_ms: None,
        end_reason: None,
    }
}

impl LeaseGrant {
    /// What the workload is told of a new lease `l` of `data` for `ttl`.
    pub(super) fn of(l: &LeaseRow, data: SecretData, ttl: Duration) -> LeaseGrant {
        LeaseGrant {
            lease_id: l.id.clone(),
            version: l.version,
            data,
            ttl,
            renewable_until_unix: to_secs(l.max_expires_ms),
        }
    }
}

/// The path part of a lease id ([`new_lease_id`]).
fn lease_path(lease_id: &str) -> Option<&str> {
    let (_, rest) = lease_id.split_once('/')?;
    let (_, rest) = rest.split_once('/')?;
    rest.rsplit_once('/').map(|(path, _)| path)
}

/// `namespace/serviceaccount/path/<128 random bits hex>`.
pub(super) fn new_lease_id(id: &Identity, path: &str) -> Result<String> {
    let mut r = Zeroizing::new([0u8; 16]);
    getrandom::fill(&mut r[..]).map_err(|_| BrokerError::internal("random number generator"))?;
    Ok(format!(
        "{}/{}/{}/{}",
        id.namespace,
        id.service_account,
        path,
        hex::encode(&r[..])
    ))
}
