"""The service channel end to end: real sockets, reference agents and an independent client (SPEC §5)."""
from __future__ import annotations

import json

from cryptography import x509
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from uptrakitd.pki.serials import format_serial

from .channel_helpers import (agent_identity, connected_agent, enrollment_token, frame, next_event, service_json,
                              start_agent, until_closed, ws_connect, ws_ssl)
from .helpers import https_port, make_csr, request_json, start_controller


class EnrollmentTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_agent_and_mqtt_enroll_get_certificates_and_reconnect_with_mtls(self):
        c = yield start_controller(self)
        token = yield enrollment_token(c)
        for kind in ("agent", "mqtt"):
            agent = start_agent(self, c, token, kind=kind)
            settings = yield next_event(agent, "service_settings")
            self.assertEqual(settings["ca_bundle_hash"], agent.state.bundle_hash())
            self.assertEqual(agent.mode_in_use, "mtls")
            body = yield service_json(c, agent.service_id)
            self.assertEqual((body["kind"], body["status"], body["connected"]), (kind, "approved", True))
            self.assertEqual((body["ip_address"], body["proxy_ip"], body["identity_source"]),
                             ("127.0.0.1", None, "mtls"))
            cert = agent.state.certificate()
            self.assertEqual(body["certificate"]["serial"], format_serial(cert.serial_number))
            self.assertEqual(body["certificate"]["ca_generation"], 1)
            self.assertEqual(cert.subject.rfc4514_string().split(",")[-1], f"CN={agent.service_id}")
        self.assertEqual(c.metrics.registry.get_sample_value("uptrakit_services_connected"), 2)
        status, body = yield request_json(c, "GET", "/api/v1/services?kind=mqtt&connected=true")
        self.assertEqual([s["kind"] for s in body["services"]], ["mqtt"])
        status, body = yield request_json(c, "GET", "/api/v1/services?kind=bogus")
        self.assertEqual(status, 400)

    @inlineCallbacks
    def test_ip_address_through_a_trusted_peer_with_x_forwarded_for(self):
        c = yield start_controller(self, trusted_proxies=["127.0.0.2"])
        token = yield enrollment_token(c)
        agent = start_agent(self, c, token, bind_address="127.0.0.2",
                            extra_headers={"X-Forwarded-For": "198.51.100.23"})
        yield next_event(agent, "service_settings")
        body = yield service_json(c, agent.service_id)
        self.assertEqual((body["ip_address"], body["proxy_ip"]), ("198.51.100.23", "127.0.0.2"))
        # the same header from an untrusted address is ignored
        other = start_agent(self, c, token, extra_headers={"X-Forwarded-For": "198.51.100.99"})
        yield next_event(other, "service_settings")
        body = yield service_json(c, other.service_id)
        self.assertEqual((body["ip_address"], body["proxy_ip"]), ("127.0.0.1", None))

    @inlineCallbacks
    def test_token_rules_and_pending_approval(self):
        c = yield start_controller(self)
        token = yield enrollment_token(c, kind="mqtt", max_uses=1, auto_approve=False)
        wrong_kind = start_agent(self, c, token, kind="agent")
        error = yield next_event(wrong_kind, "error")
        self.assertIn("mqtt", error["message"])
        yield wrong_kind.stopService()
        agent = start_agent(self, c, token, kind="mqtt", backoff=(30, 60))   # its own retry would be 30 s away
        enrolled = yield next_event(agent, "enrolled")
        self.assertEqual(enrolled["status"], "pending")
        used_up = start_agent(self, c, token, kind="mqtt")
        gave_up = next_event(used_up, "stopped")
        error = yield next_event(used_up, "error")
        self.assertIn("used up", error["message"])
        reason = yield gave_up   # a used-up token will not start working: the agent says so and stops
        self.assertEqual(reason, "enrollment refused: enrollment token used up: ask the operator for a new "
                                 "enrollment token")
        yield used_up.stopService()
        status, body = yield request_json(c, "GET", "/api/v1/enrollment-tokens")
        self.assertEqual(body["tokens"][0]["uses"], 1)
        self.assertNotIn("token", body["tokens"][0])
        approved = next_event(agent, "service_approved")
        status, _ = yield request_json(c, "POST", f"/api/v1/services/{agent.service_id}/approve")
        self.assertEqual(status, 200)
        # the agent waited on its enrollment socket: told at once, it gets its certificate and connects
        yield approved
        yield next_event(agent, "service_settings", timeout=5)
        status, body = yield request_json(c, "POST", f"/api/v1/services/{agent.service_id}/approve")
        self.assertEqual((status, body["code"]), (409, "not_pending"))


