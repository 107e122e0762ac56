"""SQLite, the embedded default (SPEC §8): its Engine, its connections and its Store. The migration runner, the
transaction helper and group commit are common.py's."""
from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger

from .common import Engine, OneThreadStore, StoreError

log = Logger()
__all__ = ["SqliteStore", "backup_path", "connect"]


class SqliteEngine(Engine):
    name = "sqlite"
    begin = "BEGIN IMMEDIATE"

    def schema_version(self, conn: Any) -> int:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])

    def record_version(self, conn: Any, version: int) -> None:
        conn.execute(f"PRAGMA user_version={int(version):d}")

    def statements(self, sql: str) -> list[str]:
        # executescript() would COMMIT on its own; split (comment-aware) so a migration is one transaction
        out, current = [], ""
        for line in sql.splitlines(keepends=True):
            current += line
            if sqlite3.complete_statement(current):
                out.append(current.strip())
                current = ""
        if current.strip() and not all(l.strip().startswith("--") or not l.strip() for l in current.splitlines()):
            raise StoreError("migration ends with an incomplete statement")
        return out

    def before_migrating(self, conn: Any, current: int) -> None:
        """A consistent copy of the database (SQLite's online backup) before it changes, to undo a failed upgrade."""
        path = getattr(conn, "path", None)
        if path is None:
            return
        target = backup_path(path, current)
        copy = sqlite3.connect(str(target))
        try:
            conn.backup(copy)
        finally:
            copy.close()
        target.chmod(0o600)
        log.info("copied the database (schema {version}) to {path} before migrating", version=current,
                 path=str(target))

    def is_duplicate(self, error: BaseException) -> bool:
        return isinstance(error, sqlite3.IntegrityError)

    def is_fault(self, error: BaseException) -> bool:
        return (isinstance(error, (sqlite3.OperationalError, sqlite3.DatabaseError, OSError, StoreError))
                and not isinstance(error, (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError)))

    def write_probe(self, conn: Any, now: int) -> None:
        conn.execute("INSERT INTO health (id, checked_at, scratch) VALUES (1, ?, zeroblob(8192)) "
                     "ON CONFLICT(id) DO UPDATE SET checked_at = excluded.checked_at, scratch = randomblob(8192)",
                     (now,))


SQLITE = SqliteEngine()


class SqliteConnection(sqlite3.Connection):
    """sqlite3's connection, knowing its engine and its file."""

    engine = SQLITE
    path: Path | None = None


def connect(path: Path) -> sqlite3.Connection:
    """A configured connection in autocommit mode (transactions are explicit)."""
    try:
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, factory=SqliteConnection)
        conn.path = Path(path)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit that returned is on disk, so an acknowledged write survives kill -9 and power loss
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=5000")
    except sqlite3.Error as e:
        raise StoreError(f"cannot open database {path}: {e}") from None
    return conn


def backup_path(db_path: Path, version: int) -> Path:
    """Where the copy of a database at schema `version` is kept before it is migrated further."""
    return db_path.with_name(f"{db_path.name}.v{version}.bak")


class SqliteStore(OneThreadStore):
    """The Store over one SQLite connection used from one thread: writes never block the reactor. Group commit
    (common.OneThreadStore): a renewal made three fsync'd commits, ~0.26 ms of CPU each here; a rotation's
    storm of them now shares commits."""

    def __init__(self, path: Path, reactor: IReactorFromThreads) -> None:
        super().__init__(reactor)
        self.path = Path(path)

    def _connect(self) -> Any:
        return connect(self.path)
