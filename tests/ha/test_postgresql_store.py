"""`--database postgresql://…`: the daemon on a real PostgreSQL (Debian's, started here in a temp dir), the
schema in lockstep with SQLite's, migrations under the advisory lock, and an outage answered with 503."""
from __future__ import annotations

import sqlite3
import threading

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from uptrakitd.config import ConfigError, build_settings
from uptrakitd.pki.serials import format_serial
from uptrakitd.store import database, postgresql

from ..helpers import enrolled_service, new_leaf, request_json, start_controller
from .postgres import PostgresCluster


class PostgresqlStoreTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.cluster = PostgresCluster()   # about a second: initdb --no-sync, pg_ctl start
        self.addCleanup(self.cluster.destroy)

    def test_the_schemas_are_in_lockstep(self):
        lite = sqlite3.connect(":memory:")
        database.migrate(lite)
        tables = [r[0] for r in lite.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        expected = {t: [r[1] for r in lite.execute(f"PRAGMA table_info({t})")] for t in tables}
        conn = postgresql.open_and_migrate(self.cluster.new_database())
        try:
            got: dict[str, list[str]] = {}
            for row in conn.execute("SELECT table_name, column_name FROM information_schema.columns "
                                    "WHERE table_schema = 'public' ORDER BY table_name, ordinal_position"):
                if row["table_name"] != "schema_version" and row["column_name"] != "rowid":
                    got.setdefault(row["table_name"], []).append(row["column_name"])
        finally:
            conn.close()
        self.assertEqual(got, expected)
        self.assertEqual(len(database.migrations()), len(postgresql.migrations()))

    def test_controllers_starting_together_apply_each_migration_once(self):
        url = self.cluster.new_database()
        results, errors = [], []

        def start() -> None:
            try:
                conn = postgresql.connect(url)
                results.append(postgresql.migrate(conn))
                conn.close()
            except Exception as e:   # reported below
                errors.append(e)
        threads = [threading.Thread(target=start) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        self.assertEqual(errors, [])
        self.assertEqual(sorted(len(r) for r in results), [0, 0, 0, 2], "exactly one applied both migrations")
        conn = postgresql.connect(url)
        versions = [r["version"] for r in conn.execute("SELECT version FROM schema_version ORDER BY version")]
        conn.close()
        self.assertEqual(versions, [1, 2])

    def test_a_url_that_is_not_postgresql_is_refused(self):
        with self.assertRaises(ConfigError) as caught:
            build_settings({"database": "mysql://root@db/uptrakit"})
        self.assertIn("postgresql://", str(caught.exception))

    @inlineCallbacks
    def test_the_daemon_keeps_its_records_in_postgresql(self):
        url = self.cluster.new_database()
        tmp = self.mktemp()
        c = yield start_controller(self, tmp, database=url)
        service = yield enrolled_service(c, hostname="on-postgres")
        issued, _key, _leaf = yield new_leaf(c)
        status, body = yield request_json(c, "POST", f"/api/v1/certificates/{format_serial(issued.serial)}/revoke",
                                          {"reason": "keyCompromise"})
        self.assertEqual(status, 200, body)
        status, ready = yield request_json(c, "GET", "/readyz", token=None)
        self.assertEqual((status, ready["checks"]["database"]), (200, "ok"))
        self.assertFalse((c.settings.data_dir / "uptrakit.sqlite3").exists(), "nothing went to SQLite")
        yield c.stopService()
        # a new process on the same data dir and database sees everything that was acknowledged
        again = yield start_controller(self, tmp, database=url)
        self.assertEqual(again.directory.get(service.id).hostname, "on-postgres")
        record = again.ca.state.records[issued.serial]
        self.assertEqual(record.reason, "keyCompromise")
        self.assertEqual(again.crls.current[1].entries, 1)
        generations = [r["generation"] for r in _rows(url, "SELECT generation FROM ca_generations")]
        self.assertEqual(generations, [1])

    @inlineCallbacks
    def test_an_outage_is_a_503_and_the_store_recovers_by_itself(self):
        cluster = self.cluster
        c = yield start_controller(self, database=cluster.new_database())
        status, body = yield request_json(c, "POST", "/api/v1/enrollment-tokens", {"name": "before"})
        self.assertEqual(status, 201, body)
        cluster.stop()
        status, body = yield request_json(c, "POST", "/api/v1/enrollment-tokens", {"name": "during"})
        self.assertEqual((status, body["code"]), (503, "storage_unavailable"))
        status, ready = yield request_json(c, "GET", "/readyz", token=None)
        self.assertEqual(status, 503)
        # reads from memory keep working: the CA bundle, OCSP, identity
        status, _ = yield request_json(c, "GET", "/api/v1/settings/pki")
        self.assertEqual(status, 200)
        cluster.start()
        status, body = yield request_json(c, "POST", "/api/v1/enrollment-tokens", {"name": "after"})
        self.assertEqual(status, 201, body)
        status, listed = yield request_json(c, "GET", "/api/v1/enrollment-tokens")
        self.assertEqual([t["name"] for t in listed["tokens"]], ["before", "after"])


def _rows(url: str, sql: str) -> list:
    conn = postgresql.connect(url)
    try:
        return list(conn.execute(sql))
    finally:
        conn.close()


class OneControllerPerDatabaseTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_a_second_controller_on_the_same_database_refuses_to_start(self):
        from uptrakitd.boot import StartupError, boot
        cluster = PostgresCluster()
        self.addCleanup(cluster.destroy)
        url = cluster.new_database()
        yield start_controller(self, database=url)
        other = self.mktemp()
        with self.assertRaises(StartupError) as caught:
            boot(build_settings({"data_dir": other + "/data", "database": url}))
        self.assertIn("several controllers on one database are not supported yet", str(caught.exception))
