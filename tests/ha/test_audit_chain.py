"""Several controllers on one PostgreSQL write one audit chain (issue 24): sequence and previous hash are taken
in the database, under a lock, in each change's transaction."""
from __future__ import annotations

import json
from typing import Any

from cryptography import x509
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.trial.unittest import TestCase

from uptrakitd import audit_verify
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
        lines = [json.dumps(e) for e in entries]
        ca = x509.load_pem_x509_certificate(a.ca.state.active().pem)
        self.assertEqual(audit_verify.verify(lines, [ca])["entries"], len(entries))
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
                audit_verify.verify([json.dumps(e) for e in rows], [ca])
            self.assertEqual(broken.exception.seq, bad, name)
            # put the chain back for the next edit
            yield a.store.run(_restore, entries)


def _restore(conn: Any, entries: list[Any]) -> None:
    conn.execute("DELETE FROM audit_log")
    for e in entries:
        conn.execute("INSERT INTO audit_log (seq, at, controller, actor, action, object, details, client, request_id, "
                     "prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     (e["seq"], e["at"], e["controller"], json.dumps(e["actor"], sort_keys=True), e["action"],
                      json.dumps(e["object"], sort_keys=True), json.dumps(e["details"], sort_keys=True), e["client"],
                      e["request_id"], e["prev_hash"], e["hash"]))

