"""SQLite: versioned migrations (with a copy of the file taken first), one writer thread (SPEC §8)."""
from __future__ import annotations

import re
import sqlite3
import threading
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from ..errors import StorageUnavailable

log = Logger()
_MIGRATION_NAME = re.compile(r"^(\d{3})-[a-z0-9-]+\.sql$")
Migration = tuple[int, str, str]


class StoreError(Exception):
    """The database cannot be opened or migrated."""


def _configure(conn: sqlite3.Connection) -> None:
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit that returned is on disk, so an acknowledged write survives kill -9 and power loss.
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=5000")


def migrations(folder: str = "schema") -> list[Migration]:
    """All schema files of `folder` (`schema`: SQLite, `schema_postgresql`) as (version, name, sql), in order."""
    found = []
    for entry in resources.files("uptrakitd.store").joinpath(folder).iterdir():
        m = _MIGRATION_NAME.match(entry.name)
        if m:
            found.append((int(m.group(1)), entry.name, entry.read_text("utf-8")))
    found.sort()
    return found


def schema_version(conn: sqlite3.Connection) -> int:
    """The schema version recorded in the database (0 for a new one)."""
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def backup_path(db_path: Path, version: int) -> Path:
    """Where the copy of a database at schema `version` is kept before it is migrated further."""
    return db_path.with_name(f"{db_path.name}.v{version}.bak")


def migrate(conn: sqlite3.Connection, known: list[Migration] | None = None,
            backup_to: Path | None = None) -> list[str]:
    """Apply pending migrations, each in its own transaction; returns the names applied.

    When a database that already has a schema is about to change, a consistent copy of it is
    written to `backup_to` first (SQLite's online backup), so a failed upgrade can be undone.
    """
    current = schema_version(conn)
    known = migrations() if known is None else known
    newest = known[-1][0] if known else 0
    if current > newest:
        raise StoreError(f"database schema version {current} is newer than this uptrakitd ({newest}); "
                         "refusing to run an older release against it")
    pending = [m for m in known if m[0] > current]
    if pending and current > 0 and backup_to is not None:
        copy = sqlite3.connect(str(backup_to))
        try:
            conn.backup(copy)
        finally:
            copy.close()
        backup_to.chmod(0o600)
        log.info("copied the database (schema {version}) to {path} before migrating", version=current,
                 path=str(backup_to))
    applied = []
    for version, name, sql in pending:
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
    applied = migrate(conn, backup_to=backup_path(path, schema_version(conn)))
    for name in applied:
        log.info("applied schema migration {name}", name=name)
    return conn


