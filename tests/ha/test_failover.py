"""Three active controllers on one PostgreSQL behind HAProxy (etc/proxies/haproxy/haproxy-ha.cfg), as
processes: agents spread over them; a revocation made through whichever controller HAProxy picks closes
the agent wherever it is; `kill -9` one controller and its agents come back through HAProxy to the
others with the certificates they had, while revocations made in a burst during the kill all stay made,
another controller takes over the leader's jobs, and nginx checking client certificates with `ssl_ocsp`
(the controllers' responders behind HAProxy) admits a valid client throughout."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, gatherResults, inlineCallbacks
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from uptrakitd.agent.client import ServiceAgent
from uptrakitd.pki.serials import format_serial

from ..channel_helpers import agent_identity, next_event
from ..e2e.harness import CONFIGS, RunningProxy, render
from ..helpers import blocking_get, blocking_tls_socket, env, free_port, require_program, spawn
from .postgres import PostgresCluster, kek_file


AGENTS = 100


def _fetch(port: int, path: str, token: str | None = None, body: Any = None, method: str = "GET") -> tuple[int, bytes]:
    """An HTTPS request through HAProxy (blocking; certificate not checked: the test checks identities itself);
    status 0 when the connection failed (HAProxy may still send one to a controller that just died)."""
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
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def _get(port: int, path: str, token: str | None = None, body: Any = None, method: str = "GET") -> tuple[int, Any]:
    """_fetch with the body parsed as JSON."""
    status, raw = _fetch(port, path, token, body, method)
    return status, json.loads(raw or b"null") if status else None


def _crl_number(port: int) -> int:
    """The number of the generation-1 CRL a controller behind HAProxy serves."""
    status, der = _fetch(port, "/api/v1/pki/crl/1.crl")
    assert status == 200, status
    return x509.load_der_x509_crl(der).extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


class Nginx:
    """nginx verifying client certificates with `ssl_ocsp` against the controllers (through HAProxy)."""

    def __init__(self, port: int, server_pem: bytes) -> None:
        self.port, self.server_pem = port, server_pem

    def status(self, cert: bytes, key: bytes) -> int:
        """The status of GET / with this client certificate (nginx answers 400 for a refused one)."""
        with blocking_tls_socket(self.port, self.server_pem, cert, key) as s:
            return blocking_get(s, "/")[0]

    def probe(self, cert: bytes, key: bytes) -> Any:
        """Handshakes with this certificate every 50 ms until `stop()`, which fires with the statuses."""
        import threading
        statuses: list[int] = []
        running = threading.Event()
        running.set()

        def loop() -> list[int]:
            while running.is_set():
                try:
                    statuses.append(self.status(cert, key))
                except OSError as e:   # a refused or broken connection counts as a failure too
                    statuses.append(-1)
                    print(f"nginx probe: {e}")
                time.sleep(0.05)
            return statuses
        done = deferToThread(loop)

        class Probe:
            def stop(self) -> Any:
                running.clear()
                return done
        return Probe()


@inlineCallbacks
def start_nginx(testcase: TestCase, work: Path, ca: bytes, pki_front: int) -> Any:
    import datetime

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    nginx = require_program("nginx", "apt-get install nginx-light")
    prefix = work / "nginx"
    prefix.mkdir()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True).sign(key, hashes.SHA256()))
    server_pem = cert.public_bytes(serialization.Encoding.PEM)
    (prefix / "server.crt").write_bytes(server_pem)
    (prefix / "server.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    (prefix / "ca.crt").write_bytes(ca)
    port = free_port()
    (prefix / "nginx.conf").write_text(f"""
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{}}
http {{
    access_log off;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {prefix}/server.crt;
        ssl_certificate_key {prefix}/server.key;
        ssl_client_certificate {prefix}/ca.crt;
        ssl_verify_client on;
        ssl_verify_depth 1;
        ssl_ocsp leaf;
        ssl_ocsp_responder http://127.0.0.1:{pki_front}/api/v1/pki/ocsp;
        location / {{ return 200 "ok\n"; }}
    }}
}}
""")
    yield RunningProxy(testcase, "nginx", [nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
                                           "-g", "daemon off;"], port).start()
    return Nginx(port, server_pem)


class FailoverTests(TestCase):
    timeout = 180

    def controller(self, work: Path, name: str, port: int, pki_port: int, pki_front: int, url: str, kek: str) -> Any:
        twistd = str(Path(sys.executable).with_name("twistd"))
        data = work / name
        process = spawn([twistd, "--pidfile=", "-n", "uptrakit", "--data-dir", str(data),
                         "--https-listen", f"haproxy:tcp:{port}:interface=127.0.0.1",
                         "--proxy-protocol-sender", "127.0.0.1", "--database", url,
                         "--ca-key-encryption-key-file", kek, "--pki-http", "listener",
                         "--pki-listen", f"tcp:{pki_port}:interface=127.0.0.1",
                         "--pki-addr", f"http://127.0.0.1:{pki_front}"], env=env(), cwd=str(work))
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
        ports, pki_ports = [free_port() for _ in range(3)], [free_port() for _ in range(3)]
        front, pki_front = free_port(), free_port()
        conf = work / "haproxy.cfg"
        conf.write_text(render(CONFIGS / "haproxy" / "haproxy-ha.cfg", {
            "LISTEN_ADDR": "127.0.0.1", "LISTEN_PORT": front, "PKI_LISTEN_PORT": pki_front,
            **{f"CONTROLLER_{x}": f"127.0.0.1:{p}" for x, p in zip("ABC", ports)},
            **{f"CONTROLLER_{x}_PKI": f"127.0.0.1:{p}" for x, p in zip("ABC", pki_ports)}}))
        proxy = yield RunningProxy(self, "haproxy", [haproxy, "-db", "-f", str(conf)], front).start()

        controllers = []
        for name, port, pki_port in zip("abc", ports, pki_ports):
            process = self.controller(work, name, port, pki_port, pki_front, url, kek)
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
        # nginx in front of other clients, asking the controllers' OCSP (through HAProxy) at every handshake
        nginx = yield start_nginx(self, work, ca, pki_front)

        # a revocation made through whichever controller HAProxy picks reaches the agent wherever it is
        victim = agents[-1]
        closed = next_event(victim, "disconnected", timeout=30)
        serial = f"{victim.state.certificate().serial_number:X}"
        status, body = yield self.until(lambda: (lambda r: r if r[0] == 200 else None)(
            _get(front, f"/api/v1/certificates/{serial}/revoke", token, {"reason": "keyCompromise"}, "POST")),
            10, "revocation")
        self.assertEqual((yield closed)[1], "certificate revoked")
        self.assertEqual((yield deferToThread(nginx.status, *agent_identity(victim))), 400,
                         "nginx refuses the revoked certificate (OCSP through HAProxy)")
        # ten more to revoke in a burst while the leader dies (their agents stop first)
        burst = agents[-11:-1]
        for agent in [victim] + burst:
            yield agent.stopService()
        serials = [format_serial(agent.state.certificate().serial_number) for agent in burst]
        survivors = agents[:-11]
        crl_before = yield deferToThread(lambda: max(_crl_number(front) for _ in range(6)))   # any controller
        a_out = controllers[0].output.decode(errors="replace")
        self.assertIn("is now the leader", a_out, "the first controller leads (it took the lock first)")
        disconnects.clear()

        # kill -9 the leader during the burst: its agents (and only they) are disconnected, and all come back;
        # every revocation that was acknowledged stays revoked; another controller leads within seconds
        back = {i: next_event(agent, "service_settings", timeout=60) for i, agent in enumerate(survivors)}
        acknowledged: list[str] = []

        def revoke_all() -> None:
            for n, s in enumerate(serials):
                if n == 3:
                    reactor.callFromThread(controllers[0].transport.signalProcess, "KILL")
                for _ in range(50):   # HAProxy may still pick the dead one until its check takes it out
                    status, _ = _fetch(front, f"/api/v1/certificates/{s}/revoke", token,
                                       {"reason": "cessationOfOperation"}, "POST")
                    if status == 200:
                        acknowledged.append(s)
                        break
                    time.sleep(0.1)
        probe = nginx.probe(*agent_identity(survivors[0]))
        killed_at = time.monotonic()
        yield deferToThread(revoke_all)
        self.assertEqual(sorted(acknowledged), sorted(serials), "each revocation acknowledged once it got through")
        yield self.until(lambda: bool(disconnects), 10, "the agents on A disconnected")
        yield deferLater(reactor, 0.5, lambda: None)   # HAProxy closes all of A's client connections at once
        lost = sorted(disconnects)
        self.assertTrue(0 < len(lost) < len(survivors), f"{len(lost)} of {len(survivors)} agents were on A")
        yield gatherResults([back[i] for i in lost])
        took = time.monotonic() - killed_at
        print(f"\nfailover: {len(lost)} of {len(survivors)} agents were on the killed controller; all back "
              f"{took:.1f} s after kill -9")
        statuses = yield probe.stop()
        print(f"failover: nginx admitted a valid client {statuses.count(200)} times of {len(statuses)} meanwhile")
        self.assertTrue(statuses and set(statuses) == {200}, f"nginx with ssl_ocsp throughout: {statuses}")
        for i, agent in enumerate(survivors):
            if i not in lost:
                back[i].addErrback(lambda f: f.trap(CancelledError))
                back[i].cancel()   # never disconnected: nothing to wait for
        self.assertEqual(sorted(disconnects), lost, "nobody else was disconnected")
        yield self.until(lambda: any(b"is now the leader" in p.output for p in controllers[1:]), 10,
                         "another controller leads")
        print(f"failover: another controller leads (seen {time.monotonic() - killed_at:.1f} s after kill -9)")
        status, revoked = yield self.until(lambda: (lambda r: r if r[0] == 200 else None)(
            _get(front, "/api/v1/certificates?status=revoked&limit=100", token)), 10, "revoked list")
        listed = {c["serial"] for c in revoked["certificates"]}
        self.assertLessEqual(set(acknowledged), listed, "no acknowledged revocation was lost")
        crl_after = yield self.until(lambda: min(_crl_number(front) for _ in range(4)), 10, "CRL")
        self.assertGreater(crl_after, crl_before, "CRL numbers keep increasing across controllers")
        # the others agree on the records: every agent's certificate is known and good on the survivors
        status, services = yield self.until(lambda: (lambda r: r if r[0] == 200 else None)(
            _get(front, "/api/v1/services", token)), 10, "services")
        self.assertEqual(len(services["services"]), AGENTS)
        # the dead controller leaves the list (the leader clears it after 15 s unseen); nothing is held by it
        status, listed = yield self.until(lambda: (lambda r: r if r[0] == 200 and len(r[1]["controllers"]) == 2
                                                   else None)(_get(front, "/api/v1/controllers", token)), 30,
                                          "the killed controller leaves the list")
        self.assertEqual(sum(c["services"] for c in listed["controllers"]), len(survivors))
        self.assertEqual([c["leader"] for c in listed["controllers"]].count(True), 1)
        for process in controllers[1:]:
            self.assertEqual((process.data / "pki" / "ca.crt").read_bytes(), ca)
            self.assertFalse(list((process.data / "pki").glob("ca-*.key")), "CA keys come sealed from the database")

        # a rotation through whichever controller HAProxy picks: every agent, on both survivors, renews on G2,
        # and both serve the same bundle
        # each renews, then comes back with the new certificate (its next service_settings)
        renewed = [next_event(agent, "service_settings", timeout=60) for agent in survivors]
        status, rotated = yield self.until(lambda: (lambda r: r if r[0] == 200 else None)(
            _get(front, "/api/v1/settings/rotate-ca", token, {}, "POST")), 10, "rotation")
        self.assertEqual(rotated["generation"], 2)
        yield gatherResults(renewed)
        issuers = {agent.state.certificate().issuer for agent in survivors}
        self.assertEqual(len(issuers), 1)
        bundles = {(p.data / "pki" / "ca.crt").read_bytes() for p in controllers[1:]}
        self.assertEqual(len(bundles), 1, "both survivors serve the same bundle")
        self.assertEqual(x509.load_pem_x509_certificates(bundles.pop())[0].subject, issuers.pop())
        hashes = yield deferToThread(lambda: {_get(front, "/api/v1/settings/pki", token)[1]["ca_bundle_hash"]
                                              for _ in range(6)})   # HAProxy spreads these over both
        self.assertEqual(hashes, {rotated["ca_bundle_hash"]})
