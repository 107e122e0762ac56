"""Several controllers on one PostgreSQL write one audit chain (issue 24): sequence and previous hash are taken
in the database, under a lock, in each change's transaction."""
from __future__ import annotations

import json
from typing import Any

from cryptography import x509
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.trial.unittest import TestCase

from uptrakitd.audit import verify as audit_verify
from uptrakitd.store import audit as stored

from ..helpers import start_controller
from .postgres import PostgresCluster, kek_file


class OneChainTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def test_two_controllers_writing_at_once_make_one_verifiable_chain(self) -> Any:
        cluster = PostgresCluster()
        self.addCleanup(cluster.destroy)
        db, kek = cluster.new_database(), kek_file(self)
        a = yield start_controller(self, database=db, ca_key_encryption_key_file=kek)
        b = yield start_controller(self, database=db, ca_key_encryption_key_file=kek)
        yield gatherResults([c.enrollment_tokens.create(f"{name}-{n}") for n in range(20)
                             for name, c in (("a", a), ("b", b))])
        entries = yield a.store.run(stored.after, 0, 1000)
        made = [e for e in entries if e["action"] == "enrollment_token.created"]
        self.assertEqual(len(made), 40)
        self.assertEqual({e["controller"] for e in made}, {a.cluster.controller_id, b.cluster.controller_id})
        self.assertEqual([e["seq"] for e in entries], list(range(1, len(entries) + 1)))
        ca = x509.load_pem_x509_certificate(a.ca.state.active().pem)
        self.assertEqual(audit_verify.verify(entries, [ca], require_checkpoint=False)["entries"], len(entries))
        # the table edited with psql, as someone with database access would: each edit is named
        from ..helpers import require_program, run
        psql = require_program("psql", "apt-get install postgresql-client")
        edits = {"modified": ("UPDATE audit_log SET details = '{\"name\": \"nobody\"}' WHERE seq = 5", 5),
                 "deleted": ("DELETE FROM audit_log WHERE seq = 7", 7)}
        for name, (sql, bad) in edits.items():
            _, err, code = yield run(psql, db, "-v", "ON_ERROR_STOP=1", "-c", sql)
            self.assertEqual(code, 0, err)
            rows = yield a.store.run(stored.after, 0, 1000)
            with self.assertRaises(audit_verify.Broken, msg=name) as broken:
                audit_verify.verify(rows, [ca], require_checkpoint=False)
            self.assertEqual(broken.exception.seq, bad, name)
            # put the chain back for the next edit
            yield a.store.run(_restore, entries)


    @inlineCallbacks
    def test_every_admin_action_through_another_controller_is_one_entry_there_with_its_actor(self) -> Any:
        """The objects are made on A; every change is asked of B, by a token made on B: each leaves exactly one
        entry, written by B with that token as actor, and A (which applies the changes) writes none of its own."""
        from twisted.internet import reactor
        from twisted.internet.task import deferLater

        from uptrakitd.pki.serials import format_serial

        from ..helpers import admin_token, new_leaf, request_json
        cluster = PostgresCluster()
        self.addCleanup(cluster.destroy)
        db, kek = cluster.new_database(), kek_file(self)
        a = yield start_controller(self, database=db, ca_key_encryption_key_file=kek)
        b = yield start_controller(self, database=db, ca_key_encryption_key_file=kek)
        issued, _, service = yield new_leaf(a)
        serial = format_serial(issued.serial)
        token = yield a.enrollment_tokens.create("manual review", max_uses=2)   # not auto-approved: pending
        pending = []
        for n in range(2):
            record, _ = yield a.directory.enroll("agent", f"pending-{n}", token["token"])
            pending.append(record.id)
        status, carol = yield request_json(b, "POST", "/api/v1/admin-tokens", {"name": "carol",
                                                                               "permissions": ["admin"]},
                                           token=admin_token(a))
        self.assertIn(status, (200, 201), carol)
        yield deferLater(reactor, 1.0, lambda: None)   # B has applied A's changes
        status, spare = yield request_json(b, "POST", "/api/v1/admin-tokens", {"name": "spare",
                                                                               "permissions": ["read"]},
                                           token=carol["token"])
        self.assertIn(status, (200, 201), spare)
        status, made = yield request_json(b, "POST", "/api/v1/enrollment-tokens", {"name": "via b"},
                                          token=carol["token"])
        self.assertIn(status, (200, 201), made)
        asked = [
            ("POST", f"/api/v1/certificates/{serial}/revoke", {"reason": "keyCompromise"}, "certificate.revoked",
             serial),
            ("PUT", f"/api/v1/services/{service.id}", {"friendly_name": "via b"}, "service.updated", service.id),
            ("POST", f"/api/v1/services/{pending[0]}/approve", None, "service.approved", pending[0]),
            ("POST", f"/api/v1/services/{pending[1]}/reject", None, "service.rejected", pending[1]),
            ("DELETE", f"/api/v1/services/{service.id}", None, "service.deactivated", service.id),
            ("DELETE", f"/api/v1/enrollment-tokens/{made['id']}", None, "enrollment_token.deleted", made["id"]),
            ("DELETE", f"/api/v1/admin-tokens/{spare['id']}", None, "admin_token.revoked", spare["id"]),
            ("PUT", "/api/v1/settings/network", {"real_ip_header": "X-Real-IP"}, "settings.network.changed",
             "network"),
            ("PUT", "/api/v1/settings/service-certificates", {"lifetime_hours": 48}, "settings.certificates.changed",
             "service_certificates"),
            ("POST", "/api/v1/settings/rotate-ca", {}, "ca.rotated", "2"),
        ]
        for method, path, body, _, _ in asked:
            status, answer = yield request_json(b, method, path, body, token=carol["token"],
                                                headers={"X-Request-Id": "change-7"})
            self.assertIn(status, (200, 201, 202), (path, answer))
        yield deferLater(reactor, 1.5, lambda: None)   # A has applied B's changes (and could have recorded them)
        entries = yield a.store.run(stored.after, 0, 1000)
        expected = [("enrollment_token.created", made["id"]), ("admin_token.created", spare["id"])] + \
            [(action, obj) for *_, action, obj in asked]
        for action, obj in expected:
            found = [e for e in entries if e["action"] == action and e["object"]["id"] == obj
                     and e["actor"].get("via") != "start-up (first start)"]   # (the first start's own settings)
            self.assertEqual(len(found), 1, f"{action} {obj}: {found}")
            (entry,) = found
            self.assertEqual((entry["controller"], entry["actor"].get("name"), entry["actor"].get("id")),
                             (b.cluster.controller_id, "carol", carol["id"]), action)
            self.assertEqual(entry["client"], "127.0.0.1", action)
        self.assertEqual([e["request_id"] for e in entries if e["request_id"]], ["change-7"] * len(asked))
        # the one revocation the deactivation made is its own entry's detail, not another revocation entry
        self.assertEqual(len([e for e in entries if e["action"] == "certificate.revoked"]), 1)
        self.assertEqual([e["seq"] for e in entries], list(range(1, len(entries) + 1)))
        self.assertEqual(audit_verify.verify(entries, [], require_checkpoint=False)["entries"], len(entries))


def _restore(conn: Any, entries: list[Any]) -> None:
    conn.execute("DELETE FROM audit_log")
    for e in entries:
        conn.execute("INSERT INTO audit_log (seq, at, controller, actor, action, object, details, client, request_id, "
                     "prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     (e["seq"], e["at"], e["controller"], json.dumps(e["actor"], sort_keys=True), e["action"],
                      json.dumps(e["object"], sort_keys=True), json.dumps(e["details"], sort_keys=True), e["client"],
                      e["request_id"], e["prev_hash"], e["hash"]))

