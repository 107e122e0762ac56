"""What both engines share: the migration runner, the transaction helper, and the Store that runs operations in
one thread of its own with group commit. What differs between SQLite and PostgreSQL is an `Engine` (one small
object per engine, in database.py and postgresql.py), reached through the connection (`conn.engine`): nothing
here, and nothing above store/, names an engine.
"""
from __future__ import annotations

import contextlib
import re
import threading
from importlib import resources
from typing import Any, Callable, Iterator, Protocol

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from ..errors import StorageUnavailable

log = Logger()
_MIGRATION_NAME = re.compile(r"^(\d{3})-[a-z0-9-]+\.sql$")
Migration = tuple[int, str, str]


class StoreError(Exception):
    """The database cannot be opened or migrated."""


class DuplicateRow(Exception):
    """An operation wrote a row whose key is taken (a unique constraint): e.g. another controller made it first."""


class Engine:
    """What one database engine does its own way."""

    name = ""
    schema_folder = "schema"
    begin = "BEGIN"
    drop_connection_on_fault = False   # a fault may have broken the connection: open a new one next time

    def schema_version(self, conn: Any) -> int:
        raise NotImplementedError

    def record_version(self, conn: Any, version: int) -> None:
        raise NotImplementedError

    def statements(self, sql: str) -> list[str]:
        raise NotImplementedError

    def migration_lock(self, conn: Any) -> contextlib.AbstractContextManager[None]:
        """Held while migrating (several controllers may start together)."""
        return contextlib.nullcontext()

    def before_migrating(self, conn: Any, current: int) -> None:
        """A database at schema `current` (> 0) is about to change."""

    def serialize(self, conn: Any, name: str) -> None:
        """Inside a transaction: transactions that call this with the same `name` run one after the other (the
        audit trail's head). SQLite's write transactions already do."""

    def startup_lock(self, conn: Any) -> None:
        """Held by a start-up connection until it closes, so that controllers starting together on one database
        start one after the other (SQLite: the data dir's lock does that already)."""

    def is_duplicate(self, error: BaseException) -> bool:
        raise NotImplementedError

    def is_fault(self, error: BaseException) -> bool:
        """The storage failed (not a bug, a constraint, or the operation's own refusal)."""
        raise NotImplementedError

    def write_probe(self, conn: Any, now: int) -> None:
        """A write the database must accept (readiness): one row rewritten with 8 KiB of fresh bytes."""
        raise NotImplementedError


def migrations(folder: str = "schema") -> list[Migration]:
    """All schema files of `folder` (`schema`: SQLite, `schema_postgresql`) as (version, name, sql), in order."""
    found = []
    for entry in resources.files("uptrakitd.store").joinpath(folder).iterdir():
        m = _MIGRATION_NAME.match(entry.name)
        if m:
            found.append((int(m.group(1)), entry.name, entry.read_text("utf-8")))
    found.sort()
    return found


def migrate(conn: Any, known: list[Migration] | None = None) -> list[str]:
    """Apply pending migrations, each in its own transaction, under the engine's migration lock; returns the
    names applied. StoreError when the database is newer than this release or a migration fails."""
    engine: Engine = conn.engine
    known = migrations(engine.schema_folder) if known is None else known
    newest = known[-1][0] if known else 0
    applied = []
    with engine.migration_lock(conn):
        current = engine.schema_version(conn)
        if current > newest:
            raise StoreError(f"database schema version {current} is newer than this uptrakitd ({newest}); "
                             "refusing to run an older release against it")
        pending = [m for m in known if m[0] > current]
        if pending and current > 0:
            engine.before_migrating(conn, current)
        for version, name, sql in pending:
            try:
                transaction(conn, _apply, engine, version, sql)
            except StoreError:
                raise
            except Exception as e:
                raise StoreError(f"migration {name} failed: {str(e).strip()}") from None
            applied.append(name)
    return applied


def open_and_migrate(conn: Any, where: str) -> Any:
    """`conn` migrated, for the synchronous start-up phase (closed if migrating fails); `where` names the
    database in the log."""
    try:
        for name in migrate(conn):
            log.info("applied schema migration {name} to {database}", name=name, database=where)
    except BaseException:
        close_quietly(conn)
        raise
    return conn


def safe_url(url: str) -> str:
    """A database URL without its password, for logs and errors."""
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")).geturl()


def schema_version(conn: Any) -> int:
    """The schema version recorded in the database (0 for a new one)."""
    return int(conn.engine.schema_version(conn))


def read_probe(conn: Any) -> None:
    """A query the database must answer (readiness)."""
    conn.execute("SELECT COUNT(*) FROM ca_generations").fetchone()


def write_probe(conn: Any, now: int) -> None:
    """A write the database must accept (readiness), in the connection's engine's SQL."""
    conn.engine.write_probe(conn, now)


def _apply(conn: Any, engine: Engine, version: int, sql: str) -> None:
    for statement in engine.statements(sql):
        conn.execute(statement)
    engine.record_version(conn, version)


