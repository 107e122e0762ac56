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
