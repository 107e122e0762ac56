"""An upgrade (issue 25, docs/deployment/upgrade.md): a data dir written by an earlier release (schema 4, made as
tests/data/upgrade/README.md says) started by this one, as twistd, the way an operator upgrades."""
from __future__ import annotations

import json
import shutil
import sqlite3
import sys
import tarfile
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from .helpers import env, run, tls_refusal

FIXTURE = Path(__file__).parent / "data" / "upgrade" / "schema4-2606677.tar.gz"
REVOKED = "123F006997DA8AEACD3D14D6ABE918DACC3F49D8"


class UpgradeTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def test_a_schema_4_data_dir_upgrades_keeps_its_copy_and_everything_in_it_still_works(self):
        from uptrakitd.agent.client import ServiceAgent

        from .channel_helpers import next_event
        from .test_ctl import Ctl
        from .test_tap import start_daemon, workdir
        cwd, port = workdir(self)
        with tarfile.open(FIXTURE) as tar:
            tar.extractall(cwd, filter="data")
        data = Path(cwd) / "uptrakit-data"
        kek = Path(cwd) / "fixture.kek"
        kek.chmod(0o600)
        daemon = start_daemon(self, "--https-listen", f"tcp:{port}:interface=127.0.0.1", "--ca-key-encryption-key-file",
                              str(kek), cwd=cwd)
        yield daemon.wait_for(b"HTTPS listening on", 30)
        log = daemon.output.decode(errors="replace")
        self.assertIn("copied the database (schema 4)", log)
        copy = data / "uptrakit.sqlite3.v4.bak"
        self.assertTrue(copy.is_file(), "the copy migrations take before changing the database")
        conn = sqlite3.connect(copy)
        self.assertEqual(conn.execute("PRAGMA user_version").fetchone()[0], 4)
        conn.close()

        url, ca_pem = f"https://localhost:{port}", (data / "pki" / "ca.crt").read_bytes()
        ctl = Ctl(self, url, (data / "admin.token").read_text().strip(), ca_pem)
        services = yield ctl.json("services", "list")
        self.assertEqual(sorted(s["hostname"] for s in services), ["kept", "revoked"])
        shown = yield ctl.json("certs", "show", REVOKED)
        self.assertEqual((shown["status"], shown["revocation_reason"]), ("revoked", "keyCompromise"))
        status = yield ctl.json("status")
        self.assertEqual(status["ready"]["status"], "ready")
        # the read-only token made by the old release still reads, and still may not change anything
        reader = Ctl(self, url, (Path(cwd) / "read.token").read_text().strip(), ca_pem)
        _, err, code = yield reader("certs", "list")
        self.assertEqual(code, 0, err)
        _, err, code = yield reader("ca", "rotate", "--yes")
        self.assertEqual(code, 4, err)

        # the old release's revoked agent is refused at the handshake; the kept one connects with its certificate
        identity = (Path(cwd) / "agent-revoked" / "identity.pem").read_bytes()
        split = identity.index(b"-----BEGIN CERTIFICATE-----")
        alert = yield tls_refusal(port, (data / "pki" / "ca.crt").read_bytes(), identity[split:], identity[:split])
        self.assertIn("certificate revoked", alert)
        agent = ServiceAgent(reactor, f"wss://localhost:{port}", Path(cwd) / "agent-kept", backoff=(0.2, 1.0))
        settled = next_event(agent, "service_settings", timeout=20)
        agent.startService()
        self.addCleanup(lambda: agent.stopService() if agent.running else None)
        yield settled
        self.assertEqual(agent.mode_in_use, "mtls")
        yield agent.stopService()

        # the audit trail begins with the upgrade, and verifies
        export = Path(cwd) / "audit.jsonl"
        out, err, code = yield run("curl", "-sS", "--cacert", str(data / "pki" / "ca.crt"), "-H",
                                   f"Authorization: Bearer {(data / 'admin.token').read_text().strip()}",
                                   f"https://localhost:{port}/api/v1/audit/export")
        export.write_bytes(out)
        first = json.loads(out.splitlines()[0])
        self.assertEqual((first["seq"], first["action"]), (1, "controller.started"))
        ca = Path(cwd) / "ca.pem"
        shutil.copy(data / "pki" / "ca.crt", ca)
        out, err, code = yield run(sys.executable, "-m", "uptrakitd.audit.verify", "verify", str(export), "--ca",
                                   str(ca), env=env())
        self.assertEqual(code, 0, out + err)
        daemon.transport.signalProcess("TERM")
        self.assertEqual((yield daemon.ended), 0)
