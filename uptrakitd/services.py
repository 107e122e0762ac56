"""Services (agents and MQTT bridges): records, store queries, and certificate issuance for them."""
from __future__ import annotations

import json
import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class ServiceRecord:
    """One service as the controller knows it (in memory, in step with the store)."""

    id: str
    kind: str
    hostname: str
    status: str
    created_at: int
    friendly_name: str | None = None
    capabilities: list[str] = field(default_factory=list)
    ip_address: str | None = None
    proxy_ip: str | None = None
    identity_source: str | None = None
    last_seen_at: int | None = None
    cert_lifetime_hours: int | None = None
    ping_interval_seconds: int | None = None
    enrollment_secret_hash: str | None = None


_COLUMNS = ("id, kind, hostname, status, created_at, friendly_name, capabilities, ip_address, proxy_ip, "
            "identity_source, last_seen_at, cert_lifetime_hours, ping_interval_seconds, enrollment_secret_hash")


def load_services(conn: sqlite3.Connection) -> list[ServiceRecord]:
    """Every service."""
    out = []
    for row in conn.execute(f"SELECT {_COLUMNS} FROM services"):
        values = list(row)
        values[6] = json.loads(values[6] or "[]")
        out.append(ServiceRecord(*values))
    return out


def insert_service(conn: sqlite3.Connection, kind: str, hostname: str, status: str,
                   friendly_name: str | None = None, capabilities: list[str] | None = None,
                   enrollment_secret_hash: str | None = None) -> ServiceRecord:
    """Create a service with a new UUID."""
    record = ServiceRecord(id=str(uuid.uuid4()), kind=kind, hostname=hostname, status=status,
                           created_at=int(time.time()), friendly_name=friendly_name,
                           capabilities=list(capabilities or []), enrollment_secret_hash=enrollment_secret_hash)
    conn.execute("INSERT INTO services (id, kind, hostname, friendly_name, status, capabilities, created_at, "
                 "enrollment_secret_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                 (record.id, kind, hostname, friendly_name, status, json.dumps(record.capabilities),
                  record.created_at, enrollment_secret_hash))
    return record


def record_connection(conn: sqlite3.Connection, service_id: str, ip_address: str, proxy_ip: str | None,
                      identity_source: str, seen_at: int) -> None:
    """Durably note where a service connected from and how it was identified."""
    conn.execute("UPDATE services SET ip_address = ?, proxy_ip = ?, identity_source = ?, last_seen_at = ? "
                 "WHERE id = ?", (ip_address, proxy_ip, identity_source, seen_at, service_id))


def update_fields(conn: sqlite3.Connection, service_id: str, **fields: Any) -> None:
    """Update named columns of one service."""
    allowed = {"status", "cert_lifetime_hours", "ping_interval_seconds", "enrollment_secret_hash", "last_seen_at",
               "friendly_name"}
    assert set(fields) <= allowed, fields
    assignments = ", ".join(f"{k} = ?" for k in fields)
    conn.execute(f"UPDATE services SET {assignments} WHERE id = ?", (*fields.values(), service_id))
