"""Attacks from unauthenticated hosts: slow heads, connection floods, huge bodies, version disclosure."""
from __future__ import annotations

import json
import socket
import ssl

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from .helpers import (log_lines, blocking_get, blocking_tls_socket, ca_pem, https_port, new_leaf, start_controller,
                      wait_until)

ATTACKER, OTHER, YET_ANOTHER = "127.0.0.9", "127.0.0.1", "127.0.0.11"


def drip_socket(port: int, source: str) -> socket.socket:
    """A TCP connection that sent one byte of a TLS ClientHello and nothing more."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    s.sendall(b"\x16")
    return s


def closed_by_server(s: socket.socket, timeout: float = 10) -> bool:
    """True when the server closes (or resets) the connection within `timeout`."""
    s.settimeout(timeout)
    try:
        return s.recv(1024) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def refused_at_once(port: int, source: str) -> bool:
    """True when a new connection from `source` is closed before it sends anything."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    try:
        return closed_by_server(s, timeout=5)
    finally:
        s.close()


def healthz_probes(port: int, ca: bytes, count: int) -> list[int]:
    statuses = []
    for _ in range(count):
        with blocking_tls_socket(port, ca, source=OTHER) as s:
            statuses.append(blocking_get(s, "/healthz")[0])
    return statuses


def raw_tls(port: int, ca: bytes) -> ssl.SSLSocket:
    return blocking_tls_socket(port, ca)


def response_head(s: ssl.SSLSocket) -> bytes:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    return buf


class SlowHeadTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_a_dripping_host_is_capped_and_timed_out_while_others_are_served(self):
        c = yield start_controller(self, max_connections_per_ip=5, request_head_timeout=1.5)
        port = https_port(c)
        drips = yield deferToThread(lambda: [drip_socket(port, ATTACKER) for _ in range(5)])
        self.addCleanup(lambda: [s.close() for s in drips])
        yield wait_until(lambda: c.https.factory.unauthenticated[ATTACKER] == 5)
        self.assertTrue((yield deferToThread(refused_at_once, port, ATTACKER)), "a sixth connection was accepted")
        statuses = yield deferToThread(healthz_probes, port, ca_pem(c), 20)
        self.assertEqual(statuses, [200] * 20, "another address is served while the attacker is at its cap")
        closed = yield deferToThread(lambda: [closed_by_server(s) for s in drips])
        self.assertEqual(closed, [True] * 5, "a head that never completes is cut off")
        metrics = c.metrics.registry
        self.assertEqual(metrics.get_sample_value("uptrakit_connections_refused_total",
                                                  {"listener": "HTTPS", "reason": "per_ip"}), 1)
        self.assertEqual(metrics.get_sample_value("uptrakit_http_head_timeouts_total"), 5)
        yield wait_until(lambda: ATTACKER not in c.https.factory.unauthenticated)

    @inlineCallbacks
    def test_authenticated_connections_do_not_count_against_the_address(self):
        c = yield start_controller(self, max_connections_per_ip=2)
        port, ca = https_port(c), ca_pem(c)
        issued, key, _ = yield new_leaf(c)

        def hold_authenticated(n):
            held = []
            for _ in range(n):
                s = blocking_tls_socket(port, ca, issued.pem, key, source=ATTACKER)
                self.assertEqual(blocking_get(s, "/api/v1/whoami")[0], 200)
                held.append(s)
            return held
        held = yield deferToThread(hold_authenticated, 4)
        self.addCleanup(lambda: [s.close() for s in held])
        drips = yield deferToThread(lambda: [drip_socket(port, ATTACKER) for _ in range(2)])
        self.addCleanup(lambda: [s.close() for s in drips])
        yield wait_until(lambda: c.https.factory.unauthenticated[ATTACKER] == 2)
        self.assertTrue((yield deferToThread(refused_at_once, port, ATTACKER)))
        self.assertEqual(c.https.factory.open, 6)

    @inlineCallbacks
    def test_the_global_cap_refuses_and_says_so(self):
        lines = log_lines(self)
        c = yield start_controller(self, max_connections=3)
        port = https_port(c)
        held = yield deferToThread(lambda: [drip_socket(port, src) for src in (ATTACKER, OTHER, YET_ANOTHER)])
        self.addCleanup(lambda: [s.close() for s in held])
        yield wait_until(lambda: c.https.factory.open == 3)
        self.assertTrue((yield deferToThread(refused_at_once, port, "127.0.0.12")))
        self.assertTrue(any("the cap is 3 (max_connections)" in line for line in lines), lines[-5:])
        self.assertEqual(c.metrics.registry.get_sample_value("uptrakit_connections_open", {"listener": "HTTPS"}), 3)

    @inlineCallbacks
    def test_the_plain_http_pki_listener_has_the_same_caps_and_gives_slots_back(self):
        """Its guard does not wrap the channel (one layer less per OCSP GET): the channel reports its own
        end, so a slot comes back after every kind of end (answered and closed, dropped by the client,
        cut at the head deadline) and the caps hold as on the HTTPS listener."""
        from .helpers import free_port
        pki_port = free_port()
        c = yield start_controller(self, pki_addr=f"http://127.0.0.1:{pki_port}", pki_http="listener",
                                   max_connections_per_ip=3, max_connections=5, request_head_timeout=1.5)
        guard = c.pki_listener.factory
        registry = c.metrics.registry

        def crl_status(source: str) -> int:
            with socket.create_connection(("127.0.0.1", pki_port), timeout=10, source_address=(source, 0)) as s:
                s.sendall(b"GET /api/v1/pki/ca.crl HTTP/1.0\r\nHost: x\r\n\r\n")
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
                return int(data.split(b" ", 2)[1])
        for _ in range(10):   # more answered connections than either cap: each gave its slot back
            self.assertEqual((yield deferToThread(crl_status, ATTACKER)), 200)
        yield wait_until(lambda: guard.open == 0)
        self.assertNotIn(ATTACKER, guard.unauthenticated)

        def idle(source: str) -> socket.socket:
            return socket.create_connection(("127.0.0.1", pki_port), timeout=10, source_address=(source, 0))
        held = yield deferToThread(lambda: [idle(ATTACKER) for _ in range(3)])
        self.addCleanup(lambda: [s.close() for s in held])
        yield wait_until(lambda: guard.unauthenticated[ATTACKER] == 3)
        self.assertTrue((yield deferToThread(refused_at_once, pki_port, ATTACKER)), "a fourth connection was accepted")
        self.assertEqual(registry.get_sample_value("uptrakit_connections_refused_total",
                                                   {"listener": "plain-HTTP PKI", "reason": "per_ip"}), 1)
        others = yield deferToThread(lambda: [idle(src) for src in (OTHER, YET_ANOTHER)])
        self.addCleanup(lambda: [s.close() for s in others])
        yield wait_until(lambda: guard.open == 5)
        self.assertTrue((yield deferToThread(refused_at_once, pki_port, "127.0.0.12")), "over the global cap")
        self.assertEqual(registry.get_sample_value("uptrakit_connections_open", {"listener": "plain-HTTP PKI"}), 5)
        held[0].close()   # dropped by the client
        yield wait_until(lambda: guard.unauthenticated[ATTACKER] == 2 and guard.open == 4)
        # the rest send nothing: cut at the head deadline, and every slot is back
        closed = yield deferToThread(lambda: [closed_by_server(s) for s in held[1:] + others])
        self.assertEqual(closed, [True] * 4)
        yield wait_until(lambda: guard.open == 0 and not guard.unauthenticated)
        self.assertEqual((yield deferToThread(crl_status, ATTACKER)), 200)


class BodyLimitTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_a_body_on_the_websocket_route_is_refused_before_it_is_read(self):
        c = yield start_controller(self)
        port, ca = https_port(c), ca_pem(c)

        def attempt():
            with raw_tls(port, ca) as s:
                s.sendall(b"GET /api/v1/ws/agent HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                          b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                          b"Sec-WebSocket-Version: 13\r\nContent-Length: 200000000\r\n\r\n")
                head = response_head(s)   # no byte of the body was sent
                return head, closed_by_server(s)
        head, closed = yield deferToThread(attempt)
        self.assertTrue(head.startswith(b"HTTP/1.1 413 "), head)
        self.assertIn(b"payload_too_large", head + b"")
        self.assertTrue(closed)
        self.assertEqual(c.metrics.registry.get_sample_value("uptrakit_http_bodies_refused_total"), 1)

    @inlineCallbacks
    def test_a_chunked_body_is_cut_off_at_the_route_limit(self):
        from uptrakitd.web.site import MAX_JSON_BODY
        c = yield start_controller(self)
        port, ca = https_port(c), ca_pem(c)

        def attempt():
            sent = 0
            with raw_tls(port, ca) as s:
                s.sendall(b"POST /api/v1/enrollment-tokens HTTP/1.1\r\nHost: localhost\r\n"
                          b"Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n")
                chunk = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"
                for _ in range(2 * MAX_JSON_BODY // 0x10000):    # twice what the route takes
                    s.sendall(chunk)
                    sent += 0x10000
                return response_head(s), closed_by_server(s)
        head, closed = yield deferToThread(attempt)
        self.assertTrue(head.startswith(b"HTTP/1.1 413 "), head[:200])
        self.assertTrue(closed, "the connection stays open after the refusal")
        self.assertEqual(c.metrics.registry.get_sample_value("uptrakit_http_bodies_refused_total"), 1)
        yield wait_until(lambda: c.https.factory.open == 0)


class DisclosureTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def test_no_version_in_server_and_json_for_a_plain_get_on_the_websocket_route(self):
        c = yield start_controller(self)
        port, ca = https_port(c), ca_pem(c)

        def get(path):
            with raw_tls(port, ca) as s:
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
                return data
        for path in ("/healthz", "/api/v1/ws/agent", "/nope"):
            data = yield deferToThread(get, path)
            head = data.split(b"\r\n\r\n")[0].lower()
            self.assertIn(b"\r\nserver: uptrakitd\r\n", head + b"\r\n", path)
            self.assertNotIn(b"twisted", data.lower(), path)
            self.assertNotIn(b"autobahn", data.lower(), path)
        data = yield deferToThread(get, "/api/v1/ws/agent")
        self.assertTrue(data.startswith(b"HTTP/1.1 426 "), data[:100])
        self.assertIn(b'"code": "upgrade_required"', data)

        def upgrade():
            with open_websocket(port, ca) as s:
                return s.head
        head = (yield deferToThread(upgrade)).lower()
        self.assertIn(b"\r\nserver: uptrakitd\r\n", head, "the 101 of a WebSocket names no library or version")
        self.assertNotIn(b"autobahn", head)




class ProxyProtocolTests(TestCase):
    """A PROXY-protocol listener believes PROXY headers only from its senders, and ignores cert headers."""

    timeout = 30

    @inlineCallbacks
    def test_only_senders_may_claim_an_address_and_headers_are_not_identity(self):
        import base64
        from cryptography.hazmat.primitives import serialization
        c = yield start_controller(self, https_listen=r"haproxy:tcp:0:interface=127.0.0.1",
                                   proxy_protocol_senders=[OTHER], trusted_proxies=["10.0.0.5"],
                                   forwarded_client_cert_pem_header="X-SSL-Client-Cert")
        port, ca = https_port(c), ca_pem(c)
        issued, _, _ = yield new_leaf(c)   # a victim's certificate: public, anyone may have it
        header = base64.b64encode(issued.cert.public_bytes(serialization.Encoding.DER)).decode()

        def whoami_via_proxy_header(source):
            raw = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
            raw.sendall(f"PROXY TCP4 10.0.0.5 127.0.0.1 40000 {port}\r\n".encode())
            ctx = ssl.create_default_context(cadata=ca.decode())
            try:
                with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                    return blocking_get(s, "/api/v1/whoami", {"X-SSL-Client-Cert": header})
            except (ssl.SSLError, ConnectionError, OSError) as e:
                return type(e).__name__
        # a client connecting directly and posing as the proxy is cut off before TLS
        # (which error the client sees depends on where its write meets the close)
        self.assertIn((yield deferToThread(whoami_via_proxy_header, ATTACKER)),
                      ("SSLEOFError", "ConnectionResetError", "SSLError", "SSLZeroReturnError", "BrokenPipeError",
                       "ConnectionAbortedError"))
        self.assertEqual(c.metrics.registry.get_sample_value(
            "uptrakit_connections_refused_total", {"listener": "HTTPS", "reason": "not_a_proxy_protocol_sender"}), 1)
        # through the real sender: the PROXY address counts, the certificate header does not
        status, body = yield deferToThread(whoami_via_proxy_header, OTHER)
        answer = json.loads(body)
        self.assertEqual((status, answer["peer_ip"], answer["identity"]), (200, "10.0.0.5", None))
        self.assertFalse(answer["via_trusted_proxy"])

    def test_a_proxy_protocol_listener_without_senders_is_refused_at_start(self):
        from uptrakitd.config import ConfigError, build_settings
        with self.assertRaises(ConfigError) as cm:
            build_settings({"https_listen": "haproxy:tcp:8443"})
        self.assertIn("--proxy-protocol-sender", str(cm.exception))


class GuardWithoutWrappingTests(TestCase):
    def test_a_protocol_that_cannot_report_its_end_is_refused_at_once(self):
        """A guard that does not wrap relies on the protocol to report its end; one that cannot would leak
        a slot per connection until the listener refused everyone, so it fails loudly instead."""
        from prometheus_client import CollectorRegistry, Counter
        from twisted.internet.address import IPv4Address
        from twisted.internet.protocol import Factory, Protocol
        from twisted.internet.task import Clock

        from uptrakitd.config import ConnectionLimits
        from uptrakitd.listen.guard import ConnectionGuard
        from uptrakitd.web.site import GuardedChannel
        refused = Counter("refused", "", ["listener", "reason"], registry=CollectorRegistry())
        addr = IPv4Address("TCP", ATTACKER, 4000)
        plain = ConnectionGuard(Factory.forProtocol(Protocol), "test", ConnectionLimits(), lambda ip: False,
                                refused, Clock(), wrap=False)
        self.assertRaises(TypeError, plain.buildProtocol, addr)
        self.assertEqual(plain.open, 0)
        channels = ConnectionGuard(Factory.forProtocol(GuardedChannel), "test", ConnectionLimits(), lambda ip: False,
                                   refused, Clock(), wrap=False)
        channel = channels.buildProtocol(addr)
        self.assertIs(channel.guard, channels)
        self.assertEqual((channels.open, channels.unauthenticated[ATTACKER]), (1, 1))


def ws_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """One masked client frame (RFC 6455 §5.2)."""
    import os
    import struct
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    head += bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n) if n < 65536 \
        else bytes([0x80 | 127]) + struct.pack("!Q", n)
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def open_websocket(port: int, ca: bytes) -> ssl.SSLSocket:
    s = raw_tls(port, ca)
    s.sendall(b"GET /api/v1/ws/agent HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    head = response_head(s)
    assert head.startswith(b"HTTP/1.1 101 "), head[:100]
    s.head = head
    return s


def keeps_sending_until_cut(s: ssl.SSLSocket, chunk: bytes, limit: float = 10.0) -> float | None:
    """Send `chunk` over and over (never a close_notify); seconds until the server cut the connection,
    None when it still took everything after `limit` seconds."""
    import time
    start = time.monotonic()
    s.settimeout(1)
    while time.monotonic() - start < limit:
        try:
            s.sendall(chunk)
        except socket.timeout:
            continue   # the server stopped reading: it may be about to cut
        except (OSError, ssl.SSLError):
            return time.monotonic() - start
    return None


class ConnectionEndTests(TestCase):
    """Once the daemon closes (or is asked to), a peer that goes on sending is cut within the close grace:
    nothing it sends is kept, and its slot under the connection caps comes back."""

    timeout = 60

    @inlineCallbacks
    def test_a_websocket_closed_by_the_peer_is_cut_however_long_the_peer_streams(self):
        c = yield start_controller(self, close_grace=1)
        port, ca = https_port(c), ca_pem(c)

        def attack():
            s = open_websocket(port, ca)
            s.sendall(ws_frame(0x8, b"\x03\xe8"))          # a clean close; the server answers it ...
            s.settimeout(5)
            reply = s.recv(4096)
            # ... and is sent 64 KiB records for as long as it keeps the connection, never a close_notify
            return reply, keeps_sending_until_cut(s, ws_frame(0x2, b"x" * 60000, fin=False))
        reply, seconds = yield deferToThread(attack)
        self.assertEqual(reply[:1], b"\x88", "the server answers the close")
        self.assertIsNotNone(seconds, "the connection was still taking bytes 10 s after the close")
        self.assertLess(seconds, 2.5)
        yield wait_until(lambda: c.https.factory.open == 0)

    @inlineCallbacks
    def test_a_websocket_the_controller_closed_is_cut_when_the_peer_streams_fragments_instead_of_replying(self):
        lines = log_lines(self)
        c = yield start_controller(self, close_grace=1)
        port, ca = https_port(c), ca_pem(c)

        def attack():
            s = open_websocket(port, ca)
            s.sendall(ws_frame(0x2, b"binary"))   # a protocol violation: the controller closes
            s.settimeout(5)
            said = b""
            while b"\x88" not in said:
                said += s.recv(4096)
            # 1-byte fragments, ~9,000 a record: each one Autobahn parses costs a copy of its whole buffer
            fragments = ws_frame(0x1, b"{", fin=False) + ws_frame(0x0, b"x", fin=False) * 9000
            return said, keeps_sending_until_cut(s, fragments)
        said, seconds = yield deferToThread(attack)
        self.assertIn(b"binary_frame", said)
        self.assertIsNotNone(seconds, "the connection was still taking fragments 10 s after the close")
        self.assertLess(seconds, 2.5)
        yield wait_until(lambda: c.https.factory.open == 0)
        self.assertTrue(any("kept sending after the close" in line or "closing handshake timeout" in line
                            for line in lines), lines[-5:])

    @inlineCallbacks
    def test_http_refused_with_a_400_is_cut_while_the_client_streams(self):
        c = yield start_controller(self, close_grace=1)
        port, ca = https_port(c), ca_pem(c)

        def attack():
            s = raw_tls(port, ca)
            s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nbroken header line\r\n\r\n")
            head = response_head(s)
            return head, keeps_sending_until_cut(s, b"y" * 65536)
        head, seconds = yield deferToThread(attack)
        self.assertTrue(head.startswith(b"HTTP/1.1 400 "), head[:100])
        self.assertIsNotNone(seconds, "a refused client was still read from 10 s later")
        self.assertLess(seconds, 2.5)
        yield wait_until(lambda: c.https.factory.open == 0)


class HandshakeLogTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_refused_websocket_handshakes_are_a_400_and_no_traceback(self):
        lines = log_lines(self)
        c = yield start_controller(self)
        port, ca = https_port(c), ca_pem(c)

        def attempt():
            with raw_tls(port, ca) as s:
                s.sendall(b"GET /api/v1/ws/agent HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                          b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n")   # no Sec-WebSocket-Key
                return response_head(s).split(b"\r\n")[0]
        for _ in range(20):
            status = yield deferToThread(attempt)
            self.assertTrue(status.startswith(b"HTTP/1.1 400 "), status)
        yield wait_until(lambda: c.https.factory.open == 0)
        text = "\n".join(lines)
        self.assertFalse("Traceback" in text or "Unhandled Error" in text, text[:600])
        self.assertLess(len(text), 20 * 400, "a refused handshake costs at most a short line of log")
