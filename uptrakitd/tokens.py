"""Enrollment tokens and admin tokens: plaintext shown once, stored as SHA-256 hashes (SPEC §6, §8)."""
from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import time
import uuid
from typing import Any


def token_hash(token: str) -> str:
    """SHA-256 hex of a high-entropy token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token(prefix: str) -> str:
    """A fresh random token with a recognizable prefix."""
    return prefix + secrets.token_urlsafe(32)


class TokenRejected(Exception):
    """An enrollment token that cannot be used; the message says why (never the token)."""


_ENROLL_COLS = "id, name, kind, max_uses, uses, expires_at, auto_approve, created_at, revoked_at"


def _enrollment_row(row: tuple) -> dict[str, Any]:
    id_, name, kind, max_uses, uses, expires_at, auto_approve, created_at, revoked_at = row
    return {"id": id_, "name": name, "kind": kind, "max_uses": max_uses, "uses": uses, "expires_at": expires_at,
            "auto_approve": bool(auto_approve), "created_at": created_at, "revoked_at": revoked_at}


def create_enrollment_token(conn: sqlite3.Connection, name: str, kind: str | None, max_uses: int | None,
                            expires_in: int | None, auto_approve: bool) -> dict[str, Any]:
    """Store a new enrollment token; returns its record plus the plaintext `token` (shown once)."""
    token = new_token("upt_")
    now = int(time.time())
    record_id = str(uuid.uuid4())
    conn.execute("INSERT INTO enrollment_tokens (id, name, kind, token_hash, max_uses, expires_at, auto_approve, "
                 "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                 (record_id, name, kind, token_hash(token), max_uses, now + expires_in if expires_in else None,
                  int(auto_approve), now))
    row = conn.execute(f"SELECT {_ENROLL_COLS} FROM enrollment_tokens WHERE id = ?", (record_id,)).fetchone()
    return dict(_enrollment_row(row), token=token)


def list_enrollment_tokens(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every enrollment token (without secrets)."""
    return [_enrollment_row(r) for r in conn.execute(f"SELECT {_ENROLL_COLS} FROM enrollment_tokens "
                                                      "ORDER BY created_at")]


def revoke_enrollment_token(conn: sqlite3.Connection, token_id: str) -> bool:
    """Revoke one token; False when unknown or already revoked."""
    return conn.execute("UPDATE enrollment_tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                        (int(time.time()), token_id)).rowcount == 1


def consume_enrollment_token(conn: sqlite3.Connection, token: str, kind: str) -> dict[str, Any]:
    """Check a presented token and count one use, in the caller's transaction; TokenRejected if unusable."""
    row = conn.execute(f"SELECT {_ENROLL_COLS} FROM enrollment_tokens WHERE token_hash = ?",
                       (token_hash(token),)).fetchone()
    if row is None:
        raise TokenRejected("enrollment token not recognized")
    record = _enrollment_row(row)
    if record["revoked_at"] is not None:
        raise TokenRejected("enrollment token revoked")
    if record["expires_at"] is not None and record["expires_at"] < time.time():
        raise TokenRejected("enrollment token expired")
    if record["max_uses"] is not None and record["uses"] >= record["max_uses"]:
        raise TokenRejected("enrollment token used up")
    if record["kind"] is not None and record["kind"] != kind:
        raise TokenRejected(f"enrollment token is for {record['kind']} services")
    conn.execute("UPDATE enrollment_tokens SET uses = uses + 1 WHERE id = ?", (record["id"],))
    return record


def create_admin_token(conn: sqlite3.Connection, name: str, permissions: list[str]) -> dict[str, Any]:
    """A new admin API token; the plaintext is returned once."""
    token = new_token("upt_admin_")
    record = {"id": str(uuid.uuid4()), "name": name, "permissions": permissions, "created_at": int(time.time())}
    conn.execute("INSERT INTO admin_tokens (id, name, token_hash, permissions, created_at) VALUES (?, ?, ?, ?, ?)",
                 (record["id"], name, token_hash(token), json.dumps(permissions), record["created_at"]))
    return dict(record, token=token, token_hash=token_hash(token))


def list_admin_tokens(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every admin token (without secrets)."""
    return [{"id": i, "name": n, "permissions": json.loads(p), "created_at": c, "revoked_at": r}
            for i, n, p, c, r in conn.execute("SELECT id, name, permissions, created_at, revoked_at "
                                              "FROM admin_tokens ORDER BY created_at")]


def revoke_admin_token(conn: sqlite3.Connection, token_id: str) -> str | None:
    """Revoke one admin token; returns its hash (to forget in memory) or None when unknown."""
    row = conn.execute("SELECT token_hash FROM admin_tokens WHERE id = ? AND revoked_at IS NULL",
                       (token_id,)).fetchone()
    if row is None:
        return None
    conn.execute("UPDATE admin_tokens SET revoked_at = ? WHERE id = ?", (int(time.time()), token_id))
    return row[0]
