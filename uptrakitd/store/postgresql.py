"""PostgreSQL (`--database postgresql://…`): the same query modules, migrations under an advisory lock.

The query modules are written once, for DB-API connections that take `?` parameters and give rows
addressable by name and position (sqlite3's style). `PgConnection` lets a psycopg 3 connection be
used that way: `?` becomes `%s`, rows are `Row`s. The schema lives in `schema_postgresql/`, kept in
lockstep with `schema/` (same tables and columns; a test compares them).

Migrations run under `pg_advisory_lock`, so controllers starting together apply each one once. This
is one controller per database for now: the CA keys are still files in that controller's data dir
(a second controller finds generations whose key file it lacks and refuses to start).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterator, Sequence
from urllib.parse import urlsplit

from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger

from ..errors import StorageUnavailable
from . import database
from .database import OneThreadStore, StoreError, close_quietly

log = Logger()
MIGRATION_LOCK = 0x7570_7472_616B_6974 & 0x7FFF_FFFF_FFFF_FFFF   # "uptrakit": pg_advisory_lock's bigint key
CONTROLLER_LOCK = MIGRATION_LOCK - 1                               # held by the active controller


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise StoreError("--database postgresql://… needs psycopg: pip install 'uptrakitd[postgresql]'") from None
    return psycopg


def safe_url(url: str) -> str:
    """The URL without its password, for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return parts._replace(netloc=netloc).geturl()


class Row(tuple):
    """A result row addressable by column name and by position, like sqlite3.Row (dict(row) works)."""

    _index: dict[str, int]

    def __new__(cls, index: dict[str, int], values: Sequence[Any]) -> Row:
        row = super().__new__(cls, values)
        row._index = index
        return row

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return tuple.__getitem__(self, self._index[key])
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._index)


def _rows(cursor: Any) -> Callable[[Sequence[Any]], Row]:
    index = {column.name: i for i, column in enumerate(cursor.description or ())}
    return lambda values: Row(index, values)


class PgConnection:
    """A psycopg connection spoken to in the query modules' style (`?` parameters, Row results)."""

    def __init__(self, conn: Any) -> None:
        self.raw = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        cursor = self.raw.cursor(row_factory=_rows)
        cursor.execute(sql.replace("%", "%%").replace("?", "%s"), tuple(params))
        return cursor

    def close(self) -> None:
        self.raw.close()


def connect(url: str) -> PgConnection:
    """A connection in autocommit mode (transactions are explicit), or StoreError."""
    psycopg = _psycopg()
    try:
        return PgConnection(psycopg.connect(url, autocommit=True, connect_timeout=10))
    except psycopg.Error as e:
        raise StoreError(f"cannot connect to {safe_url(url)}: {str(e).strip()}") from None


def migrations() -> list[tuple[int, str, str]]:
    """The PostgreSQL schema files as (version, name, sql), in order."""
    return database.migrations("schema_postgresql")


def _statements(sql: str) -> Iterator[str]:
    text = "\n".join(line for line in sql.splitlines() if not line.strip().startswith("--"))
    for statement in text.split(";"):
        if statement.strip():
            yield statement.strip()


def schema_version(conn: PgConnection) -> int:
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = conn.execute("SELECT max(version) AS v FROM schema_version").fetchone()
    return int(row["v"] or 0)


def migrate(conn: PgConnection) -> list[str]:
    """Apply pending migrations, each in one transaction, holding the advisory lock; names applied."""
    psycopg = _psycopg()
    known = migrations()
    newest = known[-1][0]
    applied = []
    conn.execute("SELECT pg_advisory_lock(?)", (MIGRATION_LOCK,))
    try:
        current = schema_version(conn)
        if current > newest:
            raise StoreError(f"database schema version {current} is newer than this uptrakitd ({newest}); "
                             "refusing to run an older release against it")
        for version, name, sql in known:
            if version <= current:
                continue
            try:
                with conn.raw.transaction():
                    for statement in _statements(sql):
                        conn.execute(statement)
                    conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
            except psycopg.Error as e:
                raise StoreError(f"migration {name} failed: {str(e).strip()}") from None
            applied.append(name)
    finally:
        conn.execute("SELECT pg_advisory_unlock(?)", (MIGRATION_LOCK,))
    return applied


def open_and_migrate(url: str) -> PgConnection:
    """Connect and migrate, for the synchronous start-up phase."""
    conn = connect(url)
    try:
        for name in migrate(conn):
            log.info("applied schema migration {name} to {database}", name=name, database=safe_url(url))
    except BaseException:
        conn.close()
        raise
    return conn


