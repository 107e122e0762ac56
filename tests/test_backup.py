"""Backup and restore (issue 25): `uptrakitctl backup` of a running controller, `uptrakitctl restore` into a new
data dir, and a first start from it that keeps every promise made before the backup (revocations) and never
sends a CRL number backwards. The drill runs it all with 150 reference agents and real twistd processes."""
from __future__ import annotations

import io
import json
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import reactor
from twisted.internet.defer import DeferredList, gatherResults, inlineCallbacks, maybeDeferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from uptrakitd.ctl.backup import make_backup, read_backup, restore_backup
from uptrakitd.ctl.client import Api, Connection, CtlError
from uptrakitd.pki.serials import format_serial
from uptrakitd.process.restored import RESTORE_MARKER
from uptrakitd.store.common import migrations

from .helpers import env, kek, new_leaf, run, start_controller, tls_refusal


NEWEST = migrations()[-1][0]


def crl_numbers(controller: Any) -> dict[int, int]:
    return {g: crl.number for g, crl in controller.crls.current.items()}


class BackupTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def test_a_running_controllers_backup_restores_into_a_data_dir_that_keeps_its_revocations(self):
        key_file = kek(self)
        c = yield start_controller(self, ca_key_encryption_key_file=str(key_file))
        kept, _, _ = yield new_leaf(c)
        revoked, _, _ = yield new_leaf(c)
        yield c.ca.revoke(revoked.serial, "keyCompromise")
        archive = Path(self.mktemp()).with_suffix(".tgz")
        manifest = yield deferToThread(make_backup, c.settings.data_dir, archive, key_file)   # the daemon runs on
        self.assertEqual((manifest["schema"], manifest["revoked"], manifest["certificates"]), (NEWEST, 1, 3))
        self.assertEqual([g["custody"] for g in manifest["ca_generations"]], ["sealed"])
        self.assertEqual(oct(archive.stat().st_mode & 0o777), "0o600")
        _, members = read_backup(archive, key_file)
        self.assertEqual(sorted(members), ["pki/ca.crt", "pki/server.crt", "pki/server.key", "uptrakit.sqlite3"],
                         "no CRL, no admin token, no clear CA key")
        live = yield c.store.run(lambda conn: conn.execute("SELECT 1 FROM settings WHERE key = ?",
                                                           (RESTORE_MARKER,)).fetchone())
        self.assertIsNone(live, "the marker is only in the copy")
        served = crl_numbers(c)
        yield c.ca.revoke(kept.serial, "superseded")   # after the backup: this one is lost with the restore
        served_after = crl_numbers(c)
        yield c.stopService()

        target = Path(self.mktemp()) / "restored"
        _, facts = restore_backup(archive, target, key_file)
        self.assertEqual((facts["certificates"], facts["revoked"]), (3, 1), "the summary is the restored database's")
        self.assertEqual(oct(target.stat().st_mode & 0o777), "0o700")
        r = yield start_controller(self, tmp=self.mktemp(), data_dir=str(target),
                                   ca_key_encryption_key_file=str(key_file))
        self.assertEqual(r.ca.state.records[revoked.serial].reason, "keyCompromise")
        self.assertIsNone(r.ca.state.records[kept.serial].revoked_at, "a revocation after the backup is not in it")
        for generation, number in crl_numbers(r).items():
            self.assertGreater(number, served_after[generation] + 1_000_000, (served, served_after))
        entries = yield r.store.run(lambda conn: [json.loads(row["details"]) for row in conn.execute(
            "SELECT details FROM audit_log WHERE action = 'controller.restored'").fetchall()])
        (details,) = entries
        self.assertEqual(details["backup_id"], manifest["backup_id"])
        # a later start is an ordinary start: no second bump
        numbers = crl_numbers(r)
        yield r.stopService()
        again = yield start_controller(self, tmp=self.mktemp(), data_dir=str(target),
                                       ca_key_encryption_key_file=str(key_file))
        for generation, number in crl_numbers(again).items():
            # (the stored CRLs may be served as they are until the rebuild after start: equal is fine)
            self.assertTrue(numbers[generation] <= number < numbers[generation] + 10, (numbers, crl_numbers(again)))

    def test_a_database_password_on_the_command_line_is_refused(self):
        from uptrakitd.ctl.backup import make_postgresql_backup, restore_postgresql
        for url in ("postgresql://uptrakitd:s%40cret@127.0.0.1:1/uptrakit", "postgresql://u@127.0.0.1:1/x?password=s"):
            for call in (lambda: make_postgresql_backup(url, Path(self.mktemp()), kek(self)),
                         lambda: restore_postgresql(Path(self.mktemp()), url, kek(self))):
                with self.assertRaises(CtlError) as refused:
                    call()
                self.assertIn("carries a password", str(refused.exception))
                self.assertNotIn("cret", str(refused.exception))

    @inlineCallbacks
    def test_clear_keys_are_refused_unless_asked_for(self):
        c = yield start_controller(self)   # the default custody: clear files
        key_file = kek(self)   # a backup key (no KEK here)
        with self.assertRaises(CtlError) as refused:
            make_backup(c.settings.data_dir, Path(self.mktemp()), key_file)
        self.assertIn("clear CA keys: generation 1 (pki/ca-1.key)", str(refused.exception))
        self.assertIn("uptrakitd-keys seal", str(refused.exception))
        archive = Path(self.mktemp())
        manifest = make_backup(c.settings.data_dir, archive, key_file, include_clear_keys=True)
        self.assertTrue(manifest["clear_keys_included"])
        self.assertIn("pki/ca-1.key", read_backup(archive, key_file)[1])

    @inlineCallbacks
    def test_a_damaged_archive_and_a_non_empty_target_are_refused(self):
        c = yield start_controller(self)
        archive, key_file = Path(self.mktemp()), kek(self)
        make_backup(c.settings.data_dir, archive, key_file, include_clear_keys=True)
        with tarfile.open(archive) as tar:
            raw = {i.name: tar.extractfile(i).read() for i in tar}
        data = raw["uptrakit.sqlite3"]
        damaged = dict(raw, **{"uptrakit.sqlite3": data[:-1] + bytes([data[-1] ^ 0xFF])})   # (always a change)
        target = Path(self.mktemp())
        with self.assertRaises(CtlError) as refused:
            restore_backup(repack(self, damaged), target, key_file)
        self.assertIn("uptrakit.sqlite3 does not match the sha256", str(refused.exception))
        self.assertFalse(target.exists(), "nothing written")
        self.assertEqual([p.name for p in target.parent.iterdir()], [], "no partial directory left either")
        busy = Path(self.mktemp())
        busy.mkdir()
        (busy / "something").write_text("x")
        with self.assertRaises(CtlError) as refused:
            restore_backup(archive, busy, key_file)
        self.assertIn("is not empty", str(refused.exception))
        # the command says the same, with its exit status
        _, err, code = yield run(sys.executable, "-m", "uptrakitd.ctl", "restore", "--in", str(repack(self, damaged)),
                                 "--data-dir", str(Path(self.mktemp())), "--key-file", str(key_file), env=env())
        self.assertEqual(code, 1)
        self.assertIn(b"does not match the sha256 in its manifest", err)


