"""Store: migrations apply once, in order, and refuse a newer schema."""
from __future__ import annotations

from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
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
        self.assertEqual(store.migrate(conn, later),   # the copy goes to backup_path(path, version)
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


class GroupCommitTests(TestCase):
    """Writes that arrive together share a commit; each is still its own unit of success or failure."""

    @inlineCallbacks
    def setUp(self):
        d = Path(self.mktemp())
        d.mkdir()
        self.path = d / "t.sqlite3"
        store.open_and_migrate(self.path).close()
        self.s = store.SqliteStore(self.path, reactor)
        self.s.start()
        self.addCleanup(self.s.close)
        yield self.s.run(lambda c: None)

    def stored(self) -> dict[str, str]:
        other = store.connect(self.path)
        try:
            return {k: v for k, v in other.execute("SELECT key, value FROM settings")}
        finally:
            other.close()

    @inlineCallbacks
    def test_many_writes_at_once_share_commits_and_all_land(self):
        def put(c, i):
            c.execute("INSERT INTO settings (key, value) VALUES (?, ?)", (f"k{i}", str(i)))
            return i
        before = self.s.commits
        results = yield gatherResults([self.s.run(put, i) for i in range(200)])
        self.assertEqual(results, list(range(200)))
        self.assertEqual(self.stored(), {f"k{i}": str(i) for i in range(200)})
        self.assertLess(self.s.commits - before, 200 // 4, "fewer commits than writes")

    @inlineCallbacks
    def test_one_failing_write_is_undone_alone(self):
        def put(c, key):
            c.execute("INSERT INTO settings (key, value) VALUES (?, '1')", (key,))

        def half_then_refuse(c):
            c.execute("INSERT INTO settings (key, value) VALUES ('half', '1')")
            raise ValueError("refused after writing")
        yield self.s.run(put, "taken")
        before = self.s.commits
        calls = [self.s.run(put, "a"), self.s.run(put, "taken"), self.s.run(half_then_refuse), self.s.run(put, "b")]
        outcomes = yield gatherResults([d.addCallbacks(lambda _: "ok", lambda f: f.type) for d in calls])
        self.assertEqual(outcomes, ["ok", store.DuplicateRow, ValueError, "ok"])   # a taken key, engine-neutral
        self.assertEqual(set(self.stored()), {"taken", "a", "b"}, "the refused writes left nothing behind")
        self.assertLess(self.s.commits - before, 4, "they were committed together")

    @inlineCallbacks
    def test_a_storage_fault_in_a_batch_fails_only_its_own_write(self):
        import sqlite3

        from uptrakitd.errors import StorageUnavailable

        def put(c, key):
            c.execute("INSERT INTO settings (key, value) VALUES (?, '1')", (key,))

        def disk_fails(c):
            c.execute("INSERT INTO settings (key, value) VALUES ('lost', '1')")
            raise sqlite3.OperationalError("disk I/O error")
        calls = [self.s.run(put, "a"), self.s.run(put, "b"), self.s.run(disk_fails), self.s.run(put, "c")]
        outcomes = yield gatherResults([d.addCallbacks(lambda _: "ok", lambda f: f.type) for d in calls])
        self.assertEqual(outcomes, ["ok", "ok", StorageUnavailable, "ok"])
        self.assertEqual(set(self.stored()), {"a", "b", "c"})
