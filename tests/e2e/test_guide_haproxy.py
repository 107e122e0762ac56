"""docs/deployment/haproxy.md followed as written, with Debian's HAProxy in its package layout.

The guide's frontend/backend pair is appended to a copy of the package's own /etc/haproxy/haproxy.cfg;
HAProxy runs master-worker as the package's unit runs it, and `systemctl reload haproxy` sends USR2
to that master, as the unit's ExecReload does. Only placeholders and absolute paths are changed.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from ..helpers import require_program, wait_until
from .guides import (CURL_TLS_REFUSED, follow_to_a_connected_agent, haproxy_package_layout, let_back_in,
                     revoke_as_written, rotate_then_refresh, standard_paths, verify_refresh_units, walk)
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

        reload_only = f'[ "$*" = "reload haproxy" ] || {{ echo "unexpected: systemctl $*" >&2; exit 1; }}\n' \
                      f'kill -USR2 "$(cat {pidfile})"'
        guide = walk("haproxy", "HAPROXY_ADDR", paths, {"systemctl": reload_only}, work, SERIAL="(step 9)")
        values = guide.values

        @inlineCallbacks
        def start_haproxy() -> Any:
            conf = haproxy_package_layout(work, runtime, guide.block("snippet"))
            yield RunningProxy(self, "haproxy", [haproxy, "-W", "-db", "-f", str(conf), "-p", str(pidfile)],
                               values["PROXY_PORT"]).start()
        c, host, agent, service_id = yield follow_to_a_connected_agent(self, guide, "/etc/haproxy/uptrakit",
                                                                       start_haproxy)
        # a rotation before HAProxy has the new ca.crt: the agent names the TLS alert and the fix
        yield rotate_then_refresh(self, guide, c, agent, service_id, host)   # refresh: new ca.crt, reload
        self.assertIn(b"unknown ca", agent.output)
        # a revocation reaches HAProxy with the next refresh, through the runtime API
        yield revoke_as_written(guide, c, service_id, host)
        yield wait_until(lambda: c.crls.current[2].entries >= 1, timeout=5)
        yield guide.run("refresh", as_root=True)   # same ca.crt: no reload, the CRL is committed at runtime
        code, out = yield guide.run("check", host, ok=False)
        self.assertIn(code, CURL_TLS_REFUSED, f"curl: HAProxy refuses the revoked certificate (exit {code})\n{out}")
        # the agent stops for good; forgetting its identity and step 6's command let the host back
        yield let_back_in(self, guide, c, agent, service_id, host)
        yield verify_refresh_units(self, guide)
