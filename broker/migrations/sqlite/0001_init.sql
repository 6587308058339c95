-- Keyhaven broker schema v1 (SQLite). Times are Unix milliseconds.
CREATE TABLE secret_versions (
    path         TEXT    NOT NULL,
    version      INTEGER NOT NULL,
    created_ms   INTEGER NOT NULL,
    deleted_ms   INTEGER,
    destroyed_ms INTEGER,
    kek_id       TEXT    NOT NULL,
    dek_iv       BLOB,
    dek_ct       BLOB,
    nonce        BLOB,
    ciphertext   BLOB,
    PRIMARY KEY (path, version)
);
CREATE INDEX secret_versions_kek ON secret_versions (kek_id);

CREATE TABLE leases (
    id              TEXT    PRIMARY KEY,
    namespace       TEXT    NOT NULL,
    service_account TEXT    NOT NULL,
    pod_name        TEXT,
    pod_uid         TEXT,
    path            TEXT    NOT NULL,
    version         INTEGER NOT NULL,
    created_ms      INTEGER NOT NULL,
    expires_ms      INTEGER NOT NULL,
    max_expires_ms  INTEGER NOT NULL,
    renewals        INTEGER NOT NULL DEFAULT 0,
    ended_ms        INTEGER,
    end_reason      TEXT
);
CREATE INDEX leases_open_expiry ON leases (expires_ms) WHERE ended_ms IS NULL;
CREATE INDEX leases_subject ON leases (namespace, service_account);
CREATE INDEX leases_path ON leases (path);

CREATE TABLE audit (
    seq       INTEGER PRIMARY KEY,
    time_ms   INTEGER NOT NULL,
    kind      TEXT    NOT NULL,
    identity  TEXT,
    pod       TEXT,
    path      TEXT,
    lease_id  TEXT,
    outcome   TEXT    NOT NULL,
    reason    TEXT,
    prev_hash TEXT    NOT NULL,
    hash      TEXT    NOT NULL
);

CREATE TABLE policies (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    yaml       TEXT    NOT NULL,
    updated_ms INTEGER NOT NULL
);
