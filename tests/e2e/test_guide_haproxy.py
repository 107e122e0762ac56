"""docs/deployment/haproxy.md followed as written, with Debian's HAProxy in its package layout.

The guide's frontend/backend pair is appended to a copy of the package's own /etc/haproxy/haproxy.cfg;
HAProxy runs master-worker as the package's unit runs it, and `systemctl reload haproxy` sends USR2
to that master, as the unit's ExecReload does. Only placeholders and absolute paths are changed.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from uptrakitd.pki.serials import format_serial

from ..helpers import free_port, request_json, require_program, wait_until
from .guides import (Guide, follow_to_a_connected_agent, generation_of, haproxy_package_layout, standard_paths,
                     verify_refresh_units)
from .harness import RunningProxy

class HaproxyGuideTests(TestCase):
    timeout = 180

    @inlineCallbacks
    def test_setup_crl_refresh_and_rotation_as_written(self):
        haproxy = require_program("haproxy", "apt-get install haproxy")
        require_program("socat", "apt-get install socat")
        work = Path(self.mktemp()).resolve()
        work.mkdir(parents=True)
        runtime = Path(tempfile.mkdtemp(prefix="upt-hap-"))   # unix socket paths are limited to ~100 bytes
        self.addCleanup(shutil.rmtree, runtime, True)
        pidfile = work / "haproxy.pid"
        paths = dict(standard_paths(work), **{"/etc/haproxy/uptrakit": work / "etc-haproxy-uptrakit",
                                              "/run/haproxy": runtime})
        values = {"CONTROLLER_HOST": "127.0.0.1", "CONTROLLER_NAME": "localhost", "CONTROLLER_PORT": free_port(),
                  "PKI_PORT": free_port(), "HAPROXY_ADDR": "127.0.0.1", "PROXY_HOST": "localhost",
                  "PROXY_PORT": free_port(), "ENROLLMENT_TOKEN": "(step 6)"}
        reload_only = f'[ "$*" = "reload haproxy" ] || {{ echo "unexpected: systemctl $*" >&2; exit 1; }}\n' \
                      f'kill -USR2 "$(cat {pidfile})"'
        guide = Guide("haproxy", values, paths, {"systemctl": reload_only}, work)

        @inlineCallbacks
        def start_haproxy() -> Any:
            conf = haproxy_package_layout(work, runtime, guide.block("snippet"))
            yield RunningProxy(self, "haproxy", [haproxy, "-W", "-db", "-f", str(conf), "-p", str(pidfile)],
                               values["PROXY_PORT"]).start()
        c, host, agent, service_id = yield follow_to_a_connected_agent(self, guide, "/etc/haproxy/uptrakit",
                                                                       start_haproxy)
        # a rotation before HAProxy has the new ca.crt: the agent names the TLS alert and the fix
        status, body = yield request_json(c, "POST", "/api/v1/settings/rotate-ca")
        self.assertEqual(status, 200, body)
        yield agent.wait_for(b"re-download ca.crt on the proxy", timeout=60)
        self.assertIn(b"unknown ca", agent.output)
        yield guide.run("refresh")   # new ca.crt: the script reloads HAProxy
        yield wait_until(lambda: generation_of(c, service_id) == 2, timeout=60)
        code, out = yield guide.run("check", host)
        self.assertEqual(json.loads(out)["identity"]["ca_generation"], 2)
        # a revocation reaches HAProxy with the next refresh, through the runtime API
        serial = format_serial(c.channel.connected[service_id].serial)
        yield request_json(c, "POST", f"/api/v1/certificates/{serial}/revoke", {"reason": "keyCompromise"})
        yield wait_until(lambda: c.crls.current[2].entries >= 1, timeout=5)
        yield guide.run("refresh")   # same ca.crt: no reload, the CRL is committed at runtime
        code, out = yield guide.run("check", host, ok=False)
        self.assertIn(code, (35, 56), f"curl: HAProxy refuses the revoked certificate in the handshake\n{out}")
        yield verify_refresh_units(self, guide)
