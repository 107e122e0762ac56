"""docs/deployment/nginx.md followed as written, with Debian's nginx in its package layout.

The controller starts from the guide's TOML, nginx from the package's own /etc/nginx/nginx.conf with
the guide's snippet in conf.d/, the agent from the guide's command line; the check, the token and
the refresh script are the guide's shell blocks. Only placeholders and absolute paths are changed.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from uptrakitd.pki.serials import format_serial

from ..helpers import free_port, request_json, require_program, run, start_controller, wait_until
from .guides import Guide, nginx_package_layout, nginx_snippet
from .harness import RunningProxy

class NginxGuideTests(TestCase):
    timeout = 180

    @inlineCallbacks
    def follow_guide(self, crl: bool) -> Any:
        """Steps 1–7 of the guide; returns (guide, controller, agent host dir, agent process, service id)."""
        nginx = require_program("nginx", "apt-get install nginx-light")
        require_program("curl", "apt-get install curl")
        require_program("openssl", "apt-get install openssl")
        work = Path(self.mktemp()).resolve()
        work.mkdir(parents=True)
        prefix = work / "nginx"
        conf = nginx_package_layout(prefix)
        paths = {"/etc/nginx/uptrakit": work / "etc-nginx-uptrakit", "/var/lib/uptrakitd": work / "controller",
                 "/var/lib/uptrakit-agent": work / "agent-state", "/opt/uptrakitd/venv/bin": Path(sys.executable).parent,
                 "/usr/local/sbin": work / "sbin"}
        values = {"CONTROLLER_HOST": "127.0.0.1", "CONTROLLER_NAME": "localhost", "CONTROLLER_PORT": free_port(),
                  "PKI_PORT": free_port(), "NGINX_ADDR": "127.0.0.1", "PROXY_HOST": "localhost",
                  "PROXY_PORT": free_port(), "ENROLLMENT_TOKEN": "(step 6)"}
        guide = Guide("nginx", values, paths, {"nginx": f'exec {nginx} -c {conf} "$@"'}, work)

        # 2. the controller from the guide's TOML
        toml = work / "uptrakit.toml"
        toml.write_text(guide.block("controller"))
        c = yield start_controller(self, str(work), config=str(toml), data_dir=str(paths["/var/lib/uptrakitd"]),
                                   https_listen=f"tcp:{values['CONTROLLER_PORT']}:interface=127.0.0.1")
        # 3.–5. files, server certificate, the snippet in conf.d/
        yield guide.run("fetch")
        yield guide.run("server-cert")
        snippet = nginx_snippet(guide, crl)
        (prefix / "conf.d" / "uptrakit.conf").write_text(snippet)
        proxy = RunningProxy(self, "nginx", [str(guide.bin / "nginx"), "-g", "daemon off;"], values["PROXY_PORT"])
        yield proxy.start()
        # 6. a token, then the agent exactly as the guide starts it
        code, out = yield guide.run("token")
        guide.values["ENROLLMENT_TOKEN"] = json.loads(out)["token"]
        host = work / "agent-host"
        host.mkdir()
        shutil.copy(paths["/etc/nginx/uptrakit"] / "ca.crt", host / "ca.crt")
        shutil.copy(paths["/etc/nginx/uptrakit"] / "server.crt", host / "proxy-server.crt")
        agent = guide.spawn("agent", host)
        self.addCleanup(_stop, agent)
        try:
            yield wait_until(lambda: len(c.channel.connected) == 1, timeout=60)
        except AssertionError:
            raise AssertionError("the agent started from the guide did not connect:\n"
                                 + agent.output.decode(errors="replace")[-3000:]) from None
        (service_id,) = list(c.channel.connected)
        # 7. the check
        code, out = yield guide.run("check", host)
        answer = json.loads(out)
        self.assertEqual((answer["identity_source"], answer["identity"]["service_id"], answer["proxy_ip"]),
                         ("proxy-cert", service_id, "127.0.0.1"))
        return guide, c, host, agent, service_id

    @inlineCallbacks
    def test_ocsp_setup_rotation_and_revocation_as_written(self):
        guide, c, host, agent, service_id = yield self.follow_guide(crl=False)
        # 8. a rotation before the proxy has the new ca.crt: the agent says what to do
        status, body = yield request_json(c, "POST", "/api/v1/settings/rotate-ca")
        self.assertEqual(status, 200, body)
        yield agent.wait_for(b"re-download ca.crt on the proxy", timeout=60)
        yield guide.run("refresh")
        yield wait_until(lambda: _generation(c, service_id) == 2, timeout=60)
        code, out = yield guide.run("check", host)
        self.assertEqual(json.loads(out)["identity"]["ca_generation"], 2)
        # revocation: nginx asks OCSP at the handshake, so the check fails at once
        serial = format_serial(c.channel.connected[service_id].serial)
        yield request_json(c, "POST", f"/api/v1/certificates/{serial}/revoke", {"reason": "keyCompromise"})
        code, out = yield guide.run("check", host, ok=False)
        self.assertEqual(code, 22, "curl -f: nginx answers 400 for the revoked certificate")

    @inlineCallbacks
    def test_crl_variant_and_the_timer_units(self):
        guide, c, host, agent, service_id = yield self.follow_guide(crl=True)
        serial = format_serial(c.channel.connected[service_id].serial)
        yield request_json(c, "POST", f"/api/v1/certificates/{serial}/revoke", {"reason": "keyCompromise"})
        yield wait_until(lambda: c.crls.current[1].entries >= 1, timeout=5)
        code, out = yield guide.run("check", host, ok=False)
        self.assertEqual(code, 0, "before the refresh nginx still has the old CRL (the controller says no identity)")
        self.assertIsNone(json.loads(out)["identity"])
        yield guide.run("refresh")   # what the timer runs
        for _ in range(50):   # `nginx -s reload` returns before the new workers run
            code, out = yield guide.run("check", host, ok=False)
            if code == 22:
                break
            yield deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(code, 22, "curl -f: nginx refuses the certificate listed in the refreshed CRL")
        # the guide's timer and service units are valid systemd units (with the script where they expect it)
        analyze = require_program("systemd-analyze", "apt-get install systemd")
        sbin = guide.workdir / "sbin"
        sbin.mkdir()
        script = sbin / "uptrakit-pki-refresh"
        script.write_text(guide.block("refresh"))
        script.chmod(0o755)
        units = guide.workdir / "units"
        units.mkdir()
        (units / "uptrakit-pki-refresh.service").write_text(guide.block("timer"))
        (units / "uptrakit-pki-refresh.timer").write_text(guide.block("timer-unit"))
        out, err, code = yield run(analyze, "verify", str(units / "uptrakit-pki-refresh.timer"),
                                   str(units / "uptrakit-pki-refresh.service"))
        self.assertEqual((code, err.decode().strip()), (0, ""), out)


def _generation(c: Any, service_id: str) -> int | None:
    proto = c.channel.connected.get(service_id)
    identity = proto.context.identity if proto is not None and proto.context is not None else None
    return identity.ca_generation if identity is not None and not proto.closing else None


def _stop(process: Any) -> Any:
    if not process.ended.called:
        process.transport.signalProcess("TERM")
    return process.ended