def repack(testcase: Any, members: dict[str, bytes], order: list[str] | None = None) -> Path:
    """A tar.gz of `members` as given (an attacker's archive: nothing recomputed unless the caller did)."""
    path = Path(testcase.mktemp())
    with tarfile.open(path, "w:gz") as tar:
        for name in order or list(members):
            info = tarfile.TarInfo(name)
            info.size = len(members[name])
            tar.addfile(info, io.BytesIO(members[name]))
    return path


def forged(testcase: Any, archive: Path, change: Any) -> Path:
    """`archive` with its database changed by `change(conn)` and every sha256 and size recomputed, as an attacker
    who can write the archive but holds no key would do (the MAC member is kept as it was)."""
    import hashlib
    import sqlite3
    with tarfile.open(archive) as tar:
        raw = {i.name: tar.extractfile(i).read() for i in tar}
    db = Path(testcase.mktemp())
    db.write_bytes(raw["uptrakit.sqlite3"])
    conn = sqlite3.connect(str(db))
    change(conn)
    conn.commit()
    conn.close()
    raw["uptrakit.sqlite3"] = db.read_bytes()
    manifest = json.loads(raw["manifest.json"])
    for name, data in raw.items():
        if name in manifest["members"]:
            manifest["members"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    manifest["certificates"] = 99_999
    raw["manifest.json"] = json.dumps(manifest).encode()
    return repack(testcase, raw)


class TamperedBackupTests(TestCase):
    """Issue 32, items 2, 8 and 15: an archive is authenticated before anything in it is used, the restored database
    is vetted against the migrations and its audit trail, and a failed restore leaves nothing."""

    timeout = 120

    @inlineCallbacks
    def test_an_archive_altered_without_the_key_is_refused_before_any_byte_is_used(self):
        key_file = kek(self)
        c = yield start_controller(self, ca_key_encryption_key_file=str(key_file))
        revoked, _, _ = yield new_leaf(c)
        yield c.ca.revoke(revoked.serial, "keyCompromise")
        yield c.stopService()
        archive = Path(self.mktemp())
        make_backup(c.settings.data_dir, archive, key_file)

        def unrevoke_and_plant(conn: Any) -> None:
            conn.execute("UPDATE certificates SET revoked_at = NULL, revocation_reason = NULL")
            conn.execute("INSERT INTO admin_tokens (id, name, token_hash, created_at) VALUES ('planted', 'x', 'x', 0)")
        attacks = {"the database re-hashed": forged(self, archive, unrevoke_and_plant),
                   "another key's archive": None}
        other = Path(self.mktemp())
        make_backup(c.settings.data_dir, other, kek(self))
        attacks["another key's archive"] = other
        for what, path in attacks.items():
            target = Path(self.mktemp()) / "restored"
            with self.assertRaises(CtlError, msg=what) as refused:
                restore_backup(path, target, key_file)
            self.assertIn("is not authenticated by the key", str(refused.exception), what)
            self.assertFalse(target.parent.exists() and any(target.parent.iterdir()), f"{what}: nothing written")
        # an archive of the old, unauthenticated format is refused with the reason
        with tarfile.open(archive) as tar:
            raw = {i.name: tar.extractfile(i).read() for i in tar}
        del raw["manifest.json.hmac"]
        with self.assertRaises(CtlError) as refused:
            restore_backup(repack(self, raw), Path(self.mktemp()), key_file)
        self.assertIn("made before archives were authenticated", str(refused.exception))

    @inlineCallbacks
    def test_a_database_changed_by_someone_else_is_refused_even_with_the_key(self):
        """A backup of a live database someone wrote to (triggers, a column, a view planted), authenticated
        because the operator's own backup took it: the vetting refuses it, and leaves nothing."""
        import sqlite3
        key_file = kek(self)
        c = yield start_controller(self, ca_key_encryption_key_file=str(key_file))
        revoked, _, _ = yield new_leaf(c)
        yield c.ca.revoke(revoked.serial, "keyCompromise")
        yield c.stopService()
        live = c.settings.data_dir / "uptrakit.sqlite3"
        plants = {"trigger": "CREATE TRIGGER keep_good AFTER UPDATE ON certificates BEGIN "
                             "UPDATE certificates SET revoked_at = NULL WHERE serial = new.serial; END",
                  "view": "CREATE VIEW v AS SELECT 1",
                  "column": "ALTER TABLE admin_tokens ADD COLUMN backdoor TEXT"}
        pristine = live.read_bytes()
        for kind, sql in plants.items():
            live.write_bytes(pristine)
            conn = sqlite3.connect(str(live))
            conn.execute(sql)
            conn.commit()
            conn.close()
            archive = Path(self.mktemp())
            make_backup(c.settings.data_dir, archive, key_file)
            target = Path(self.mktemp()) / "restored"
            with self.assertRaises(CtlError, msg=kind) as refused:
                restore_backup(archive, target, key_file)
            self.assertIn("not what uptrakitd's migrations create", str(refused.exception), kind)
            self.assertFalse(target.exists(), kind)
            self.assertEqual(list(target.parent.iterdir()), [], f"{kind}: no partial directory")
        # an audit entry rewritten in the live database is refused by the chain check
        live.write_bytes(pristine)
        conn = sqlite3.connect(str(live))
        conn.execute("UPDATE audit_log SET details = '{}' WHERE seq = 2")
        conn.commit()
        conn.close()
        archive = Path(self.mktemp())
        make_backup(c.settings.data_dir, archive, key_file)
        with self.assertRaises(CtlError) as refused:
            restore_backup(archive, Path(self.mktemp()), key_file)
        self.assertIn("audit trail does not verify", str(refused.exception))

    @inlineCallbacks
    def test_a_gzip_bomb_and_bad_member_names_are_refused_in_bounded_memory(self):
        import resource
        key_file = kek(self)
        c = yield start_controller(self, ca_key_encryption_key_file=str(key_file))
        yield c.stopService()
        archive = Path(self.mktemp())
        make_backup(c.settings.data_dir, archive, key_file)
        with tarfile.open(archive) as tar:
            raw = {i.name: tar.extractfile(i).read() for i in tar}
        bomb = dict(raw, **{"uptrakit.sqlite3": bytes(400 << 20)})   # 400 MiB of zeros: ~400 KB compressed
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with self.assertRaises(CtlError) as refused:
            restore_backup(repack(self, bomb), Path(self.mktemp()) / "r", key_file)
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        self.assertIn("is not the size its manifest says", str(refused.exception))
        self.assertLess(grown, 50, f"restore grew by {grown:.0f} MiB on a bomb")
        for name in ("../escape", "/abs", "pki/\u202eevil", "a\x00b"):
            member_names = dict(raw)
            member_names[name] = b"x"
            target = Path(self.mktemp()) / "r"
            with self.assertRaises(CtlError, msg=name):
                restore_backup(repack(self, member_names), target, key_file)
            self.assertFalse(target.parent.exists() and any(target.parent.iterdir()), name)


def api_of(port: int, data: Path) -> Any:
    """The project's own HTTPS client (uptrakitctl's), blocking: call it in a thread. (status, JSON)."""
    api = Api(Connection(f"https://localhost:{port}", str(data / "admin.token"), str(data / "pki" / "ca.crt"), 20))
    return api.exchange


def served_crl_numbers(pki_port: int) -> dict[int, int]:
    """The number of each generation's CRL the PKI listener serves."""
    numbers = {}
    for generation in (1, 2, 3):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{pki_port}/api/v1/pki/crl/{generation}.crl",
                                        timeout=5) as r:
                crl = x509.load_der_x509_crl(r.read())
        except urllib.error.HTTPError:
            continue
        numbers[generation] = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    return numbers


