-- version 2: the one-row table readiness writes to (schema/002-health.sql).
CREATE TABLE health (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    checked_at  BIGINT NOT NULL,
    scratch     BYTEA
);