class IndependentClientTests(TestCase):
    """The `websockets` library, not our agent, talks to the channel."""

    timeout = 60

    @inlineCallbacks
    def test_websockets_client_full_flow_and_garbage(self):
        c = yield start_controller(self)
        token = yield enrollment_token(c)
        url = f"wss://localhost:{https_port(c)}/api/v1/ws/agent"

        def enroll_and_certify():
            with ws_connect(url, ssl=ws_ssl(c)) as ws:
                ws.send(frame("enroll", 1, hostname="ws-host", enrollment_token=token, capabilities=["x"]))
                enrolled = json.loads(ws.recv(timeout=10))
                csr, key = make_csr(enrolled["service_id"])
                ws.send(frame("request_certificate", 2, csr_pem=csr.decode()))
                cert = json.loads(ws.recv(timeout=10))
                return enrolled, cert, key
        enrolled, cert, key = yield deferToThread(enroll_and_certify)
        self.assertEqual((enrolled["type"], enrolled["seq"], enrolled["status"]), ("enrolled", 1, "approved"))
        self.assertEqual((cert["type"], cert["seq"]), ("certificate", 2))
        x509.load_pem_x509_certificate(cert["cert_pem"].encode())

        def authenticated_session():
            with ws_connect(url, ssl=ws_ssl(c, cert["cert_pem"].encode(), key)) as ws:
                settings = json.loads(ws.recv(timeout=10))
                ws.send(frame("ping", 1, service_ts=123))
                pong = json.loads(ws.recv(timeout=10))
                ws.send(frame("no_such_type", 2))
                ws.send("{not json")
                rest, code, reason = until_closed(ws)
                return settings, pong, rest[0], code, reason
        settings, pong, error, code, reason = yield deferToThread(authenticated_session)
        self.assertEqual(settings["type"], "service_settings")
        self.assertEqual(settings["trust_domain"], "uptrakit.local")
        self.assertEqual((pong["type"], pong["service_ts"]), ("pong", 123))
        self.assertEqual((error["type"], error["code"]), ("error", "invalid_json"))
        self.assertEqual((code, reason), (1008, "protocol error"))
        body = yield service_json(c, enrolled["service_id"])
        self.assertEqual(body["capabilities"], ["x"])
        self.assertIsNotNone(body["last_seen_at"])
        # the enrollment secret was invalidated by the certificate
        def reuse_secret():
            with ws_connect(url, ssl=ws_ssl(c),
                         additional_headers={"Authorization": f"Bearer {enrolled['enrollment_secret']}"}) as ws:
                return until_closed(ws)[1:]
        code, reason = yield deferToThread(reuse_secret)
        self.assertEqual((code, reason), (1008, "enrollment secret not recognized"))

    @inlineCallbacks
    def test_bad_envelopes_are_errors_then_close(self):
        c = yield start_controller(self)
        url = f"wss://localhost:{https_port(c)}/api/v1/ws/agent"
        cases = [(frame("enroll", 2), "bad_seq"), (json.dumps({"protocol_version": 2, "seq": 1, "type": "x"}),
                                                   "unsupported_version"),
                 (json.dumps([1, 2]), "invalid_envelope"), (b"\x00\x01", "binary_frame"),
                 (frame("enroll", 1, hostname=5, enrollment_token="t"), "invalid_message"),
                 (frame("enroll", 1, hostname="\ud800", enrollment_token="t"), "invalid_json"),
                 # a newline would make a fake log line, ESC drives the operator's terminal
                 (frame("enroll", 1, hostname="h\n2026-12-03 [uptrakitd#info] admin token created",
                        enrollment_token="t"), "invalid_message"),
                 (frame("enroll", 1, hostname="h", friendly_name="\x1b[2Jgone", enrollment_token="t"),
                  "invalid_message"),
                 (frame("enroll", 1, hostname="h\rx", enrollment_token="t"), "invalid_message"),
                 # issue 32, item 15: a bidi override shows "vm-evil" as "vm-live" in services list
                 (frame("enroll", 1, hostname="vm-\u202elive", enrollment_token="t"), "invalid_message"),
                 (frame("enroll", 1, hostname="vm", friendly_name="a\u200bb", enrollment_token="t"),
                  "invalid_message")]

        def attempt(payload):
            with ws_connect(url, ssl=ws_ssl(c)) as ws:
                ws.send(payload)
                messages, code, reason = until_closed(ws)
                return messages[0]["code"], code, reason
        for payload, code in cases:
            got = yield deferToThread(attempt, payload)
            self.assertEqual(got, (code, 1008, "protocol error"), payload)

        def ten_unknown():
            with ws_connect(url, ssl=ws_ssl(c)) as ws:
                for seq in range(1, 11):
                    ws.send(frame("mystery", seq))
                messages, _, reason = until_closed(ws)
                return messages[0]["code"], reason
        got = yield deferToThread(ten_unknown)
        self.assertEqual(got, ("unknown_types", "protocol error"))

    @inlineCallbacks
    def test_rate_limit_and_enrollment_timeout(self):
        from websockets.exceptions import ConnectionClosed
        c = yield start_controller(self)
        c.channel.enroll_timeout = 0.5
        agent = yield connected_agent(self, c, backoff=(30, 60))
        yield agent.stopService()
        cert, key = agent_identity(agent)
        url = f"wss://localhost:{https_port(c)}/api/v1/ws/agent"

        def flood():
            with ws_connect(url, ssl=ws_ssl(c, cert, key)) as ws:
                try:
                    for seq in range(1, 400):  # valid pings, far faster than 50/s
                        ws.send(frame("ping", seq, service_ts=seq))
                except ConnectionClosed:
                    pass  # closed while we were still sending: the replies before the close are still read
                messages, code, reason = until_closed(ws)
                return sum(m["type"] == "pong" for m in messages), code, reason

        def idle():
            with ws_connect(url, ssl=ws_ssl(c)) as ws:
                return until_closed(ws)[2]
        pongs, code, reason = yield deferToThread(flood)
        self.assertEqual((code, reason), (1008, "rate limit exceeded"))
        self.assertGreaterEqual(pongs, 90)   # the burst allowance was served
        self.assertLess(pongs, 399)
        reason = yield deferToThread(idle)
        self.assertEqual(reason, "enrollment timeout")


