-- Keyhaven broker schema (sqlite): credentials shared by the replicas of one service account
-- (a role's `share: per-serviceaccount`).
--
-- A shared credential is one db_credentials row (its lease_id is the lease that created it)
-- with `shared` set and `ends_ms`, the end of its life (creation + the role's max_ttl): no
-- lease of it outlives that. Its password is a sealed secret version at
-- `db/CONN/ROLE/USERNAME`, so key rotation, re-wrap and retirement cover it; it is destroyed
-- with the role.
ALTER TABLE db_credentials ADD COLUMN shared INTEGER NOT NULL DEFAULT 0;
ALTER TABLE db_credentials ADD COLUMN ends_ms INTEGER;

-- The other leases of a shared credential, written under the caps' lock before the lease is
-- stored. A row whose lease is not stored yet keeps the credential alive for the pending
-- grace; the revoker claims a credential (active -> dropping) under the same lock only while
-- none of its leases is live, so a lease never joins a role being dropped.
CREATE TABLE db_credential_leases (
    lease_id   TEXT   PRIMARY KEY,
    credential TEXT   NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE INDEX db_credential_leases_credential ON db_credential_leases (credential);
CREATE INDEX db_credentials_shared ON db_credentials (connection, role, namespace, service_account, shared, state);
