"""CA generations: certificate, key file name, CRL number."""
from __future__ import annotations


from . import changes
from .common import Connection, Row


def load_all(conn: Connection) -> list[Row]:
    """Every stored CA, oldest first: generation, cert_pem, key_file, key_sealed, external, crl_number."""
    return conn.execute("SELECT generation, cert_pem, key_file, key_sealed, external, crl_number "
                        "FROM ca_generations ORDER BY generation").fetchall()


def load_one(conn: Connection, generation: int) -> Row | None:
    """One stored CA (the columns of load_all), or None."""
    return conn.execute("SELECT generation, cert_pem, key_file, key_sealed, external, crl_number "
                        "FROM ca_generations WHERE generation = ?", (generation,)).fetchone()


def insert(conn: Connection, generation: int, cert_pem: str, key_file: str, not_after: int,
           external: bool, created_at: int, key_sealed: str | None = None) -> None:
    """Record a CA generation (its key file is already on disk, or its key is sealed in `key_sealed`)."""
    conn.execute("INSERT INTO ca_generations (generation, cert_pem, key_file, key_sealed, not_after, external, "
                 "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                 (generation, cert_pem, key_file, key_sealed, not_after, int(external), created_at))
    changes.note(conn, "ca", str(generation))


def reseal(conn: Connection, generation: int, key_sealed: str) -> None:
    """Replace a generation's sealed key (after a key-encryption key rotation)."""
    conn.execute("UPDATE ca_generations SET key_sealed = ? WHERE generation = ?", (key_sealed, generation))


def forget_key_file(conn: Connection, generation: int) -> None:
    """The generation's clear key file is gone: its key is the sealed copy alone (pki.seal)."""
    conn.execute("UPDATE ca_generations SET key_file = '' WHERE generation = ?", (generation,))


def next_crl_number(conn: Connection, generation: int) -> int:
    """Increment and return the persisted CRL number of a generation (monotonic across restarts)."""
    conn.execute("UPDATE ca_generations SET crl_number = crl_number + 1 WHERE generation = ?", (generation,))
    return int(conn.execute("SELECT crl_number FROM ca_generations WHERE generation = ?",
                            (generation,)).fetchone()[0])


def next_crl_numbers(conn: Connection, generations: list[int]) -> dict[int, int]:
    """next_crl_number for several generations in one transaction."""
    return {g: next_crl_number(conn, g) for g in generations}
