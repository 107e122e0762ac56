"""Backup and restore with PostgreSQL (issue 25, docs/deployment/backup.md): `uptrakitctl backup --database` is a
pg_dump taken in the snapshot its manifest was read in, with the restore marker added; `uptrakitctl restore
--database` loads it into an empty database, and the first controller that starts there moves the CRL numbers
on, as with SQLite."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from uptrakitd.restored import RESTORE_MARKER
from uptrakitd.store.common import migrations

from ..e2e.guides import Guide, standard_paths
from ..helpers import env, new_leaf, require_program, run, start_controller
from .postgres import PostgresCluster, kek_file


def ctl(*args: str) -> Any:
    return run(sys.executable, "-m", "uptrakitd.ctl", *args, env=env())


class PostgresqlBackupTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def test_backup_of_running_controllers_restores_into_an_empty_database(self) -> Any:
        require_program("pg_dump", "apt-get install postgresql-client")
        cluster = PostgresCluster()
        self.addCleanup(cluster.destroy)
        db, kek = cluster.new_database(), kek_file(self)
        a = yield start_controller(self, database=db, ca_key_encryption_key_file=kek)
        kept, _, _ = yield new_leaf(a)
        revoked, _, _ = yield new_leaf(a)
        yield a.ca.revoke(revoked.serial, "keyCompromise")
        archive, fresh = Path(self.mktemp()).resolve(), cluster.new_database()
        work = Path(self.mktemp()).resolve()
        work.mkdir()
        # docs/deployment/backup.md's PostgreSQL blocks, as written (placeholders and the venv's path filled)
        guide = Guide("backup", {"DATABASE_URL": db, "NEW_DATABASE_URL": fresh, "PG_BACKUP_FILE": archive,
                                 "BACKUP_FILE": "-", "CONTROLLER_PORT": "-", "ADMIN_TOKEN_FILE": "-"},
                      standard_paths(work), {}, work)
        _, out = yield guide.run("pg-backup")   # while a runs
        self.assertIn("its CA keys are sealed", out)
        from uptrakitd.ctl.backup import read_backup
        manifest, members = read_backup(archive)
        self.assertEqual((manifest["engine"], manifest["schema"], manifest["revoked"]), ("postgresql", migrations()[-1][0], 1))
        self.assertEqual(list(members), ["database.sql"])
        self.assertNotIn(b"BEGIN PRIVATE KEY", members["database.sql"], "sealed keys stay sealed")
        marker = yield a.store.run(lambda conn: conn.execute("SELECT 1 FROM settings WHERE key = ?",
                                                             (RESTORE_MARKER,)).fetchone())
        self.assertIsNone(marker, "the live database never holds the marker")
        served = {g: crl.number for g, crl in a.crls.current.items()}
        yield a.ca.revoke(kept.serial, "superseded")   # after the backup: lost with it

        _, err, code = yield ctl("restore", "--in", str(archive), "--database", db)
        self.assertEqual(code, 2)
        self.assertIn(b"the target database is not empty", err)
        _, err, code = yield ctl("restore", "--in", str(archive), "--data-dir", self.mktemp())
        self.assertEqual(code, 2)
        self.assertIn(b"it is a PostgreSQL backup, restore it with --database", err)
        yield guide.run("pg-restore")
        b = yield start_controller(self, database=fresh, ca_key_encryption_key_file=kek)
        self.assertEqual(b.ca.state.records[revoked.serial].reason, "keyCompromise")
        self.assertIsNone(b.ca.state.records[kept.serial].revoked_at)
        for generation, number in b.crls.current.items():
            self.assertGreater(number.number, served[generation] + 1_000_000)
        restored = yield b.store.run(lambda conn: [json.loads(r["details"]) for r in conn.execute(
            "SELECT details FROM audit_log WHERE action = 'controller.restored'").fetchall()])
        self.assertEqual([d["backup_id"] for d in restored], [manifest["backup_id"]])
        # the controllers of the backup's time are forgotten: only the live one lists itself
        from uptrakitd.store import controllers

        from ..helpers import wait_until
        yield wait_until(lambda: b.cluster.leader, timeout=10)
        listed = yield b.store.run(lambda conn: [r["id"] for r in controllers.load_all(conn)])
        self.assertEqual(listed, [b.cluster.controller_id])
        # a second controller joining the restored database is an ordinary start
        c = yield start_controller(self, database=fresh, ca_key_encryption_key_file=kek)
        again = yield c.store.run(lambda conn: conn.execute(
            "SELECT count(*) AS n FROM audit_log WHERE action = 'controller.restored'").fetchone()["n"])
        self.assertEqual(again, 1)
