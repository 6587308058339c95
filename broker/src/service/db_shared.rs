//! Credentials shared by the leases of one service account (a role's
//! `share: per-serviceaccount`): the replicas of a workload log in as one database role,
//! dropped when the last of their leases ends.
//!
//! - The first lease creates the credential like any other, its row marked `shared` with an
//!   end of life (`ends_ms`: creation + the role's `max_ttl`). Its password is sealed as a
//!   secret version at `db/CONN/ROLE/USERNAME` BEFORE the role exists, so key rotation,
//!   re-wrap and retirement cover it, and a broker killed at any point leaves it recorded.
//! - A later lease of the same service account joins the newest active shared credential
//!   that lives at least as long as the lease would (a `db_credential_leases` row, written
//!   under the caps' lock); otherwise it creates a new one, within `max_per_identity`. No
//!   lease of a shared credential outlives its end of life.
//! - `VALID UNTIL` is the latest expiry of its leases: raised by every join and renewal,
//!   never lowered ([`Broker::extend_valid_until`]).
//! - The revoker claims a credential (`active` → `dropping`) under the caps' lock only while
//!   none of its leases is live, so no lease joins a role being dropped. Its password is
//!   destroyed, in the transaction of the drop's audit record, once the role is gone.

use keyhaven_broker_core::dbrole::{self, RoleDef};

use super::*;
use crate::store::DbCredentialRow;
use crate::target_db::Target;

/// The secret path of shared credential `c`'s password.
fn password_path(c: &DbCredentialRow) -> String {
    dbrole::shared_password_path(&c.connection, &c.role, &c.username)
}

impl Broker {
    /// Seals a new shared credential's password (audited as `admin:db_credential_share`, by
    /// the service account whose lease creates it).
    pub(super) async fn seal_shared_password(
        &self,
        id: &Identity,
        c: &DbCredentialRow,
        password: &str,
    ) -> Result<()> {
        let data = SecretData::from_pairs([("password", password.as_bytes().to_vec())]);
        self.store_secret_version(
            &Caller::Workload(id.clone()),
            &password_path(c),
            data,
            "db_credential_share",
        )
        .await
        .map(drop)
    }

    /// A lease joins shared credential `c`: its expiry is capped at `c`'s end of life, `c`'s
    /// `VALID UNTIL` raised to it; returns `c`'s password.
    pub(super) async fn join_shared(
        &self,
        def: &RoleDef,
        target: &Target,
        c: &DbCredentialRow,
        lease: &mut LeaseRow,
    ) -> Result<Zeroizing<String>> {
        if let Some(end) = c.ends_ms {
            lease.max_expires_ms = lease.max_expires_ms.min(end);
            lease.expires_ms = lease.expires_ms.min(end);
        }
        let password = self.shared_password(c).await?;
        if lease.expires_ms > c.valid_until_ms {
            self.extend_valid_until(def, target, c, lease.expires_ms)
                .await?;
        }
        Ok(password)
    }

    /// Shared credential `c`'s password, opened.
    async fn shared_password(&self, c: &DbCredentialRow) -> Result<Zeroizing<String>> {
        let path = password_path(c);
        let missing = || BrokerError::internal("shared credential's sealed password");
        for attempt in 0..2 {
            let row = self
                .reads
                .latest_version(&path)
                .await?
                .ok_or_else(missing)?;
            let sealed = row.sealed.as_ref().ok_or_else(missing)?;
            match self.envelope.open(&path, row.version, sealed).await {
                // Re-wrapped and its old KEK retired between the read and the unwrap.
                Err(CryptoError::Hsm(e))
                    if e.kind() == keyhaven_hsm::ErrorKind::KeyNotFound && attempt == 0 =>
                {
                    continue
                }
                other => {
                    let data = other?;
                    let p = data.0.get("password").ok_or_else(missing)?;
                    let p = std::str::from_utf8(p).map_err(|_| missing())?;
                    return Ok(Zeroizing::new(p.to_owned()));
                }
            }
        }
        Err(missing())
    }

    /// The role of credential `c` is gone from the database: `ev` is recorded (for a shared
    /// credential, in the transaction that destroys its password), then the row marked
    /// dropped. Idempotent: a broker killed in between does it again.
    pub(super) async fn credential_gone(&self, c: &DbCredentialRow, ev: AuditEvent) -> Result<()> {
        if c.shared {
            let path = password_path(c);
            let at = path.clone();
            self.commit_change(move |store| async move {
                let (_, records) = store
                    .delete_audited(&at, true, now_ms(), |_| vec![ev])
                    .await?;
                Ok(((), records))
            })
            .await?;
            self.reads.forget_versions();
            self.envelope.cache().purge_path(&path);
        } else {
            self.audit(ev).await?;
        }
        self.store.mark_db_dropped(&c.lease_id, now_ms()).await?;
        Ok(())
    }
}
