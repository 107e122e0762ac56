"""PostgreSQL (`--database postgresql://…`): its Engine, its connections and its Store.

`PgConnection` lets a psycopg 3 connection be used in the query modules' style (`?` parameters, rows by
name and position); the schema in `schema_postgresql/` is kept in lockstep with `schema/` (a test compares
them). Migrations and the first start run under advisory locks, so controllers starting together apply each
migration once and create one CA. Clustering (change feed, leadership) is uptrakitd.cluster's.
"""
from __future__ import annotations

import contextlib
import hashlib
from typing import Any, Callable, Iterator, Sequence

from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger

from .common import Engine, OneThreadStore, Row, StoreError, safe_url, statements_split_on_semicolons

log = Logger()
MIGRATION_LOCK = 0x7570_7472_616B_6974 & 0x7FFF_FFFF_FFFF_FFFF   # "uptrakit": pg_advisory_lock's bigint key
BOOT_LOCK = MIGRATION_LOCK - 2                                     # held while a controller starts


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise StoreError("--database postgresql://… needs psycopg: pip install 'uptrakitd[postgresql]'") from None
    return psycopg


class PostgresEngine(Engine):
    name = "postgresql"
    schema_folder = "schema_postgresql"
    drop_connection_on_fault = True   # a lost connection stays lost: the next operation reconnects

    def schema_version(self, conn: Any) -> int:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = conn.execute("SELECT max(version) AS v FROM schema_version").fetchone()
        return int(row["v"] or 0)

    def record_version(self, conn: Any, version: int) -> None:
        conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))

    def statements(self, sql: str) -> list[str]:
        return list(statements_split_on_semicolons(sql))

    @contextlib.contextmanager
    def migration_lock(self, conn: Any) -> Iterator[None]:
        """pg_advisory_lock: controllers starting together apply each migration once."""
        conn.execute("SELECT pg_advisory_lock(?)", (MIGRATION_LOCK,))
        try:
            yield
        finally:
            conn.execute("SELECT pg_advisory_unlock(?)", (MIGRATION_LOCK,))

    def serialize(self, conn: Any, name: str) -> None:
        key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") & 0x7FFF_FFFF_FFFF_FFFF
        conn.execute("SELECT pg_advisory_xact_lock(?)", (key,))

    def startup_lock(self, conn: Any) -> None:
        """Controllers starting together on an empty database boot one after the other (the first creates the
        CA, the next ones load it): held until the start-up connection closes."""
        conn.execute("SELECT pg_advisory_lock(?)", (BOOT_LOCK,))

    def is_duplicate(self, error: BaseException) -> bool:
        return isinstance(error, _psycopg().errors.UniqueViolation)

    def is_fault(self, error: BaseException) -> bool:
        return isinstance(error, (_psycopg().OperationalError, _psycopg().InterfaceError, StoreError))

    def write_probe(self, conn: Any, now: int) -> None:
        conn.execute("INSERT INTO health (id, checked_at, scratch) VALUES (1, ?, decode(repeat(md5(random()::text), "
                     "512), 'hex')) ON CONFLICT (id) DO UPDATE SET checked_at = excluded.checked_at, "
                     "scratch = excluded.scratch", (now,))


POSTGRES = PostgresEngine()


def _rows(cursor: Any) -> Callable[[Sequence[Any]], Row]:
    index = {column.name: i for i, column in enumerate(cursor.description or ())}
    return lambda values: Row(index, values)


class PgConnection:
    """A psycopg connection spoken to in the query modules' style (`?` parameters, Row results).

    With a `controller_id` (the controller's id), writes through it append to the change log (changes.py)."""

    engine: Engine = POSTGRES

    def __init__(self, conn: Any, controller_id: str | None = None) -> None:
        self.raw = conn
        self.controller_id = controller_id
        self.records_changes = controller_id is not None

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        cursor = self.raw.cursor(row_factory=_rows)
        cursor.execute(sql.replace("%", "%%").replace("?", "%s"), tuple(params))
        return cursor

    def close(self) -> None:
        self.raw.close()



def connect(url: str, controller_id: str | None = None) -> PgConnection:
    """A connection in autocommit mode (transactions are explicit), or StoreError; see PgConnection for `controller_id`."""
    psycopg = _psycopg()
    try:
        return PgConnection(psycopg.connect(url, autocommit=True, connect_timeout=10), controller_id)
    except psycopg.Error as e:
        raise StoreError(f"cannot connect to {safe_url(url)}: {str(e).strip()}") from None


class PostgresStore(OneThreadStore):
    """The Store over one PostgreSQL connection used from one thread (group commit as SQLite's); reconnects
    after a failure. Its writes carry `controller_id` into the change log, which the other controllers apply."""

    def __init__(self, url: str, reactor: IReactorFromThreads, controller_id: str) -> None:
        super().__init__(reactor)
        self.url = url
        self.controller_id = controller_id

    def _connect(self) -> Any:
        return connect(self.url, self.controller_id)

    def _describe(self, error: BaseException) -> str:
        return "the database cannot be reached"

