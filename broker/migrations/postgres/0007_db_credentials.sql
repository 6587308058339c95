-- Keyhaven broker schema v7 (PostgreSQL): dynamic database credentials.
--
-- A connection's admin URL is a sealed secret version at `db/CONN` (secret_versions), so key
-- rotation, re-wrap and retirement cover it like any secret. Role definitions are not secret.
CREATE TABLE db_roles (
    connection TEXT   NOT NULL,
    role       TEXT   NOT NULL,
    definition TEXT   NOT NULL,
    updated_ms BIGINT NOT NULL,
    PRIMARY KEY (connection, role)
);

-- One row per database role the broker creates, written BEFORE the role is created (state
-- `pending`), so a broker killed at any point leaves a row that says what to drop.
-- state: pending (being created) | active (its lease committed) | dropping (its lease was
-- never stored) | dropped (gone from the database). A row that is not dropped and whose lease is not active is dropped by the
-- revoker, retried with back-off until it succeeds.
CREATE TABLE db_credentials (
    lease_id        TEXT   PRIMARY KEY,
    connection      TEXT   NOT NULL,
    role            TEXT   NOT NULL,
    username        TEXT   NOT NULL UNIQUE,
    namespace       TEXT   NOT NULL,
    service_account TEXT   NOT NULL,
    state           TEXT   NOT NULL,
    created_ms      BIGINT NOT NULL,
    valid_until_ms  BIGINT NOT NULL,
    dropped_ms      BIGINT,
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_ms BIGINT NOT NULL DEFAULT 0,
    last_error      TEXT
);
CREATE INDEX db_credentials_live ON db_credentials (connection, role, state);
