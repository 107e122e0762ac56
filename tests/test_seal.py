"""CA key custody with the embedded SQLite: sealed keys from the first start, and `uptrakitd-keys seal` for a
data dir whose keys are clear files (crash-safe at every step)."""
from __future__ import annotations

import base64
import os

import shutil
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from uptrakitd.process.boot import StartupError, boot
from uptrakitd.config import build_settings
from uptrakitd.pki.seal import SealError, seal_data_dir

from .helpers import env, kek, log_lines, request_json, run, start_controller


def private_key(signer):
    """The key object behind a KeySigner (the test looks for its traces)."""
    return serialization.load_pem_private_key(signer.pem(), password=None)


def key_traces(key) -> list[bytes]:
    """What a CA private key looks like wherever it might be written: PEM, DER, the bare scalar."""
    scalar = key.private_numbers().private_value.to_bytes(48, "big")
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return [key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()), scalar, base64.b64encode(scalar), pem.splitlines()[2]]


def files_holding(directory: Path, traces: list[bytes]) -> list[str]:
    found = []
    for path in directory.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            if any(t in data for t in traces):
                found.append(path.name)
    return found


class SealedFromTheStartTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_first_start_and_rotation_write_no_clear_ca_key_anywhere(self):
        path = kek(self)
        c = yield start_controller(self, ca_key_encryption_key_file=str(path))
        status, body = yield request_json(c, "POST", "/api/v1/settings/rotate-ca")
        self.assertEqual(status, 200, body)
        status, pki = yield request_json(c, "GET", "/api/v1/settings/pki")
        self.assertEqual((pki["active_ca"]["custody"], pki["previous_ca"]["custody"]), ("sealed", "sealed"))
        traces = [t for ca in c.ca.state.generations.values() for t in key_traces(private_key(ca.signer))]
        data_dir = c.settings.data_dir
        self.assertEqual(sorted(p.name for p in (data_dir / "pki").glob("ca-*.key")), [])
        # every file under the test's directory: data dir, database and its journal, logs of the test
        self.assertEqual(files_holding(Path(c.tmp), traces), [])
        self.assertEqual(files_holding(Path(c.tmp), key_traces(c.server_cert.key)), ["server.key"],
                         "the search finds a key where there is one (the HTTPS server's own, a file by design)")
        yield c.stopService()
        again = boot(build_settings({"data_dir": str(data_dir), "https_listen": "tcp:0:interface=127.0.0.1",
                                     "ca_key_encryption_key_file": str(path)}))
        again.lock.release()
        self.assertEqual(sorted(again.state.generations), [1, 2])
        with self.assertRaises(StartupError) as raised:
            boot(build_settings({"data_dir": str(data_dir), "https_listen": "tcp:0:interface=127.0.0.1"}))
        self.assertIn("is sealed in the database: start with --ca-key-encryption-key-file", str(raised.exception))


class SealCommandTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def clear_data_dir(self) -> Path:
        """A stopped controller's data dir with two generations whose keys are clear files."""
        lines = log_lines(self)
        c = yield start_controller(self)
        self.assertTrue(any("are clear files in" in line and "uptrakitd-keys seal" in line for line in lines),
                        "the start says where the clear keys are and how to seal them")
        status, _ = yield request_json(c, "POST", "/api/v1/settings/rotate-ca")
        self.assertEqual(status, 200)
        status, pki = yield request_json(c, "GET", "/api/v1/settings/pki")
        self.assertEqual(pki["active_ca"]["custody"], "file")
        self.keys = {g: private_key(ca.signer).private_numbers() for g, ca in c.ca.state.generations.items()}
        yield c.stopService()
        return c.settings.data_dir

    def boots(self, data_dir: Path, path: Path | None) -> dict:
        flags = {"data_dir": str(data_dir), "https_listen": "tcp:0:interface=127.0.0.1"}
        if path is not None:
            flags["ca_key_encryption_key_file"] = str(path)
        booted = boot(build_settings(flags))
        booted.lock.release()
        return {g: private_key(ca.signer).private_numbers() for g, ca in booted.state.generations.items()}

    @inlineCallbacks
    def test_a_crash_at_any_step_leaves_a_startable_data_dir_and_the_same_keys(self):
        original = yield self.clear_data_dir()
        path = kek(self)
        for step in ("sealed", "removed", "forgotten"):
            for nth in (1, 2):   # the first generation's step, then the second's
                data_dir = Path(self.mktemp()).resolve()
                shutil.copytree(original, data_dir)
                seen = []

                def crash(at, step=step, nth=nth):
                    seen.append(at)
                    if seen.count(step) == nth:
                        raise KeyboardInterrupt(f"crash after {step} #{nth}")
                with self.assertRaises(KeyboardInterrupt):
                    seal_data_dir(data_dir, path, crash)
                self.assertEqual(self.boots(data_dir, path), self.keys, (step, nth))
                seal_data_dir(data_dir, path)   # run again: it finishes what the crash left
                self.assertEqual(list((data_dir / "pki").glob("ca-*.key")), [], (step, nth))
                self.assertEqual(self.boots(data_dir, path), self.keys, (step, nth))

    @inlineCallbacks
    def test_the_command_seals_removes_the_files_and_refuses_a_running_daemon(self):
        data_dir = yield self.clear_data_dir()
        path = kek(self)
        cli = [sys.executable, "-m", "uptrakitd.pki.seal", "seal", "--data-dir", str(data_dir),
               "--ca-key-encryption-key-file", str(path)]
        self.assertEqual(self.boots(data_dir, path), self.keys, "a KEK before the seal: the clear files still load")
        out, err, code = yield run(*cli, env=dict(env(), LOGNAME="other", USER="other"))   # a claim, not a fact
        self.assertEqual(code, 0, err)
        self.assertIn(b"sealed CA generation(s) 1, 2", out)
        self.assertEqual(list((data_dir / "pki").glob("ca-*.key")), [])
        self.assertEqual(self.boots(data_dir, path), self.keys)
        # on the audit trail, which still verifies: each generation sealed, then its file removed, by whom
        from uptrakitd.store import open_database, transaction
        from uptrakitd.store import audit as stored
        conn = open_database(data_dir)
        try:
            entries = [e for e in transaction(conn, stored.page, None, 500) if e["action"].startswith("ca_key.")]
            export = transaction(conn, stored.after, 0, 10_000)
        finally:
            conn.close()
        self.assertEqual(sorted((e["action"], e["object"]["id"]) for e in entries),
                         [("ca_key.file_removed", "1"), ("ca_key.file_removed", "2"),
                          ("ca_key.sealed", "1"), ("ca_key.sealed", "2")])
        self.assertEqual(entries[0]["actor"]["command"], "uptrakitd-keys seal")
        import pwd
        # issue 32, item 14: on main ac6af64 LOGNAME=other was recorded as the user
        self.assertEqual((entries[0]["actor"]["user"], entries[0]["actor"]["uid"], entries[0]["actor"]["claimed_login"]),
                         (pwd.getpwuid(os.getuid()).pw_name, os.getuid(), "other"))
        from uptrakitd.audit import verify as audit_verify
        self.assertEqual(audit_verify.verify(export, [], require_checkpoint=False)["entries"], len(export),
                         "the chain still links")
        out, err, code = yield run(*cli, env=env())
        self.assertEqual((code, out.strip()), (0, b"no clear CA key file to seal"))
        booted = boot(build_settings({"data_dir": str(data_dir), "https_listen": "tcp:0:interface=127.0.0.1",
                                      "ca_key_encryption_key_file": str(path)}))
        self.addCleanup(booted.lock.release)
        out, err, code = yield run(*cli, env=env())
        self.assertEqual(code, 2)
        self.assertIn(b"is in use by another uptrakitd", err)
        with self.assertRaises(SealError):
            seal_data_dir(Path(self.mktemp()), path)


class KekOwnerTests(TestCase):
    """Issue 37, item 1: ca-keys.md made a root-owned KEK; the seal removed the clear keys, and the daemon
    (another user) then could not start: a restart loop with its keys already gone."""

    timeout = 60

    @inlineCallbacks
    def test_the_seal_refuses_a_kek_the_daemons_user_cannot_read_and_changes_nothing(self):
        import os
        c = yield start_controller(self)
        yield c.stopService()
        data_dir = c.settings.data_dir
        os.chown(data_dir, 65534, 65534)   # the daemon's account owns its data dir
        self.addCleanup(os.chown, data_dir, 0, 0)
        path = kek(self)                   # root's, mode 0600
        before = sorted(p.name for p in (data_dir / "pki").iterdir())
        with self.assertRaises(SealError) as refused:
            seal_data_dir(data_dir, path)
        self.assertIn("could not read it", str(refused.exception))
        self.assertIn(f"chown nobody {path}", str(refused.exception))
        self.assertEqual(sorted(p.name for p in (data_dir / "pki").iterdir()), before, "nothing changed")
        os.chown(path, 65534, 65534)
        self.assertEqual(seal_data_dir(data_dir, path), [1])

    def test_a_start_that_cannot_read_the_kek_names_the_user_it_runs_as(self):
        import pwd
        missing = Path(self.mktemp())
        with self.assertRaises(StartupError) as refused:
            boot(build_settings({"data_dir": self.mktemp(), "https_listen": "tcp:0:interface=127.0.0.1",
                                 "ca_key_encryption_key_file": str(missing)}))
        self.assertIn(f"uptrakitd runs as user {pwd.getpwuid(os.getuid()).pw_name}", str(refused.exception))
