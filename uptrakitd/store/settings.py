"""Stored runtime settings: one JSON value per key."""
from __future__ import annotations

import json
from typing import Any

from . import changes
from .common import Connection


def get(conn: Connection, key: str) -> Any:
    """A stored runtime setting (JSON), or None."""
    row = conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
    return json.loads(row["value"]) if row else None


def put(conn: Connection, key: str, value: Any) -> None:
    """Store a runtime setting (JSON)."""
    conn.execute("INSERT INTO settings (key, value) VALUES (?, ?) "
                 "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, json.dumps(value)))
    changes.note(conn, "settings", key)
