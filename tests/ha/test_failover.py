"""Three active controllers on one PostgreSQL behind HAProxy (etc/proxies/haproxy/haproxy-ha.cfg), as
processes: agents spread over them; a revocation made through whichever controller HAProxy picks closes
the agent wherever it is; `kill -9` one controller and its agents come back through HAProxy to the
others with the certificates they had."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, gatherResults, inlineCallbacks
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from uptrakitd.agent.client import ServiceAgent

from ..channel_helpers import next_event
from ..e2e.harness import CONFIGS, RunningProxy, render
from ..helpers import env, free_port, require_program, spawn
from .postgres import PostgresCluster, kek_file


AGENTS = 100


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
                         "--ca-key-encryption-key-file", kek], env=env(), cwd=str(work))
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
    def test_agents_of_a_killed_controller_come_back_through_haproxy_to_the_others(self):
        haproxy = require_program("haproxy", "apt-get install haproxy")
        cluster = PostgresCluster()
        self.addCleanup(cluster.destroy)
        url, kek = cluster.new_database(), kek_file(self)
        work = Path(self.mktemp()).resolve()
        work.mkdir(parents=True)
        ports, front = [free_port() for _ in range(3)], free_port()
        conf = work / "haproxy.cfg"
        conf.write_text(render(CONFIGS / "haproxy" / "haproxy-ha.cfg", {
            "LISTEN_ADDR": "127.0.0.1", "LISTEN_PORT": front, "CONTROLLER_A": f"127.0.0.1:{ports[0]}",
            "CONTROLLER_B": f"127.0.0.1:{ports[1]}", "CONTROLLER_C": f"127.0.0.1:{ports[2]}"}))
        proxy = yield RunningProxy(self, "haproxy", [haproxy, "-db", "-f", str(conf)], front).start()

        controllers = []
        for name, port in zip("abc", ports):
            process = self.controller(work, name, port, url, kek)
            controllers.append(process)
            try:   # one after the other: the first creates the CA and the admin token, the others load them
                yield self.expect(process, b"HTTPS listening", 40)
            except AssertionError:
                raise AssertionError(f"controller {name} did not start:\n" + process.output.decode(errors="replace")
                                     [-2500:] + "\nHAProxy:\n" + proxy.output.output.decode(errors="replace")[-1500:])
        a = controllers[0]
        token = (a.data / "admin.token").read_text().strip()
        status, created = yield self.until(lambda: (lambda r: r if r[0] == 201 else None)(
            _get(front, "/api/v1/enrollment-tokens", token, {"name": "ha", "auto_approve": True,
                                                               "max_uses": None}, "POST")), 20, "token")
        ca = (a.data / "pki" / "ca.crt").read_bytes()
        disconnects: dict[int, list[Any]] = {}
        agents = []
        for i in range(AGENTS):
            agent = ServiceAgent(reactor, f"wss://localhost:{front}", self.mktemp(), enrollment_token=created["token"],
                                 ca_cert=ca, backoff=(0.2, 2.0))
            agent.observers.append(lambda event, detail, i=i: disconnects.setdefault(i, []).append(detail)
                                   if event == "disconnected" else None)
            agents.append(agent)
            self.addCleanup(lambda agent=agent: agent.stopService() if agent.running else None)
        settled = [next_event(agent, "service_settings", timeout=90) for agent in agents]
        for agent in agents:
            agent.startService()
        yield gatherResults(settled)
        disconnects.clear()   # enrolling ends with a close (then the agent comes back with its certificate)

        # a revocation made through whichever controller HAProxy picks reaches the agent wherever it is
        victim = agents[-1]
        closed = next_event(victim, "disconnected", timeout=30)
        serial = f"{victim.state.certificate().serial_number:X}"
        status, body = yield self.until(lambda: (lambda r: r if r[0] == 200 else None)(
            _get(front, f"/api/v1/certificates/{serial}/revoke", token, {"reason": "keyCompromise"}, "POST")),
            10, "revocation")
        self.assertEqual((yield closed)[1], "certificate revoked")
        yield victim.stopService()
        disconnects.clear()
        survivors = agents[:-1]

        # kill -9 one controller: its agents (and only they) are disconnected, and all come back
        back = {i: next_event(agent, "service_settings", timeout=60) for i, agent in enumerate(survivors)}
        killed_at = time.monotonic()
        controllers[1].transport.signalProcess("KILL")
        yield self.until(lambda: bool(disconnects), 10, "the agents on B disconnected")
        yield deferLater(reactor, 0.5, lambda: None)   # HAProxy closes all of B's client connections at once
        lost = sorted(disconnects)
        self.assertTrue(0 < len(lost) < len(survivors), f"{len(lost)} of {len(survivors)} agents were on B")
        yield gatherResults([back[i] for i in lost])
        took = time.monotonic() - killed_at
        print(f"\nfailover: {len(lost)} of {len(survivors)} agents were on the killed controller; all back "
              f"{took:.1f} s after kill -9")
        for i, agent in enumerate(survivors):
            if i not in lost:
                back[i].addErrback(lambda f: f.trap(CancelledError))
                back[i].cancel()   # never disconnected: nothing to wait for
        self.assertEqual(sorted(disconnects), lost, "nobody else was disconnected")
        # the others agree on the records: every agent's certificate is known and good on the survivors
        status, services = yield self.until(lambda: (lambda r: r if r[0] == 200 else None)(
            _get(front, "/api/v1/services", token)), 10, "services")
        self.assertEqual(len(services["services"]), AGENTS)
        for process in (controllers[0], controllers[2]):
            self.assertEqual((process.data / "pki" / "ca.crt").read_bytes(), ca)
            self.assertFalse(list((process.data / "pki").glob("ca-*.key")), "CA keys come sealed from the database")
