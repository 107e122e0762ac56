-- version 3: a managed CA key may be kept in its row, sealed with the key-encryption key (PostgreSQL,
-- --ca-key-encryption-key-file); key_file is '' then. With SQLite the key stays a file and this is NULL.
ALTER TABLE ca_generations ADD COLUMN key_sealed TEXT;
