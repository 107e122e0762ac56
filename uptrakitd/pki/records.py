"""Store queries for the PKI: run in the store thread (Store.run) or at start-up (transaction)."""
from __future__ import annotations

import sqlite3
import time

from cryptography import x509

from .authority import CertRecord
from .issue import Issued
from .serials import format_serial, parse_serial


def load_generations(conn: sqlite3.Connection) -> list[tuple[int, str, str, bool, int]]:
    """(generation, cert_pem, key_file, external, crl_number) for every stored CA, oldest first."""
    rows = conn.execute("SELECT generation, cert_pem, key_file, external, crl_number "
                        "FROM ca_generations ORDER BY generation").fetchall()
    return [(g, pem, kf, bool(ext), num) for g, pem, kf, ext, num in rows]


def insert_generation(conn: sqlite3.Connection, generation: int, cert: x509.Certificate,
                      cert_pem: str, key_file: str, external: bool) -> None:
    """Record a CA generation (its key file is already on disk)."""
    conn.execute("INSERT INTO ca_generations (generation, cert_pem, key_file, not_after, external, created_at) "
                 "VALUES (?, ?, ?, ?, ?, ?)",
                 (generation, cert_pem, key_file, int(cert.not_valid_after_utc.timestamp()),
                  int(external), int(time.time())))


def insert_certificate(conn: sqlite3.Connection, issued: Issued, service_id: str | None, purpose: str) -> CertRecord:
    """Record an issued certificate; returns the in-memory record for it."""
    cert = issued.cert
    record = CertRecord(serial=issued.serial, service_id=service_id, purpose=purpose,
                        ca_generation=issued.ca_generation,
                        not_before=int(cert.not_valid_before_utc.timestamp()),
                        not_after=int(cert.not_valid_after_utc.timestamp()))
    conn.execute("INSERT INTO certificates (serial, service_id, purpose, ca_generation, not_before, not_after, "
                 "cert_pem, issued_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                 (format_serial(issued.serial), service_id, purpose, issued.ca_generation, record.not_before,
                  record.not_after, issued.pem.decode("ascii"), int(time.time())))
    return record


def mark_revoked(conn: sqlite3.Connection, serial: int, revoked_at: int, reason: str) -> bool:
    """Revoke one certificate; False when it was already revoked or is unknown."""
    cur = conn.execute("UPDATE certificates SET revoked_at = ?, revocation_reason = ? "
                       "WHERE serial = ? AND revoked_at IS NULL", (revoked_at, reason, format_serial(serial)))
    return cur.rowcount == 1


def load_records(conn: sqlite3.Connection) -> list[CertRecord]:
    """Every certificate record, for the in-memory index."""
    rows = conn.execute("SELECT serial, service_id, purpose, ca_generation, not_before, not_after, revoked_at, "
                        "revocation_reason FROM certificates ORDER BY issued_at, rowid")
    return [CertRecord(parse_serial(s), sid, p, g, nb, na, ra, rr) for s, sid, p, g, nb, na, ra, rr in rows]


def next_crl_number(conn: sqlite3.Connection, generation: int) -> int:
    """Increment and return the persisted CRL number of a generation (monotonic across restarts)."""
    conn.execute("UPDATE ca_generations SET crl_number = crl_number + 1 WHERE generation = ?", (generation,))
    return conn.execute("SELECT crl_number FROM ca_generations WHERE generation = ?", (generation,)).fetchone()[0]
