"""Channel operations at scale: rotation with 50 agents, catch-up, revocation, slow consumers."""
from __future__ import annotations

import json

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from uptrakitd.channel.protocol import OUTBOUND_CAP, buffered_bytes
from uptrakitd.pki.serials import format_serial

from .channel_helpers import (agent_identity, connected_agent, enrollment_token, frame, next_event, service_json,
                              start_agent, until_closed, ws_connect, ws_ssl)
from .helpers import https_port, make_csr, request_json, start_controller, wait_until


def issuer_generation(agent) -> int:
    cn = agent.state.certificate().issuer.rfc4514_string()
    return int(cn.split("Uptrakit Internal CA G")[1].split()[0])


class RotationTests(TestCase):
    timeout = 180

    @inlineCallbacks
    def test_rotation_with_50_agents_and_one_offline(self):
        c = yield start_controller(self)
        token = yield enrollment_token(c)
        agents = [start_agent(self, c, token, backoff=(0.2, 2.0)) for _ in range(50)]
        yield gatherResults([next_event(a, "service_settings", timeout=90) for a in agents])
        offline = start_agent(self, c, token)
        yield next_event(offline, "service_settings")
        yield offline.stopService()
        order = {id(a): [] for a in agents}
        for a in agents:
            a.observers.append(lambda name, detail, a=a: order[id(a)].append(name)
                               if name in ("ca_bundle_updated", "request_cert_renewal") else None)
        renewed = [next_event(a, "service_settings", lambda d: True, timeout=120) for a in agents]
        status, body = yield request_json(c, "POST", "/api/v1/settings/rotate-ca")
        self.assertEqual(status, 200, body)
        self.assertEqual(body["notified"], 50)
        yield gatherResults(renewed)
        for a in agents:
            self.assertEqual(order[id(a)][:2], ["ca_bundle_updated", "request_cert_renewal"])
            self.assertEqual(a.state.bundle_hash(), body["ca_bundle_hash"])
        yield wait_until(lambda: all(a.proto is not None and issuer_generation(a) == 2 for a in agents), timeout=60)
        status, services = yield request_json(c, "GET", "/api/v1/services?connected=true")
        self.assertEqual(len(services["services"]), 50)
        self.assertTrue(all(s["certificate"]["ca_generation"] == 2 for s in services["services"]))
        # generation-1 certificates are revoked (superseded) once their services came back on generation 2
        old = [r for r in c.ca.state.records.values() if r.purpose == "client" and r.ca_generation == 1
               and r.service_id != offline.service_id]
        self.assertEqual(len(old), 50)
        yield wait_until(lambda: all(r.reason == "superseded" for r in old), timeout=10)
        # the offline agent comes back with its generation-1 certificate, notices the hash, fetches and renews
        self.assertNotEqual(offline.state.bundle_hash(), body["ca_bundle_hash"])
        fetched = next_event(offline, "bundle_fetched", timeout=30)
        offline.startService()
        got = yield fetched
        self.assertEqual(got, body["ca_bundle_hash"])
        yield wait_until(lambda: issuer_generation(offline) == 2 and offline.proto is not None, timeout=30)
        self.assertEqual(offline.state.bundle_hash(), body["ca_bundle_hash"])


class LifecycleTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_revocation_closes_the_socket_before_the_api_answers_and_the_agent_stops(self):
        c = yield start_controller(self)
        agent = yield connected_agent(self, c)
        stopped = next_event(agent, "stopped", timeout=5)
        serial = format_serial(agent.state.certificate().serial_number)
        proto = c.channel.connected[agent.service_id]
        status, _ = yield request_json(c, "POST", f"/api/v1/certificates/{serial}/revoke", {"reason": "keyCompromise"})
        self.assertEqual(status, 200)
        # the close was sent as part of the revocation, not by a later sweep
        self.assertTrue(proto.closing)
        reason = yield stopped
        self.assertEqual(reason, "certificate revoked")
        body = yield service_json(c, agent.service_id)
        self.assertFalse(body["connected"])

    @inlineCallbacks
    def test_identity_comes_from_the_verified_certificate_not_autobahns_parsed_copy(self):
        """Autobahn's per-connection parse of the peer certificate is skipped (9 % of the reactor in a
        rotation); the socket still belongs to the service its mTLS certificate names."""
        c = yield start_controller(self)
        agent = yield connected_agent(self, c)
        proto = c.channel.connected[agent.service_id]
        self.assertIsNone(proto._transport_details.peer_cert, "Autobahn did not parse the certificate")
        self.assertTrue(proto._transport_details.is_secure)
        self.assertEqual(proto.serial, agent.state.certificate().serial_number)
        self.assertEqual(proto.context.identity.service_id, agent.service_id)

    @inlineCallbacks
    def test_deactivation_revokes_and_closes(self):
        c = yield start_controller(self)
        agent = yield connected_agent(self, c, kind="mqtt")
        stopped = next_event(agent, "stopped", timeout=5)
        status, body = yield request_json(c, "DELETE", f"/api/v1/services/{agent.service_id}")
        self.assertEqual((status, body["status"], body["certificate"]), (200, "deactivated", None))
        reason = yield stopped
        self.assertEqual(reason, "service deactivated")
        status, certs = yield request_json(c, "GET", f"/api/v1/certificates?service_id={agent.service_id}")
        self.assertTrue(all(x["revocation_reason"] == "cessationOfOperation" for x in certs["certificates"]))

    @inlineCallbacks
    def test_new_connection_supersedes_and_shutdown_says_restarting(self):
        c = yield start_controller(self)
        # a long backoff: once superseded, the agent must not come back and supersede the test's client
        agent = yield connected_agent(self, c, backoff=(30, 60))
        cert, key = agent_identity(agent)
        superseded = next_event(agent, "disconnected")
        url = f"wss://localhost:{https_port(c)}/api/v1/ws/agent"
        ws = yield deferToThread(ws_connect, url, ssl=ws_ssl(c, cert, key))
        self.addCleanup(ws.close)
        first = yield deferToThread(ws.recv, 10)
        self.assertEqual(json.loads(first)["type"], "service_settings")
        code, reason = yield superseded
        self.assertEqual((code, reason), (1008, "superseded by new connection"))
        yield agent.stopService()

        pending = deferToThread(until_closed, ws)
        yield c.stopService()
        messages, code, _ = yield pending
        self.assertEqual([m["type"] for m in messages], ["server_restarting"])
        self.assertEqual(code, 1001)

    @inlineCallbacks
    def test_renewal_window_request_and_renew_flow(self):
        c = yield start_controller(self)
        status, _ = yield request_json(c, "PUT", "/api/v1/settings/service-certificates",
                                       {"lifetime_hours": 10, "renewal_window_hours": 11})
        token = yield enrollment_token(c)
        agent = start_agent(self, c, token)
        first = yield next_event(agent, "certificate")
        rotated = yield next_event(agent, "disconnected", lambda d: d[1] == "certificate rotated", timeout=20)
        self.assertEqual(rotated, (1008, "certificate rotated"))
        yield next_event(agent, "service_settings")
        self.assertNotEqual(agent.state.certificate().public_bytes(Encoding.PEM).decode(), first["cert_pem"])

    @inlineCallbacks
    def test_the_reference_agent_comes_back_when_its_renewal_is_deferred(self):
        c = yield start_controller(self)
        agent = yield connected_agent(self, c)
        before = agent.state.certificate().serial_number
        from twisted.internet import reactor
        from uptrakitd.channel.protocol import TokenBucket
        # as if a fleet had just taken every renewal: one is admitted every 2 s from now
        c.channel._admission = TokenBucket(reactor, rate=0.5, burst=1.0)
        c.channel._admission.tokens = 0.0
        deferred = next_event(agent, "error", lambda m: m.get("code") == "renewal_deferred")
        rotated = next_event(agent, "disconnected", lambda d: d[1] == "certificate rotated", timeout=20)
        agent.renew("test")
        message = yield deferred
        self.assertGreaterEqual(message["retry_after_seconds"], 1.0)
        yield rotated
        yield next_event(agent, "service_settings")
        self.assertNotEqual(agent.state.certificate().serial_number, before, "renewed on the second try")


class SlowConsumerTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_a_socket_that_never_reads_is_dropped_and_memory_stays_flat(self):
        import socket
        c = yield start_controller(self)
        agent = yield connected_agent(self, c)
        yield agent.stopService()
        cert, key = agent_identity(agent)
        ctx = ws_ssl(c, cert, key)

        def open_and_stop_reading():
            raw = socket.create_connection(("127.0.0.1", https_port(c)))
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s = ctx.wrap_socket(raw, server_hostname="localhost")
            s.sendall(b"GET /api/v1/ws/agent HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                      b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                      b"Sec-WebSocket-Version: 13\r\n\r\n")
            s.recv(1024)
            return s
        sock = yield deferToThread(open_and_stop_reading)
        self.addCleanup(sock.close)
        yield wait_until(lambda: agent.service_id in c.channel.connected)
        proto = c.channel.connected[agent.service_id]
        payload = "x" * 60000
        largest = 0
        sent = 0
        for _ in range(2000):
            if not proto.send("ca_bundle_updated", ca_bundle_pem=payload, ca_bundle_hash="0" * 64):
                break
            sent += 1
            largest = max(largest, buffered_bytes(proto.transport))
            yield deferLater(reactor, 0, lambda: None)
        self.assertTrue(proto.closing, "the slow consumer was not disconnected")
        self.assertLessEqual(largest, OUTBOUND_CAP + 70000)
        self.assertGreater(sent, 10)
        yield wait_until(lambda: agent.service_id not in c.channel.connected)
        self.assertEqual(c.metrics.registry.get_sample_value("uptrakit_channel_slow_consumers_total"), 1)


class AgentTwistdTests(TestCase):
    """`twistd -n uptrakit-agent` as an operator runs it, against a real controller."""

    timeout = 60

    @inlineCallbacks
    def test_twistd_agent_enrolls_and_connects(self):
        import os
        import sys
        from pathlib import Path
        from .helpers import ca_pem
        from .helpers import env, run, spawn
        c = yield start_controller(self)
        token = yield enrollment_token(c)
        tmp = Path(os.path.abspath(self.mktemp()))
        tmp.mkdir()
        (tmp / "ca.crt").write_bytes(ca_pem(c))
        twistd = str(Path(sys.executable).with_name("twistd"))
        (tmp / "token").write_text(token + "\n")
        proto = spawn([
            twistd, "--pidfile=", "-n", "uptrakit-agent", "--controller", f"wss://localhost:{https_port(c)}",
            "--enrollment-token-file", str(tmp / "token"), "--state-dir", str(tmp / "state"),
            "--ca-cert", str(tmp / "ca.crt"), "--kind", "mqtt", "--hostname", "bridge-7"], env=env(), cwd=str(tmp))
        transport = proto.transport
        self.addCleanup(lambda: None if proto.ended.called else (transport.signalProcess("TERM"), proto.ended)[1])
        try:
            yield wait_until(lambda: any(s.hostname == "bridge-7" and s.id in c.channel.connected
                                         for s in c.directory), timeout=30)
        except AssertionError:
            self.fail(proto.output.decode(errors="replace")[-3000:])
        service = next(s for s in c.directory if s.hostname == "bridge-7")
        self.assertEqual((service.kind, service.identity_source), ("mqtt", "mtls"))
        self.assertEqual(oct((tmp / "state" / "identity.pem").stat().st_mode & 0o777), "0o600")
        self.assertNotIn(token.encode(), proto.output)
        # issue 37, item 7: its log says it is connected (its last lines read like a failure before)
        yield wait_until(lambda: f"connected to the controller as service {service.id}".encode() in proto.output,
                         timeout=10)
        # deactivated: the agent stops, and says so with its exit status (systemd marks the unit failed)
        status, _ = yield request_json(c, "DELETE", f"/api/v1/services/{service.id}")
        self.assertEqual(status, 200)
        code = yield proto.ended
        self.assertEqual(code, 3, proto.output.decode(errors="replace")[-2000:])
        self.assertIn(b"uptrakit-agent: stopped: service deactivated", proto.output)
        # the token from the environment works the same way, and never shows in the process's output
        other_token = yield enrollment_token(c)
        second = spawn([
            twistd, "--pidfile=", "-n", "uptrakit-agent", "--controller", f"wss://localhost:{https_port(c)}",
            "--state-dir", str(tmp / "state2"), "--ca-cert", str(tmp / "ca.crt"), "--hostname", "bridge-8"],
            env=dict(env(), UPTRAKIT_ENROLLMENT_TOKEN=other_token), cwd=str(tmp))
        self.addCleanup(lambda: None if second.ended.called else (second.transport.signalProcess("TERM"),
                                                                    second.ended)[1])
        yield wait_until(lambda: any(s.hostname == "bridge-8" and s.id in c.channel.connected
                                     for s in c.directory), timeout=30)
        self.assertNotIn(other_token.encode(), second.output)
        second.transport.signalProcess("TERM")
        yield second.ended
        out, err, code = yield run(
            twistd, "--pidfile=", "-n", "uptrakit-agent", "--state-dir", str(tmp / "x"), env=env())
        self.assertNotEqual(code, 0)
        self.assertIn(b"--controller is required", out + err)


class LostRenewalTests(TestCase):
    """A renewal answer that never reaches the service must not lock it out."""

    timeout = 60

    @inlineCallbacks
    def test_old_certificate_stays_valid_until_the_new_one_is_used(self):
        c = yield start_controller(self)
        agent = yield connected_agent(self, c, backoff=(30, 60))
        yield agent.stopService()
        old_cert, old_key = agent_identity(agent)
        old_serial = x509.load_pem_x509_certificate(old_cert).serial_number
        url = f"wss://localhost:{https_port(c)}/api/v1/ws/agent"

        def renew_and_lose_the_answer():
            csr, new_key = make_csr(agent.service_id)
            with ws_connect(url, ssl=ws_ssl(c, old_cert, old_key)) as ws:
                json.loads(ws.recv(timeout=10))                       # service_settings
                ws.send(frame("renew_certificate", 1, csr_pem=csr.decode()))
                messages, _, reason = until_closed(ws)               # certificate: "lost" by the caller
                return messages[0]["cert_pem"].encode(), new_key, reason

        def session(cert, key):
            with ws_connect(url, ssl=ws_ssl(c, cert, key)) as ws:
                return json.loads(ws.recv(timeout=10))["type"]
        new_cert, new_key, reason = yield deferToThread(renew_and_lose_the_answer)
        self.assertEqual(reason, "certificate rotated")
        self.assertIsNone(c.ca.state.records[old_serial].revoked_at)
        self.assertEqual((yield deferToThread(session, old_cert, old_key)), "service_settings")
        self.assertEqual((yield deferToThread(session, new_cert, new_key)), "service_settings")
        yield wait_until(lambda: c.ca.state.records[old_serial].reason == "superseded", timeout=5)
