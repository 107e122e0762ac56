"""The first start from a restored backup (`uptrakitctl backup` / `restore`, docs/deployment/backup.md).

A backup sets a marker in its copy of the database (the settings row RESTORE_MARKER: the backup's id and time);
the live database never holds it. When a controller starts on a database that holds it, the database came
from a backup, and what the controller served after that backup is unknown to it. CRL numbers must never go
backwards (RFC 5280 §5.2.3: relying parties keep the highest they saw), so every CA generation's CRL number
moves past anything that may have been published since: a rebuild is at most one every 0.5 s per controller
(coalesced revocations) plus one per rotation, so BUMP_MARGIN + BUMP_PER_SECOND × seconds since the backup
covers five controllers revoking without pause. The controllers listed at the backup's time are forgotten (each
live one lists itself again within seconds). The marker goes, and `controller.restored` is recorded, in the same
transaction, so it happens once.
"""
from __future__ import annotations

import json
import time
from typing import Any

from twisted.logger import Logger

from uptrakitd.audit import SYSTEM, log_entry
from uptrakitd.store import audit as stored_audit
from uptrakitd.store.common import Connection, transaction

log = Logger()
RESTORE_MARKER = "restored_from_backup"
BUMP_MARGIN = 1_000_000
BUMP_PER_SECOND = 10


def marker_sql(backup_id: str, taken_at: int) -> tuple[str, tuple[Any, ...]]:
    """The statement a backup runs on its copy (never on the live database)."""
    return ("INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (RESTORE_MARKER, json.dumps({"backup_id": backup_id, "taken_at": int(taken_at)})))


def _finish(conn: Connection, now: int, controller_id: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    row = conn.execute("SELECT value FROM settings WHERE key = ?", (RESTORE_MARKER,)).fetchone()
    if row is None:
        return None
    marker = json.loads(row["value"])
    bump = BUMP_MARGIN + BUMP_PER_SECOND * max(0, now - int(marker.get("taken_at", now)))
    moved = {}
    for found in conn.execute("SELECT generation, crl_number FROM ca_generations ORDER BY generation").fetchall():
        generation, number = found["generation"], found["crl_number"]
        conn.execute("UPDATE ca_generations SET crl_number = ? WHERE generation = ?", (number + bump, generation))
        moved[str(generation)] = {"from": number, "to": number + bump}
    conn.execute("DELETE FROM settings WHERE key = ?", (RESTORE_MARKER,))
    # the controllers of the backup's time, and the sockets they held, belong to another life
    conn.execute("UPDATE services SET controller = NULL WHERE controller IS NOT NULL")
    conn.execute("DELETE FROM controllers")
    details = {"backup_id": marker.get("backup_id"), "taken_at": marker.get("taken_at"), "crl_numbers": moved,
               "bump": bump}
    entry = stored_audit.append(conn, now, controller_id, dict(SYSTEM), "controller.restored",
                                {"kind": "controller", "id": controller_id}, details)
    return details, entry


def finish_restore(conn: Connection, controller_id: str, now: int | None = None) -> dict[str, Any] | None:
    """On a database restored from a backup: move the CRL numbers on, drop the marker and record it, in one
    transaction; fires nothing, returns what it did (None when the database was not restored)."""
    done = transaction(conn, _finish, int(time.time()) if now is None else now, controller_id)
    if done is None:
        return None
    details, entry = done
    log_entry(entry)
    taken = details["taken_at"]
    log.warn("this database was restored from backup {backup} (taken at {taken}): CRL numbers moved on by {bump} "
             "so they never go backwards; revocations, certificates and changes made after the backup are not "
             "here (docs/deployment/backup.md)", backup=details["backup_id"],
             taken=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(taken)) if isinstance(taken, int) else taken,
             bump=details["bump"])
    return details
