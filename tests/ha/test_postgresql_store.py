"""`--database postgresql://…`: the daemon on a real PostgreSQL (Debian's, started here in a temp dir), the
schema in lockstep with SQLite's, migrations under the advisory lock, and an outage answered with 503."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from uptrakitd.config import ConfigError, build_settings
from uptrakitd.pki.serials import format_serial
from uptrakitd.store import common, database, postgresql

from ..helpers import enrolled_service, new_leaf, request_json, start_controller
from .postgres import PostgresCluster, kek_file, together


class PostgresqlStoreTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.cluster = PostgresCluster()   # about a second: initdb --no-sync, pg_ctl start
        self.addCleanup(self.cluster.destroy)

    def test_the_schemas_are_in_lockstep(self):
        lite = database.connect(Path(":memory:"))
        common.migrate(lite)
        tables = [r[0] for r in lite.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        expected = {t: [r[1] for r in lite.execute(f"PRAGMA table_info({t})")] for t in tables}
        conn = common.open_and_migrate(postgresql.connect(self.cluster.new_database()), "test")
        try:
            got: dict[str, list[str]] = {}
            for row in conn.execute("SELECT table_name, column_name FROM information_schema.columns "
                                    "WHERE table_schema = 'public' ORDER BY table_name, ordinal_position"):
                if row["table_name"] != "schema_version" and row["column_name"] != "rowid":
                    got.setdefault(row["table_name"], []).append(row["column_name"])
        finally:
            conn.close()
        self.assertEqual(got, expected)
        self.assertEqual(len(common.migrations()), len(common.migrations(postgresql.POSTGRES.schema_folder)))

    def test_controllers_starting_together_apply_each_migration_once(self):
        url = self.cluster.new_database()

        def start() -> list[str]:
            conn = postgresql.connect(url)
            try:
                return common.migrate(conn)
            finally:
                conn.close()
        results = together(start, 4)
        every = len(common.migrations(postgresql.POSTGRES.schema_folder))
        self.assertEqual(sorted(len(r) for r in results), [0, 0, 0, every], "exactly one applied the migrations")
        conn = postgresql.connect(url)
        versions = [r["version"] for r in conn.execute("SELECT version FROM schema_version ORDER BY version")]
        conn.close()
        self.assertEqual(versions, list(range(1, every + 1)))

    def test_a_url_that_is_not_postgresql_is_refused(self):
        kek = kek_file(self)
        with self.assertRaises(ConfigError) as caught:
            build_settings({"database": "mysql://root@db/uptrakit", "ca_key_encryption_key_file": kek})
        self.assertIn("postgresql://", str(caught.exception))
        with self.assertRaises(ConfigError) as caught:
            build_settings({"database": "postgresql:///uptrakit"})
        self.assertIn("--ca-key-encryption-key-file", str(caught.exception))
        sealed_sqlite = build_settings({"ca_key_encryption_key_file": kek})   # the embedded SQLite seals too
        self.assertEqual((sealed_sqlite.database, str(sealed_sqlite.ca_key_encryption_key_file)), (None, kek))

    @inlineCallbacks
    def test_the_daemon_keeps_its_records_in_postgresql(self):
        url, kek = self.cluster.new_database(), kek_file(self)
        tmp = self.mktemp()
        c = yield start_controller(self, tmp, database=url, ca_key_encryption_key_file=kek)
        service = yield enrolled_service(c, hostname="on-postgres")
        issued, _key, _leaf = yield new_leaf(c)
        status, body = yield request_json(c, "POST", f"/api/v1/certificates/{format_serial(issued.serial)}/revoke",
                                          {"reason": "keyCompromise"})
        self.assertEqual(status, 200, body)
        status, ready = yield request_json(c, "GET", "/readyz", token=None)
        self.assertEqual((status, ready["checks"]["database"]), (200, "ok"))
        self.assertFalse((c.settings.data_dir / "uptrakit.sqlite3").exists(), "nothing went to SQLite")
        self.assertEqual(list((c.settings.data_dir / "pki").glob("ca-*.key")), [], "the CA key is in the database")
        fingerprint = c.ca.state.active().fingerprint
        yield c.stopService()
        # another controller, with an empty data dir of its own (another host), starts from the database
        again = yield start_controller(self, database=url, ca_key_encryption_key_file=kek)
        self.assertEqual(again.ca.state.active().fingerprint, fingerprint)
        self.assertEqual(again.directory.get(service.id).hostname, "on-postgres")
        record = again.ca.state.records[issued.serial]
        self.assertEqual(record.reason, "keyCompromise")
        self.assertEqual(again.crls.current[1].entries, 1)
        generations = [r["generation"] for r in _rows(url, "SELECT generation FROM ca_generations")]
        self.assertEqual(generations, [1])

    @inlineCallbacks
    def test_an_outage_is_a_503_and_the_store_recovers_by_itself(self):
        cluster = self.cluster
        c = yield start_controller(self, database=cluster.new_database(), ca_key_encryption_key_file=kek_file(self))
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


class KeyEncryptionKeyTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.cluster = PostgresCluster()
        self.addCleanup(self.cluster.destroy)

    def boot(self, url: str, kek: str) -> Any:
        from uptrakitd.process.boot import boot
        booted = boot(build_settings({"data_dir": self.mktemp() + "/data", "database": url,
                                      "ca_key_encryption_key_file": kek}))
        booted.lock.release()
        return booted

    def test_the_key_encryption_key_is_required_and_can_be_rotated(self):
        import os
        from uptrakitd.process.boot import StartupError
        from uptrakitd.pki.keys import kek_id
        url = self.cluster.new_database()
        first, second = os.urandom(32), os.urandom(32)
        fingerprint = self.boot(url, kek_file(self, first)).state.active().fingerprint
        with self.assertRaises(StartupError) as caught:
            self.boot(url, kek_file(self, second))
        self.assertIn(f"sealed with key-encryption key {kek_id(first)}, which is not in", str(caught.exception))
        # rotation: the new key first, the old one second; at start the CA key is sealed again with the new one
        self.boot(url, kek_file(self, second, first))
        (row,) = _rows(url, "SELECT key_sealed FROM ca_generations")
        self.assertTrue(row["key_sealed"].startswith(f"v1:{kek_id(second)}:"))
        self.assertEqual(self.boot(url, kek_file(self, second)).state.active().fingerprint, fingerprint)
        loose = kek_file(self, second)
        os.chmod(loose, 0o644)
        with self.assertRaises(StartupError) as caught:
            self.boot(url, loose)
        self.assertIn("chmod 600", str(caught.exception))


def _rows(url: str, sql: str) -> list:
    conn = postgresql.connect(url)
    try:
        return list(conn.execute(sql))
    finally:
        conn.close()
