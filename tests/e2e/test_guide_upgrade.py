"""docs/deployment/upgrade.md followed as written on a data dir the release at 2606677 wrote (schema 4,
tests/data/upgrade/README.md; its CA key sealed, as backup.md asks).

The daemon before the upgrade is that data dir at rest (the old release's code is not installed here: it ran
when the fixture was made). `systemctl stop|start uptrakitd` stop and start a real `twistd -n uptrakit` of this
release; `pip install --upgrade ./uptrakitd` is checked to name a checkout and does nothing more, since the
test's venv already holds this release. Only placeholders and absolute paths are changed.
"""
from __future__ import annotations

import os
import shutil
import sys
import tarfile
from pathlib import Path

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from ..helpers import free_port, wait_until
from ..test_tap import TWISTD
from ..test_upgrade import FIXTURE
from .guides import Guide, standard_paths

ROOT = Path(__file__).resolve().parents[2]


class UpgradeGuideTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def test_backup_stop_upgrade_start_and_check_as_written(self):
        work = Path(self.mktemp()).resolve()
        work.mkdir(parents=True)
        venv_bin = work / "venv-bin"
        venv_bin.mkdir()
        os.symlink(Path(sys.executable).parent / "uptrakitctl", venv_bin / "uptrakitctl")
        (venv_bin / "pip").write_text('#!/bin/sh\n[ "$*" = "install --upgrade ./uptrakitd" ] && '
                                      '[ -f ./uptrakitd/pyproject.toml ] || { echo "unexpected: pip $*" >&2; exit 1; }\n')
        (venv_bin / "pip").chmod(0o755)
        os.symlink(ROOT, work / "uptrakitd")   # the new release's checkout, where install.md stands
        port, pidfile, log = free_port(), work / "uptrakitd.pid", work / "uptrakitd.log"
        keeper = work / "admin.token"
        paths = dict(standard_paths(work), **{"/var/backups/uptrakitd": work / "backups",
                                              "/opt/uptrakitd/venv/bin": venv_bin, "/etc/uptrakitd": work / "etc"})
        guide = Guide("upgrade", {"CONTROLLER_PORT": port, "ADMIN_TOKEN_FILE": keeper}, paths, {"chown": "exit 0"},
                      work)
        data = Path(guide.paths["/var/lib/uptrakitd"])
        with tarfile.open(FIXTURE) as tar:
            tar.extractall(work, filter="data")
        (work / "uptrakit-data").rename(data)
        shutil.copy(data / "admin.token", keeper)
        (work / "etc").mkdir(mode=0o700)
        key_file = (work / "fixture.kek").rename(work / "etc" / "kek")   # its CA key is sealed, as backup.md asks
        key_file.chmod(0o600)
        (work / "backups").mkdir(mode=0o700)
        guide.shim("systemctl", f'''case "$*" in
  "stop uptrakitd") [ -f {pidfile} ] || exit 0; kill "$(cat {pidfile})"
      while kill -0 "$(cat {pidfile})" 2>/dev/null; do sleep 0.1; done ;;
  "start uptrakitd") cd {work} && {TWISTD} --pidfile={pidfile} -n uptrakit --data-dir {data} \\
      --https-listen tcp:{port}:interface=127.0.0.1 --ca-key-encryption-key-file {key_file} >>{log} 2>&1 & ;;
  *) echo "unexpected: systemctl $*" >&2; exit 1 ;;
esac''')
        self.addCleanup(lambda: guide.run_command("systemctl stop uptrakitd", ok=False))

        yield guide.run("upgrade")
        yield wait_until(lambda: "HTTPS listening on" in (log.read_text() if log.exists() else ""), timeout=30)
        self.assertIn("copied the database (schema 4)", log.read_text())
        (backup,) = (work / "backups").glob("before-upgrade-*.tgz")
        from uptrakitd.ctl.backup import read_backup
        self.assertEqual(read_backup(backup, key_file)[0]["schema"], 4, "the backup was taken before the upgrade")
        code, out = yield guide.run("check")
        lines = out.splitlines()
        self.assertIn("version", lines[0])
        self.assertIn("ready", lines[1])
