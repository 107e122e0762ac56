"""uptrakitctl with several controllers on one PostgreSQL (issue 25): `status` lists them, and `ca rotate --wait`
asked of one follows the renewals of services connected to every controller, to the end."""
from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.trial.unittest import TestCase

from ..channel_helpers import enrollment_token, next_event, start_agent
from ..helpers import start_controller
from ..test_ctl import Ctl
from .postgres import PostgresCluster, kek_file


class ClusterCtlTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def test_rotate_wait_follows_every_controllers_services(self) -> Any:
        cluster = PostgresCluster()
        self.addCleanup(cluster.destroy)
        db, kek = cluster.new_database(), kek_file(self)
        a = yield start_controller(self, database=db, ca_key_encryption_key_file=kek)
        b = yield start_controller(self, database=db, ca_key_encryption_key_file=kek)
        token = yield enrollment_token(a)   # (only the first controller wrote an admin token file)
        agents = [start_agent(self, c, token) for c in (a, a, b)]
        yield gatherResults([next_event(agent, "service_settings") for agent in agents])
        self.assertEqual((len(a.channel.connected), len(b.channel.connected)), (2, 1))
        ctl = Ctl.of(self, a)
        status = yield ctl.json("status")
        self.assertEqual(sorted(c["id"] for c in status["controllers"]),
                         sorted([a.cluster.controller_id, b.cluster.controller_id]))
        out, err, code = yield ctl("ca", "rotate", "--yes", "--wait", "--wait-timeout", "60", "-o", "json")
        self.assertEqual(code, 0, err)
        last = json.loads(out.splitlines()[-1])
        self.assertEqual((last["complete"], last["renewed"], last["total"], last["lagging_controllers"]),
                         (True, 3, 3, []))
        for agent in agents:
            self.assertIn("G2", agent.state.certificate().issuer.rfc4514_string())


class BreakGlassPostgresqlTests(TestCase):
    """Issue 37, item 4 with PostgreSQL: `uptrakitctl tokens admin create --database` writes a token every
    controller knows within seconds (through the change log), with no API."""

    timeout = 90

    @inlineCallbacks
    def test_a_token_written_into_the_database_works_on_every_controller(self) -> Any:
        import sys

        from ..helpers import env, request_json, run
        from .postgres import PostgresCluster, kek_file
        cluster = PostgresCluster()
        self.addCleanup(cluster.destroy)
        db, kek = cluster.new_database(), kek_file(self)
        a = yield start_controller(self, database=db, ca_key_encryption_key_file=kek)
        b = yield start_controller(self, database=db, ca_key_encryption_key_file=kek)
        out, err, code = yield run(sys.executable, "-m", "uptrakitd.ctl", "tokens", "admin", "create", "--name",
                                   "break-glass", "--role", "read", "--database", db, env=env())
        self.assertEqual(code, 0, err)
        token = out.decode().splitlines()[0]
        from twisted.internet import reactor
        from twisted.internet.task import deferLater
        for c in (a, b):
            for _ in range(150):
                status, _ = yield request_json(c, "GET", "/api/v1/services", token=token)
                if status == 200:
                    break
                yield deferLater(reactor, 0.1, lambda: None)
            self.assertEqual(status, 200)
            status, _ = yield request_json(c, "POST", "/api/v1/settings/rotate-ca", token=token)
            self.assertEqual(status, 403, "a read token")
