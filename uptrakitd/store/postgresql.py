"""PostgreSQL (`--database postgresql://…`): the same query modules, migrations under an advisory lock.

The query modules are written once, for DB-API connections that take `?` parameters and give rows
addressable by name and position (sqlite3's style). `PgConnection` lets a psycopg 3 connection be
used that way: `?` becomes `%s`, rows are `Row`s. The schema lives in `schema_postgresql/`, kept in
lockstep with `schema/` (same tables and columns; a test compares them).

Migrations run under `pg_advisory_lock`, so controllers starting together apply each one once.
Several controllers share one database, all active: what one changes reaches the others through the
change log (`ChangeFeed`), and the jobs that must run once per database run on the `Leadership` holder.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Iterator, Sequence
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import blockingCallFromThread
from twisted.logger import Logger

from ..errors import StorageUnavailable
from . import changes, database
from .database import OneThreadStore, StoreError, close_quietly

log = Logger()
MIGRATION_LOCK = 0x7570_7472_616B_6974 & 0x7FFF_FFFF_FFFF_FFFF   # "uptrakit": pg_advisory_lock's bigint key
LEADER_LOCK = MIGRATION_LOCK - 1                                   # held by the controller that runs the periodic jobs
BOOT_LOCK = MIGRATION_LOCK - 2                                     # held while a controller starts


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
    """A psycopg connection spoken to in the query modules' style (`?` parameters, Row results).

    With an `origin` (the controller's id), writes through it append to the change log (changes.py)."""

    def __init__(self, conn: Any, origin: str | None = None) -> None:
        self.raw = conn
        self.origin = origin
        self.records_changes = origin is not None

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        cursor = self.raw.cursor(row_factory=_rows)
        cursor.execute(sql.replace("%", "%%").replace("?", "%s"), tuple(params))
        return cursor

    def close(self) -> None:
        self.raw.close()


def connect(url: str, origin: str | None = None) -> PgConnection:
    """A connection in autocommit mode (transactions are explicit), or StoreError; see PgConnection for `origin`."""
    psycopg = _psycopg()
    try:
        return PgConnection(psycopg.connect(url, autocommit=True, connect_timeout=10), origin)
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


def open_and_migrate(url: str, origin: str | None = None) -> PgConnection:
    """Connect and migrate, for the synchronous start-up phase."""
    conn = connect(url, origin)
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


class Leadership:
    """Which controller runs the jobs that must run once per database (automatic CA rotation, pruning
    the change log, releasing dead controllers' services): the one whose session holds an advisory
    lock. Every controller serves, issues and revokes; only these jobs must not run twice. PostgreSQL
    drops a dead controller's session, and its lock with it, so another one takes over at its next
    `check()` (every 2 s). Every check also refreshes this controller's row in `controllers`."""

    def __init__(self, url: str, controller: str, hostname: str, started_at: int,
                 ca_generation: Callable[[], int] = lambda: 0) -> None:
        self.url = url
        self.ca_generation = ca_generation   # the active CA generation (its TLS context trusts it)
        self.controller = controller
        self.hostname = hostname
        self.started_at = started_at
        self._conn: PgConnection | None = None
        self.leader = False
        self._lock = threading.Lock()   # check() and release() run in threads and share the session
        self._released = False

    def check(self) -> bool:
        """Keep or try to take the lock (blocking: run it in a thread); True while this controller leads."""
        with self._lock:
            return self._check() if not self._released else False

    def _check(self) -> bool:
        from . import controllers
        try:
            if self._conn is None:
                self._conn = connect(self.url, self.controller)
            if not self.leader and self._conn.execute("SELECT pg_try_advisory_lock(?) AS locked",
                                                      (LEADER_LOCK,)).fetchone()["locked"]:
                self.leader = True
                log.info("this controller is now the leader: it runs the jobs that run once per database")
            now = int(time.time())
            # a live session means the lock is still ours
            transaction(self._conn, controllers.heartbeat, self.controller, self.hostname, self.started_at, now,
                        self.leader, self.ca_generation())
            if self.leader:
                for dead in transaction(self._conn, controllers.clear_dead, now):
                    log.info("controller {controller} was not seen for {seconds} s: its services are released",
                             controller=dead, seconds=controllers.DEAD_AFTER_SECONDS)
        except Exception as e:   # the database is away: whoever holds the lock when it is back leads
            if self._conn is not None:
                close_quietly(self._conn)
                self._conn = None
            if self.leader:
                log.warn("lost the database session that made this controller the leader: {error}",
                         error=str(e).strip())
            self.leader = False
        return self.leader

    def release(self) -> None:
        """At stop: leave the controllers' table and give the lock up (another leads within its next check)."""
        from . import controllers
        with self._lock:
            self._released = True
            if self._conn is not None:
                try:
                    transaction(self._conn, controllers.leave, self.controller)
                except Exception as e:
                    log.warn("could not remove this controller's row: {error}", error=str(e).strip())
                close_quietly(self._conn)
                self._conn = None
            self.leader = False


class ChangeFeed:
    """Applies what other controllers on the database changed (store/changes.py), in commit order.

    A thread LISTENs for `uptrakit_changes` and, on a notification or after a second without one,
    reads the change rows after the last it applied and hands them to `apply` on the reactor, waiting
    for it. Rows are read again from a little before the last one (`WINDOW`), so a transaction that took
    its sequence number earlier but committed later is not skipped. The controller's own changes are
    already in its memory and are not applied again.
    """

    WINDOW = 200
    BATCH = 1000

    def __init__(self, url: str, reactor: Any, after: int, origin: str,
                 apply: Callable[[list[Any]], Any], confirm: Callable[[float], None] = lambda started: None) -> None:
        self.url = url
        self.confirm = confirm   # ClusterFreshness.confirm: every change committed before `started` is applied
        self.reactor = reactor
        self.last = after
        self.origin = origin
        self.apply = apply
        self._seen: set[int] = set()
        self._running = False
        self._stopped: Deferred | None = None

    def start(self) -> None:
        self._running = True
        self._stopped = Deferred()
        threading.Thread(target=self._loop, name="uptrakitd-change-feed", daemon=True).start()

    def stop(self) -> Deferred | None:
        """Stop reading; fires when the thread is done (within about a second)."""
        self._running = False
        return self._stopped

    def _loop(self) -> None:
        conn: PgConnection | None = None
        failed = False
        try:
            while self._running:
                try:
                    if conn is None:
                        conn = connect(self.url)
                        conn.execute(f"LISTEN {changes.CHANNEL}")
                        if failed:
                            log.info("change feed: reconnected; reading what was missed")
                            failed = False
                    started = time.time()
                    rows = changes.since(conn, max(0, self.last - self.WINDOW), self.BATCH)
                    fresh = [c for c in rows if c.seq not in self._seen]
                    theirs = [c for c in fresh if c.origin != self.origin]
                    done = len(theirs)
                    if theirs and self._running:
                        done = blockingCallFromThread(self.reactor, self.apply, theirs)
                    # what was dealt with is done; from the first change that was not, read again
                    until = theirs[done].seq if done < len(theirs) else None
                    for c in fresh:
                        if until is not None and c.seq >= until:
                            break
                        self._seen.add(c.seq)
                        self.last = max(self.last, c.seq)
                    self._seen = {seq for seq in self._seen if seq > self.last - self.WINDOW}
                    if until is not None:
                        time.sleep(1.0)   # the database is away for the store too: give it a moment
                    elif len(rows) < self.BATCH:
                        self.confirm(started)
                        for _ in conn.raw.notifies(timeout=1.0, stop_after=1):
                            pass
                except Exception as e:
                    if not failed:
                        log.error("change feed: {error}; retrying every second", error=str(e).strip())
                    failed = True
                    if conn is not None:
                        close_quietly(conn)
                        conn = None
                    time.sleep(1.0)
        finally:
            if conn is not None:
                close_quietly(conn)
            stopped = self._stopped
            if stopped is not None:
                self.reactor.callFromThread(stopped.callback, None)


class PostgresStore(OneThreadStore):
    """The Store over one PostgreSQL connection used from one thread; reconnects after a failure.

    Its writes carry `origin` into the change log, which the other controllers apply (ChangeFeed).
    """

    def __init__(self, url: str, reactor: IReactorFromThreads, origin: str) -> None:
        super().__init__(reactor)
        self.url = url
        self.origin = origin
        self._conn: PgConnection | None = None

    def _in_thread(self, operation: Callable[..., Any], args: tuple, kw: dict) -> Any:
        psycopg = _psycopg()
        try:
            if self._conn is None:
                self._conn = connect(self.url, self.origin)
            return transaction(self._conn, operation, *args, **kw)
        except (psycopg.OperationalError, psycopg.InterfaceError, StoreError) as e:
            # the connection is gone or unusable: drop it, so the next operation reconnects
            if self._conn is not None:
                close_quietly(self._conn)
                self._conn = None
            log.error("database operation failed, answering 503: {error}", error=str(e).strip())
            raise StorageUnavailable("storage unavailable: the database cannot be reached") from None


def boot_lock(conn: PgConnection) -> None:
    """Held by a controller's start-up connection until it closes: controllers starting together on an
    empty database boot one after the other (the first creates the CA, the next ones load it)."""
    conn.execute("SELECT pg_advisory_lock(?)", (BOOT_LOCK,))
