"""docs/deployment/backup.md's SQLite walk followed as written: a backup of the running daemon, the restore with its
stop, moves and start, and the check.

`systemctl stop|start uptrakitd` stop and start a real `twistd -n uptrakit` on the guide's data dir (sealed keys,
as the guide asks); `chown` is a no-op (the guide's user is this test's). Only placeholders and absolute paths
are changed.
"""
from __future__ import annotations

from pathlib import Path

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from ..helpers import free_port, wait_until
from ..test_ctl import Ctl
from ..helpers import kek
from ..test_tap import TWISTD
from .guides import Guide, standard_paths


class BackupGuideTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def test_backup_restore_and_check_as_written(self):
        work = Path(self.mktemp()).resolve()
        work.mkdir(parents=True)
        port, pidfile, log = free_port(), work / "uptrakitd.pid", work / "uptrakitd.log"
        paths = dict(standard_paths(work), **{"/var/backups/uptrakitd": work / "backups", "/etc/uptrakitd": work / "etc"})
        (work / "etc").mkdir(mode=0o700)
        key_file = kek(self).rename(work / "etc" / "kek")   # the guide's backup key is the KEK
        keeper = work / "keeper.token"
        guide = Guide("backup", {"BACKUP_FILE": "-", "CONTROLLER_URL": f"https://localhost:{port}", "ADMIN_TOKEN_FILE": keeper,
                                 "DATABASE_URL": "-", "NEW_DATABASE_URL": "-", "PG_BACKUP_FILE": "-"},
                      paths, {"chown": "exit 0"}, work)
        data = Path(guide.paths["/var/lib/uptrakitd"])
        guide.shim("systemctl", f'''case "$*" in
  "stop uptrakitd") kill "$(cat {pidfile})"; while kill -0 "$(cat {pidfile})" 2>/dev/null; do sleep 0.1; done ;;
  "start uptrakitd") cd {work} && {TWISTD} --pidfile={pidfile} -n uptrakit --data-dir {data} \\
      --https-listen tcp:{port}:interface=127.0.0.1 --ca-key-encryption-key-file {key_file} >>{log} 2>&1 & ;;
  *) echo "unexpected: systemctl $*" >&2; exit 1 ;;
esac''')
        self.addCleanup(lambda: guide.run_command("systemctl stop uptrakitd", ok=False) if pidfile.exists() else None)

        @inlineCallbacks
        def started():
            yield wait_until(lambda: "HTTPS listening on" in (log.read_text() if log.exists() else ""), timeout=30)
            return Ctl(self, f"https://localhost:{port}", keeper.read_text().strip() if keeper.exists()
                       else (data / "admin.token").read_text().strip(), (data / "pki" / "ca.crt").read_bytes())
        yield guide.run_command("systemctl start uptrakitd")   # as install.md left it
        ctl = yield started()
        made = yield ctl.json("tokens", "admin", "create", "--name", "keeper")
        keeper.write_text(made["token"] + "\n")
        yield ctl.json("tokens", "enroll", "create", "--name", "before the backup")
        before = yield ctl.json("status")

        yield guide.run("backup")
        (archive,) = (work / "backups").glob("uptrakit-*.tgz")
        self.assertEqual(oct(archive.stat().st_mode & 0o777), "0o600")
        yield ctl.json("tokens", "enroll", "create", "--name", "after the backup")
        last = yield ctl.json("status")   # the newest CRL the old daemon served
        log.write_text("")

        guide.values["BACKUP_FILE"] = str(archive)
        yield guide.run("restore")
        self.assertTrue((Path(str(data) + ".before-restore") / "uptrakit.sqlite3").exists(), "the old dir is kept")
        yield started()
        self.assertIn("was restored from backup", log.read_text())
        code, out = yield guide.run("check")
        self.assertIn("ready", out.splitlines()[0])
        ctl = Ctl(self, f"https://localhost:{port}", keeper.read_text().strip(), (data / "pki" / "ca.crt").read_bytes())
        names = {t["name"] for t in (yield ctl.json("tokens", "enroll", "list"))}
        self.assertEqual(names, {"before the backup"}, "what came after the backup is not there")
        after = yield ctl.json("status")
        self.assertEqual(after["pki"]["active_ca"]["fingerprint"], before["pki"]["active_ca"]["fingerprint"])
        self.assertGreater(after["pki"]["active_ca"]["crl_number"], last["pki"]["active_ca"]["crl_number"],
                           "CRL numbers never go backwards")