def transaction(conn: PgConnection, operation: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """Run operation(conn, *args) in one transaction: committed when it returns, rolled back when it raises."""
    with conn.raw.transaction():
        return operation(conn, *args, **kw)


def write_probe(conn: PgConnection, now: int) -> None:
    """database.write_probe for PostgreSQL: one row rewritten with 8 KiB of fresh bytes."""
    conn.execute("INSERT INTO health (id, checked_at, scratch) VALUES (1, ?, decode(repeat(md5(random()::text), "
                 "512), 'hex')) ON CONFLICT (id) DO UPDATE SET checked_at = excluded.checked_at, "
                 "scratch = excluded.scratch", (now,))


class ControllerLock:
    """One active controller per database, for now: a session advisory lock on a connection of its own.

    Several controllers would each keep their own copy of the records in memory with nothing to keep the
    copies in step yet; the lock makes a second one refuse to start instead. It is released when the
    controller stops or dies (PostgreSQL drops a dead session's locks), so a standby can then start.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: PgConnection | None = None

    def acquire(self, wait: bool = False, poll_seconds: float = 1.0,
                waiting: Callable[[str], None] | None = None, grace_seconds: float = 5.0) -> None:
        """Take the lock; without `wait`, StoreError when another controller holds it after `grace_seconds`.

        With `wait` (a standby): try again every `poll_seconds` (reconnecting when the database goes
        away meanwhile) until the active controller stops or dies and PostgreSQL drops its lock.
        `waiting(status)` is called on every try: start-up runs before twistd's logging, so it is how a
        standby says what it does (stderr, and systemd's STATUS with a longer start timeout).
        """
        say = waiting or (lambda status: None)
        grace_until = time.monotonic() + grace_seconds
        told = False
        while True:
            try:
                conn = connect(self.url)
                row = conn.execute("SELECT pg_try_advisory_lock(?) AS locked", (CONTROLLER_LOCK,)).fetchone()
            except (StoreError, _psycopg().Error) as e:
                if not wait:
                    raise StoreError(str(e)) from None
                say(f"standby: cannot reach {safe_url(self.url)} ({str(e).strip()}); trying again")
                time.sleep(poll_seconds)
                continue
            if row["locked"]:
                self._conn = conn
                if told:
                    say(f"standby: the active controller is gone; taking over {safe_url(self.url)}")
                return
            conn.close()
            # a controller that just stopped (a restart) may still hold it for a moment: PostgreSQL ends
            # its session shortly after the connection closes
            if not wait and time.monotonic() < grace_until:
                time.sleep(0.2)
                continue
            if not wait:
                raise StoreError(f"another controller is active on {safe_url(self.url)}: several active controllers "
                                 "on one database are not supported yet (start this one with --standby to take "
                                 "over when that one stops)")
            say(f"standby: another controller is active on {safe_url(self.url)}; waiting to take over")
            told = True
            time.sleep(poll_seconds)

    def take(self) -> PgConnection | None:
        """Hand the lock's session over (to the store, which then holds the lock by writing over it)."""
        conn, self._conn = self._conn, None
        return conn

    def release(self) -> None:
        if self._conn is not None:
            close_quietly(self._conn)
            self._conn = None


class LeadershipLost(StoreError):
    """Another controller holds the database's lock: this one must stop writing (and stop)."""


class PostgresStore(OneThreadStore):
    """The Store over one PostgreSQL connection used from one thread; reconnects after a failure.

    With a `lock` (the active controller's), the store writes over the very session that holds the
    advisory lock, and takes the lock again on every reconnect: if another controller took it while
    this one was cut off from the database, nothing is written and `on_lost()` is called (the daemon
    stops; under systemd it comes back as a standby). Two controllers never write at once.
    """

    def __init__(self, url: str, reactor: IReactorFromThreads, lock: ControllerLock | None = None,
                 on_lost: Callable[[], None] | None = None) -> None:
        super().__init__(reactor)
        self.url = url
        self._lock = lock
        self._on_lost = on_lost
        self._conn = lock.take() if lock is not None else None
        self.lost = False

    def refusing(self) -> str | None:
        return "this controller is no longer the active one" if self.lost else super().refusing()

    def _connect(self, grace_seconds: float = 5.0) -> PgConnection:
        conn = connect(self.url)
        if self._lock is None:
            return conn
        # our own previous session may hold the lock a moment longer (PostgreSQL has not noticed it died)
        until = time.monotonic() + grace_seconds
        while not conn.execute("SELECT pg_try_advisory_lock(?) AS locked", (CONTROLLER_LOCK,)).fetchone()["locked"]:
            if time.monotonic() >= until:
                conn.close()
                raise LeadershipLost("another controller took over the database while this one was cut off from it")
            time.sleep(0.2)
        return conn

    def _in_thread(self, operation: Callable[..., Any], args: tuple, kw: dict) -> Any:
        psycopg = _psycopg()
        try:
            if self._conn is None:
                self._conn = self._connect()
            return transaction(self._conn, operation, *args, **kw)
        except LeadershipLost as e:
            self.lost = True
            log.critical("{error}: stopping (nothing more is written)", error=str(e))
            if self._on_lost is not None:
                self._reactor.callFromThread(self._on_lost)
            raise StorageUnavailable("storage unavailable: this controller is no longer the active one") from None
        except (psycopg.OperationalError, psycopg.InterfaceError, StoreError) as e:
            # the connection is gone or unusable: drop it, so the next operation reconnects
            if self._conn is not None:
                close_quietly(self._conn)
                self._conn = None
            log.error("database operation failed, answering 503: {error}", error=str(e).strip())
            raise StorageUnavailable("storage unavailable: the database cannot be reached") from None
