"""Nginx Proxy Manager's Advanced-snippet form, run on nginx inside NPM's generated layout."""
from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from uptrakitd.pki.serials import format_serial

from ..channel_helpers import next_event
from ..helpers import DATA, ca_pem, https_port, request_json, require_program
from .guides import Guide
from .harness import (RunningProxy, agent_identity, check_proxy, controller_for_nginx, free_port, render,
                      rotate_and_follow, status_with_cert, write_pki_files)


class NginxProxyManagerTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def test_agent_through_the_npm_snippet_with_ocsp(self):
        nginx = require_program("nginx", "apt-get install nginx-light")
        c = yield controller_for_nginx(self)
        prefix = Path(self.mktemp()).resolve()
        (prefix / "conf.d" / "include").mkdir(parents=True)
        files = write_pki_files(c, prefix / "pki")
        port = free_port()
        values = dict(files, PREFIX=prefix, LISTEN_ADDR="127.0.0.1", LISTEN_PORT=port, UPSTREAM_HOST="127.0.0.1",
                      UPSTREAM_PORT=https_port(c), ADVANCED=prefix / "advanced.conf")
        # docs/deployment/nginx-proxy-manager.md's Advanced snippet, its /data paths pointing at the test's files
        guide = Guide("nginx-proxy-manager", {
            "CONTROLLER_HOST": "127.0.0.1", "CONTROLLER_NAME": "localhost", "CONTROLLER_PORT": https_port(c),
            "PKI_PORT": urlsplit(c.runtime.network.pki_addr).port, "NPM_ADDR": "127.0.0.1", "NPM_DATA": "(unused)",
            "PROXY_HOST": "localhost", "PROXY_PORT": port, "ENROLLMENT_TOKEN": "(unused)"},
            {"/data/custom_ssl/uptrakit": prefix / "pki"}, {}, prefix)
        (prefix / "advanced.conf").write_text(guide.block("snippet"))
        (prefix / "conf.d" / "include" / "proxy.conf").write_text((DATA / "npm" / "proxy.conf").read_text())
        (prefix / "nginx.conf").write_text(render(DATA / "npm" / "nginx.conf", values))
        proxy = RunningProxy(self, "nginx (NPM layout)", [nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf")],
                             port)
        yield proxy.start()
        survivor = yield check_proxy(self, c, port, "proxy-cert")
        agent = yield check_proxy(self, c, port, "proxy-cert")
        cert, key = agent_identity(agent)
        stopped = next_event(agent, "disconnected", timeout=10)
        serial = format_serial(agent.state.certificate().serial_number)
        yield request_json(c, "POST", f"/api/v1/certificates/{serial}/revoke", {"reason": "keyCompromise"})
        yield stopped
        self.assertEqual((yield status_with_cert(port, ca_pem(c), cert, key)), 400)

        def reload_nginx():
            proxy.signal("HUP")
            return deferLater(reactor, 1, lambda: None)
        yield rotate_and_follow(self, c, survivor, port, files, reload_nginx)