def transaction(conn: Any, operation: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """Run operation(conn, *args) in one transaction: committed when it returns, rolled back when it raises
    (a taken unique key as DuplicateRow)."""
    engine: Engine = conn.engine
    conn.execute(engine.begin)
    try:
        result = operation(conn, *args, **kw)
    except BaseException as e:
        _rollback(conn)
        if engine.is_duplicate(e):
            raise DuplicateRow(str(e).strip()) from e
        raise
    conn.execute("COMMIT")
    return result


def _rollback(conn: Any, to: str = "") -> None:
    with contextlib.suppress(Exception):   # a broken connection cannot roll back: the error that broke it counts
        conn.execute(f"ROLLBACK TO {to}" if to else "ROLLBACK")


def close_quietly(conn: Any) -> None:
    """Close a connection that may already be broken."""
    with contextlib.suppress(Exception):
        conn.close()


Queued = tuple[Callable[..., Any], tuple, dict, Deferred]


class Connection(Protocol):
    """A connection of either engine as the query modules use it: DB-API `execute` with `?` parameters, rows
    addressable by column name and position (`Row`); `engine` says what differs."""

    engine: Any

    def execute(self, sql: str, params: Any = ...) -> Any: ...

    def close(self) -> None: ...


class Row(tuple):
    """A result row addressable by column name and by position, like sqlite3.Row (dict(row) works), for a
    driver whose rows are not (psycopg)."""

    _index: dict[str, int]

    def __new__(cls, index: dict[str, int], values: Any) -> Row:
        row = super().__new__(cls, values)
        row._index = index
        return row

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return tuple.__getitem__(self, self._index[key])
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._index)


class OneThreadStore:
    """A Store whose operations all run in one thread of its own, in transactions, with group commit.

    Operations that arrive while a transaction commits are run together in the next one, each inside a
    SAVEPOINT of its own (one that raises is undone alone, as its own transaction would be), and every
    caller is answered after the COMMIT that made its write durable. A storage fault inside a batch rolls
    it back and runs its operations again one transaction each, so each caller sees what it would have
    alone. A fault answers 503 (StorageUnavailable); with an engine that says so, the connection is opened
    again for the next operation.
    """

    MAX_BATCH = 64

    def __init__(self, reactor: IReactorFromThreads) -> None:
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="uptrakitd-store")
        self._conn: Any = None
        self._closed = False
        self._queue: list[Queued] = []
        self._lock = threading.Lock()
        self._draining = False
        self.commits = 0   # transactions committed (tests, benchmarks)

    def _connect(self) -> Any:
        """A new connection (in the store thread)."""
        raise NotImplementedError

    def refusing(self) -> str | None:
        """Why no operation may run now (None: they may)."""
        return "the store is closed" if self._closed else None

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

    def _connection(self) -> Any:
        if self._conn is None:
            self._conn = self._connect()
        return self._conn

    def _fault(self, error: BaseException) -> bool:
        return isinstance(error, (OSError, StoreError)) or (
            self._conn is not None and self._conn.engine.is_fault(error))

    def _run_one(self, operation: Callable[..., Any], args: tuple, kw: dict, d: Deferred) -> tuple[Deferred, Any]:
        try:
            result = self._in_thread(operation, args, kw)
        except BaseException:
            return d, Failure()
        self.commits += 1
        return d, result

    def _in_thread(self, operation: Callable[..., Any], args: tuple, kw: dict) -> Any:
        try:
            return transaction(self._connection(), operation, *args, **kw)
        except Exception as e:
            if not self._fault(e):
                raise  # a bug, a constraint or the operation's own refusal: not the storage's fault
            self._after_fault(e)
            raise StorageUnavailable(f"storage unavailable: {self._describe(e)}") from None

    def _describe(self, error: BaseException) -> str:
        return str(error).strip()

    def _after_fault(self, error: BaseException) -> None:
        log.error("database operation failed, answering 503: {error}", error=str(error).strip())
        if self._conn is not None and self._conn.engine.drop_connection_on_fault:
            close_quietly(self._conn)
            self._conn = None

    def _run_batch(self, batch: list[Queued]) -> list[tuple[Deferred, Any]]:
        answers: list[tuple[Deferred, Any]] = []
        try:
            conn = self._connection()
            engine: Engine = conn.engine
            conn.execute(engine.begin)
            for operation, args, kw, d in batch:
                conn.execute("SAVEPOINT operation")
                try:
                    result: Any = operation(conn, *args, **kw)
                except Exception as e:
                    if self._fault(e):
                        raise
                    result = Failure(DuplicateRow(str(e).strip())) if engine.is_duplicate(e) else Failure()
                    _rollback(conn, "operation")
                conn.execute("RELEASE operation")
                answers.append((d, result))
            conn.execute("COMMIT")
            self.commits += 1
            return answers
        except Exception as e:
            if self._conn is not None:
                _rollback(self._conn)
            if self._fault(e):
                return [self._run_one(*item) for item in batch]
            failure = Failure()   # not expected: every caller hears of it rather than waiting forever
            return [(item[3], failure) for item in batch]


def _answer(answers: list[tuple[Deferred, Any]]) -> None:
    """On the reactor: fire each caller's Deferred with its result or Failure."""
    for d, result in answers:
        if isinstance(result, Failure):
            d.errback(result)
        else:
            d.callback(result)


def statements_split_on_semicolons(sql: str) -> Iterator[str]:
    """Statements of a migration written without semicolons inside literals (comment lines dropped)."""
    text = "\n".join(line for line in sql.splitlines() if not line.strip().startswith("--"))
    for statement in text.split(";"):
        if statement.strip():
            yield statement.strip()
