"""The audit trail (issue 24): who did what, recorded with the change or not at all, on a chain an auditor can
verify offline with `uptrakit-audit verify`."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from cryptography import x509
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from uptrakitd import audit
from uptrakitd.audit import verify as audit_verify
from uptrakitd.pki.serials import format_serial
from uptrakitd.store import audit as stored

from .helpers import env, log_lines, new_leaf, request_json, run, start_controller


def export_lines(c):
    """The export, as an auditor downloads it."""
    import treq

    from .helpers import admin_token, https_client, url

    @inlineCallbacks
    def get():
        response = yield https_client(c).get(url(c, "/api/v1/audit/export"),
                                             headers={"Authorization": f"Bearer {admin_token(c)}"})
        assert response.code == 200, response.code
        assert response.headers.getRawHeaders("content-type") == ["application/jsonl"]
        body = yield treq.content(response)
        return body.decode().splitlines()
    return get()


class AuditTrailTests(TestCase):
    timeout = 90

    @inlineCallbacks
    def setUp(self):
        self.c = yield start_controller(self)
        self.events = []
        observer = lambda event: self.events.append(event) if event.get("audit") else None   # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    @inlineCallbacks
    def entries(self, **filters):
        query = "&".join(f"{k}={v}" for k, v in filters.items())
        status, body = yield request_json(self.c, "GET", "/api/v1/audit" + ("?" + query if query else ""))
        self.assertEqual(status, 200, body)
        return body

    @inlineCallbacks
    def test_an_api_change_names_the_token_the_address_and_the_request_id(self):
        status, alice = yield request_json(self.c, "POST", "/api/v1/admin-tokens", {"name": "alice",
                                                                                    "permissions": ["admin"]})
        self.assertIn(status, (200, 201), alice)
        issued, _, service = yield new_leaf(self.c)
        serial = format_serial(issued.serial)
        status, body = yield request_json(self.c, "POST", f"/api/v1/certificates/{serial}/revoke",
                                          {"reason": "keyCompromise"}, token=alice["token"],
                                          headers={"X-Request-Id": "ticket-4711"})
        self.assertEqual(status, 200, body)
        body = yield self.entries(action="certificate.revoked")
        (entry,) = body["entries"]
        self.assertEqual((entry["actor"]["kind"], entry["actor"]["name"], entry["actor"]["role"]),
                         ("admin_token", "alice", "admin"))
        self.assertEqual(entry["actor"]["id"], alice["id"])
        self.assertEqual((entry["object"], entry["details"]["reason"], entry["details"]["service_id"]),
                         ({"kind": "certificate", "id": serial}, "keyCompromise", service.id))
        self.assertEqual((entry["client"], entry["request_id"]), ("127.0.0.1", "ticket-4711"))
        # the token's creation names the bootstrap token, the certificate's issue the service
        body = yield self.entries(action="admin_token.created")
        self.assertEqual((body["entries"][0]["actor"]["name"], body["entries"][0]["details"]["name"]),
                         ("bootstrap", "alice"))
        body = yield self.entries(action="certificate.issued", object=serial)
        self.assertEqual(body["entries"][0]["actor"], {"kind": "service", "id": service.id})
        # a network change records the old and new values; a rotation its generations
        status, _ = yield request_json(self.c, "PUT", "/api/v1/settings/network", {"real_ip_header": "X-Real-IP"})
        self.assertEqual(status, 200)
        body = yield self.entries(action="settings.network.changed")
        self.assertEqual(body["entries"][0]["details"]["changes"]["real_ip_header"],
                         {"old": "X-Forwarded-For", "new": "X-Real-IP"})
        # a service edit records what changed, and nothing when nothing did
        for _ in range(2):
            status, _ = yield request_json(self.c, "PUT", f"/api/v1/services/{service.id}",
                                           {"friendly_name": "boiler room", "cert_lifetime_hours": 24})
            self.assertEqual(status, 200)
        body = yield self.entries(action="service.updated")
        (entry,) = body["entries"]
        self.assertEqual((entry["object"]["id"], entry["details"]["changed"]["friendly_name"]),
                         (service.id, {"old": None, "new": "boiler room"}))
        status, _ = yield request_json(self.c, "POST", "/api/v1/settings/rotate-ca")
        body = yield self.entries(action="ca.rotated")
        self.assertEqual((body["entries"][0]["object"]["id"], body["entries"][0]["details"]["previous"],
                          body["entries"][0]["details"]["trigger"]), ("2", 1, "api"))
        # every entry was also a log line with "audit": true (for a SIEM reading the journal)
        logged = {event["entry"]["seq"] for event in self.events}
        body = yield self.entries(limit=500)
        self.assertEqual({e["seq"] for e in body["entries"] if e["seq"] > 4} - logged, set(),
                         "every entry (the start-up's four come before the observer)")
        self.assertGreaterEqual(len(logged), 7)   # token, enrollment token, service issue, revoke, network, rotation…

    @inlineCallbacks
    def test_what_the_first_start_made_is_on_the_trail(self):
        body = yield self.entries(limit=500)
        first = {e["action"]: e for e in reversed(body["entries"]) if e["seq"] <= 5}
        self.assertEqual(list(first), ["settings.network.changed", "ca.created", "certificate.issued",
                                       "admin_token.created", "controller.started"])
        self.assertEqual(first["settings.network.changed"]["actor"], {"kind": "system", "via": "start-up (first start)"})
        self.assertEqual(first["ca.created"]["details"]["trigger"], "first start")
        self.assertEqual(first["certificate.issued"]["details"]["purpose"], "server")
        self.assertEqual(first["certificate.issued"]["object"]["id"],
                         format_serial(next(r.serial for r in self.c.ca.state.records.values()
                                            if r.purpose == "server")))
        self.assertEqual(first["admin_token.created"]["details"]["name"], "bootstrap")

    @inlineCallbacks
    def test_the_client_address_is_the_one_the_trusted_proxy_rules_resolve(self):
        import treq
        from twisted.web.client import Agent

        from .helpers import TrustPolicy, admin_token, ca_pem, https_port
        status, _ = yield request_json(self.c, "PUT", "/api/v1/settings/network", {"trusted_proxies": ["127.0.0.2/32"]})
        self.assertEqual(status, 200)
        for source, expected in (("127.0.0.2", "203.0.113.9"), ("127.0.0.3", "127.0.0.3")):
            agent = Agent(reactor, contextFactory=TrustPolicy(ca_pem(self.c)), bindAddress=(source, 0))
            response = yield treq.client.HTTPClient(agent).post(
                f"https://127.0.0.1:{https_port(self.c)}/api/v1/enrollment-tokens",
                data=json.dumps({"name": f"from {source}"}).encode(),
                headers={"Authorization": f"Bearer {admin_token(self.c)}", "X-Forwarded-For": "203.0.113.9"})
            self.assertIn(response.code, (200, 201))
            yield treq.content(response)
            body = yield self.entries(action="enrollment_token.created")
            self.assertEqual((body["entries"][0]["details"]["name"], body["entries"][0]["client"]),
                             (f"from {source}", expected), "a trusted proxy's X-Forwarded-For; anyone else's own")

    @inlineCallbacks
    def test_the_entry_and_its_change_commit_together_or_not_at_all(self):
        issued, _, _ = yield new_leaf(self.c)
        serial = format_serial(issued.serial)
        real = stored.append

        def refusing(*args, **kw):
            raise RuntimeError("the trail cannot be written")
        self.patch(stored, "append", refusing)
        status, _ = yield request_json(self.c, "POST", f"/api/v1/certificates/{serial}/revoke",
                                       {"reason": "keyCompromise"})
        self.assertEqual(status, 500)
        self.flushLoggedErrors(RuntimeError)
        self.patch(stored, "append", real)
        row = yield self.c.store.run(lambda conn: conn.execute(
            "SELECT revoked_at FROM certificates WHERE serial = ?", (serial,)).fetchone())
        self.assertIsNone(row["revoked_at"], "no entry, no revocation")
        self.assertFalse(self.c.ca.state.is_revoked(issued.serial))
        body = yield self.entries(action="certificate.revoked")
        self.assertEqual(body["entries"], [])

    @inlineCallbacks
    def test_an_admin_tokens_first_use_is_recorded_once(self):
        status, carol = yield request_json(self.c, "POST", "/api/v1/admin-tokens", {"name": "carol",
                                                                                    "permissions": ["read"]})
        self.assertIn(status, (200, 201), carol)
        for _ in range(3):
            status, _ = yield request_json(self.c, "GET", "/api/v1/services", token=carol["token"])
            self.assertEqual(status, 200)
        body = yield self.entries(action="admin_token.first_used", object=carol["id"])
        (entry,) = body["entries"]
        self.assertEqual((entry["actor"]["name"], entry["actor"]["role"]), ("carol", "read"))
        # another process (a restart, another controller) seeing it again writes no second entry
        self.c.admin_tokens._seen.clear()
        status, _ = yield request_json(self.c, "GET", "/api/v1/services", token=carol["token"])
        body = yield self.entries(action="admin_token.first_used", object=carol["id"])
        self.assertEqual(len(body["entries"]), 1)

    @inlineCallbacks
    def test_unknown_tokens_are_counted_in_one_entry_a_minute_and_a_used_up_token_once(self):
        for _ in range(30):   # a guessing flood from one address
            status, _ = yield request_json(self.c, "GET", "/api/v1/services", token="upt_admin_guess")
            self.assertEqual(status, 401)
        yield self.c.audit.flush_sign_in_failures()   # (the timer does it a minute after the first)
        body = yield self.entries(action="admin.sign_in_failed")
        (entry,) = body["entries"]
        self.assertEqual((entry["actor"], entry["details"]["failures"], entry["details"]["ranges"],
                          entry["details"]["routes"]),
                         ({"kind": "anonymous"}, 30, {"127.0.0.0/24": 30}, {"GET /api/v1/services": 30}))
        # issue 32, item 10: on main ac6af64, 60 decoys and then 200 failures from 200 other addresses left 0
        # entries. Every failure is counted now, by range, in one entry a window
        for n in range(60):
            self.c.audit.sign_in_failed("10.9.0.1", "GET", "/api/v1/services", None)
        for n in range(200):
            self.c.audit.sign_in_failed(f"10.{n}.7.{n}", "POST", "/api/v1/settings/rotate-ca", None)
        yield self.c.audit.flush_sign_in_failures()
        body = yield self.entries(action="admin.sign_in_failed", limit=500)
        self.assertEqual(len(body["entries"]), 2)
        details = body["entries"][0]["details"]
        self.assertEqual((details["failures"], details["ranges"]["10.9.0.0/24"], details["routes"]),
                         (260, 60, {"POST /api/v1/settings/rotate-ca": 200, "GET /api/v1/services": 60}))
        self.assertEqual(len(details["ranges"]), 64, "the 64 most failing ranges are named")
        self.assertEqual((details["other_ranges"], details["other_failures"]), (201 - 64, 260 - 60 - 63))
        self.assertIsNone(self.c.audit.flush_sign_in_failures(), "nothing pending: no empty entry")
        token = yield self.c.enrollment_tokens.create("one use", max_uses=1, auto_approve=True)
        service, _ = yield self.c.directory.enroll("agent", "host-9", token["token"])
        body = yield self.entries(action="enrollment_token.used_up")
        (entry,) = body["entries"]
        self.assertEqual((entry["object"]["id"], entry["details"]["by"]), (token["id"], service.id))
        body = yield self.entries(action="service.enrolled", object=service.id)
        self.assertEqual(body["entries"][0]["details"]["enrollment_token"], token["id"])
        many = yield self.c.enrollment_tokens.create("many uses", max_uses=5, auto_approve=True)
        yield self.c.directory.enroll("agent", "host-10", many["token"])   # uses left: not "used up"
        body = yield self.entries(action="enrollment_token.used_up")
        self.assertEqual(len(body["entries"]), 1)

    @inlineCallbacks
    def test_pages_newest_first_with_a_cursor_and_filters(self):
        for n in range(5):
            yield self.c.enrollment_tokens.create(f"t{n}")
        body = yield self.entries(action="enrollment_token.created", limit=2)
        self.assertEqual([e["details"]["name"] for e in body["entries"]], ["t4", "t3"])
        body = yield self.entries(action="enrollment_token.created", limit=2, before=body["next_before"])
        self.assertEqual([e["details"]["name"] for e in body["entries"]], ["t2", "t1"])
        status, body = yield request_json(self.c, "GET", "/api/v1/audit?limit=0")
        self.assertEqual((status, body["code"]), (400, "invalid_filter"))
        status, body = yield request_json(self.c, "GET", "/api/v1/audit?since=yesterday")
        self.assertEqual((status, body["code"]), (400, "invalid_filter"))


class VerifyTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def setUp(self):
        self.c = yield start_controller(self)
        for n in range(3):
            yield self.c.enrollment_tokens.create(f"t{n}")
        self.patch(audit, "CHECKPOINT_EVERY", 1)
        covered = yield self.c.audit.checkpoint_if_due()
        self.assertIsInstance(covered, int, "a checkpoint was due and written")
        yield self.c.enrollment_tokens.create("after the checkpoint")
        self.lines = yield export_lines(self.c)
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.ca = self.dir / "ca.pem"
        self.ca.write_bytes(self.c.ca.bundle_pem())

    @inlineCallbacks
    def verify(self, lines):
        export = self.dir / "export.jsonl"
        export.write_text("\n".join(lines) + "\n")
        out, err, code = yield run(sys.executable, "-m", "uptrakitd.audit.verify", "verify", str(export),
                                   "--ca", str(self.ca), env=env())
        return code, (out + err).decode()

    @inlineCallbacks
    def test_an_untouched_export_verifies_with_its_signed_checkpoint(self):
        code, out = yield self.verify(self.lines)
        self.assertEqual(code, 0, out)
        self.assertIn("2 signed checkpoint(s)", out, "the one due, and the one the export signed first")
        kinds = [json.loads(line)["action"] for line in self.lines]
        self.assertIn("audit.checkpoint", kinds)

    @inlineCallbacks
    def test_each_kind_of_tampering_names_the_first_bad_sequence(self):
        entries = [json.loads(line) for line in self.lines]
        dump = lambda es: [stored.export_line(e) for e in es]   # noqa: E731
        modified = [dict(e) for e in entries]
        modified[2] = dict(modified[2], details={"name": "someone else"})
        deleted = entries[:1] + entries[2:]
        reordered = entries[:1] + [entries[2], entries[1]] + entries[3:]
        inserted = entries[:2] + [dict(entries[1], seq=3)] + [dict(e, seq=e["seq"] + 1) for e in entries[2:]]
        cases = {"modified": (modified, 3), "deleted": (deleted, 2), "reordered": (reordered, 2),
                 "inserted": (inserted, 3)}
        for name, (lines, bad) in cases.items():
            code, out = yield self.verify(dump(lines))
            self.assertEqual(code, 1, name)
            self.assertIn(f"first bad sequence {bad}:", out, name)
        # a checkpoint re-signed by another CA, or pointing at another hash, does not verify
        other = self.dir / "other.pem"
        from .helpers import foreign_ca_and_leaf
        other.write_bytes(foreign_ca_and_leaf()[0])
        export = self.dir / "export.jsonl"
        export.write_text("\n".join(self.lines) + "\n")
        out, err, code = yield run(sys.executable, "-m", "uptrakitd.audit.verify", "verify", str(export),
                                   "--ca", str(other), env=env())
        self.assertEqual(code, 1)
        self.assertIn("signature does not verify", out.decode())
        # the end cut off after the last checkpoint is only seen with --expect
        last = entries[-1]
        out, err, code = yield run(sys.executable, "-m", "uptrakitd.audit.verify", "verify", str(export),
                                   "--ca", str(self.ca), "--expect", f"{last['seq'] + 1}:{'0' * 64}",
                                   env=env())
        self.assertEqual(code, 1)
        self.assertIn(f"first bad sequence {last['seq'] + 1}", out.decode())

    @inlineCallbacks
    def test_a_pruned_trail_still_verifies_and_its_new_start_is_vouched_for(self):
        import time
        entries = [json.loads(line) for line in self.lines]
        checkpoint = [e for e in entries if e["action"] == "audit.checkpoint"][-1]
        kept_from, deleted = yield self.c.audit.prune(int(time.time()) + 1)
        self.assertEqual((kept_from, deleted), (checkpoint["details"]["sequence"], kept_from - 1))
        lines = yield export_lines(self.c)
        pruned = [json.loads(line) for line in lines]
        self.assertEqual(pruned[0]["seq"], kept_from)
        self.assertEqual([e["action"] for e in pruned[-2:]], ["audit.pruned", "audit.checkpoint"],
                         "the prune is vouched for at once")
        code, out = yield self.verify(lines)
        self.assertEqual(code, 0, out)
        # without the checkpoint that vouches for it (the export cut before it), a later start is a cut
        until = next(i for i, line in enumerate(lines) if json.loads(line)["action"] == "audit.checkpoint")
        code, out = yield self.verify(lines[:until])
        self.assertEqual(code, 1)
        self.assertIn(f"first bad sequence {kept_from}", out)
        nothing = yield self.c.audit.prune(int(time.time()) - 3600)
        self.assertIsNone(nothing, "nothing older than an hour")

    @inlineCallbacks
    def test_cuts_empty_exports_and_fields_no_hash_covers_are_refused(self):
        """Issue 32, item 3: what the verifier accepted on main ac6af64 (each exited 0 there)."""
        entries = [json.loads(line) for line in self.lines]
        checkpoint = next(i for i, e in enumerate(entries) if e["action"] == "audit.checkpoint")
        covered = entries[checkpoint]["details"]["sequence"]
        added = dict(entries[1], note="no hash covers this")
        cases = {
            "a cut from the start up to the checkpointed entry, no audit.pruned": (
                [line for line in self.lines if json.loads(line)["seq"] >= covered], "holds no audit.pruned entry"),
            "an empty export": ([], "holds no entry"),
            "a cut before every checkpoint": (self.lines[:checkpoint], "no signed checkpoint"),
            "an added field": (self.lines[:1] + [stored.export_line(added)] + self.lines[2:], "fields an audit entry"),
            "a line not in canonical form": (self.lines[:1] + [json.dumps(entries[1], indent=1).replace("\n", "")]
                                             + self.lines[2:], "canonical form"),
        }
        for name, (lines, reason) in cases.items():
            code, out = yield self.verify(lines)
            self.assertEqual(code, 1, f"{name}: {out}")
            self.assertIn(reason, out, name)

    def test_the_library_and_the_command_agree(self):
        summary = audit_verify.verify(self.lines, [x509.load_pem_x509_certificate(self.ca.read_bytes())])
        self.assertEqual((summary["entries"], summary["checkpoints"]), (len(self.lines), 2))


class RealDaemonTests(TestCase):
    """`twistd -n uptrakit` killed with -9 in a burst of changes, and its database edited with `sqlite3`."""

    timeout = 120

    @inlineCallbacks
    def start(self):
        from .test_tap import start_daemon
        daemon = start_daemon(self, "--https-listen", f"tcp:{self.port}:interface=127.0.0.1", cwd=self.cwd)
        yield daemon.wait_for(b"listening on")
        return daemon

    def api(self, method, path, body=None):
        data = Path(self.cwd) / "uptrakit-data"
        argv = [self.curl, "-sS", "--cacert", str(data / "pki" / "ca.crt"), "-X", method, "-H",
                f"Authorization: Bearer {(data / 'admin.token').read_text().strip()}"]
        if body is not None:
            argv += ["-d", json.dumps(body)]
        return run(*argv, f"https://localhost:{self.port}{path}")

    @inlineCallbacks
    def verify(self):
        out, _, code = yield self.api("GET", "/api/v1/audit/export")
        export, ca = Path(self.cwd) / "export.jsonl", Path(self.cwd) / "ca.pem"
        export.write_bytes(out)
        ca.write_bytes((Path(self.cwd) / "uptrakit-data" / "pki" / "ca.crt").read_bytes())
        out, err, code = yield run(sys.executable, "-m", "uptrakitd.audit.verify", "verify", str(export), "--ca",
                                   str(ca), env=env())
        return code, out.decode() + err.decode(), [json.loads(line) for line in export.read_text().splitlines()]

    @inlineCallbacks
    def issue_certificates(self, count):
        """`count` service certificates in ./uptrakit-data, issued by the library itself before twistd starts
        there (a subprocess daemon has no quick way to issue them); fires with their serials."""
        from uptrakitd.process.boot import boot
        from uptrakitd.config import build_settings
        from uptrakitd.process.daemon import build_daemon

        from .helpers import new_leaf
        flags = {"data_dir": str(Path(self.cwd) / "uptrakit-data"), "https_listen": "tcp:0:interface=127.0.0.1"}
        controller = build_daemon(boot(build_settings(flags, None)), reactor, flags, environ={})
        controller.startService()
        try:
            serials = []
            for _ in range(count):
                issued, _, _ = yield new_leaf(controller)
                serials.append(format_serial(issued.serial))
        finally:
            yield controller.stopService()
        return serials

    @inlineCallbacks
    def test_kill_9_in_a_revocation_burst_keeps_every_acknowledged_revocation_and_edits_are_caught(self):
        from twisted.internet import defer

        from .helpers import require_program
        from .test_tap import workdir
        self.curl = require_program("curl", "apt-get install curl")
        sqlite = require_program("sqlite3", "apt-get install sqlite3")
        self.cwd, self.port = workdir(self)
        serials = yield self.issue_certificates(40)
        daemon = yield self.start()
        acknowledged, burst = [], []
        for serial in serials:
            d = self.api("POST", f"/api/v1/certificates/{serial}/revoke", {"reason": "keyCompromise"})
            d.addCallback(lambda r, serial=serial: acknowledged.append(serial)
                          if r[2] == 0 and b'"revoked": true' in r[0] else None)
            burst.append(d)
        while len(acknowledged) < 10:
            yield defer.DeferredList(burst[:1])
            burst = burst[1:] or burst
        daemon.transport.signalProcess("KILL")   # in the middle of the burst, right after 10+ acknowledgements
        yield daemon.ended
        yield defer.DeferredList(burst, consumeErrors=True)
        self.assertLess(len(acknowledged), len(serials), "the kill came before the burst ended")
        daemon = yield self.start()
        code, out, entries = yield self.verify()
        self.assertEqual(code, 0, out)
        recorded = {e["object"]["id"] for e in entries if e["action"] == "certificate.revoked"}
        self.assertLessEqual(set(acknowledged), recorded, "every acknowledged revocation has its entry")
        for serial in acknowledged:
            out, _, _ = yield self.api("GET", f"/api/v1/certificates/{serial}")
            self.assertEqual(json.loads(out)["revocation_reason"], "keyCompromise", serial)
        daemon.transport.signalProcess("TERM")
        yield daemon.ended

        database = str(Path(self.cwd) / "uptrakit-data" / "uptrakit.sqlite3")
        edits = {
            "modified": ("UPDATE audit_log SET details = '{\"name\": \"nobody\"}' WHERE seq = 5", 5),
            "deleted": ("DELETE FROM audit_log WHERE seq = 7", 7),
            "reordered": ("UPDATE audit_log SET seq = -1 WHERE seq = 8; UPDATE audit_log SET seq = 8 WHERE seq = 9; "
                          "UPDATE audit_log SET seq = 9 WHERE seq = -1", 8),
        }
        backup = Path(database).read_bytes()
        for name, (sql, bad) in edits.items():
            Path(database).write_bytes(backup)
            for suffix in ("-wal", "-shm"):
                Path(database + suffix).unlink(missing_ok=True)
            _, err, status = yield run(sqlite, database, sql)
            self.assertEqual(status, 0, err)
            daemon = yield self.start()
            code, out, _ = yield self.verify()
            self.assertEqual(code, 1, f"{name}: {out}")
            self.assertIn(f"first bad sequence {bad}:", out, name)
            daemon.transport.signalProcess("TERM")
            yield daemon.ended


class RewrittenChainTests(TestCase):
    """Issue 32, item 3: whoever can write the database removed an entry and the checkpoint after it and re-hashed
    the rest; on main ac6af64 the restarted controller signed a checkpoint over the forged head. It refuses now,
    and says why."""

    timeout = 60

    @inlineCallbacks
    def test_a_rewritten_trail_is_never_signed_after_a_restart(self):
        import sqlite3
        c = yield start_controller(self)
        yield c.admin_tokens.create("backdoor", ["admin"])
        for n in range(3):
            yield c.enrollment_tokens.create(f"t{n}")
        covered = yield c.audit.checkpoint_if_due(force=True)
        yield c.enrollment_tokens.create("after")
        yield c.stopService()
        database = c.settings.data_dir / "uptrakit.sqlite3"
        conn = sqlite3.connect(str(database))
        conn.row_factory = sqlite3.Row
        rows = [stored._row(r) for r in conn.execute("SELECT * FROM audit_log ORDER BY seq").fetchall()]
        forged, previous = [], stored.GENESIS
        for entry in rows:
            if entry["action"] in ("admin_token.created", "audit.checkpoint"):
                continue
            entry = dict(entry, seq=len(forged) + 1, prev_hash=previous)
            entry["hash"] = previous = stored.entry_hash(entry)
            forged.append(entry)
        conn.execute("DELETE FROM audit_log")
        for e in forged:
            conn.execute("INSERT INTO audit_log (seq, at, controller, actor, action, object, details, client, "
                         "request_id, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         (e["seq"], e["at"], e["controller"], json.dumps(e["actor"]), e["action"],
                          json.dumps(e["object"]), json.dumps(e["details"]), e["client"], e["request_id"],
                          e["prev_hash"], e["hash"]))
        conn.commit()
        conn.close()
        lines = log_lines(self)
        again = yield start_controller(self, tmp=self.mktemp(), data_dir=str(c.settings.data_dir))
        signed = yield again.audit.checkpoint_if_due(force=True)
        self.assertIsNone(signed, "no checkpoint over a rewritten trail")
        self.assertTrue(any("does not continue from the checkpoint this controller signed last" in line
                            and f"entry {covered}" in line for line in lines), lines[-5:])
        count = yield again.store.run(lambda conn: conn.execute(
            "SELECT count(*) AS n FROM audit_log WHERE action = 'audit.checkpoint'").fetchone()["n"])
        self.assertEqual(count, 0)

    @inlineCallbacks
    def test_an_anchor_file_someone_else_wrote_stops_checkpoints_but_not_the_start(self):
        c = yield start_controller(self)
        yield c.stopService()
        for garbage in ('["not", "mine"]', '{"database": "sqlite", "seq": "1"}', "{"):
            (c.settings.data_dir / "audit-anchor.json").write_text(garbage)
            lines = log_lines(self)
            again = yield start_controller(self, tmp=self.mktemp(), data_dir=str(c.settings.data_dir))
            signed = yield again.audit.checkpoint_if_due(force=True)
            self.assertIsNone(signed, garbage)
            self.assertTrue(any("cannot read" in line and "audit-anchor.json" in line for line in lines), garbage)
            yield again.stopService()


class SettingsAtStartTests(TestCase):
    """Issue 32, item 7: on main ac6af64 a restart with --force-settings-override and --trusted-proxy 0.0.0.0/0
    changed who may assert identities with 0 audit entries (the same change through the API made 1)."""

    timeout = 60

    @inlineCallbacks
    def test_a_start_that_overrides_the_stored_network_settings_is_on_the_trail(self):
        c = yield start_controller(self)
        yield c.stopService()
        again = yield start_controller(self, tmp=self.mktemp(), data_dir=str(c.settings.data_dir),
                                       force_settings_override=True, trusted_proxies=["0.0.0.0/0"],
                                       forwarded_client_cert_pem_header="X-SSL-Client-Cert")
        entries = yield again.store.run(stored.page, None, 100, "settings.network.changed")
        self.assertEqual([e["actor"] for e in entries], [{"kind": "system", "via": "start-up (--force-settings-override)"},
                                                         {"kind": "system", "via": "start-up (first start)"}])
        changed = entries[0]["details"]["changes"]
        self.assertEqual(changed["trusted_proxies"]["new"], ["0.0.0.0/0"])
        # the same flags again change nothing: no entry
        yield again.stopService()
        third = yield start_controller(self, tmp=self.mktemp(), data_dir=str(c.settings.data_dir),
                                       force_settings_override=True, trusted_proxies=["0.0.0.0/0"],
                                       forwarded_client_cert_pem_header="X-SSL-Client-Cert")
        entries = yield third.store.run(stored.page, None, 100, "settings.network.changed")
        self.assertEqual(len(entries), 2)


class AuditQueryTests(TestCase):
    """Issue 32, item 13: on main ac6af64 these query parameters gave five tracebacks and 500s."""

    timeout = 60

    @inlineCallbacks
    def test_unicode_digits_and_huge_numbers_are_a_400(self):
        from urllib.parse import quote
        c = yield start_controller(self)
        for query in ("limit=²", "limit=٣", "before=" + "9" * 30, "since=" + "9" * 30, "until=" + "9" * 19,
                      "since=" + quote("２０２６"), "since=9999-99-99", "before=-1", "limit=" + "1" * 25):
            status, body = yield request_json(c, "GET", f"/api/v1/audit?{query}")
            self.assertEqual((status, body.get("code")), (400, "invalid_filter"), query)
        status, _ = yield request_json(c, "GET", "/api/v1/audit?since=2026-01-01T00:00:00Z&limit=5")
        self.assertEqual(status, 200)
