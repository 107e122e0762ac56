"""Enrolled services (agents and MQTT bridges)."""
from __future__ import annotations

import json
from typing import Any

from . import changes
from .common import Connection

COLUMNS = ("id", "kind", "hostname", "status", "created_at", "friendly_name", "capabilities", "ip_address",
           "proxy_ip", "identity_source", "last_seen_at", "cert_lifetime_hours", "ping_interval_seconds",
           "enrollment_secret_hash", "controller")
WRITABLE = frozenset({"status", "cert_lifetime_hours", "ping_interval_seconds", "enrollment_secret_hash",
                      "last_seen_at", "friendly_name"})


def load_all(conn: Connection) -> list[dict[str, Any]]:
    """Every service as a dict of COLUMNS (capabilities decoded)."""
    return [_values(row) for row in conn.execute(f"SELECT {', '.join(COLUMNS)} FROM services")]


def load_one(conn: Connection, service_id: str) -> dict[str, Any] | None:
    """One service as a dict of COLUMNS, or None."""
    row = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM services WHERE id = ?", (service_id,)).fetchone()
    return _values(row) if row is not None else None


def load_many(conn: Connection, service_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Services by id (dicts of COLUMNS), for those that exist; read 500 at a time."""
    out: dict[str, dict[str, Any]] = {}
    for i in range(0, len(service_ids), 500):
        chunk = service_ids[i:i + 500]
        for row in conn.execute(f"SELECT {', '.join(COLUMNS)} FROM services WHERE id IN "
                                f"({', '.join('?' * len(chunk))})", chunk):
            out[row["id"]] = _values(row)
    return out


def _values(row: Any) -> dict[str, Any]:
    values = dict(row)
    values["capabilities"] = json.loads(values["capabilities"] or "[]")
    return values


def insert(conn: Connection, service_id: str, kind: str, hostname: str, status: str, created_at: int,
           friendly_name: str | None, capabilities: list[str], enrollment_secret_hash: str | None) -> None:
    """Create a service row."""
    conn.execute("INSERT INTO services (id, kind, hostname, friendly_name, status, capabilities, created_at, "
                 "enrollment_secret_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                 (service_id, kind, hostname, friendly_name, status, json.dumps(capabilities), created_at,
                  enrollment_secret_hash))
    changes.note(conn, "service", service_id)


def record_connection(conn: Connection, service_id: str, ip_address: str, proxy_ip: str | None,
                      identity_source: str, seen_at: int) -> int | None:
    """Durably note where a service connected from and how it was identified; the change's seq (PostgreSQL)."""
    conn.execute("UPDATE services SET ip_address = ?, proxy_ip = ?, identity_source = ?, last_seen_at = ?, "
                 "controller = ? WHERE id = ?",
                 (ip_address, proxy_ip, identity_source, seen_at, changes.controller_id_of(conn), service_id))
    return changes.note(conn, "connected", service_id)


def record_disconnection(conn: Connection, service_id: str) -> None:
    """The service's socket on this controller is gone (unless another controller holds a newer one)."""
    cur = conn.execute("UPDATE services SET controller = NULL WHERE id = ? AND controller = ?",
                       (service_id, changes.controller_id_of(conn)))
    if cur.rowcount:
        changes.note(conn, "service", service_id)


def release_controller(conn: Connection, controller_id: str) -> list[str]:
    """No socket is held by `controller_id` any more (it stopped, or died): the services it held."""
    ids = [row["id"] for row in conn.execute("SELECT id FROM services WHERE controller = ?", (controller_id,))]
    conn.execute("UPDATE services SET controller = NULL WHERE controller = ?", (controller_id,))
    for service_id in ids:
        changes.note(conn, "service", service_id)
    return ids


def update_fields(conn: Connection, service_id: str, **fields: Any) -> None:
    """Update named columns of one service (only the WRITABLE ones)."""
    if not set(fields) <= WRITABLE:
        raise ValueError(f"not writable: {sorted(set(fields) - WRITABLE)}")
    assignments = ", ".join(f"{k} = ?" for k in fields)
    conn.execute(f"UPDATE services SET {assignments} WHERE id = ?", (*fields.values(), service_id))
    if set(fields) != {"last_seen_at"}:   # a heartbeat is not worth waking every controller for
        changes.note(conn, "service", service_id)


def take_enrollment_secret(conn: Connection, service_id: str, secret_hash: str) -> bool:
    """Consume a one-time enrollment secret before its certificate is signed: True for the one caller (on any
    controller) whose UPDATE cleared it, False for every other."""
    taken = conn.execute("UPDATE services SET enrollment_secret_hash = NULL WHERE id = ? AND enrollment_secret_hash = ?",
                         (service_id, secret_hash)).rowcount == 1
    if taken:
        changes.note(conn, "service", service_id)
    return taken


def give_back_enrollment_secret(conn: Connection, service_id: str, secret_hash: str) -> None:
    """A refused CSR consumed nothing: the secret works again (unless it was given out anew meanwhile)."""
    conn.execute("UPDATE services SET enrollment_secret_hash = ? WHERE id = ? AND enrollment_secret_hash IS NULL",
                 (secret_hash, service_id))
    changes.note(conn, "service", service_id)
