-- version 4: what changed, in commit order, for the other controllers on the same database to apply
-- (PostgreSQL: written with every change that must reach them, announced by NOTIFY uptrakit_changes).
-- With SQLite there is one controller and nothing is written here; the table exists for lockstep.
CREATE TABLE changes (
    seq INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    origin TEXT NOT NULL,
    at INTEGER NOT NULL
);
-- the controllers on the database (each refreshes its row every 2 s) and which one holds a service's socket
CREATE TABLE controllers (
    id TEXT PRIMARY KEY,
    hostname TEXT NOT NULL,
    started_at INTEGER NOT NULL,
    seen_at INTEGER NOT NULL,
    leader INTEGER NOT NULL DEFAULT 0,
    ca_generation INTEGER NOT NULL DEFAULT 0   -- the newest CA generation its TLS context trusts
);
ALTER TABLE services ADD COLUMN controller TEXT;
