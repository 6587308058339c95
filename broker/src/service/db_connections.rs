//! The databases dynamic credentials are made in: storing a connection (its admin URL sealed
//! like a secret at `db/NAME`), rotating its admin password to one only the broker knows, and
//! deleting a connection or a role once nothing still needs it.
//!
//! A connection's stored data is `url` and, after a rotation, `password` (which replaces the
//! URL's). Each use reads the newest version, so every replica follows a rotation at its next
//! call.

use keyhaven_broker_core::dbrole;

use super::db_credentials::{check_segment, random_hex, target_error};
use super::*;
use crate::store::RoleRemoval;
use crate::target_db::{AdminLogin, AdminSession, Target};

/// A connection's stored data, opened.
struct Connection {
    version: i64,
    data: SecretData,
}

impl Connection {
    fn login(&self) -> Result<AdminLogin<'_>> {
        let field = |k: &str| {
            self.data
                .0
                .get(k)
                .map(|v| std::str::from_utf8(v))
                .transpose()
                .map_err(|_| BrokerError::internal("stored connection is not UTF-8"))
        };
        Ok(AdminLogin {
            url: field("url")?
                .ok_or_else(|| BrokerError::internal("stored connection has no URL"))?,
            password: field("password")?,
        })
    }
}

impl Broker {
    /// The stored versions of connection `name` that are not deleted, newest first.
    async fn connection_versions(&self, name: &str) -> Result<Vec<Connection>> {
        let path = dbrole::connection_path(name);
        let mut out = Vec::new();
        for row in self.store.versions(&path).await?.into_iter().rev() {
            let (Some(sealed), None) = (row.sealed.as_ref(), row.deleted_ms) else {
                continue;
            };
            let data = self.envelope.open(&path, row.version, sealed).await?;
            out.push(Connection {
                version: row.version,
                data,
            });
        }
        Ok(out)
    }

    /// The pool of connection `name`, from its newest stored version.
    pub(super) async fn target(&self, name: &str) -> Result<Target> {
        let path = dbrole::connection_path(name);
        let row = self
            .reads
            .latest_version(&path)
            .await?
            .ok_or_else(|| BrokerError::NotFound(format!("database connection {name}")))?;
        if let Some(t) = self.targets.get(name, row.version) {
            return Ok(t);
        }
        let sealed = row
            .sealed
            .as_ref()
            .ok_or_else(|| BrokerError::NotFound(format!("database connection {name}")))?;
        let c = Connection {
            version: row.version,
            data: self.envelope.open(&path, row.version, sealed).await?,
        };
        self.targets
            .insert(name, c.version, c.login()?)
            .map_err(target_error)
    }

    /// Stores connection `name`'s admin URL (sealed like a secret, at `db/NAME`) after checking
    /// that it logs in and may create roles; returns its version.
    pub async fn put_db_connection(
        &self,
        caller: &Caller,
        name: &str,
        url: Zeroizing<String>,
    ) -> Result<i64> {
        check_segment("connection name", name)?;
        let path = dbrole::connection_path(name);
        self.require(caller, &path, Capability::Write, "db_connection_put")
            .await?;
        // The operator is told why (our fixed text), even when the database is down.
        let login = AdminLogin {
            url: &url,
            password: None,
        };
        let checked = crate::target_db::probe(login)
            .await
            .map_err(|e| BrokerError::FailedPrecondition(e.to_string()));
        if let Err(e) = checked {
            return self
                .audited(
                    caller,
                    EventKind::Admin("db_connection_put".into()),
                    Some(&path),
                    None,
                    Err(e),
                )
                .await;
        }
        let data = SecretData::from_pairs([("url", url.as_bytes().to_vec())]);
        self.store_secret_version(caller, &path, data, "db_connection_put")
            .await
    }

    /// Logs in with the newest stored version of `name` (or, when the database refuses it,
    /// the one before: an interrupted rotation) and begins the change to `password`.
    async fn begin_rotation(
        &self,
        name: &str,
        password: &str,
    ) -> Result<(AdminSession, Connection)> {
        let mut refused = None;
        for c in self.connection_versions(name).await?.into_iter().take(2) {
            let opened = AdminSession::open(c.login()?).await;
            match opened {
                Ok(mut s) => {
                    if let Err(e) = s.begin_password_change(password).await {
                        s.close().await;
                        return Err(target_error(e));
                    }
                    return Ok((s, c));
                }
                Err(e) if e.is_login_refused() => refused = Some(e),
                Err(e) => return Err(target_error(e)),
            }
        }
        Err(match refused {
            Some(e) => BrokerError::FailedPrecondition(format!(
                "{e}: neither the newest stored login nor the one before it is accepted; \
                 store a working one with `brokerctl db connection put {name}`"
            )),
            None => BrokerError::NotFound(format!("database connection {name}")),
        })
    }

