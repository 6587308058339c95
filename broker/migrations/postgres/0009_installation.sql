-- Keyhaven broker schema (PostgreSQL): this installation's id, made once (the migration runs
-- under sqlx's lock: one id whichever replica starts first). The roles its dynamic credentials
-- create carry it in their comment, so two installations that share a target database never
-- take each other's roles for their own.
CREATE TABLE installation (id TEXT NOT NULL PRIMARY KEY);
INSERT INTO installation (id) VALUES (md5(random()::text || clock_timestamp()::text));
