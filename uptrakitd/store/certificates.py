"""Issued certificates and their revocation. Serials are stored as uppercase hex."""
from __future__ import annotations


from . import changes
from .common import Connection, Row


def insert(conn: Connection, serial: str, service_id: str | None, purpose: str, ca_generation: int,
           not_before: int, not_after: int, cert_pem: str, issued_at: int) -> None:
    """Record an issued certificate."""
    conn.execute("INSERT INTO certificates (serial, service_id, purpose, ca_generation, not_before, not_after, "
                 "cert_pem, issued_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                 (serial, service_id, purpose, ca_generation, not_before, not_after, cert_pem, issued_at))
    changes.note(conn, "certificate", serial)


def valid_for_service(conn: Connection, service_id: str, now: int) -> int:
    """How many unrevoked, unexpired client certificates the database holds for a service, under a lock of that
    service's (every controller of a cluster counts and records in turn)."""
    conn.engine.serialize(conn, f"service-certificates:{service_id}")
    return int(conn.execute("SELECT count(*) AS n FROM certificates WHERE service_id = ? AND purpose = 'client' AND "
                            "revoked_at IS NULL AND not_after > ?", (service_id, now)).fetchone()["n"])


def load_all(conn: Connection) -> list[Row]:
    """Every certificate record in issue order: serial, service_id, purpose, ca_generation, not_before,
    not_after, revoked_at, revocation_reason."""
    return conn.execute("SELECT serial, service_id, purpose, ca_generation, not_before, not_after, revoked_at, "
                        "revocation_reason FROM certificates ORDER BY issued_at, rowid").fetchall()


def load_current(conn: Connection, expired_before: int) -> list[Row]:
    """load_all's rows, without the client certificates that expired before `expired_before` (nothing in memory
    needs them: CRLs stop listing a certificate a day after it expires; the store keeps the row)."""
    return conn.execute("SELECT serial, service_id, purpose, ca_generation, not_before, not_after, revoked_at, "
                        "revocation_reason FROM certificates WHERE not_after >= ? OR purpose = 'server' "
                        "ORDER BY issued_at, rowid", (expired_before,)).fetchall()


def delete_expired(conn: Connection, expired_before: int, batch: int) -> list[str]:
    """Delete up to `batch` certificate rows that expired before `expired_before`; returns their serials."""
    rows = conn.execute("SELECT serial FROM certificates WHERE not_after < ? ORDER BY not_after LIMIT ?",
                        (expired_before, batch)).fetchall()
    serials = [row["serial"] for row in rows]
    for start in range(0, len(serials), 500):
        chunk = serials[start:start + 500]
        conn.execute(f"DELETE FROM certificates WHERE serial IN ({', '.join('?' * len(chunk))})", tuple(chunk))
    return serials


def load_one(conn: Connection, serial: str) -> Row | None:
    """One certificate record (the columns of load_all), or None."""
    return conn.execute("SELECT serial, service_id, purpose, ca_generation, not_before, not_after, revoked_at, "
                        "revocation_reason FROM certificates WHERE serial = ?", (serial,)).fetchone()


def pem_of(conn: Connection, serial: str) -> str | None:
    """The certificate itself (PEM), or None."""
    row = conn.execute("SELECT cert_pem FROM certificates WHERE serial = ?", (serial,)).fetchone()
    return str(row["cert_pem"]) if row is not None else None


def load_many(conn: Connection, serials: list[str]) -> dict[str, Row]:
    """Records by serial (the columns of load_all), for those that exist; read 500 at a time."""
    out: dict[str, Row] = {}
    for i in range(0, len(serials), 500):
        chunk = serials[i:i + 500]
        for row in conn.execute("SELECT serial, service_id, purpose, ca_generation, not_before, not_after, revoked_at, "
                                f"revocation_reason FROM certificates WHERE serial IN ({', '.join('?' * len(chunk))})",
                                chunk):
            out[row["serial"]] = row
    return out


def mark_revoked(conn: Connection, serial: str, revoked_at: int, reason: str) -> bool:
    """Revoke one certificate; False when it was already revoked or is unknown."""
    cur = conn.execute("UPDATE certificates SET revoked_at = ?, revocation_reason = ? "
                       "WHERE serial = ? AND revoked_at IS NULL", (revoked_at, reason, serial))
    if cur.rowcount == 1:
        changes.note(conn, "revoked", serial)
    return cur.rowcount == 1


def revoke_all_of_service(conn: Connection, service_id: str, revoked_at: int, reason: str) -> list[str]:
    """Revoke every unrevoked certificate of a service; returns their serials."""
    serials = [row["serial"] for row in conn.execute(
        "SELECT serial FROM certificates WHERE service_id = ? AND revoked_at IS NULL", (service_id,))]
    conn.execute("UPDATE certificates SET revoked_at = ?, revocation_reason = ? "
                 "WHERE service_id = ? AND revoked_at IS NULL", (revoked_at, reason, service_id))
    for serial in serials:
        changes.note(conn, "revoked", serial)
    return serials