    /// Sets connection `name`'s admin password to a new random one that only the broker knows
    /// (`write` on `db/NAME`); returns the new version.
    ///
    /// The password changes in a database transaction that commits only after the new version
    /// is stored, so a failure before leaves the old password in force and stored. A broker
    /// killed between the two commits leaves a newest version the database never took: the
    /// next rotation logs in with the version before it and goes on.
    pub async fn rotate_db_root(&self, caller: &Caller, name: &str) -> Result<i64> {
        check_segment("connection name", name)?;
        let path = dbrole::connection_path(name);
        let verb = "db_connection_rotate_root";
        self.require(caller, &path, Capability::Write, verb).await?;
        let kind = || EventKind::Admin(verb.into());
        let password = random_hex(24)?;
        let begun = self.begin_rotation(name, &password).await;
        let (mut session, from) = match begun {
            Ok(b) => b,
            Err(e) => {
                return self
                    .audited(caller, kind(), Some(&path), None, Err(e))
                    .await
            }
        };
        let url = from.login()?.url.as_bytes().to_vec();
        let data =
            SecretData::from_pairs([("url", url), ("password", password.as_bytes().to_vec())]);
        // Audited by itself (the record names the new version).
        let stored = self.store_secret_version(caller, &path, data, verb).await;
        let version = match stored {
            Ok(v) => v,
            Err(e) => {
                session.close().await; // rolled back: the old password stays
                return Err(e);
            }
        };
        let committed = session.commit().await;
        session.close().await;
        let checked = match committed {
            Ok(()) => crate::target_db::probe(AdminLogin {
                url: from.login()?.url,
                password: Some(&password),
            })
            .await
            .map_err(target_error),
            Err(e) => Err(target_error(e)),
        };
        match checked {
            Ok(()) => {
                tracing::info!(
                    connection = name,
                    version,
                    from = from.version,
                    "connection's admin password rotated"
                );
                Ok(version)
            }
            Err(e) => {
                let e = BrokerError::FailedPrecondition(format!(
                    "version {version} is stored but logging in with it failed ({e}); \
                     run `brokerctl db connection rotate-root {name}` again"
                ));
                self.audited(caller, kind(), Some(&path), None, Err(e))
                    .await
            }
        }
    }

    /// Deletes role `CONN/ROLE`'s definition (`write` on `db/CONN/ROLE`); refused while any of
    /// its credentials is live (its role still in the database or not known to be gone).
    pub async fn delete_db_role(
        &self,
        caller: &Caller,
        connection: &str,
        role: &str,
    ) -> Result<()> {
        check_segment("connection name", connection)?;
        check_segment("role name", role)?;
        let path = format!("db/{connection}/{role}");
        self.require(caller, &path, Capability::Write, "db_role_delete")
            .await?;
        let r = match self.store.delete_db_roles(connection, Some(role)).await {
            Ok(RoleRemoval::Deleted(0)) => Err(BrokerError::NotFound(format!(
                "database role db/{connection}/{role}"
            ))),
            Ok(RoleRemoval::Deleted(_)) => Ok(()),
            Ok(RoleRemoval::InUse(n)) => Err(in_use(&path, n)),
            Err(e) => Err(e.into()),
        };
        self.audited(
            caller,
            EventKind::Admin("db_role_delete".into()),
            Some(&path),
            None,
            r,
        )
        .await
    }

    /// Deletes connection `name`: its role definitions, and every version of its stored URL
    /// destroyed (`destroy` on `db/NAME`). Refused while any of its credentials is live, and
    /// while its database still holds a role the broker marked (that only this connection
    /// could drop) — unless `database_gone`, when the operator states the database no longer
    /// exists and only the first check is made.
    pub async fn delete_db_connection(
        &self,
        caller: &Caller,
        name: &str,
        database_gone: bool,
    ) -> Result<u64> {
        check_segment("connection name", name)?;
        let path = dbrole::connection_path(name);
        let verb = "db_connection_delete";
        self.require(caller, &path, Capability::Destroy, verb)
            .await?;
        let r = async {
            if !database_gone {
                let marked = self.target(name).await?.marked_roles().await.map_err(|e| {
                    BrokerError::FailedPrecondition(format!(
                        "{e}: cannot show that the database holds no role the broker made; \
                             if the database no longer exists, add --database-gone"
                    ))
                })?;
                let live = self.store.live_db_credentials(name).await?.len();
                if live == 0 && !marked.is_empty() {
                    return Err(BrokerError::FailedPrecondition(format!(
                        "the database still holds {} role(s) the broker made and no lease \
                         needs: drop them with `brokerctl db reconcile {name}` first",
                        marked.len()
                    )));
                }
            }
            match self.store.delete_db_roles(name, None).await? {
                RoleRemoval::InUse(n) => return Err(in_use(&path, n)),
                RoleRemoval::Deleted(_) => {}
            }
            let n = self.delete_versions(caller, &path, true, verb).await?;
            self.targets.remove(name);
            Ok(n)
        }
        .await;
        match r {
            Ok(n) => Ok(n),
            Err(e) => {
                self.audited(
                    caller,
                    EventKind::Admin(verb.into()),
                    Some(&path),
                    None,
                    Err(e),
                )
                .await
            }
        }
    }
}

/// The refusal of a deletion while credentials live, with how to see and end them.
fn in_use(path: &str, live: i64) -> BrokerError {
    BrokerError::FailedPrecondition(format!(
        "{live} credential(s) of {path} are live (their roles are in the database or not yet \
         known to be dropped); they go when their leases end, or revoke them with \
         `brokerctl leases revoke --prefix {path}`; `brokerctl db status` shows what is \
         left"
    ))
}
