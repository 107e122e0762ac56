"""Store: migrations apply once, in order, and refuse a newer schema."""
from __future__ import annotations

from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from uptrakitd import store


class MigrationTests(TestCase):
    def db(self) -> Path:
        d = Path(self.mktemp())
        d.mkdir()
        return d / "t.sqlite3"

    def test_fresh_database_gets_every_migration_once(self) -> None:
        path = self.db()
        conn = store.open_and_migrate(path)
        self.assertEqual(store.schema_version(conn), store.migrations()[-1][0])
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        self.assertTrue({"settings", "ca_generations", "services", "certificates", "admin_tokens",
                         "enrollment_tokens"} <= tables)
        self.assertEqual(conn.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        self.assertEqual(conn.execute("PRAGMA foreign_keys").fetchone()[0], 1)
        conn.close()
        conn = store.connect(path)
        self.assertEqual(store.migrate(conn), [])

    def test_newer_schema_is_refused(self) -> None:
        path = self.db()
        conn = store.open_and_migrate(path)
        conn.execute("PRAGMA user_version=999")
        conn.close()
        with self.assertRaises(store.StoreError) as cm:
            store.open_and_migrate(path)
        self.assertIn("newer", str(cm.exception))

    def test_failed_transaction_changes_nothing(self) -> None:
        conn = store.open_and_migrate(self.db())

        def boom(c):
            c.execute("INSERT INTO settings (key, value) VALUES ('a', '1')")
            raise RuntimeError("boom")
        self.assertRaises(RuntimeError, store.transaction, conn, boom)
        self.assertEqual(conn.execute("SELECT COUNT(*) FROM settings").fetchone()[0], 0)

    @inlineCallbacks
    def test_async_store_commits_durably(self) -> None:
        path = self.db()
        store.open_and_migrate(path).close()
        s = store.SqliteStore(path, reactor)
        s.start()
        self.addCleanup(s.close)
        yield s.run(lambda c: c.execute("INSERT INTO settings (key, value) VALUES ('k', '\"v\"')"))
        other = store.connect(path)
        self.assertEqual(other.execute("SELECT value FROM settings WHERE key='k'").fetchone()[0], '"v"')
        other.close()

    def test_a_copy_of_the_database_is_taken_before_it_is_migrated(self) -> None:
        path = self.db()
        conn = store.open_and_migrate(path)
        conn.execute("INSERT INTO settings (key, value) VALUES ('kept', '1')")
        version = store.schema_version(conn)
        later = store.migrations() + [(version + 1, f"{version + 1:03d}-extra.sql",
                                       "CREATE TABLE extra (id INTEGER PRIMARY KEY);")]
        self.assertEqual(store.migrate(conn, later, backup_to=store.backup_path(path, version)),
                         [f"{version + 1:03d}-extra.sql"])
        conn.close()
        copy = store.connect(store.backup_path(path, version))
        self.assertEqual(store.schema_version(copy), version)
        self.assertEqual(copy.execute("SELECT value FROM settings WHERE key = 'kept'").fetchone()[0], "1")
        self.assertIsNone(copy.execute("SELECT name FROM sqlite_master WHERE name = 'extra'").fetchone())
        copy.close()
        self.assertEqual(oct(store.backup_path(path, version).stat().st_mode & 0o777), "0o600")

    def test_a_new_database_needs_no_copy(self) -> None:
        path = self.db()
        store.open_and_migrate(path).close()
        self.assertFalse(store.backup_path(path, 0).exists())
