"""The data-access package: every SQL statement of uptrakitd lives here.

The interface the rest of the daemon uses is small, so that another engine can sit beside SQLite:

- `Store.run(operation, *args) -> Deferred`: run `operation(conn, *args)` in the store's one
  thread, inside one transaction (committed when it returns, rolled back when it raises); fires
  with its result. Nothing touches the database on the reactor thread.
- `Store.start()`, `Store.close()`: the thread's lifetime (the service tree calls them).
- Start-up, before the reactor runs: `open_and_migrate(path)` gives a connection and
  `transaction(conn, operation, *args)` runs an operation on it synchronously.

An *operation* is a function from the query modules (`settings`, `ca_generations`, `certificates`,
`services`, `tokens`) or a composition of them written by a domain module. `conn` is a DB-API
connection that takes `?` parameters and returns rows addressable by column name.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

from twisted.internet.defer import Deferred

from .database import (SqliteStore, StoreError, backup_path, connect, migrate, migrations, open_and_migrate,
                       read_probe, schema_version, transaction, write_probe)


class Store(Protocol):
    """What the daemon needs of a database (SqliteStore is the implementation; see the module docstring)."""

    def run(self, operation: Callable[..., Any], *args: Any, **kw: Any) -> Deferred: ...

    def start(self) -> None: ...

    def close(self) -> None: ...


__all__ = ["SqliteStore", "Store", "StoreError", "backup_path", "connect", "migrate", "migrations", "open_and_migrate",
           "read_probe", "schema_version", "transaction", "write_probe"]
