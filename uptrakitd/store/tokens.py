"""Enrollment tokens and admin tokens, stored as SHA-256 hashes only."""
from __future__ import annotations

from typing import Any

from . import changes
from .common import Connection, Row

_ENROLL_COLS = "id, name, kind, max_uses, uses, expires_at, auto_approve, created_at, revoked_at"


def _enrollment(row: Row) -> dict[str, Any]:
    out = dict(row)
    out["auto_approve"] = bool(out["auto_approve"])
    return out


def insert_enrollment_token(conn: Connection, token_id: str, name: str, kind: str | None, digest: str,
                            max_uses: int | None, expires_at: int | None, auto_approve: bool,
                            created_at: int) -> dict[str, Any]:
    """Store a new enrollment token; returns its record (without the hash)."""
    conn.execute("INSERT INTO enrollment_tokens (id, name, kind, token_hash, max_uses, expires_at, auto_approve, "
                 "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                 (token_id, name, kind, digest, max_uses, expires_at, int(auto_approve), created_at))
    return _enrollment(conn.execute(f"SELECT {_ENROLL_COLS} FROM enrollment_tokens WHERE id = ?",
                                    (token_id,)).fetchone())


def list_enrollment_tokens(conn: Connection) -> list[dict[str, Any]]:
    """Every enrollment token (without hashes), oldest first."""
    return [_enrollment(r) for r in conn.execute(f"SELECT {_ENROLL_COLS} FROM enrollment_tokens "
                                                  "ORDER BY created_at")]


def find_enrollment_token(conn: Connection, digest: str) -> dict[str, Any] | None:
    """The enrollment token with this hash, or None."""
    row = conn.execute(f"SELECT {_ENROLL_COLS} FROM enrollment_tokens WHERE token_hash = ?", (digest,)).fetchone()
    return _enrollment(row) if row else None


def count_enrollment_use(conn: Connection, token_id: str, now: int) -> None:
    """Count one use of an enrollment token (and when it was the last one it had, when)."""
    conn.execute("UPDATE enrollment_tokens SET uses = uses + 1, used_up_at = CASE WHEN max_uses IS NOT NULL AND "
                 "uses + 1 >= max_uses THEN ? ELSE used_up_at END WHERE id = ?", (now, token_id))


def delete_spent_enrollment_tokens(conn: Connection, before: int, batch: int) -> list[str]:
    """Delete up to `batch` enrollment tokens used up, expired or revoked before `before`; returns their ids."""
    rows = conn.execute("SELECT id FROM enrollment_tokens WHERE used_up_at < ? OR expires_at < ? OR revoked_at < ? "
                        "LIMIT ?", (before, before, before, batch)).fetchall()
    ids = [row["id"] for row in rows]
    for token_id in ids:
        conn.execute("DELETE FROM enrollment_tokens WHERE id = ?", (token_id,))
    return ids


def revoke_enrollment_token(conn: Connection, token_id: str, revoked_at: int) -> bool:
    """Revoke one token; False when unknown or already revoked."""
    return conn.execute("UPDATE enrollment_tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                        (revoked_at, token_id)).rowcount == 1


def insert_admin_token(conn: Connection, token_id: str, name: str, digest: str, permissions_json: str,
                       created_at: int) -> None:
    """Store a new admin token."""
    conn.execute("INSERT INTO admin_tokens (id, name, token_hash, permissions, created_at) VALUES (?, ?, ?, ?, ?)",
                 (token_id, name, digest, permissions_json, created_at))
    changes.note(conn, "admin_tokens", token_id)


def list_admin_tokens(conn: Connection) -> list[Row]:
    """Every admin token (without hashes): id, name, permissions (JSON), created_at, revoked_at."""
    return conn.execute("SELECT id, name, permissions, created_at, revoked_at FROM admin_tokens "
                        "ORDER BY created_at").fetchall()


def active_admin_tokens(conn: Connection) -> list[Row]:
    """id, name, token_hash and permissions (JSON) of every admin token not revoked."""
    return conn.execute("SELECT id, name, token_hash, permissions FROM admin_tokens WHERE revoked_at IS NULL"
                        ).fetchall()


def mark_first_use(conn: Connection, digest: str, now: int) -> bool:
    """Note an admin token's first use; True only the first time (on any controller)."""
    cursor = conn.execute("UPDATE admin_tokens SET first_used_at = ? WHERE token_hash = ? AND first_used_at IS NULL",
                          (now, digest))
    return bool(cursor.rowcount == 1)


def admin_token_by_hash(conn: Connection, digest: str) -> Row | None:
    """id, name and permissions (JSON) of the active admin token with this hash, or None."""
    return conn.execute("SELECT id, name, permissions FROM admin_tokens WHERE token_hash = ? AND revoked_at IS NULL",
                        (digest,)).fetchone()


def revoke_admin_token(conn: Connection, token_id: str, revoked_at: int) -> str | None:
    """Revoke one admin token; returns its hash (to forget in memory) or None when unknown."""
    row = conn.execute("SELECT token_hash FROM admin_tokens WHERE id = ? AND revoked_at IS NULL",
                       (token_id,)).fetchone()
    if row is None:
        return None
    conn.execute("UPDATE admin_tokens SET revoked_at = ? WHERE id = ?", (revoked_at, token_id))
    changes.note(conn, "admin_tokens", token_id)
    return str(row["token_hash"])
