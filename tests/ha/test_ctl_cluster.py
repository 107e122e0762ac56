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
