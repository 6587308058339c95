-- Keyhaven broker schema v4 (PostgreSQL): the policy generation and the replica registry.
--
-- `policies.generation` is bumped by every `policy apply`, in the same transaction as the new
-- document and its audit record. Each replica polls it and reloads its policies when it moves
-- (the bound is documented in docs/operations.md).
ALTER TABLE policies ADD COLUMN generation BIGINT NOT NULL DEFAULT 1;

-- One row per broker replica, refreshed by its heartbeat.
CREATE TABLE replicas (
    name              TEXT   PRIMARY KEY,
    version           TEXT   NOT NULL,
    started_ms        BIGINT NOT NULL,
    heartbeat_ms      BIGINT NOT NULL,
    policy_generation BIGINT NOT NULL,
    primary_kek       TEXT
);
