-- version 4: what changed, in commit order, for the other controllers on the same database to apply
-- (written with every change that must reach them, announced by NOTIFY uptrakit_changes).
CREATE TABLE changes (
    seq BIGSERIAL PRIMARY KEY,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    origin TEXT NOT NULL,
    at BIGINT NOT NULL
);
CREATE INDEX changes_at ON changes (at);
-- the controllers on the database (each refreshes its row every 2 s) and which one holds a service's socket
CREATE TABLE controllers (
    id TEXT PRIMARY KEY,
    hostname TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    seen_at BIGINT NOT NULL,
    leader INTEGER NOT NULL DEFAULT 0,
    ca_generation INTEGER NOT NULL DEFAULT 0   -- the newest CA generation its TLS context trusts
);
ALTER TABLE services ADD COLUMN controller TEXT;
