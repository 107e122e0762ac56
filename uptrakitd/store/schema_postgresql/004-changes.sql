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
