-- Keyhaven broker schema v3 (SQLite): the secrets generation.
--
-- One counter, bumped in the same transaction as every change to secret_versions (new
-- version, soft delete, destroy, DEK re-wrap), by triggers so no writer can miss it. The
-- broker hands out a secret version it remembers only if the generation it read it under is
-- still current when the lease commits: the audit append checks that in the same transaction.
CREATE TABLE secrets_generation (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    n  INTEGER NOT NULL
);
INSERT INTO secrets_generation (id, n) VALUES (1, 0);

CREATE TRIGGER secret_versions_generation_insert AFTER INSERT ON secret_versions
BEGIN
    UPDATE secrets_generation SET n = n + 1 WHERE id = 1;
END;
CREATE TRIGGER secret_versions_generation_update AFTER UPDATE ON secret_versions
BEGIN
    UPDATE secrets_generation SET n = n + 1 WHERE id = 1;
END;
CREATE TRIGGER secret_versions_generation_delete AFTER DELETE ON secret_versions
BEGIN
    UPDATE secrets_generation SET n = n + 1 WHERE id = 1;
END;
