"""Several controllers on one PostgreSQL write one audit chain (issue 24): sequence and previous hash are taken
in the database, under a lock, in each change's transaction."""
from __future__ import annotations

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
        import json
        lines = [json.dumps(e) for e in entries]
        ca = x509.load_pem_x509_certificate(a.ca.state.active().pem)
        self.assertEqual(audit_verify.verify(lines, [ca])["entries"], len(entries))