class RestoreDrillTests(TestCase):
    """150 reference agents on a real twistd; a rotation (renewals in flight) and 30 revocations while the backup
    is taken, 20 more revocations after it; stop, restore into a fresh dir, start the restored controller on the
    same address."""

    timeout = 300

    @inlineCallbacks
    def test_restore_drill(self):
        from uptrakitd.agent.client import ServiceAgent

        from .channel_helpers import agent_identity, next_event
        from .helpers import free_port, require_program
        from .test_tap import start_daemon, workdir
        openssl = require_program("openssl", "apt-get install openssl")
        cwd, port = workdir(self)
        pki = free_port()
        key_file = kek(self)

        def daemon(data: Path) -> Any:
            started = start_daemon(self, "--data-dir", str(data), "--https-listen", f"tcp:{port}:interface=127.0.0.1",
                                   "--pki-addr", f"http://127.0.0.1:{pki}", "--pki-http", "listener",
                                   "--ca-key-encryption-key-file", str(key_file), "--rotation-renewal-rate", "50",
                                   cwd=cwd)
            # its output, for whoever reads a failure (the daemon's log is not the test's)
            self.addCleanup(lambda: (Path(cwd) / f"{data.name}.log").write_bytes(started.output))
            return started
        data = Path(cwd) / "data"
        first = daemon(data)
        yield first.wait_for(b"HTTPS listening on", 30)
        yield first.wait_for(b"PKI listening on", 30)
        api = api_of(port, data)
        status, token = yield deferToThread(api, "POST", "/api/v1/enrollment-tokens",
                                            {"name": "drill", "max_uses": 150, "auto_approve": True})
        self.assertEqual(status, 201, token)
        ca = (data / "pki" / "ca.crt").read_bytes()
        agents = []
        for _ in range(150):
            agent = ServiceAgent(reactor, f"wss://localhost:{port}", self.mktemp(), enrollment_token=token["token"],
                                 ca_cert=ca, backoff=(0.2, 2.0))
            agents.append(agent)
            self.addCleanup(lambda agent=agent: agent.stopService() if agent.running else None)
        settled = [next_event(agent, "service_settings", timeout=120) for agent in agents]
        for agent in agents:
            agent.startService()
        yield gatherResults(settled)
        fleet, victims = agents[:100], agents[100:]
        for agent in victims:   # their certificates are revoked below; they would stop anyway
            yield agent.stopService()
        victim_ids = {format_serial(a.state.certificate().serial_number): agent_identity(a) for a in victims}
        serials = list(victim_ids)

        # a rotation: 100 renewals over ~2 s; 30 revocations at once; the backup once 15 are acknowledged
        status, rotated = yield deferToThread(api, "POST", "/api/v1/settings/rotate-ca")
        self.assertEqual(status, 200, rotated)
        acknowledged: list[str] = []

        def revoke(serial: str) -> Any:
            return deferToThread(api, "POST", f"/api/v1/certificates/{serial}/revoke", {"reason": "keyCompromise"}) \
                .addCallback(lambda r: acknowledged.append(serial) if r[0] == 200 else None)
        burst = [deferLater(reactor, n * 0.03, revoke, s) for n, s in enumerate(serials[:30])]   # a steady stream
        while len(acknowledged) < 10:
            yield deferLater(reactor, 0.01, lambda: None)
        before_backup = list(acknowledged)
        archive = Path(cwd) / "backup.tgz"
        out, err, code = yield run(sys.executable, "-m", "uptrakitd.ctl", "backup", "--data-dir", str(data), "--out",
                                   str(archive), "--key-file", str(key_file), env=env())
        self.assertEqual(code, 0, err)
        yield DeferredList(burst)
        self.assertLess(len(before_backup), 30, "revocations were still coming while the backup was taken")
        for serial in serials[30:]:   # after the backup: lost with the restore, as the guide says
            yield revoke(serial)
        self.assertEqual(len(acknowledged), 50)
        yield deferLater(reactor, 1.5, lambda: None)   # the CRLs are rebuilt (0.5 s after a revocation)
        last_served = yield deferToThread(served_crl_numbers, pki)
        fell_back: set[int] = set()
        for n, agent in enumerate(fleet):
            agent.observers.append(lambda event, detail, n=n: fell_back.add(n) if event == "fell_back" else None)
        first.transport.signalProcess("TERM")
        yield first.ended

        restored = Path(cwd) / "restored"
        out, err, code = yield run(sys.executable, "-m", "uptrakitd.ctl", "restore", "--in", str(archive),
                                   "--data-dir", str(restored), "--key-file", str(key_file), env=env())
        self.assertEqual(code, 0, err)
        (restored / "admin.token").write_bytes((data / "admin.token").read_bytes())   # the operator keeps it
        second = daemon(restored)
        yield second.wait_for(b"HTTPS listening on", 30)
        yield second.wait_for(b"PKI listening on", 30)   # (it may start a moment after HTTPS)
        self.assertIn(b"was restored from backup", second.output)

        # every revocation acknowledged before the backup: in the CRL, revoked by OCSP, refused at the handshake
        now_served = yield deferToThread(served_crl_numbers, pki)
        for generation, number in last_served.items():
            self.assertGreater(now_served[generation], number, "CRL numbers never go backwards")
        with urllib.request.urlopen(f"http://127.0.0.1:{pki}/api/v1/pki/crl/1.crl", timeout=5) as r:
            listed = {format_serial(e.serial_number) for e in x509.load_der_x509_crl(r.read())}
        self.assertEqual(set(before_backup) - listed, set())
        issuer = Path(cwd) / "g1.pem"
        issuer.write_bytes(x509.load_pem_x509_certificates(ca)[0].public_bytes(serialization.Encoding.PEM))
        for serial in before_backup[:3]:
            leaf = Path(cwd) / f"{serial}.pem"
            leaf.write_bytes(victim_ids[serial][0])
            out, err, _ = yield run(openssl, "ocsp", "-issuer", str(issuer), "-cert", str(leaf), "-url",
                                    f"http://127.0.0.1:{pki}/api/v1/pki/ocsp", "-CAfile", str(issuer))
            self.assertIn(": revoked", out.decode(), err)
        for serial in before_backup[:2]:
            alert = yield tls_refusal(port, (restored / "pki" / "ca.crt").read_bytes(), *victim_ids[serial])
            self.assertIn("certificate revoked", alert)

        # the fleet comes back by itself, then renews through a rotation followed by uptrakitctl
        restored_api = api_of(port, restored)
        for _ in range(300):
            status, listed_services = yield deferToThread(restored_api, "GET", "/api/v1/services?connected=true")
            if len(listed_services["services"]) >= 100:
                break
            yield deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(len(listed_services["services"]), 100, "every agent of the fleet reconnected")
        self.assertGreater(len(fell_back), 0, "some agents renewed after the backup: they came back with their "
                                              "previous certificate (otherwise this drill proves nothing of that)")
        token_file = restored / "admin.token"
        out, err, code = yield run(sys.executable, "-m", "uptrakitd.ctl", "--url", f"https://localhost:{port}",
                                   "--token-file", str(token_file), "--ca-file", str(restored / "pki" / "ca.crt"),
                                   "ca", "rotate", "--yes", "--wait", "--wait-timeout", "120", "-o", "json",
                                   env=env())
        self.assertEqual(code, 0, err)
        last = json.loads(out.decode().splitlines()[-1])
        self.assertEqual((last["complete"], last["renewed"], last["total"]), (True, 100, 100))
        print(f"\nrestore drill: {len(before_backup)} revocations acknowledged before the backup kept; CRL numbers "
              f"{last_served} -> {now_served}; {len(fell_back)} agents came back with their previous certificate")
        yield gatherResults([maybeDeferred(agent.stopService) for agent in fleet])
        second.transport.signalProcess("TERM")
        yield second.ended


