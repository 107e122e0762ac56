"""HAProxy (Debian package) in front of the controller: mTLS, headers, CRL via the runtime API, rotation."""
from __future__ import annotations

import shutil
import socket
import tempfile
from pathlib import Path

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from uptrakitd.pki.serials import format_serial

from ..channel_helpers import next_event
from ..helpers import ca_pem, https_port, request_json, require_program, start_controller, wait_until
from .guides import Guide, guide_values, haproxy_package_layout
from .harness import (agent_identity, check_proxy, CONFIGS, connected_with_generation, free_port, PROXY_ADDR,
                      refresh_pki_files, render, RunningProxy, status_with_cert, write_pki_files)


def runtime_api(sock_path: str, *commands: str) -> str:
    """Send commands to HAProxy's stats socket (what `socat stdio unix:admin.sock` does)."""
    out = []
    for command in commands:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(sock_path)
            s.sendall(command.encode() + b"\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            out.append(data.decode())
    return "\n".join(out)


@inlineCallbacks
def start_haproxy(testcase, c):
    """HAProxy from the package's haproxy.cfg plus docs/deployment/haproxy.md's frontend/backend pair.

    Its server certificate is the controller's own (guide step 4: "use yours"), so the agents and
    clients of these tests trust it with the controller's CA.
    """
    haproxy = require_program("haproxy", "apt-get install haproxy")
    work = Path(testcase.mktemp()).resolve()
    work.mkdir(parents=True)
    files = write_pki_files(c, work / "etc-haproxy-uptrakit")
    runtime = Path(tempfile.mkdtemp(prefix="upt-haproxy-"))  # unix socket paths are limited to ~100 bytes
    testcase.addCleanup(shutil.rmtree, runtime, True)
    port = free_port()
    values = guide_values("HAPROXY_ADDR", CONTROLLER_PORT=https_port(c), PKI_PORT=1, HAPROXY_ADDR=PROXY_ADDR, PROXY_PORT=port, SERIAL="-")
    guide = Guide("haproxy", values, {"/etc/haproxy/uptrakit": work / "etc-haproxy-uptrakit"}, {}, work)
    conf = haproxy_package_layout(work, runtime, guide.block("snippet"))
    proxy = RunningProxy(testcase, "haproxy", [haproxy, "-db", "-f", str(conf)], port)
    yield proxy.start()
    proxy.files, proxy.socket = files, str(runtime / "admin.sock")
    return proxy


class HaproxyTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def test_agent_through_haproxy_crl_runtime_update_and_rotation(self):
        c = yield start_controller(self, trusted_proxies=[PROXY_ADDR],
                                   forwarded_client_cert_pem_header="X-SSL-Client-Cert")
        yield request_json(c, "PUT", "/api/v1/settings/network",
                           {"forwarded_client_verify_header": "X-SSL-Client-Verify"})
        proxy = yield start_haproxy(self, c)
        agent = yield check_proxy(self, c, proxy.port, "proxy-cert")
        victim = yield check_proxy(self, c, proxy.port, "proxy-cert")
        cert, key = agent_identity(victim)
        yield victim.stopService()
        status = yield status_with_cert(proxy.port, ca_pem(c), cert, key)
        self.assertEqual(status, 200)
        serial = format_serial(victim.state.certificate().serial_number)
        yield request_json(c, "POST", f"/api/v1/certificates/{serial}/revoke", {"reason": "keyCompromise"})
        yield wait_until(lambda: c.crls.current[1].entries >= 1, timeout=3)
        # the documented runtime update: no reload, no dropped connections
        crl = (c.settings.data_dir / "pki" / "ca.crl").read_text()
        sock = proxy.socket
        answer = yield deferToThread(runtime_api, sock, f"set ssl crl-file {proxy.files['CRL_FILE']} <<\n{crl}\n",
                                     f"commit ssl crl-file {proxy.files['CRL_FILE']}")
        self.assertIn("Success", answer)
        status = yield status_with_cert(proxy.port, ca_pem(c), cert, key)
        self.assertEqual(status, 0, "HAProxy refuses the revoked certificate at the handshake")
        self.assertIsNotNone(agent.proto, "the other agent's connection survived the CRL update")
        # rotation + documented steps (new ca.crt and ca.crl, reload): renewed agents keep working
        renewed = next_event(agent, "service_settings", timeout=60)
        yield request_json(c, "POST", "/api/v1/settings/rotate-ca")
        refresh_pki_files(c, proxy.files)
        yield proxy.restart()
        yield renewed
        yield wait_until(lambda: connected_with_generation(c, agent, 2), timeout=60)
        cert, key = agent_identity(agent)
        status = yield status_with_cert(proxy.port, ca_pem(c), cert, key)
        self.assertEqual(status, 200)


class PassthroughTests(TestCase):
    """HAProxy `mode tcp` + PROXY protocol: mTLS end to end, the agent's real address recorded."""

    timeout = 60

    @inlineCallbacks
    def test_tcp_passthrough_with_proxy_protocol(self):
        from ..channel_helpers import start_agent
        from .harness import AGENT_ADDR
        haproxy = require_program("haproxy", "apt-get install haproxy")
        c = yield start_controller(self, https_listen=r"haproxy:tcp:0:interface=127.0.0.1",
                                   proxy_protocol_senders=["127.0.0.1"])
        record = yield c.enrollment_tokens.create("passthrough", auto_approve=True)
        prefix = Path(self.mktemp()).resolve()
        prefix.mkdir(parents=True)
        port = free_port()
        conf = prefix / "haproxy.cfg"
        conf.write_text(render(CONFIGS / "haproxy/haproxy-passthrough.cfg",
                               dict(LISTEN_ADDR="127.0.0.1", LISTEN_PORT=port, UPSTREAM=f"127.0.0.1:{https_port(c)}")))
        proxy = RunningProxy(self, "haproxy", [haproxy, "-db", "-f", str(conf)], port)
        yield proxy.start()
        agent = start_agent(self, c, record["token"], bind_address=AGENT_ADDR, port=port)
        yield next_event(agent, "service_settings", timeout=30)
        service = c.directory.get(agent.service_id)
        self.assertEqual((service.identity_source, service.ip_address, service.proxy_ip), ("mtls", AGENT_ADDR, None))
