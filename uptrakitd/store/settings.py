"""Stored runtime settings: one JSON value per key."""
from __future__ import annotations

import json
import sqlite3
from typing import Any

from . import changes


def get(conn: sqlite3.Connection, key: str) -> Any:
    """A stored runtime setting (JSON), or None."""
    row = conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
    return json.loads(row["value"]) if row else None


def put(conn: sqlite3.Connection, key: str, value: Any) -> None:
    """Store a runtime setting (JSON)."""
    conn.execute("INSERT INTO settings (key, value) VALUES (?, ?) "
                 "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, json.dumps(value)))
    changes.note(conn, "settings", key)