class AgentAfterRestoreTests(TestCase):
    """A restored controller knows the certificates issued before its backup only. The reference agent then
    connects with its previous certificate and renews; when that one is unknown too, it keeps its newer one and
    retries (it never stops, which a 'revoked' answer to the old certificate would otherwise make it do)."""

    timeout = 90

    @inlineCallbacks
    def test_two_renewals_after_the_backup_leave_the_agent_retrying_with_its_newest_certificate(self):
        from .channel_helpers import connected_agent, next_event
        from .helpers import https_port
        key_file = str(kek(self))
        c = yield start_controller(self, ca_key_encryption_key_file=key_file)
        port = https_port(c)
        agent = yield connected_agent(self, c, backoff=(0.05, 0.3))
        archive = Path(self.mktemp())
        yield deferToThread(make_backup, c.settings.data_dir, archive, Path(key_file))
        for _ in range(2):   # two renewals the backup does not know
            settled = next_event(agent, "certificate")
            agent.renew("test")
            yield settled
            yield next_event(agent, "service_settings")
        newest = agent.state.certificate().serial_number
        previous = agent.state.previous_certificate().serial_number
        yield c.stopService()
        target = Path(self.mktemp()) / "restored"
        restore_backup(archive, target, Path(key_file))
        events: list[tuple[str, Any]] = []
        agent.observers.append(lambda event, detail: events.append((event, detail)))
        r = yield start_controller(self, tmp=self.mktemp(), data_dir=str(target), ca_key_encryption_key_file=key_file,
                                   https_listen=f"tcp:{port}:interface=127.0.0.1")
        self.assertNotIn(newest, r.ca.state.records)
        self.assertNotIn(previous, r.ca.state.records)
        yield next_event(agent, "fell_back", timeout=20)
        refused = yield next_event(agent, "disconnected", timeout=20)
        self.assertEqual(refused[1], "certificate not recognized")
        yield deferLater(reactor, 0.5, lambda: None)
        self.assertIsNone(agent.stopped_reason, "the agent keeps trying")
        self.assertEqual(agent.state.certificate().serial_number, newest, "its newest certificate is current again")
        self.assertEqual(agent.state.previous_certificate().serial_number, previous)
        yield agent.stopService()


