"""CA keys in a PKCS#11 token (issue 23): Debian's SoftHSM2 with a token the test initialises, a real daemon,
openssl as the judge of what the token signed."""
from __future__ import annotations

import datetime
import re
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from uptrakitd.process.boot import STEPS, FaultInjected, StartupError, boot
from uptrakitd.config import build_settings
from uptrakitd.pki.serials import format_serial

from .helpers import (env, free_port, log_lines, make_csr, new_leaf, plain_http_client, request_json, require_program,
                      run, start_controller, wait_until)
from .softhsm import SoftHsm


def booted_once(settings, **kw):
    booted = boot(settings, **kw)
    booted.lock.release()
    return booted


def pem_private_keys(directory: Path, lines: list[str]) -> list[bytes]:
    """The public keys (DER SPKI) of every PEM private key in a file under `directory` or in the log lines."""
    found = []
    blobs = [p.read_bytes() for p in directory.rglob("*") if p.is_file()] + ["\n".join(lines).encode()]
    for blob in blobs:
        for block in re.findall(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----.+?-----END [A-Z ]*PRIVATE KEY-----", blob, re.S):
            key = serialization.load_pem_private_key(block, password=None)
            found.append(key.public_key().public_bytes(serialization.Encoding.DER,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo))
    return found


def spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


class TokenLifecycleTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def setUp(self):
        self.openssl = require_program("openssl", "apt-get install openssl")
        self.hsm = SoftHsm(self)
        self.lines = log_lines(self)
        self.pki_port = free_port()
        self.tmp = self.mktemp()
        self.c = yield self.start()

    def start(self):
        return start_controller(self, tmp=self.tmp, pki_addr=f"http://127.0.0.1:{self.pki_port}", pki_http="listener",
                                **self.hsm.flags())

    def write(self, name: str, data: bytes) -> str:
        Path(self.tmp, name).write_bytes(data)
        return str(Path(self.tmp, name))

    @inlineCallbacks
    def ocsp(self, leaf: str, *extra: str):
        ca = self.write("ca.pem", self.c.ca.bundle_pem())
        out, err, _ = yield run(self.openssl, "ocsp", "-issuer", ca, "-cert", leaf, "-CAfile", ca,
                                "-url", f"http://127.0.0.1:{self.pki_port}/api/v1/pki/ocsp", *extra)
        return out.decode() + err.decode()

    @inlineCallbacks
    def crl_verifies(self, generation: int) -> str:
        body = yield (yield plain_http_client().get(
            f"http://127.0.0.1:{self.pki_port}/api/v1/pki/crl/{generation}.crl")).content()
        crl = self.write(f"g{generation}.crl", body)
        ca = self.write(f"g{generation}.pem", self.c.ca.state.generations[generation].pem)
        out, err, code = yield run(self.openssl, "crl", "-inform", "DER", "-in", crl, "-CAfile", ca, "-noout",
                                   "-text")
        self.assertEqual(code, 0, err)
        self.assertIn("verify OK", err.decode() + out.decode())
        return out.decode()

    @inlineCallbacks
    def test_issue_renew_revoke_crl_ocsp_rotate_and_restart_with_the_key_in_the_token(self):
        status, pki = yield request_json(self.c, "GET", "/api/v1/settings/pki")
        self.assertEqual(pki["active_ca"]["custody"], "pkcs11")
        keys = self.hsm.private_keys()
        self.assertEqual([k["label"] for k in keys], ["uptrakit-ca-g1"])
        self.assertEqual({(k["sensitive"], k["extractable"], k["always_sensitive"], k["never_extractable"], k["local"])
                          for k in keys}, {(True, False, True, True, True)}, "made in the token, never leaves it")
        ca1 = self.c.ca.state.active().cert
        self.assertTrue(any("its key in the PKCS#11 token" in line for line in self.lines))

        issued, _, service = yield new_leaf(self.c)          # signed in the PKI worker, through its own session
        issued.cert.verify_directly_issued_by(ca1)
        renewed = yield self.c.directory.issue_certificate(service.id, make_csr(service.id)[0])
        renewed.cert.verify_directly_issued_by(ca1)
        leaf = self.write("leaf.pem", issued.pem)
        for extra in ((), ("-no_nonce",)):
            out = yield self.ocsp(leaf, *extra)
            self.assertIn(f"{leaf}: good", out)
            self.assertIn("Response verify OK", out)
        self.assertEqual(self.c.ocsp.delegated is not None, True, "OCSP is delegated with a key in a token")

        status, body = yield request_json(self.c, "POST", f"/api/v1/certificates/{format_serial(issued.serial)}/revoke",
                                          {"reason": "keyCompromise"})
        self.assertEqual(status, 200, body)
        out = yield self.ocsp(leaf)
        self.assertIn(f"{leaf}: revoked", out)
        self.assertIn("Response verify OK", out)
        yield wait_until(lambda: self.c.crls.current.get(1) is not None and self.c.crls.current[1].entries == 1, 10)
        text = yield self.crl_verifies(1)
        self.assertIn(format(issued.serial, "X"), text.replace(":", ""))

        status, body = yield request_json(self.c, "POST", "/api/v1/settings/rotate-ca")
        self.assertEqual(status, 200, body)
        status, pki = yield request_json(self.c, "GET", "/api/v1/settings/pki")
        self.assertEqual((pki["active_ca"]["generation"], pki["active_ca"]["custody"], pki["previous_ca"]["custody"]),
                         (2, "pkcs11", "pkcs11"))
        self.assertEqual(sorted(k["label"] for k in self.hsm.private_keys()), ["uptrakit-ca-g1", "uptrakit-ca-g2"])
        ca2 = self.c.ca.state.active().cert
        after, _, _ = yield new_leaf(self.c)
        after.cert.verify_directly_issued_by(ca2)
        yield wait_until(lambda: 2 in self.c.crls.current, 10)
        yield self.crl_verifies(2)

        yield self.c.stopService()
        self.c = yield self.start()
        self.assertEqual(sorted(self.c.ca.state.generations), [1, 2])
        again, _, _ = yield new_leaf(self.c)
        again.cert.verify_directly_issued_by(ca2)
        out = yield self.ocsp(self.write("again.pem", again.pem))
        self.assertIn("good", out)

        # no CA private key anywhere: the only private key on disk or in the logs is the HTTPS server's own
        found = pem_private_keys(Path(self.tmp), self.lines)
        server = spki(x509.load_pem_x509_certificate((Path(self.tmp) / "data/pki/server.crt").read_bytes()))
        self.assertTrue(found, "the search finds the server key, so it would find a CA key")
        self.assertEqual(set(found), {server})
        self.assertNotIn(spki(ca1), found)
        self.assertNotIn(spki(ca2), found)
        self.assertFalse(any("PIN" in line and "31415926" in line or "31415926" in line for line in self.lines),
                         "the PIN is never logged")

    @inlineCallbacks
    def test_the_reference_agent_enrolls_and_follows_a_rotation_through_the_token(self):
        from .channel_helpers import connected_agent, next_event
        agent = yield connected_agent(self, self.c)          # enrollment over the WebSocket, issued by the token
        cert = x509.load_pem_x509_certificate(agent.state.identity_pem().split(b"-----END PRIVATE KEY-----")[-1])
        cert.verify_directly_issued_by(self.c.ca.state.active().cert)
        renewed = next_event(agent, "service_settings", timeout=60)
        status, body = yield request_json(self.c, "POST", "/api/v1/settings/rotate-ca")
        self.assertEqual(status, 200, body)
        self.assertEqual(body["notified"], 1)
        yield renewed
        yield wait_until(lambda: agent.proto is not None and self.c.channel.connected.get(agent.service_id)
                         is not None and self.c.channel.connected[agent.service_id].context.identity is not None
                         and self.c.channel.connected[agent.service_id].context.identity.ca_generation == 2, 60)
        cert = x509.load_pem_x509_certificate(agent.state.identity_pem().split(b"-----END PRIVATE KEY-----")[-1])
        cert.verify_directly_issued_by(self.c.ca.state.active().cert)

    @inlineCallbacks
    def test_a_rotation_that_dies_before_its_commit_leaves_an_orphan_key_that_breaks_nothing(self):
        """The moment a kill -9 would hit between the key made in the token and the generation committed."""
        from uptrakitd.pki import authority
        from uptrakitd.pki.state import insert_generation

        def dying(*args, **kw):
            raise RuntimeError("killed before the commit")
        self.patch(authority, "insert_generation", dying)
        with self.assertRaises(RuntimeError):
            yield self.c.ca.rotate()
        self.patch(authority, "insert_generation", insert_generation)
        self.assertEqual(sorted(k["label"] for k in self.hsm.private_keys()), ["uptrakit-ca-g1", "uptrakit-ca-g2"])
        self.assertEqual(self.c.ca.state.active().generation, 1, "the old generation stays active")
        status, body = yield request_json(self.c, "POST", "/api/v1/settings/rotate-ca")
        self.assertEqual(status, 200, body)
        yield self.c.stopService()
        self.c = yield self.start()
        self.assertEqual(self.c.ca.state.active().generation, 2)
        labels = sorted(k["label"] for k in self.hsm.private_keys())
        self.assertEqual(labels, ["uptrakit-ca-g1", "uptrakit-ca-g2", "uptrakit-ca-g2"], "the orphan is never loaded")
        issued, _, _ = yield new_leaf(self.c)
        issued.cert.verify_directly_issued_by(self.c.ca.state.active().cert)

    @inlineCallbacks
    def test_a_token_unplugged_at_run_time_fails_issuing_with_503_keeps_ocsp_and_crls_and_recovers(self):
        yield wait_until(lambda: self.c.ocsp.delegated._signers.get(1) is not None, 10)
        issued, _, service = yield new_leaf(self.c)
        leaf = self.write("leaf.pem", issued.pem)
        self.hsm.unplug()

        status, body = yield request_json(self.c, "GET", "/readyz", token=None)
        self.assertEqual(status, 503, body)
        self.assertIn("CA key unavailable", body["checks"]["ca"])
        status, body = yield request_json(self.c, "POST", "/api/v1/settings/rotate-ca")
        self.assertEqual((status, body.get("code")), (503, "signer_unavailable"), body)
        with self.assertRaises(Exception) as raised:
            yield self.c.directory.issue_certificate(service.id, make_csr(service.id)[0])
        self.assertEqual((getattr(raised.exception, "status", None), getattr(raised.exception, "code", None)),
                         (503, "signer_unavailable"), repr(raised.exception))
        out = yield self.ocsp(leaf)
        self.assertIn(f"{leaf}: good", out, "the delegated responder keeps answering")
        self.assertIn("Response verify OK", out)
        response = yield plain_http_client().get(f"http://127.0.0.1:{self.pki_port}/api/v1/pki/crl/1.crl")
        self.assertEqual(response.code, 200, "the CRL is still served")
        yield response.content()
        self.assertEqual(self.c.ca.state.active().generation, 1, "nothing changed")

        self.hsm.plug()
        yield wait_until(lambda: True, 0)
        for _ in range(40):
            status, body = yield request_json(self.c, "GET", "/readyz", token=None)
            if status == 200:
                break
            yield sleep(0.25)
        self.assertEqual(status, 200, body)
        renewed = yield self.c.directory.issue_certificate(service.id, make_csr(service.id)[0])
        renewed.cert.verify_directly_issued_by(self.c.ca.state.active().cert)
        status, body = yield request_json(self.c, "POST", "/api/v1/settings/rotate-ca")
        self.assertEqual(status, 200, body)


def sleep(seconds: float):
    from twisted.internet import reactor
    from twisted.internet.task import deferLater
    return deferLater(reactor, seconds, lambda: None)


class TokenStartTests(TestCase):
    timeout = 90

    def setUp(self):
        self.hsm = SoftHsm(self)
        self.tmp = Path(self.mktemp()).absolute()
        self.tmp.mkdir()

    def settings(self, uri: str | None = None, **flags):
        return build_settings({"data_dir": str(self.tmp / "data"), "https_listen": "tcp:0:interface=127.0.0.1",
                               **(self.hsm.flags(uri) if uri != "none" else {}), **flags})

    def test_a_wrong_pin_or_token_refuses_to_start_and_creates_nothing(self):
        wrong = self.tmp / "wrong-pin"
        wrong.write_text("0000\n")
        wrong.chmod(0o600)
        with self.assertRaises(StartupError) as raised:
            boot(self.settings(pkcs11_pin_file=str(wrong)))
        self.assertIn("the PIN for token 'uptrakit' is wrong", str(raised.exception))
        self.assertNotIn("0000", str(raised.exception))
        with self.assertRaises(StartupError) as raised:
            boot(self.settings("pkcs11:token=nosuch"))
        self.assertIn("no token labelled 'nosuch'", str(raised.exception))
        self.assertFalse((self.tmp / "data").exists(), "nothing created")
        self.assertEqual(self.hsm.private_keys(), [], "no key made in the token either")

    def test_flags_that_cannot_work_are_refused_with_the_reason(self):
        from uptrakitd.config import ConfigError
        cases = [({"ca_key_uri": "pkcs11:object=x"}, "names no token"),
                 ({"ca_key_uri": "pkcs11:token=uptrakit?pin-value=1234"}, "must not carry the PIN"),
                 ({"pkcs11_module": None}, "needs --pkcs11-module"),
                 ({"ocsp_signer": "ca"}, "delegated responder")]
        for change, message in cases:
            flags = dict(self.hsm.flags(), data_dir=str(self.tmp / "data"))
            flags.update({k: v for k, v in change.items()})
            with self.assertRaises(ConfigError, msg=message) as raised:
                build_settings(flags)
            self.assertIn(message, str(raised.exception))
        self.assertEqual(build_settings(self.hsm.flags()).ocsp_signer, "delegated", "the default with a token")

    @inlineCallbacks
    def test_the_daemon_says_one_line_and_exits_when_the_pin_is_wrong(self):
        wrong = self.tmp / "wrong-pin"
        wrong.write_text("0000\n")
        wrong.chmod(0o600)
        argv = [s if s != str(self.hsm.pin_file) else str(wrong) for s in self.hsm.argv()]
        out, err, code = yield run(str(Path(sys.executable).parent / "twistd"), "--pidfile=", "-n", "uptrakit",
                                   "--data-dir", str(self.tmp / "data"), "--https-listen",
                                   "tcp:0:interface=127.0.0.1", *argv, env=dict(env(), **self.hsm.env()),
                                   cwd=str(self.tmp))
        lines = err.decode().strip().splitlines()
        self.assertEqual(code, 2, err)
        self.assertEqual(len(lines), 1, err)
        self.assertIn("uptrakitd: error: the PIN for token 'uptrakit' is wrong", lines[0])
        self.assertFalse((self.tmp / "data").exists())

    def test_a_crash_after_the_key_is_made_leaves_an_orphan_that_breaks_nothing(self):
        def crash(step):
            if step == "ca_key_written":
                raise FaultInjected(step)
        self.assertIn("ca_key_written", STEPS)
        with self.assertRaises(FaultInjected):
            boot(self.settings(), fault=crash)
        booted = booted_once(self.settings())
        self.assertEqual(sorted(booted.state.generations), [1])
        keys = self.hsm.private_keys()
        self.assertEqual([k["label"] for k in keys], ["uptrakit-ca-g1", "uptrakit-ca-g1"], "the orphan stays, unused")
        active = booted.state.active()
        self.assertEqual(spki(active.cert), active.signer.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
        booted_once(self.settings())   # and the next start too

    def test_file_keys_move_into_the_token_and_an_operator_made_key_is_used(self):
        first = booted_once(self.settings("none"))
        self.assertEqual(first.state.active().custody, "file")
        moved = booted_once(self.settings())
        self.assertEqual(sorted(moved.state.generations), [1, 2])
        self.assertEqual((moved.state.generations[1].custody, moved.state.active().custody), ("file", "pkcs11"))
        now = datetime.datetime.now(datetime.timezone.utc)
        self.assertEqual([ca.generation for ca in moved.state.trusted(now)], [2, 1], "G1 stays trusted")
        operator = self.hsm.generate("ops-ca")
        uri = "pkcs11:token=uptrakit;object=ops-ca"
        adopted = booted_once(self.settings(uri))
        self.assertEqual(adopted.state.active().generation, 3)
        self.assertEqual(spki(adopted.state.active().cert), operator, "the operator's key signs generation 3")
        self.assertEqual(booted_once(self.settings(uri)).state.active().generation, 3, "and stays so at restart")
        with self.assertRaises(StartupError) as raised:
            boot(self.settings("pkcs11:token=uptrakit;object=nosuch"))
        self.assertIn("no private key with label 'nosuch'", str(raised.exception))
        with self.assertRaises(StartupError) as raised:
            boot(self.settings("none"))
        self.assertIn("is in a PKCS#11 token", str(raised.exception))


class NoSecretsInCoresTests(TestCase):
    """Issue 32, item 9: on main ac6af64 a core of the daemon held the PIN 7 times, and the PIN's environment
    variable was inherited by the PKI worker and multiprocessing's resource tracker."""

    timeout = 90

    @inlineCallbacks
    def test_no_core_dumps_and_the_pin_never_reaches_a_child(self):
        import os

        from twisted.internet import reactor
        from twisted.internet.task import deferLater

        from .helpers import run, spawn
        from .test_tap import TWISTD
        from .softhsm import PIN
        hsm = SoftHsm(self)
        tmp = Path(self.mktemp()).absolute()
        tmp.mkdir()
        argv = [a for a in hsm.argv() if a not in ("--pkcs11-pin-file", str(hsm.pin_file))]
        daemon = spawn([TWISTD, "--pidfile=", "-n", "uptrakit", "--data-dir", str(tmp / "data"), "--https-listen",
                        "tcp:0:interface=127.0.0.1", *argv],
                       env=dict(env(), **hsm.env(), UPTRAKIT_PKCS11_PIN=PIN), cwd=str(tmp))
        self.addCleanup(lambda: None if daemon.ended.called else (daemon.transport.signalProcess("KILL"),
                                                                   daemon.ended)[1])
        yield daemon.wait_for(b"HTTPS listening on", 60)
        pid = daemon.transport.pid
        port = re.search(rb"HTTPS listening on .*?port=(\d+)", daemon.output).group(1).decode()
        curl = require_program("curl", "apt-get install curl")
        data = tmp / "data"
        out, err, code = yield run(curl, "-sS", "--cacert", str(data / "pki" / "ca.crt"), "-X", "POST", "-H",
                                   f"Authorization: Bearer {(data / 'admin.token').read_text().strip()}",
                                   f"https://localhost:{port}/api/v1/settings/rotate-ca")   # CRLs: the worker signs
        self.assertEqual(code, 0, err)

        def children(of: int) -> list[int]:
            found = []
            for task in Path(f"/proc/{of}/task").iterdir():
                found += [int(p) for p in (task / "children").read_text().split()]
            return found + [g for c in found for g in children(c)]
        for _ in range(100):   # the PKI worker starts with the first CRL
            if children(pid):
                break
            yield deferLater(reactor, 0.1, lambda: None)
        kids = children(pid)
        self.assertTrue(kids, "the PKI worker runs")
        for process in [pid] + kids:
            limits = Path(f"/proc/{process}/limits").read_text()
            core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
            self.assertEqual(core.split()[4:6], ["0", "0"], f"{process}: {core}")
        for child in kids:
            self.assertNotIn(b"UPTRAKIT_PKCS11_PIN", Path(f"/proc/{child}/environ").read_bytes(), child)
        # and no process of the same user may read its memory (PR_SET_DUMPABLE 0), checked from inside
        probe = [sys.executable, "-c", "from uptrakitd.process.nodump import no_core_dumps, dumpable; "
                 "before = dumpable(); no_core_dumps(); print(before, dumpable())"]
        import subprocess
        out = subprocess.run(probe, capture_output=True, check=True, env=env()).stdout.split()
        self.assertEqual(out, [b"1", b"0"])
        self.assertNotIn(PIN.encode(), os.environ.get("UPTRAKIT_PKCS11_PIN", "").encode() or b"-")
        daemon.transport.signalProcess("TERM")
        yield daemon.ended
