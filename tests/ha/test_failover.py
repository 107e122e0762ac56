"""Active/standby on one PostgreSQL behind HAProxy (etc/proxies/haproxy/haproxy-ha.cfg): `kill -9` the active
controller, the standby takes the database lock, boots from the database (the CA key sealed in it), and
the agent reconnects through HAProxy with the certificate it already had."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from uptrakitd.agent.client import ServiceAgent

from ..channel_helpers import next_event
from ..e2e.harness import CONFIGS, RunningProxy, render
from ..helpers import env, free_port, require_program, spawn
from .postgres import PostgresCluster, kek_file


def _get(port: int, path: str, token: str | None = None, body: Any = None, method: str = "GET") -> tuple[int, Any]:
    """An HTTPS request through HAProxy (blocking; certificate not checked: the test checks identities itself)."""
    import ssl
    import urllib.error
    import urllib.request
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    req = urllib.request.Request(f"https://127.0.0.1:{port}{path}", method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=5) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")
    except OSError:
        return 0, None


class FailoverTests(TestCase):
    timeout = 180

    def controller(self, work: Path, name: str, port: int, url: str, kek: str) -> Any:
        twistd = str(Path(sys.executable).with_name("twistd"))
        data = work / name
        process = spawn([twistd, "--pidfile=", "-n", "uptrakit", "--data-dir", str(data),
                         "--https-listen", f"haproxy:tcp:{port}:interface=127.0.0.1",
                         "--proxy-protocol-sender", "127.0.0.1", "--database", url,
                         "--ca-key-encryption-key-file", kek, "--standby"], env=env(), cwd=str(work))
        def kill() -> Any:
            if not process.ended.called:
                try:
                    process.transport.signalProcess("KILL")
                except ProcessExitedAlready:
                    pass
            return process.ended
        self.addCleanup(kill)
        process.data = data
        return process

    @inlineCallbacks
    def expect(self, process: Any, needle: bytes, timeout: float) -> Any:
        try:
            yield process.wait_for(needle, timeout=timeout)
        except Exception:
            raise AssertionError(f"{needle!r} not logged within {timeout} s:\n"
                                 + process.output.decode(errors="replace")[-2500:]) from None

    @inlineCallbacks
    def until(self, probe: Any, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            result = yield deferToThread(probe)
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout} s")
            yield deferLater(reactor, 0.2, lambda: None)

    @inlineCallbacks
    def test_the_standby_takes_over_when_the_active_controller_is_killed(self):
        haproxy = require_program("haproxy", "apt-get install haproxy")
        cluster = PostgresCluster()
        self.addCleanup(cluster.destroy)
        url, kek = cluster.new_database(), kek_file(self)
        work = Path(self.mktemp()).resolve()
        work.mkdir(parents=True)
        port_a, port_b, front = free_port(), free_port(), free_port()
        conf = work / "haproxy.cfg"
        conf.write_text(render(CONFIGS / "haproxy" / "haproxy-ha.cfg", {
            "LISTEN_ADDR": "127.0.0.1", "LISTEN_PORT": front,
            "CONTROLLER_A": f"127.0.0.1:{port_a}", "CONTROLLER_B": f"127.0.0.1:{port_b}"}))
        proxy = yield RunningProxy(self, "haproxy", [haproxy, "-db", "-f", str(conf)], front).start()

        a = self.controller(work, "a", port_a, url, kek)
        try:
            yield self.until(lambda: _get(front, "/readyz")[0] == 200, 40, "controller A ready through HAProxy")
        except AssertionError:
            raise AssertionError("A did not become ready:\n" + a.output.decode(errors="replace")[-2500:]
                                 + "\nHAProxy:\n" + proxy.output.output.decode(errors="replace")[-1500:]) from None
        b = self.controller(work, "b", port_b, url, kek)
        yield self.expect(b, b"another controller is active", 30)   # B is a standby, not listening

        token = (a.data / "admin.token").read_text().strip()
        status, created = yield self.until(lambda: (lambda r: r if r[0] == 201 else None)(
            _get(front, "/api/v1/enrollment-tokens", token, {"name": "ha", "auto_approve": True,
                                                               "max_uses": None}, "POST")), 10, "token")
        ca = (a.data / "pki" / "ca.crt").read_bytes()
        agent = ServiceAgent(reactor, f"wss://localhost:{front}", self.mktemp(), enrollment_token=created["token"],
                             ca_cert=ca, backoff=(0.1, 1.0))
        agent.startService()
        self.addCleanup(lambda: agent.stopService() if agent.running else None)
        yield next_event(agent, "service_settings", timeout=30)

        back = next_event(agent, "service_settings", timeout=60)
        killed_at = time.monotonic()
        a.transport.signalProcess("KILL")
        yield self.expect(b, b"taking over", 30)
        yield back   # the agent is back, through HAProxy, on B, with the certificate A issued
        took = time.monotonic() - killed_at
        print(f"\nfailover: the agent was back {took:.1f} s after kill -9 of the active controller")
        status, services = yield self.until(lambda: (lambda r: r if r[0] == 200 else None)(
            _get(front, "/api/v1/services", token)), 10, "services on B")
        (service,) = services["services"]
        self.assertEqual((service["connected"], service["identity_source"]), (True, "mtls"))
        self.assertEqual((b.data / "pki" / "ca.crt").read_bytes(), ca, "B serves the CA that A created")
        self.assertFalse(list((b.data / "pki").glob("ca-*.key")), "B's CA key came sealed from the database")