class BackupFilesTests(TestCase):
    """Issue 32, items 6 and 11: the backup runs as root over a data dir the daemon's account writes."""

    timeout = 60

    @inlineCallbacks
    def test_a_link_in_the_data_dir_is_never_followed(self):
        """On main ac6af64 a symlink from pki/server.crt to a root-only file put that file's bytes in the backup."""
        import os
        key_file = kek(self)
        c = yield start_controller(self, ca_key_encryption_key_file=str(key_file))
        yield c.stopService()
        secret = Path(self.mktemp())
        secret.write_bytes(b"root only: shadow")
        secret.chmod(0o600)
        server_crt = c.settings.data_dir / "pki" / "server.crt"
        server_crt.unlink()
        os.symlink(secret, server_crt)
        out = Path(self.mktemp())
        with self.assertRaises(CtlError) as refused:
            make_backup(c.settings.data_dir, out, key_file)
        self.assertIn("a link is never followed", str(refused.exception))
        self.assertFalse(out.exists())
        # another user's file in the daemon's dir is not copied either
        server_crt.unlink()
        server_crt.write_bytes(b"planted")
        os.chown(server_crt, 65534, 65534)
        with self.assertRaises(CtlError) as refused:
            make_backup(c.settings.data_dir, out, key_file)
        self.assertIn("not a regular file owned by the data dir's owner", str(refused.exception))

    @inlineCallbacks
    def test_a_file_another_user_made_first_is_never_used(self):
        """On main ac6af64, FILE.partial made first by another user (mode 0666) became the backup, keys and all."""
        import os
        c = yield start_controller(self)
        yield c.stopService()
        folder = Path(self.mktemp())
        folder.mkdir()
        out = folder / "backup.tgz"
        for trap in (out.with_name(out.name + ".partial"),):
            trap.write_bytes(b"")
            trap.chmod(0o666)
            os.chown(trap, 65534, 65534)
        os.symlink("/nonexistent-target", folder / "link.tgz")
        with self.assertRaises(CtlError):
            make_backup(c.settings.data_dir, folder / "link.tgz", kek(self), include_clear_keys=True)
        make_backup(c.settings.data_dir, out, kek(self), include_clear_keys=True)
        info = out.stat()
        self.assertEqual((info.st_uid, oct(info.st_mode & 0o777)), (os.getuid(), "0o600"))
        self.assertEqual((folder / "backup.tgz.partial").read_bytes(), b"", "the other user's file is untouched")
        self.assertEqual(sorted(p.name for p in folder.iterdir()), ["backup.tgz", "backup.tgz.partial", "link.tgz"],
                         "no temporary file left")
