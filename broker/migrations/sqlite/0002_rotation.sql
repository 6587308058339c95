-- Keyhaven broker schema v2 (SQLite): KEK rotation. Times are Unix milliseconds.

-- How many times each row's DEK was re-wrapped (a row is moved at most once per rotation).
ALTER TABLE secret_versions ADD COLUMN rewraps INTEGER NOT NULL DEFAULT 0;

-- Encryptions recorded under each KEK: new DEKs sealed, DEKs re-wrapped to it.
CREATE TABLE kek_usage (
    kek_id     TEXT    PRIMARY KEY,
    seals      INTEGER NOT NULL DEFAULT 0,
    rewraps_in INTEGER NOT NULL DEFAULT 0
);
INSERT INTO kek_usage (kek_id, seals)
    SELECT kek_id, COUNT(*) FROM secret_versions GROUP BY kek_id;

-- One row per committed re-wrap batch (pruned after an hour): rate, ETA, who did what.
CREATE TABLE rewrap_batches (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    time_ms     INTEGER NOT NULL,
    replica     TEXT    NOT NULL,
    to_kek      TEXT    NOT NULL,
    rows_moved  INTEGER NOT NULL,
    duration_ms INTEGER NOT NULL
);
CREATE INDEX rewrap_batches_time ON rewrap_batches (time_ms);

-- KEKs retired (or being retired): no DEK may be wrapped by them again.
CREATE TABLE retired_keks (
    kek_id     TEXT    PRIMARY KEY,
    retired_ms INTEGER NOT NULL
);
