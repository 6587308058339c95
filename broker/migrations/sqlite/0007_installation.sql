-- Keyhaven broker schema (SQLite): this installation's id, made once. The roles its dynamic
-- credentials create carry it in their comment, so two installations that share a target
-- database never take each other's roles for their own.
CREATE TABLE installation (id TEXT NOT NULL PRIMARY KEY);
INSERT INTO installation (id) VALUES (lower(hex(randomblob(16))));
