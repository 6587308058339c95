-- Keyhaven broker schema v4 (SQLite): the policy generation and the replica registry.
--
-- `policies.generation` is bumped by every `policy apply`, in the same transaction as the new
-- document and its audit record. Each replica polls it and reloads its policies when it moves
-- (the bound is documented in docs/operations.md).
ALTER TABLE policies ADD COLUMN generation INTEGER NOT NULL DEFAULT 1;

-- One row per broker replica, refreshed by its heartbeat.
CREATE TABLE replicas (
    name              TEXT   PRIMARY KEY,
    version           TEXT   NOT NULL,
    started_ms        INTEGER NOT NULL,
    heartbeat_ms      INTEGER NOT NULL,
    policy_generation INTEGER NOT NULL,
    primary_kek       TEXT
);
