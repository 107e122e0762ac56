-- uptrakitd schema for PostgreSQL, version 1: the same tables and columns as schema/001-initial.sql
-- (tests/ha/test_postgresql_store.py keeps the two in lockstep). Times are epoch seconds (UTC).
CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE ca_generations (
    generation  INTEGER PRIMARY KEY,
    cert_pem    TEXT NOT NULL,
    key_file    TEXT NOT NULL,
    not_after   BIGINT NOT NULL,
    external    INTEGER NOT NULL DEFAULT 0,
    crl_number  BIGINT NOT NULL DEFAULT 0,
    created_at  BIGINT NOT NULL
);

CREATE TABLE services (
    id                      TEXT PRIMARY KEY,
    kind                    TEXT NOT NULL CHECK (kind IN ('agent', 'mqtt')),
    hostname                TEXT NOT NULL,
    friendly_name           TEXT,
    status                  TEXT NOT NULL CHECK (status IN ('pending', 'approved', 'rejected', 'deactivated')),
    capabilities            TEXT NOT NULL DEFAULT '[]',
    ip_address              TEXT,
    proxy_ip                TEXT,
    identity_source         TEXT,
    last_seen_at            BIGINT,
    created_at              BIGINT NOT NULL,
    enrollment_secret_hash  TEXT,
    cert_lifetime_hours     INTEGER,
    ping_interval_seconds   INTEGER
);

CREATE TABLE certificates (
    serial             TEXT PRIMARY KEY,
    service_id         TEXT REFERENCES services(id),
    purpose            TEXT NOT NULL CHECK (purpose IN ('server', 'client')),
    ca_generation      INTEGER NOT NULL REFERENCES ca_generations(generation),
    not_before         BIGINT NOT NULL,
    not_after          BIGINT NOT NULL,
    cert_pem           TEXT NOT NULL,
    issued_at          BIGINT NOT NULL,
    revoked_at         BIGINT,
    revocation_reason  TEXT,
    rowid              BIGSERIAL         -- SQLite's implicit rowid: issue order within one second
);
CREATE INDEX certificates_service ON certificates(service_id);
CREATE INDEX certificates_revoked ON certificates(ca_generation, revoked_at);

CREATE TABLE admin_tokens (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    token_hash  TEXT NOT NULL UNIQUE,
    permissions TEXT NOT NULL DEFAULT '["admin"]',
    created_at  BIGINT NOT NULL,
    revoked_at  BIGINT
);

CREATE TABLE enrollment_tokens (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    kind          TEXT,
    token_hash    TEXT NOT NULL UNIQUE,
    max_uses      INTEGER,
    uses          INTEGER NOT NULL DEFAULT 0,
    expires_at    BIGINT,
    auto_approve  INTEGER NOT NULL DEFAULT 1,
    created_at    BIGINT NOT NULL,
    revoked_at    BIGINT
);
