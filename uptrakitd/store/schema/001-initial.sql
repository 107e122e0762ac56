-- uptrakitd schema, version 1. Times are epoch seconds (UTC). Secrets are stored as SHA-256 hashes only.
CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL               -- JSON
);

CREATE TABLE ca_generations (
    generation  INTEGER PRIMARY KEY,  -- 1, 2, 3 ... in rotation order; the highest is active
    cert_pem    TEXT NOT NULL,
    key_file    TEXT NOT NULL,        -- file name under <data-dir>/pki/, written before this row
    not_after   INTEGER NOT NULL,
    external    INTEGER NOT NULL DEFAULT 0,
    crl_number  INTEGER NOT NULL DEFAULT 0,
    created_at  INTEGER NOT NULL
);

CREATE TABLE services (
    id                      TEXT PRIMARY KEY,   -- UUID
    kind                    TEXT NOT NULL CHECK (kind IN ('agent', 'mqtt')),
    hostname                TEXT NOT NULL,
    friendly_name           TEXT,
    status                  TEXT NOT NULL CHECK (status IN ('pending', 'approved', 'rejected', 'deactivated')),
    capabilities            TEXT NOT NULL DEFAULT '[]',
    ip_address              TEXT,
    proxy_ip                TEXT,
    identity_source         TEXT,
    last_seen_at            INTEGER,
    created_at              INTEGER NOT NULL,
    enrollment_secret_hash  TEXT,
    cert_lifetime_hours     INTEGER,
    ping_interval_seconds   INTEGER
);

CREATE TABLE certificates (
    serial             TEXT PRIMARY KEY,   -- uppercase hex, no colons, no sign byte
    service_id         TEXT REFERENCES services(id),   -- NULL for the server certificate
    purpose            TEXT NOT NULL CHECK (purpose IN ('server', 'client')),
    ca_generation      INTEGER NOT NULL REFERENCES ca_generations(generation),
    not_before         INTEGER NOT NULL,
    not_after          INTEGER NOT NULL,
    cert_pem           TEXT NOT NULL,
    issued_at          INTEGER NOT NULL,
    revoked_at         INTEGER,
    revocation_reason  TEXT
);
CREATE INDEX certificates_service ON certificates(service_id);
CREATE INDEX certificates_revoked ON certificates(ca_generation, revoked_at);

CREATE TABLE admin_tokens (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    token_hash  TEXT NOT NULL UNIQUE,
    permissions TEXT NOT NULL DEFAULT '["admin"]',
    created_at  INTEGER NOT NULL,
    revoked_at  INTEGER
);

CREATE TABLE enrollment_tokens (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    kind          TEXT,
    token_hash    TEXT NOT NULL UNIQUE,
    max_uses      INTEGER,
    uses          INTEGER NOT NULL DEFAULT 0,
    expires_at    INTEGER,
    auto_approve  INTEGER NOT NULL DEFAULT 1,
    created_at    INTEGER NOT NULL,
    revoked_at    INTEGER
);
