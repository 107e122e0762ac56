"""The change log several controllers on one PostgreSQL share (SPEC: high availability).

Every write another controller must learn of appends `(kind, key)` here in the same transaction, and
NOTIFY wakes the others at commit. A notification is only a hint: each controller reads the rows after
the last one it applied (`ChangeFeed` in uptrakitd/cluster/postgresql.py), so a missed notification, or a listener that
was reconnecting, costs a short delay and nothing else. Applying a change is idempotent: a controller
reads the row it names and makes its memory agree with it.

Only connections that say so (`PgConnection.records_changes`) write here: SQLite has one controller.

kinds and keys:
    certificate  serial (hex)   issued; the record is read
    revoked      serial (hex)   revoked; OCSP, CRL, TLS verify, identity and the socket follow
    ca           generation     a new CA generation (a rotation): TLS context, bundle, broadcast
    service      service id     enrolled, approved, rejected, deactivated, edited
    connected    service id     authenticated on `controller_id`: an older socket elsewhere is superseded
    settings     setting key    network or service-certificate settings
    admin_tokens token id       created or revoked
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CHANNEL = "uptrakit_changes"
KINDS = frozenset({"certificate", "revoked", "ca", "service", "connected", "settings", "admin_tokens"})
KEEP_SECONDS = 7 * 86400   # rows older than this are pruned (a controller down longer reloads at start)


@dataclass(frozen=True, slots=True)
class Change:
    """One row of the change log."""

    seq: int
    kind: str
    key: str
    controller_id: str   # the controller that wrote it (the column `origin`)


def note(conn: Any, kind: str, key: str) -> int | None:
    """Append a change in the caller's transaction (only on connections that record changes); its seq."""
    if not getattr(conn, "records_changes", False):
        return None
    assert kind in KINDS, kind
    # `at` by the database's clock (only PostgreSQL connections record changes): store/ reads no clock
    row = conn.execute("INSERT INTO changes (kind, key, origin, at) VALUES (?, ?, ?, CAST(extract(epoch FROM now()) "
                       "AS BIGINT)) RETURNING seq", (kind, str(key), conn.controller_id)).fetchone()
    conn.execute(f"NOTIFY {CHANNEL}")
    return int(row["seq"])


def controller_id_of(conn: Any) -> str | None:
    """The controller a connection writes for (None with SQLite: there is only one)."""
    return getattr(conn, "controller_id", None)


def newest(conn: Any) -> int:
    """The highest sequence number written so far (0 for none)."""
    row = conn.execute("SELECT max(seq) AS seq FROM changes").fetchone()
    return int(row["seq"] or 0)


def since(conn: Any, after: int, limit: int = 1000) -> list[Change]:
    """Changes with a sequence number above `after`, oldest first."""
    return [Change(int(r["seq"]), r["kind"], r["key"], r["origin"]) for r in conn.execute(
        "SELECT seq, kind, key, origin FROM changes WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit))]


def prune(conn: Any, now: int) -> int:
    """Drop changes older than KEEP_SECONDS; how many."""
    cur = conn.execute("DELETE FROM changes WHERE at < ?", (now - KEEP_SECONDS,))
    return int(cur.rowcount or 0)
