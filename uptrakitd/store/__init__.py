"""The SQLite store: versioned migrations, one writer connection off the reactor thread (SPEC §8)."""
from __future__ import annotations

import re
import sqlite3
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred
from twisted.logger import Logger

log = Logger()
_MIGRATION_NAME = re.compile(r"^(\d{3})-[a-z0-9-]+\.sql$")


class StoreError(Exception):
    """The database cannot be opened or migrated."""


def _configure(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit that returned is on disk, so an acknowledged write survives kill -9 and power loss.
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=5000")


def migrations() -> list[tuple[int, str, str]]:
    """All schema files as (version, name, sql), in order."""
    found = []
    for entry in resources.files("uptrakitd.store").joinpath("schema").iterdir():
        m = _MIGRATION_NAME.match(entry.name)
        if m:
            found.append((int(m.group(1)), entry.name, entry.read_text("utf-8")))
    found.sort()
    return found


def schema_version(conn: sqlite3.Connection) -> int:
    """The schema version recorded in the database (0 for a new one)."""
    return conn.execute("PRAGMA user_version").fetchone()[0]


def migrate(conn: sqlite3.Connection) -> list[str]:
    """Apply pending migrations, each in its own transaction; returns the names applied."""
    current = schema_version(conn)
    known = migrations()
    newest = known[-1][0] if known else 0
    if current > newest:
        raise StoreError(f"database schema version {current} is newer than this uptrakitd ({newest}); "
                         "refusing to run an older release against it")
    applied = []
    for version, name, sql in known:
        if version <= current:
            continue
        try:
            conn.execute("BEGIN")
            for statement in _statements(sql):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={version:d}")
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            conn.execute("ROLLBACK")
            raise StoreError(f"migration {name} failed: {e}") from None
        applied.append(name)
    return applied


def _statements(sql: str) -> list[str]:
    # executescript() would COMMIT on its own; split (comment-aware) so a migration is one transaction.
    out, current = [], ""
    for line in sql.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            out.append(current.strip())
            current = ""
    if current.strip() and not all(l.strip().startswith("--") or not l.strip() for l in current.splitlines()):
        raise StoreError("migration ends with an incomplete statement")
    return out


def connect(path: Path) -> sqlite3.Connection:
    """A configured connection in autocommit mode (we issue BEGIN/COMMIT ourselves)."""
    try:
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        _configure(conn)
    except sqlite3.Error as e:
        raise StoreError(f"cannot open database {path}: {e}") from None
    return conn


def open_and_migrate(path: Path) -> sqlite3.Connection:
    """Open the database for the synchronous start-up phase, migrating it first."""
    conn = connect(path)
    applied = migrate(conn)
    for name in applied:
        log.info("applied schema migration {name}", name=name)
    return conn


class Store:
    """Deferred API over one connection in one thread: every write is off the reactor thread."""

    def __init__(self, path: Path, reactor: Any) -> None:
        self.path = Path(path)
        self._pool = adbapi.ConnectionPool(
            "sqlite3", str(self.path), cp_min=1, cp_max=1, check_same_thread=False,
            isolation_level=None, cp_openfun=_configure, cp_reactor=reactor)
        self._closed = False

    def run(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Deferred:
        """Run fn(conn, *args) in the store thread inside one transaction; commit when it returns."""
        return self._pool.runWithConnection(_in_transaction, fn, args, kw)

    def start(self) -> None:
        """Start the pool's thread (normally done when the reactor starts)."""
        self._pool.start()

    def close(self) -> None:
        """Stop the thread after pending work (once; later calls do nothing)."""
        if not self._closed:
            self._closed = True
            self._pool.close()


def _in_transaction(conn: Any, fn: Callable[..., Any], args: tuple, kw: dict) -> Any:
    raw = conn._connection if hasattr(conn, "_connection") else conn
    raw.execute("BEGIN IMMEDIATE")
    try:
        result = fn(raw, *args, **kw)
    except BaseException:
        raw.execute("ROLLBACK")
        raise
    raw.execute("COMMIT")
    return result


def transaction(conn: sqlite3.Connection, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """Synchronous twin of Store.run for the start-up phase."""
    return _in_transaction(conn, fn, args, kw)
