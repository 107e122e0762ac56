"""`uptrakitctl` (issue 25) against a real controller: every command the UI has, its JSON and its tables, and a clear
error with its own exit status for each thing that can be wrong (cannot connect, TLS, 401, 403, 409, 503)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from uptrakitd.pki.serials import format_serial

from .helpers import (admin_token, enrolled_service, env, free_port, https_port, new_leaf, request_json, run,
                      start_controller)


class Ctl:
    """uptrakitctl as an operator runs it: a process, its flags, its exit status."""

    def __init__(self, testcase: TestCase, url: str, token: str, ca_pem: bytes, ca: bool = True) -> None:
        tmp = Path(testcase.mktemp())
        tmp.mkdir()
        self.token_file, self.ca_file = tmp / "token", tmp / "ca.crt"
        self.token_file.write_text(token + "\n")
        self.ca_file.write_bytes(ca_pem)
        self.url = url
        self.ca = ca

    @classmethod
    def of(cls, testcase: TestCase, controller, token: str | None = None, ca: bool = True) -> "Ctl":
        """For an in-process controller (start_controller)."""
        return cls(testcase, f"https://localhost:{https_port(controller)}", token or admin_token(controller),
                   controller.ca.bundle_pem(), ca)

    def __call__(self, *args: str, columns: int = 200):
        e = dict(env(), COLUMNS=str(columns))
        flags = ["--url", self.url, "--token-file", str(self.token_file)]
        if self.ca:
            flags += ["--ca-file", str(self.ca_file)]
        return run(sys.executable, "-m", "uptrakitd.ctl", *flags, *args, env=e).addCallback(
            lambda r: (r[0].decode(), r[1].decode(), r[2]))

    @inlineCallbacks
    def json(self, *args: str):
        out, err, code = yield self(*args, "-o", "json")
        assert code == 0, (args, code, err)
        return json.loads(out)


class CommandTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def setUp(self):
        self.c = yield start_controller(self)
        self.ctl = Ctl.of(self, self.c)

    @inlineCallbacks
    def test_connection_options_work_after_the_command_too(self):
        """Issue 37, item 8: `uptrakitctl status --ca-file F` was "No such option" (vault, kubectl and step take
        them there)."""
        ctl = self.ctl
        out, err, code = yield run(sys.executable, "-m", "uptrakitd.ctl", "status", "-o", "json", "--ca-file",
                                   str(ctl.ca_file), f"--url={ctl.url}", "--token-file", str(ctl.token_file),
                                   "--timeout", "20", env=env())
        self.assertEqual(code, 0, err)
        self.assertIn("ready", json.loads(out))
        from uptrakitd.ctl.commands import connection_options_first
        self.assertEqual(connection_options_first(["services", "show", "x", "--url", "U", "--", "--url", "v"]),
                         ["--url", "U", "services", "show", "x", "--", "--url", "v"])

    @inlineCallbacks
    def test_services_certificates_tokens_network_and_status(self):
        c, ctl = self.c, self.ctl
        token = yield c.enrollment_tokens.create("manual", max_uses=2)
        pending, _ = yield c.directory.enroll("agent", "boiler-room", token["token"])
        other, _ = yield c.directory.enroll("agent", "attic", token["token"])
        listed = yield ctl.json("services", "list", "--status", "pending")
        self.assertEqual({s["id"] for s in listed}, {pending.id, other.id})
        # the short id the UI shows (issue 37, item 2: "404 no route" before)
        out, err, code = yield ctl("services", "approve", pending.id[:8])
        self.assertEqual((code, out.strip()), (0, f"service {pending.id} (boiler-room) is approved"), err)
        self.assertEqual(c.directory.get(pending.id).status, "approved")
        out, err, code = yield ctl("services", "reject", "--yes", other.id)
        self.assertEqual(code, 0, err)
        self.assertEqual(c.directory.get(other.id).status, "rejected")
        out, err, code = yield ctl("services", "show", pending.id)
        self.assertIn("hostname:", out)
        self.assertIn("boiler-room", out)

        issued, _, service = yield new_leaf(c)
        serial = format_serial(issued.serial)
        out, _, code = yield ctl("certs", "list", "--service", service.id)
        self.assertEqual(out.splitlines()[0].split(), ["SERIAL", "SERVICE", "PURPOSE", "GEN", "NOT", "AFTER", "STATUS"])
        self.assertIn(serial, out)
        shown = yield ctl.json("certs", "show", serial)
        self.assertEqual((shown["serial"], shown["status"], shown["service_id"]), (serial, "valid", service.id))
        out, _, _ = yield ctl("certs", "show", serial, "--pem")
        self.assertTrue(out.startswith("-----BEGIN CERTIFICATE-----"), out)
        # destructive commands ask; without a terminal to ask on they need --yes and change nothing
        out, err, code = yield ctl("certs", "revoke", serial, "--reason", "keyCompromise")
        self.assertEqual(code, 2)
        self.assertIn("add --yes", err)
        self.assertIsNone(c.ca.state.records[issued.serial].revoked_at)
        out, err, code = yield ctl("certs", "revoke", serial, "--reason", "keyCompromise", "--yes")
        self.assertEqual(code, 0, err)
        self.assertEqual(c.ca.state.records[issued.serial].reason, "keyCompromise")
        out, err, code = yield ctl("certs", "revoke", serial, "--yes")   # 409
        self.assertEqual(code, 1)
        self.assertIn("refused (409 conflict): certificate " + serial + " is already revoked", err)
        out, err, code = yield ctl("services", "deactivate", service.id, "--yes")
        self.assertEqual((code, c.directory.get(service.id).status), (0, "deactivated"), err)

        made = yield ctl.json("tokens", "enroll", "create", "--name", "rack 4", "--max-uses", "3", "--kind", "agent")
        self.assertTrue(made["token"].startswith("upt_"), made)
        self.assertEqual((made["name"], made["max_uses"], made["kind"]), ("rack 4", 3, "agent"))
        out, _, _ = yield ctl("tokens", "enroll", "list")
        self.assertIn(made["id"], out)
        self.assertNotIn(made["token"], out, "a token's secret is shown once")
        out, err, code = yield ctl("tokens", "enroll", "delete", made["id"], "--yes")
        self.assertEqual(code, 0, err)
        reader = yield ctl.json("tokens", "admin", "create", "--name", "auditor", "--role", "read")
        self.assertEqual(reader["permissions"], ["read"])
        admins = yield ctl.json("tokens", "admin", "list")
        self.assertEqual({t["name"] for t in admins}, {"bootstrap", "auditor"})

        answer = yield ctl.json("network", "set", "--trusted-proxy", "127.0.0.2/32", "--trusted-proxy", "10.0.0.0/8",
                                "--real-ip-header", "X-Real-IP")
        self.assertEqual((answer["trusted_proxies"], answer["real_ip_header"]), (["127.0.0.2/32", "10.0.0.0/8"],
                                                                                 "X-Real-IP"))
        self.assertEqual(str(c.runtime.network.trusted_proxies[1]), "10.0.0.0/8")
        out, _, _ = yield ctl("network", "show")
        self.assertIn("trusted proxies:         127.0.0.2/32, 10.0.0.0/8", out)
        out, err, code = yield ctl("network", "set")
        self.assertEqual(code, 2)
        self.assertIn("nothing to change", err)

        out, err, code = yield ctl("status")
        self.assertEqual(code, 0, err)
        self.assertIn("ready", out.splitlines()[0])
        self.assertIn("active CA    generation 1", out)
        self.assertIn("key: file", out)
        self.assertIn("CRL #", out)
        status = yield ctl.json("status")
        self.assertEqual(status["ready"]["status"], "ready")
        self.assertEqual(status["pki"]["active_ca"]["generation"], 1)
        # an untrusted peer claiming an identity: the doctor names it and says what to do
        yield request_json(c, "GET", "/api/v1/whoami", token=None, headers={"X-SSL-Client-Cert": "forged"})
        out, _, code = yield ctl("doctor")
        self.assertEqual(code, 0, "a warning is not a failure")
        _, _, strict = yield ctl("doctor", "--strict")
        self.assertEqual(strict, 1, "issue 37, item 6: with --strict a warning is")
        self.assertIn("trusted proxies:       127.0.0.2/32, 10.0.0.0/8", out)
        self.assertIn("WARNING  untrusted_sender: 127.0.0.1: 127.0.0.1 sends client-certificate headers", out)
        self.assertIn("add 127.0.0.1/32 to the trusted proxies", out)
        doctor = yield ctl.json("doctor")
        self.assertEqual([a["code"] for p in doctor["peers"] for a in p["advice"]], ["untrusted_sender"])
        out, err, code = yield ctl("ca", "rotate", "--yes", "--wait")
        self.assertEqual(code, 0, err)
        self.assertIn("rotation to generation 2 complete", out)
        self.assertEqual(c.ca.state.active().generation, 2)
        # every change above is on the audit trail, by the bootstrap token
        entries = yield c.store.run(lambda conn: [r["action"] for r in conn.execute(
            "SELECT action FROM audit_log WHERE actor LIKE '%bootstrap%'").fetchall()])
        for action in ("service.approved", "service.rejected", "certificate.revoked", "service.deactivated",
                       "enrollment_token.created", "enrollment_token.deleted", "admin_token.created",
                       "settings.network.changed", "ca.rotated"):
            self.assertIn(action, entries)

    @inlineCallbacks
    def test_tables_fit_the_terminal_and_never_cut_an_id(self):
        service = yield enrolled_service(self.c, hostname="a-very-long-host-name-in-a-far-away-rack.example.net")
        out, _, code = yield self.ctl("services", "list", columns=100)
        self.assertEqual(code, 0)
        lines = out.splitlines()
        self.assertTrue(all(len(line) <= 100 for line in lines), lines)
        self.assertIn(service.id, lines[1])
        self.assertIn("…", lines[1], "the host name gave up room")
        wide, _, _ = yield self.ctl("services", "list", columns=250)
        self.assertIn("a-very-long-host-name-in-a-far-away-rack.example.net", wide)

    @inlineCallbacks
    def test_each_failure_has_its_sentence_and_exit_status(self):
        c = self.c
        # cannot connect
        nobody = Ctl.of(self, c)
        nobody.url = f"https://localhost:{free_port()}"
        _, err, code = yield nobody("status")
        self.assertEqual(code, 3)
        self.assertIn("connection refused (is uptrakitd running", err)
        # TLS: the controller's CA is not in the system's trust store
        _, err, code = yield Ctl.of(self, c, ca=False)("status")
        self.assertEqual(code, 3)
        self.assertIn("TLS verification of localhost", err)
        self.assertIn("pass the controller's CA with --ca-file", err)
        # 401
        _, err, code = yield Ctl.of(self, c, token="upt_admin_nobody-holds-this")("certs", "list")
        self.assertEqual(code, 4)
        self.assertIn("does not accept this token (401)", err)
        # 403: a read token reads, and is told it may not change
        reader = yield c.admin_tokens.create("auditor", ["read"])
        read_only = Ctl.of(self, c, token=reader["token"])
        out, err, code = yield read_only("certs", "list")
        self.assertEqual(code, 0, err)
        _, err, code = yield read_only("ca", "rotate", "--yes")
        self.assertEqual(code, 4)
        self.assertIn("needs an admin token; this one may only read (403)", err)
        self.assertEqual(c.ca.state.active().generation, 1)
        # no token file at all
        _, err, code = yield run(sys.executable, "-m", "uptrakitd.ctl", "--url", self.ctl.url, "status",
                                 env={k: v for k, v in env().items() if not k.startswith("UPTRAKIT_")})
        self.assertEqual(code, 2)
        self.assertIn(b"no admin token: pass --token-file FILE or set UPTRAKIT_TOKEN_FILE", err)
        # 503: the controller's storage is gone
        c.store.close()
        _, err, code = yield self.ctl("tokens", "enroll", "create", "--name", "late")
        self.assertEqual(code, 1)
        self.assertIn("the controller cannot do it now (503): storage unavailable", err)

    @inlineCallbacks
    def test_completion_scripts_for_bash_and_zsh_complete_the_commands(self):
        for shell, marker in (("bash", "complete -o nosort -F"), ("zsh", "#compdef uptrakitctl")):
            out, err, code = yield self.ctl("completion", shell)
            self.assertEqual(code, 0, err)
            self.assertIn(marker, out)
        # what the script asks the program for, as bash would ask it after "uptrakitctl ce<TAB>"
        e = dict(env(), _UPTRAKITCTL_COMPLETE="bash_complete", COMP_WORDS="uptrakitctl ce", COMP_CWORD="1")
        out, err, code = yield run(sys.executable, "-m", "uptrakitd.ctl", env=e)
        self.assertEqual((code, out.split()), (0, [b"plain,certs"]), err)
        e.update(COMP_WORDS="uptrakitctl tokens admin ", COMP_CWORD="3")
        out, _, _ = yield run(sys.executable, "-m", "uptrakitd.ctl", env=e)
        self.assertEqual(sorted(out.split()), [b"plain,create", b"plain,list", b"plain,revoke"])


def on_a_terminal(argv: list[str], answer: bytes | None, environ: dict[str, str]) -> tuple[int, bytes]:
    """Run argv with a pseudo-terminal as stdin and stdout (as a person at a shell would); type `answer` once
    the question shows. Blocking: call it in a thread."""
    import os
    import pty
    import select
    import subprocess
    import time as clock
    controller, terminal = pty.openpty()
    process = subprocess.Popen(argv, stdin=terminal, stdout=terminal, stderr=terminal, env=environ,
                               close_fds=True)
    os.close(terminal)
    seen, answered, deadline = b"", answer is None, clock.monotonic() + 60
    while clock.monotonic() < deadline:
        ready, _, _ = select.select([controller], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(controller, 4096)
            except OSError:   # the program ended and closed its side
                break
            if not chunk:
                break
            seen += chunk
            if not answered and b"[y/N]" in seen:
                os.write(controller, answer)
                answered = True
        elif process.poll() is not None:
            break
    os.close(controller)
    return process.wait(10), seen


class TerminalTests(TestCase):
    """What a person at a terminal sees: the question before a destructive change, and the live progress bar."""

    timeout = 120

    @inlineCallbacks
    def test_a_destructive_command_asks_and_the_rotation_progress_is_one_redrawn_line(self):
        from twisted.internet.threads import deferToThread
        c = yield start_controller(self)
        ctl = Ctl.of(self, c)
        issued, _, _ = yield new_leaf(c)
        serial = format_serial(issued.serial)
        argv = [sys.executable, "-m", "uptrakitd.ctl", "--url", ctl.url, "--token-file", str(ctl.token_file),
                "--ca-file", str(ctl.ca_file)]
        code, seen = yield deferToThread(on_a_terminal, argv + ["certs", "revoke", serial], b"n\n", env())
        self.assertIn(f"Revoke certificate {serial} (unspecified)? This cannot be undone. [y/N]".encode(), seen)
        self.assertEqual(code, 1)
        self.assertIn(b"nothing changed", seen)
        self.assertIsNone(c.ca.state.records[issued.serial].revoked_at)
        code, seen = yield deferToThread(on_a_terminal, argv + ["certs", "revoke", serial], b"y\n", env())
        self.assertEqual(code, 0, seen)
        self.assertIsNotNone(c.ca.state.records[issued.serial].revoked_at)
        code, seen = yield deferToThread(on_a_terminal, argv + ["ca", "rotate", "--wait"], b"y\n", env())
        self.assertEqual(code, 0, seen)
        self.assertIn(b"\r[########################] 0/0 renewed  lagging controllers: none", seen)
        self.assertIn(b"rotation to generation 2 complete", seen)


class BreakGlassTests(TestCase):
    """Issue 37, item 4: after a restore there was no admin token and no way to make one without the API."""

    timeout = 90

    @inlineCallbacks
    def test_an_admin_token_made_from_the_data_dir_works_after_a_sighup_and_is_audited(self):
        import os
        import pwd

        from twisted.internet import reactor
        from twisted.internet.task import deferLater

        from .helpers import require_program
        from .test_tap import start_daemon, workdir
        curl = require_program("curl", "apt-get install curl")
        cwd, port = workdir(self)
        daemon = start_daemon(self, "--https-listen", f"tcp:{port}:interface=127.0.0.1", cwd=cwd)
        yield daemon.wait_for(b"HTTPS listening on", 30)
        data = Path(cwd) / "uptrakit-data"
        (data / "admin.token").unlink()   # as after a restore: no token file left
        out, err, code = yield run(sys.executable, "-m", "uptrakitd.ctl", "tokens", "admin", "create", "--name",
                                   "break-glass", "--data-dir", str(data), env=dict(env(), LOGNAME="mallory"))
        self.assertEqual(code, 0, err)
        token = out.decode().splitlines()[0]
        self.assertTrue(token.startswith("upt_admin_"), out)
        self.assertIn(b"after a SIGHUP", out)

        def whoami_as_admin():
            return run(curl, "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", str(data / "pki" / "ca.crt"),
                       "-H", f"Authorization: Bearer {token}", f"https://localhost:{port}/api/v1/services")
        out, _, _ = yield whoami_as_admin()
        self.assertEqual(out, b"401", "not known before the SIGHUP")
        daemon.transport.signalProcess("HUP")
        for _ in range(50):
            out, _, _ = yield whoami_as_admin()
            if out == b"200":
                break
            yield deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(out, b"200")
        out, _, _ = yield run(curl, "-sS", "--cacert", str(data / "pki" / "ca.crt"), "-H",
                              f"Authorization: Bearer {token}",
                              f"https://localhost:{port}/api/v1/audit?action=admin_token.created")
        (entry,) = [e for e in json.loads(out)["entries"] if e["details"]["name"] == "break-glass"]
        self.assertEqual(entry["actor"], {"kind": "local", "command": "uptrakitctl tokens admin create",
                                          "user": pwd.getpwuid(os.getuid()).pw_name, "uid": os.getuid(),
                                          "claimed_login": "mallory"})
        # without write access it is refused, and nothing is written
        other = Path(self.mktemp())
        other.mkdir()
        _, err, code = yield run(sys.executable, "-m", "uptrakitd.ctl", "tokens", "admin", "create", "--name", "x",
                                 "--data-dir", str(other), env=env())
        self.assertEqual(code, 2)
        self.assertIn(b"holds no uptrakit.sqlite3", err)
        daemon.transport.signalProcess("TERM")
        yield daemon.ended