class FrameFloodTests(TestCase):
    """Limits count frames and bytes, not only whole messages."""

    timeout = 60

    @inlineCallbacks
    def test_one_byte_fragments_and_ping_floods_are_closed_for_rate(self):
        c = yield start_controller(self)
        url = f"wss://localhost:{https_port(c)}/api/v1/ws/agent"

        def fragments():
            with ws_connect(url, ssl=ws_ssl(c)) as ws:
                try:
                    ws.send(iter(["x"] * 5000))   # one message, 5,000 one-byte frames
                except Exception:
                    pass  # closed under us: the reason follows
                return until_closed(ws)[1:]

        def pings():
            with ws_connect(url, ssl=ws_ssl(c)) as ws:
                try:
                    for i in range(5000):
                        ws.ping(str(i))
                except Exception:
                    pass
                return until_closed(ws)[1:]
        self.assertEqual((yield deferToThread(fragments)), (1008, "rate limit exceeded"))
        self.assertEqual((yield deferToThread(pings)), (1008, "rate limit exceeded"))


class CapsUnderConcurrencyTests(TestCase):
    """Issue 32, item 4, through the `websockets` library: on main ac6af64, 20 renewals sent back to back on one
    socket were 20 certificates (the cap is 3), and 20 sockets resuming one enrollment secret got 20."""

    timeout = 90

    @inlineCallbacks
    def test_one_enrollment_is_one_certificate_and_back_to_back_renewals_are_one(self):
        import asyncio
        c = yield start_controller(self)
        token = yield enrollment_token(c)
        url = f"wss://localhost:{https_port(c)}/api/v1/ws/agent"

        def enroll():
            with ws_connect(url, ssl=ws_ssl(c)) as ws:
                ws.send(frame("enroll", 1, hostname="racer", enrollment_token=token))
                return json.loads(ws.recv(timeout=10))
        enrolled = yield deferToThread(enroll)
        service_id, secret = enrolled["service_id"], enrolled["enrollment_secret"]
        csr, key = make_csr(service_id)

        async def resume_all():
            from websockets.asyncio.client import connect
            sockets = await asyncio.gather(*[connect(url, ssl=ws_ssl(c), additional_headers={
                "Authorization": f"Bearer {secret}"}) for _ in range(20)])
            await asyncio.gather(*[ws.send(frame("request_certificate", 1, csr_pem=csr.decode())) for ws in sockets])
            answers = []
            for ws in sockets:
                try:
                    answers.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
                except Exception:
                    answers.append(None)
                await ws.close()
            return answers
        answers = yield deferToThread(asyncio.run, resume_all())
        certificates = [a for a in answers if a and a["type"] == "certificate"]
        self.assertEqual(len(certificates), 1, [a and a.get("code") for a in answers])
        import time
        self.assertEqual(c.ca.state.valid_client_certificates(service_id, time.time()), 1)
        cert = certificates[0]["cert_pem"].encode()

        async def renew_twenty():
            from websockets.asyncio.client import connect
            async with connect(url, ssl=ws_ssl(c, cert, key)) as ws:
                await ws.recv()   # service_settings
                for seq in range(1, 21):
                    await ws.send(frame("renew_certificate", seq, csr_pem=make_csr(service_id)[0].decode()))
                kinds = []
                try:
                    while True:
                        kinds.append(json.loads(await asyncio.wait_for(ws.recv(), 10)).get("type"))
                except Exception:
                    return kinds
        kinds = yield deferToThread(asyncio.run, renew_twenty())
        self.assertEqual(kinds.count("certificate"), 1, kinds)
        issued = [r for r in c.ca.state.by_service[service_id] if r.purpose == "client"]
        self.assertEqual(len(issued), 2, "the first certificate and one renewal")
