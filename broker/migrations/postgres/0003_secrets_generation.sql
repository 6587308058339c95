-- Keyhaven broker schema v3 (PostgreSQL): the secrets generation.
--
-- One counter, bumped in the same transaction as every change to secret_versions (new
-- version, soft delete, destroy, DEK re-wrap), by a trigger so no writer can miss it. A broker
-- replica may hand out a secret version it remembers only if the generation it read it under
-- is still current when the lease commits: the audit append checks that in the same statement.
CREATE TABLE secrets_generation (
    id SMALLINT PRIMARY KEY CHECK (id = 1),
    n  BIGINT   NOT NULL
);
INSERT INTO secrets_generation (id, n) VALUES (1, 0);

CREATE FUNCTION bump_secrets_generation() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE secrets_generation SET n = n + 1 WHERE id = 1;
    RETURN NULL;
END
$$;

CREATE TRIGGER secret_versions_generation
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON secret_versions
    FOR EACH STATEMENT EXECUTE FUNCTION bump_secrets_generation();
