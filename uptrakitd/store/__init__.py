"""The data-access package: every SQL statement of uptrakitd lives here.

The interface the rest of the daemon uses is small, so that another engine can sit beside SQLite:

- `Store.run(operation, *args) -> Deferred`: run `operation(conn, *args)` in the store's one
  thread, inside one transaction (committed when it returns, rolled back when it raises); fires
  with its result. Nothing touches the database on the reactor thread.
- `Store.start()`, `Store.close()`: the thread's lifetime (the service tree calls them).
- Start-up, before the reactor runs: `open_database(data_dir, url)` gives a connection and
  `transaction(conn, operation, *args)` runs an operation on it synchronously.
- Engines: SQLite in the data dir (`database.py`, the default) or PostgreSQL (`postgresql.py`, when
  `--database postgresql://…` is given); `make_store` picks the Store. What both share is in `common.py`:
  the migration runner, `transaction`, the one-thread Store with group commit, `DuplicateRow` (a taken
  unique key, whatever the engine calls it). A connection carries its `Engine`, the little that differs
  (schema version, statement splitting, the migration and start-up locks, which errors are faults, the
  write probe): nothing above store/ names an engine.

An *operation* is a function from the query modules (`settings`, `ca_generations`, `certificates`,
`services`, `tokens`) or a composition of them written by a domain module. `conn` is a DB-API
connection that takes `?` parameters and returns rows addressable by column name.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol

from twisted.internet.defer import Deferred

from . import common, database, postgresql
from .common import (Connection, DuplicateRow, StoreError, migrate, migrations, read_probe, schema_version,
                     transaction, write_probe)
from .database import SqliteStore, backup_path, connect
from .postgresql import PgConnection, PostgresStore


def sqlite_path(data_dir: Path) -> Path:
    """Where the embedded database lives."""
    return data_dir / "uptrakit.sqlite3"


def open_database(data_dir: Path, url: str | None = None, controller_id: str | None = None) -> Any:
    """The start-up connection: PostgreSQL when `url` is given (its writes noted in the change log as
    `controller_id`'s), else SQLite in `data_dir`; migrated."""
    if url:
        return common.open_and_migrate(postgresql.connect(url, controller_id), common.safe_url(url))
    path = sqlite_path(data_dir)
    return common.open_and_migrate(database.connect(path), str(path))


def open_and_migrate(path: Path) -> Any:
    """The SQLite database at `path`, migrated (tools and tests that name the file)."""
    return common.open_and_migrate(database.connect(path), str(path))


def make_store(data_dir: Path, url: str | None, reactor: Any, controller_id: str = "") -> SqliteStore | PostgresStore:
    """The daemon's Store for the configured engine (PostgreSQL: its writes noted as `controller_id`'s)."""
    if url:
        return PostgresStore(url, reactor, controller_id)
    return SqliteStore(sqlite_path(data_dir), reactor)


class Store(Protocol):
    """What the daemon needs of a database (SqliteStore is the implementation; see the module docstring)."""

    def run(self, operation: Callable[..., Any], *args: Any, **kw: Any) -> Deferred: ...

    def start(self) -> None: ...

    def close(self) -> None: ...


__all__ = ["Connection", "DuplicateRow", "PgConnection", "PostgresStore", "SqliteStore", "Store", "StoreError", "backup_path", "connect", "make_store",
           "migrate", "migrations", "open_and_migrate", "open_database", "read_probe", "schema_version", "sqlite_path", "transaction",
           "write_probe"]
