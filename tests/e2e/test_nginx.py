"""nginx (Debian package) in front of the controller: mTLS, headers, OCSP, CRL, rotation."""
from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from uptrakitd.pki.serials import format_serial

from ..channel_helpers import next_event
from ..helpers import ca_pem, https_port, request_json, require_program, wait_until
from .guides import Guide, guide_values, nginx_package_layout, nginx_snippet
from .harness import (PROXY_ADDR, agent_identity, check_proxy, connected_with_generation, controller_for_nginx,
                      free_port, refresh_pki_files, RunningProxy, status_with_cert, write_pki_files)


@inlineCallbacks
def start_nginx(testcase, c, crl=False):
    """nginx from the package's nginx.conf with docs/deployment/nginx.md's snippet in conf.d/.

    Its server certificate is the controller's own (guide step 4: "use the one you already have"), so
    the agents and clients of these tests trust it with the controller's CA.
    """
    nginx = require_program("nginx", "apt-get install nginx-light")
    work = Path(testcase.mktemp()).resolve()
    work.mkdir(parents=True)
    files = write_pki_files(c, work / "etc-nginx-uptrakit")
    prefix = work / "nginx"
    conf = nginx_package_layout(prefix)
    port = free_port()
    values = guide_values("NGINX_ADDR", CONTROLLER_PORT=https_port(c), PKI_PORT=urlsplit(c.runtime.network.pki_addr).port, NGINX_ADDR=PROXY_ADDR,
                          PROXY_PORT=port, SERIAL="-")
    guide = Guide("nginx", values, {"/etc/nginx/uptrakit": work / "etc-nginx-uptrakit"},
                  {"nginx": f'exec {nginx} -c {conf} "$@"'}, work)
    (prefix / "conf.d" / "uptrakit.conf").write_text(nginx_snippet(guide, crl))
    proxy = RunningProxy(testcase, "nginx", [str(guide.bin / "nginx"), "-g", "daemon off;"], port)
    yield proxy.start()
    proxy.files, proxy.prefix, proxy.conf = files, prefix, conf
    return proxy


class NginxTests(TestCase):
    timeout = 120

    def test_agent_through_nginx_with_ocsp(self):
        return self.ocsp_through_nginx()

    @inlineCallbacks
    def test_nginx_accepts_answers_signed_by_a_delegated_responder(self):
        """--ocsp-signer delegated: nginx verifies the embedded responder certificate against the CA."""
        c = yield self.ocsp_through_nginx(ocsp_signer="delegated")
        self.assertEqual(sorted(c.ocsp.delegated._signers), [1], "the answers nginx accepted were delegated")

    @inlineCallbacks
    def ocsp_through_nginx(self, **extra):
        from twisted.logger import formatEvent, globalLogPublisher
        self.ocsp_log = []

        def observe(event):
            if event.get("log_namespace") == "uptrakitd.pki.ocsp":
                self.ocsp_log.append(formatEvent(event))
        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        c = yield controller_for_nginx(self, log_level="debug", **extra)   # the line per answer is debug
        nginx = yield start_nginx(self, c)
        agent = yield check_proxy(self, c, nginx.port, "proxy-cert")
        cert, key = agent_identity(agent)
        status = yield status_with_cert(nginx.port, ca_pem(c), cert, key)
        self.assertEqual(status, 200)
        before = c.metrics.ocsp_responses.labels("good")._value.get()
        self.assertGreater(before, 0, "nginx asked the controller's OCSP responder")
        serial = format_serial(agent.state.certificate().serial_number)
        stopped = next_event(agent, "disconnected", timeout=10)
        yield request_json(c, "POST", f"/api/v1/certificates/{serial}/revoke", {"reason": "keyCompromise"})
        yield stopped
        status = yield status_with_cert(nginx.port, ca_pem(c), cert, key)
        self.assertEqual(status, 400, "nginx refuses the revoked certificate (its 'SSL certificate error' page)")
        self.assertGreater(c.metrics.ocsp_responses.labels("revoked")._value.get(), 0)
        self.assertIn(f"OCSP: revoked for serial {serial}", "\n".join(self.ocsp_log))   # (format_serial's)
        return c

    @inlineCallbacks
    def test_crl_file_and_rotation(self):
        c = yield controller_for_nginx(self)
        nginx = yield start_nginx(self, c, crl=True)
        agent = yield check_proxy(self, c, nginx.port, "proxy-cert")
        other = yield check_proxy(self, c, nginx.port, "proxy-cert")
        cert, key = agent_identity(other)
        serial = format_serial(other.state.certificate().serial_number)
        yield request_json(c, "POST", f"/api/v1/certificates/{serial}/revoke", {"reason": "keyCompromise"})
        yield other.stopService()
        yield wait_until(lambda: c.crls.current[1].entries >= 1, timeout=3)
        refresh_pki_files(c, nginx.files)   # the documented timer: fetch ca.crl, then reload
        nginx.signal("HUP")
        yield deferLater(reactor, 1.0, lambda: None)
        status = yield status_with_cert(nginx.port, ca_pem(c), cert, key)
        self.assertEqual(status, 400, "nginx refuses the certificate listed in the refreshed CRL")
        # rotation + the documented steps (new ca.crt and ca.crl, reload): renewed agents keep working
        renewed = next_event(agent, "service_settings", timeout=60)
        status, body = yield request_json(c, "POST", "/api/v1/settings/rotate-ca")
        refresh_pki_files(c, nginx.files)
        nginx.signal("HUP")
        yield deferLater(reactor, 1.0, lambda: None)  # the reload starts new workers
        yield renewed
        yield wait_until(lambda: connected_with_generation(c, agent, 2), timeout=60)
        cert, key = agent_identity(agent)
        status = yield status_with_cert(nginx.port, ca_pem(c), cert, key)
        self.assertEqual(status, 200)


class AgentDiagnosisTests(TestCase):
    """The reference agent says what is wrong when nginx refuses it (issue: a bare Autobahn '[400]')."""

    timeout = 120

    @inlineCallbacks
    def test_a_rotation_the_proxy_has_not_followed_is_named_with_its_fix(self):
        c = yield controller_for_nginx(self)
        nginx = yield start_nginx(self, c)
        agent = yield check_proxy(self, c, nginx.port, "proxy-cert")
        diagnosis = next_event(agent, "diagnosis", timeout=60)
        status, body = yield request_json(c, "POST", "/api/v1/settings/rotate-ca")
        self.assertEqual(status, 200, body)
        # the agent renews onto generation 2; nginx still trusts only generation 1 and answers 400
        text = yield diagnosis
        self.assertIn("HTTP 400", text)
        self.assertIn("re-download ca.crt on the proxy", text)
        # the fix it names works
        refresh_pki_files(c, nginx.files)
        nginx.signal("HUP")
        yield wait_until(lambda: connected_with_generation(c, agent, 2), timeout=60)

    @inlineCallbacks
    def test_a_proxy_the_controller_does_not_trust_is_named(self):
        c = yield controller_for_nginx(self)
        nginx = yield start_nginx(self, c)
        agent = yield check_proxy(self, c, nginx.port, "proxy-cert")
        c.channel.enroll_timeout = 1.0
        status, body = yield request_json(c, "PUT", "/api/v1/settings/network", {"trusted_proxies": []})
        self.assertEqual(status, 200, body)
        diagnosis = next_event(agent, "diagnosis", timeout=30)
        agent.proto.transport.loseConnection()   # reconnect: now nginx's headers are ignored
        text = yield diagnosis
        self.assertIn("--trusted-proxy", text)
        self.assertIn("did not see this agent's certificate", text)