def transaction(conn: sqlite3.Connection, operation: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """Run operation(conn, *args) in one transaction: committed when it returns, rolled back when it raises."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = operation(conn, *args, **kw)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return result


def read_probe(conn: sqlite3.Connection) -> None:
    """A query the database must answer (readiness)."""
    conn.execute("SELECT COUNT(*) FROM ca_generations").fetchone()


def write_probe(conn: sqlite3.Connection, now: int) -> None:
    """A write the database must accept (readiness): one row, updated in place."""
    conn.execute("INSERT INTO health (id, checked_at, scratch) VALUES (1, ?, zeroblob(8192)) "
                 "ON CONFLICT(id) DO UPDATE SET checked_at = excluded.checked_at, scratch = randomblob(8192)",
                 (now,))


def close_quietly(conn: Any) -> None:
    """Close a connection that may already be broken."""
    try:
        conn.close()
    except Exception:
        pass


class OneThreadStore:
    """A Store whose operations all run in one thread of its own, one transaction each (the engines'
    common part: SqliteStore, postgresql.PostgresStore)."""

    def __init__(self, reactor: IReactorFromThreads) -> None:
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="uptrakitd-store")
        self._conn: Any = None
        self._closed = False

    def refusing(self) -> str | None:
        """Why no operation may run now (None: they may)."""
        return "the store is closed" if self._closed else None

    def run(self, operation: Callable[..., Any], *args: Any, **kw: Any) -> Deferred:
        """Run operation(conn, *args) in the store thread inside one transaction; fires with its result."""
        reason = self.refusing()
        if reason is not None:
            return fail(StorageUnavailable(f"storage unavailable: {reason}"))
        return deferToThreadPool(self._reactor, self._pool, self._in_thread, operation, args, kw)

    def _in_thread(self, operation: Callable[..., Any], args: tuple, kw: dict) -> Any:
        raise NotImplementedError

    def start(self) -> None:
        """Start the store thread."""
        self._pool.start()

    def close(self) -> None:
        """Finish pending work, stop the thread, close the connection (once; later calls do nothing)."""
        if self._closed:
            return
        self._closed = True
        self._pool.stop()
        if self._conn is not None:
            close_quietly(self._conn)
            self._conn = None


def _storage_fault(e: BaseException) -> bool:
    """The storage failed (not a bug, a constraint or the operation's own refusal)."""
    return (isinstance(e, (sqlite3.OperationalError, sqlite3.DatabaseError, OSError, StoreError))
            and not isinstance(e, (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError)))


class SqliteStore(OneThreadStore):
    """The Store over one SQLite connection used from one thread: writes never block the reactor.

    Group commit: operations that arrive while a transaction commits are run together in the next one,
    each inside a SAVEPOINT of its own (one that raises is undone alone, as its own transaction would
    be), and every caller is answered after the COMMIT that made its write durable. A renewal made three
    fsync'd commits (the new certificate, the revocation it supersedes, the connection), ~0.26 ms of CPU
    each here; a CA rotation's storm of them now shares commits. A storage fault inside a batch rolls it
    back and runs its operations again one transaction each, so each caller sees what it would have alone.
    """

    MAX_BATCH = 64

    def __init__(self, path: Path, reactor: IReactorFromThreads) -> None:
        super().__init__(reactor)
        self.path = Path(path)
        self._queue: list[tuple[Callable[..., Any], tuple, dict, Deferred]] = []
        self._lock = threading.Lock()
        self._draining = False
        self.commits = 0   # transactions committed (tests, benchmarks)

    def run(self, operation: Callable[..., Any], *args: Any, **kw: Any) -> Deferred:
        """Run operation(conn, *args) in the store thread; fires with its result once it is committed."""
        reason = self.refusing()
        if reason is not None:
            return fail(StorageUnavailable(f"storage unavailable: {reason}"))
        d: Deferred = Deferred()
        with self._lock:
            self._queue.append((operation, args, kw, d))
            idle, self._draining = not self._draining, True
        if idle:
            self._pool.callInThread(self._drain)
        return d

    def _drain(self) -> None:
        while True:
            with self._lock:
                batch = self._queue[:self.MAX_BATCH]
                del self._queue[:len(batch)]
                if not batch:
                    self._draining = False
                    return
            answers = self._run_batch(batch) if len(batch) > 1 else [self._run_one(*batch[0])]
            self._reactor.callFromThread(_answer, answers)

    def _run_one(self, operation: Callable[..., Any], args: tuple, kw: dict, d: Deferred) -> tuple[Deferred, Any]:
        try:
            result = self._in_thread(operation, args, kw)
        except BaseException:
            return d, Failure()
        self.commits += 1
        return d, result

    def _run_batch(self, batch: list[tuple[Callable[..., Any], tuple, dict, Deferred]]) -> list[tuple[Deferred, Any]]:
        answers: list[tuple[Deferred, Any]] = []
        try:
            if self._conn is None:
                self._conn = connect(self.path)
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            for operation, args, kw, d in batch:
                conn.execute("SAVEPOINT operation")
                try:
                    result: Any = operation(conn, *args, **kw)
                except Exception as e:
                    if _storage_fault(e):
                        raise
                    result = Failure()
                    conn.execute("ROLLBACK TO operation")
                conn.execute("RELEASE operation")
                answers.append((d, result))
            conn.execute("COMMIT")
            self.commits += 1
            return answers
        except Exception as e:
            if self._conn is not None:
                try:
                    self._conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            if _storage_fault(e):
                return [self._run_one(*item) for item in batch]
            failure = Failure()   # not expected: every caller hears of it rather than waiting forever
            return [(item[3], failure) for item in batch]

    def _in_thread(self, operation: Callable[..., Any], args: tuple, kw: dict) -> Any:
        try:
            if self._conn is None:
                self._conn = connect(self.path)
            return transaction(self._conn, operation, *args, **kw)
        except (sqlite3.OperationalError, sqlite3.DatabaseError, OSError, StoreError) as e:
            if not _storage_fault(e):
                raise  # a bug or a constraint: not the storage's fault
            log.error("database write failed, answering 503: {error}", error=str(e))
            raise StorageUnavailable(f"storage unavailable: {e}") from None


def _answer(answers: list[tuple[Deferred, Any]]) -> None:
    """On the reactor: fire each caller's Deferred with its result or Failure."""
    for d, result in answers:
        if isinstance(result, Failure):
            d.errback(result)
        else:
            d.callback(result)
