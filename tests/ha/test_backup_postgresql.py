"""Backup and restore with PostgreSQL (issue 25, docs/deployment/backup.md): `uptrakitctl backup --database` is a
pg_dump taken in the snapshot its manifest was read in, with the restore marker added; `uptrakitctl restore
--database` loads it into an empty database, and the first controller that starts there moves the CRL numbers
on, as with SQLite."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from uptrakitd.process.restored import RESTORE_MARKER
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
        (work / "etc").mkdir(mode=0o700)
        shutil.copy(kek, work / "etc" / "kek")   # the guide's backup key is the controllers' KEK
        guide = Guide("backup", {"DATABASE_URL": db, "NEW_DATABASE_URL": fresh, "PG_BACKUP_FILE": archive,
                                 "BACKUP_FILE": "-", "CONTROLLER_URL": "-", "ADMIN_TOKEN_FILE": "-"},
                      dict(standard_paths(work), **{"/etc/uptrakitd": work / "etc"}), {}, work)
        _, out = yield guide.run("pg-backup")   # while a runs
        self.assertIn("its CA keys are sealed", out)
        from uptrakitd.ctl.backup import read_backup
        manifest, members = read_backup(archive, Path(kek))
        self.assertEqual((manifest["engine"], manifest["schema"], manifest["revoked"]), ("postgresql", migrations()[-1][0], 1))
        self.assertEqual(list(members), ["database.dump"])
        self.assertTrue(members["database.dump"].startswith(b"PGDMP"), "pg_dump's custom format")
        self.assertNotIn(b"BEGIN PRIVATE KEY", members["database.dump"], "sealed keys stay sealed")
        marker = yield a.store.run(lambda conn: conn.execute("SELECT 1 FROM settings WHERE key = ?",
                                                             (RESTORE_MARKER,)).fetchone())
        self.assertIsNone(marker, "the live database never holds the marker")
        served = {g: crl.number for g, crl in a.crls.current.items()}
        yield a.ca.revoke(kept.serial, "superseded")   # after the backup: lost with it

        _, err, code = yield ctl("restore", "--in", str(archive), "--database", db, "--key-file", kek)
        self.assertEqual(code, 2)
        self.assertIn(b"the target database is not empty", err)
        _, err, code = yield ctl("restore", "--in", str(archive), "--data-dir", self.mktemp(), "--key-file", kek)
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


class TamperedPostgresqlBackupTests(TestCase):
    """Issue 32, item 1: a PostgreSQL archive runs nothing it brings. An archive of the old plain-SQL format (what a
    `\\!` line turned into a root shell on restore) is refused before any tool sees it; one forged without the key
    is refused by its MAC; and a backup of a live database that someone gave a function and a trigger is refused
    from `pg_restore --list`, before a statement of it runs, even with the key."""

    timeout = 120

    @inlineCallbacks
    def test_nothing_in_an_archive_runs_and_a_planted_trigger_is_refused_before_loading(self) -> Any:
        import hashlib
        import io
        import tarfile

        import psycopg
        require_program("pg_restore", "apt-get install postgresql-client")
        cluster = PostgresCluster()
        self.addCleanup(cluster.destroy)
        db, kek = cluster.new_database(), kek_file(self)
        a = yield start_controller(self, database=db, ca_key_encryption_key_file=kek)
        yield a.stopService()
        proof = Path(self.mktemp()).resolve()
        # 1. the archive the attack used: format 1, a database.sql with a shell line, its sha256 recomputed
        sql = f"\\! id > {proof}\nSELECT 1;\n".encode()
        manifest = {"format": "uptrakitd-backup/1", "members": {"database.sql": hashlib.sha256(sql).hexdigest()}}
        old = Path(self.mktemp())
        with tarfile.open(old, "w:gz") as tar:
            for name, data in (("manifest.json", json.dumps(manifest).encode()), ("database.sql", sql)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        fresh = cluster.new_database()
        _, err, code = yield ctl("restore", "--in", str(old), "--database", fresh, "--key-file", kek)
        self.assertEqual(code, 1, err)
        self.assertIn(b"made before archives were authenticated", err)
        self.assertFalse(proof.exists(), "no shell command ran")

        # 2. a live database given a function and a trigger: its own (authenticated) backup is refused unloaded
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute("CREATE FUNCTION keep_good() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                         "NEW.revoked_at := NULL; RETURN NEW; END $$")
            conn.execute("CREATE TRIGGER keep_good BEFORE UPDATE ON certificates FOR EACH ROW "
                         "EXECUTE FUNCTION keep_good()")
        archive = Path(self.mktemp()).resolve()
        _, err, code = yield ctl("backup", "--database", db, "--key-file", kek, "--out", str(archive))
        self.assertEqual(code, 0, err)
        _, err, code = yield ctl("restore", "--in", str(archive), "--database", fresh, "--key-file", kek)
        self.assertEqual(code, 1, err)
        self.assertIn(b"refused before anything was loaded", err)
        with psycopg.connect(fresh, autocommit=True) as conn:
            left = conn.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
                                ).fetchone()[0]
        self.assertEqual(left, 0, "nothing was loaded")

        # 3. a column added: loaded (a TABLE entry), then refused by the schema check and emptied again
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute("DROP TRIGGER keep_good ON certificates")
            conn.execute("DROP FUNCTION keep_good()")
            conn.execute("ALTER TABLE admin_tokens ADD COLUMN backdoor TEXT")
        archive = Path(self.mktemp()).resolve()
        _, err, code = yield ctl("backup", "--database", db, "--key-file", kek, "--out", str(archive))
        self.assertEqual(code, 0, err)
        _, err, code = yield ctl("restore", "--in", str(archive), "--database", fresh, "--key-file", kek)
        self.assertEqual(code, 1, err)
        self.assertIn(b"not what uptrakitd's migrations create", err)
        self.assertIn(b"admin_tokens.backdoor", err)
        with psycopg.connect(fresh, autocommit=True) as conn:
            left = conn.execute("SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                                "WHERE n.nspname = 'public'").fetchone()[0]
        self.assertEqual(left, 0, "a refused restore leaves the database empty")
