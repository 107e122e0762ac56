-- uptrakitd schema, version 2: a one-row table that readiness writes to, so /readyz fails when writes do.
CREATE TABLE health (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    checked_at  INTEGER NOT NULL,
    scratch     BLOB              -- rewritten with 8 KiB each probe: it needs fresh pages, like real growth
);
