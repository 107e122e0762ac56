"""Who is this request? (SPEC §3) End to end over real sockets, plus properties of the stripping rules."""
from __future__ import annotations

import base64
import json
from urllib.parse import quote, quote_plus

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings, strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.http_headers import Headers

from uptrakitd.config import NetworkSettings
from uptrakitd.pki.state import CaState
from uptrakitd.pki.serials import format_serial
from uptrakitd.trust.identity import IdentityResolver, header_family

from .helpers import (blocking_get, blocking_tls_socket, ca_pem, foreign_ca_and_leaf, https_port, request_json,
                      new_leaf, start_controller)


PROXY = "127.0.0.2"
CLIENT = "127.0.0.1"


def rfc2253(name: x509.Name) -> str:
    return name.rfc4514_string()


class EndToEndTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def setUp(self):
        self.c = yield start_controller(self, trusted_proxies=[PROXY])
        self.leaf, self.key, self.service = yield new_leaf(self.c)
        self.pem = self.leaf.pem
        self.der = self.leaf.cert.public_bytes(serialization.Encoding.DER)

    def whoami(self, source=CLIENT, headers=None, cert=None, key=None):
        def go():
            with blocking_tls_socket(https_port(self.c), ca_pem(self.c), cert, key, source=source) as s:
                return blocking_get(s, "/api/v1/whoami", headers)
        d = deferToThread(go)
        d.addCallback(lambda r: json.loads(r[1]))
        return d

    def configure(self, **fields):
        return request_json(self.c, "PUT", "/api/v1/settings/network", fields)

    def assertIdentity(self, answer, source):
        self.assertEqual(answer["identity_source"], source, answer)
        self.assertEqual(answer["identity"], {"service_id": self.service.id,
                                              "serial": format_serial(self.leaf.serial), "ca_generation": 1})
        self.assertIsNone(answer["rejected"])

    def assertNoIdentity(self, answer, reason_fragment):
        self.assertIsNone(answer["identity"], answer)
        self.assertEqual(answer["identity_source"], "none")
        self.assertIn(reason_fragment, answer["rejected"] or "")

    @inlineCallbacks
    def test_direct_mtls_wins_and_ignores_headers(self):
        other, _, _ = yield new_leaf(self.c)
        yield self.configure(forwarded_client_cert_pem_header="X-SSL-Client-Cert")
        answer = yield self.whoami(CLIENT, {"X-SSL-Client-Cert": base64.b64encode(
            other.cert.public_bytes(serialization.Encoding.DER)).decode()}, self.pem, self.key)
        self.assertIdentity(answer, "mtls")
        self.assertEqual((answer["peer_ip"], answer["client_ip"], answer["proxy_ip"]), (CLIENT, CLIENT, None))
        self.assertFalse(answer["via_trusted_proxy"])

    @inlineCallbacks
    def test_a_deactivated_service_has_no_identity_even_with_a_valid_certificate(self):
        # the state an interrupted deactivation of an older release could leave: deactivated, not revoked
        self.service.status = "deactivated"
        yield self.configure(forwarded_client_cert_pem_header="X-SSL-Client-Cert")
        answer = yield self.whoami(CLIENT, cert=self.pem, key=self.key)
        self.assertNoIdentity(answer, "service deactivated")
        answer = yield self.whoami(PROXY, {"X-SSL-Client-Cert": base64.b64encode(self.der).decode()})
        self.assertNoIdentity(answer, "service deactivated")

    @inlineCallbacks
    def test_a_cached_header_verification_follows_revocation_and_rotation(self):
        yield self.configure(forwarded_client_cert_pem_header="X-SSL-Client-Cert")
        header = {"X-SSL-Client-Cert": base64.b64encode(self.der).decode()}
        for _ in range(3):
            self.assertIdentity((yield self.whoami(PROXY, header)), "proxy-cert")
        self.assertEqual((self.c.resolver.verified.misses, self.c.resolver.verified.hits), (1, 2),
                         "the signature was checked once")
        other, _, _ = yield new_leaf(self.c)
        other_header = {"X-SSL-Client-Cert": base64.b64encode(other.cert.public_bytes(serialization.Encoding.DER))
                        .decode()}
        yield self.whoami(PROXY, other_header)
        yield request_json(self.c, "POST", f"/api/v1/certificates/{format_serial(other.serial)}/revoke", {})
        self.assertNoIdentity((yield self.whoami(PROXY, other_header)), "certificate revoked")
        for _ in range(2):   # generation 1 leaves the trusted set at the second rotation
            status, _ = yield request_json(self.c, "POST", "/api/v1/settings/rotate-ca")
            self.assertEqual(status, 200)
        self.assertNoIdentity((yield self.whoami(PROXY, header)), "not issued by a trusted CA")

    @inlineCallbacks
    def test_every_certificate_header_format_through_a_trusted_proxy(self):
        yield self.configure(forwarded_client_cert_pem_header="X-SSL-Client-Cert")
        b64 = base64.b64encode(self.der).decode()
        for name, value in [("nginx $ssl_client_escaped_cert", quote(self.pem.decode(), safe="-_.~")),
                            ("HAProxy/Caddy base64 DER", b64), ("Traefik chain", b64 + "," + b64),
                            ("RFC 9440", f":{b64}:")]:
            answer = yield self.whoami(PROXY, {"X-SSL-Client-Cert": value, "X-Forwarded-For": "203.0.113.9"})
            self.assertIdentity(answer, "proxy-cert")
            self.assertEqual((answer["client_ip"], answer["proxy_ip"]), ("203.0.113.9", PROXY), name)
        yield self.configure(forwarded_client_cert_info_header="X-Forwarded-Client-Cert",
                             forwarded_client_cert_pem_header="")
        xfcc = f'By=spiffe://proxy;Hash=abc;Cert="{quote(self.pem.decode(), safe="-_.~")}";Subject="{rfc2253(self.leaf.cert.subject)}"'
        answer = yield self.whoami(PROXY, {"X-Forwarded-Client-Cert": xfcc})
        self.assertIdentity(answer, "proxy-cert")

    @inlineCallbacks
    def test_structured_info_through_a_trusted_proxy(self):
        cert = self.leaf.cert
        yield self.configure(forwarded_client_cert_info_header="X-Forwarded-Client-Cert-Info")
        kv = (f'Subject="{rfc2253(cert.subject)}";Issuer="{rfc2253(cert.issuer)}";'
              f'SerialNumber="{format_serial(cert.serial_number)}"')
        answer = yield self.whoami(PROXY, {"X-Forwarded-Client-Cert-Info": kv})
        self.assertIdentity(answer, "proxy-info")
        slash = (f'Subject="/O=Uptrakit Agent/CN={self.service.id}";Issuer="/O=Uptrakit/CN='
                 f'{self.c.ca.state.active().common_name}";SerialNumber="{format_serial(cert.serial_number).lower()}"')
        answer = yield self.whoami(PROXY, {"X-Forwarded-Client-Cert-Info": slash})
        self.assertIdentity(answer, "proxy-info")
        yield self.configure(forwarded_client_cert_info_header="X-Forwarded-Tls-Client-Cert-Info")
        traefik = quote_plus(f'Subject="{rfc2253(cert.subject)}";Issuer="{rfc2253(cert.issuer)}";'
                             f'SerialNumber="{cert.serial_number}";NB="1";NA="2"')
        answer = yield self.whoami(PROXY, {"X-Forwarded-Tls-Client-Cert-Info": traefik})
        self.assertIdentity(answer, "proxy-info")

    @inlineCallbacks
    def test_forgeries_get_no_identity_and_whoami_says_why(self):
        cert = self.leaf.cert
        yield self.configure(forwarded_client_cert_info_header="X-Forwarded-Client-Cert-Info",
                             forwarded_client_cert_pem_header="X-SSL-Client-Cert")

        def kv(subject=None, issuer=None, serial=None):
            return {"X-Forwarded-Client-Cert-Info":
                    f'Subject="{subject or rfc2253(cert.subject)}";Issuer="{issuer or rfc2253(cert.issuer)}";'
                    f'SerialNumber="{serial or format_serial(cert.serial_number)}"'}
        answer = yield self.whoami(PROXY, kv(issuer="CN=Uptrakit Internal CA G1 00000000,O=Uptrakit"))
        self.assertNoIdentity(answer, "issuer CN does not match a trusted CA")
        answer = yield self.whoami(PROXY, kv(serial="0123456789ABCDEF"))
        self.assertNoIdentity(answer, "serial not issued to this service")
        answer = yield self.whoami(PROXY, kv(subject="CN=00000000-0000-4000-8000-000000000000"))
        self.assertNoIdentity(answer, "subject CN is not a known service")
        _, foreign, _ = foreign_ca_and_leaf(self.service.id)
        answer = yield self.whoami(PROXY, {"X-SSL-Client-Cert": base64.b64encode(
            x509.load_pem_x509_certificate(foreign).public_bytes(serialization.Encoding.DER)).decode()})
        self.assertNoIdentity(answer, "certificate not issued by a trusted CA")
        answer = yield self.whoami(PROXY, {"X-Forwarded-Client-Cert-Info": 'Hash=1;Subject="CN=x"'})
        self.assertNoIdentity(answer, "lacks")
        answer = yield self.whoami(PROXY, {"X-SSL-Client-Cert": "%%%garbage"})
        self.assertNoIdentity(answer, "unusable")
        # the very same good headers from an untrusted address: stripped, and whoami says so
        answer = yield self.whoami(CLIENT, dict(kv(), **{"X-Forwarded-For": "203.0.113.9"}))
        self.assertNoIdentity(answer, "not a trusted proxy")
        self.assertEqual((answer["client_ip"], answer["proxy_ip"]), (CLIENT, None))
        # revoked: refused at once
        yield request_json(self.c, "POST", f"/api/v1/certificates/{format_serial(cert.serial_number)}/revoke", {})
        answer = yield self.whoami(PROXY, kv())
        self.assertNoIdentity(answer, "certificate revoked")

    @inlineCallbacks
    def test_verify_header_and_previous_ca(self):
        cert = self.leaf.cert
        yield self.configure(forwarded_client_cert_info_header="X-Forwarded-Client-Cert-Info",
                             forwarded_client_verify_header="X-SSL-Client-Verify")
        kv = (f'Subject="{rfc2253(cert.subject)}";Issuer="{rfc2253(cert.issuer)}";'
              f'SerialNumber="{format_serial(cert.serial_number)}"')
        answer = yield self.whoami(PROXY, {"X-Forwarded-Client-Cert-Info": kv, "X-SSL-Client-Verify": "FAILED:x"})
        self.assertNoIdentity(answer, "verification did not succeed")
        answer = yield self.whoami(PROXY, {"X-Forwarded-Client-Cert-Info": kv, "X-SSL-Client-Verify": "SUCCESS"})
        self.assertIdentity(answer, "proxy-info")
        yield self.c.ca.rotate()
        answer = yield self.whoami(PROXY, {"X-Forwarded-Client-Cert-Info": kv, "X-SSL-Client-Verify": "SUCCESS"})
        self.assertIdentity(answer, "proxy-info")  # generation 1 is the previous CA: still trusted
        yield self.c.ca.rotate()
        answer = yield self.whoami(PROXY, {"X-Forwarded-Client-Cert-Info": kv, "X-SSL-Client-Verify": "SUCCESS"})
        self.assertNoIdentity(answer, "issuer CN does not match a trusted CA")

    @inlineCallbacks
    def test_network_settings_api(self):
        status, body = yield self.configure(trusted_proxies=["10.0.0.0/8", "nonsense"])
        self.assertEqual((status, body["code"]), (400, "invalid_setting"))
        self.assertIn("trusted_proxies", body["error"])
        status, body = yield request_json(self.c, "GET", "/api/v1/settings/network")
        self.assertEqual(body["trusted_proxies"], ["127.0.0.2/32"])
        status, body = yield self.configure(pki_addr="http://pki.example")
        self.assertEqual(status, 200)
        self.assertIn("rotate the CA", body["pki_addr_warning"])
        # applied to the next request, no restart: 127.0.0.2 stops being trusted
        yield self.configure(trusted_proxies=[])
        answer = yield self.whoami(PROXY, {"X-Forwarded-For": "203.0.113.9"})
        self.assertEqual((answer["client_ip"], answer["proxy_ip"]), (PROXY, None))
        status, body = yield request_json(self.c, "PUT", "/api/v1/settings/network", b"[1, 2]")
        self.assertEqual(status, 400)
        status, body = yield request_json(self.c, "PUT", "/api/v1/settings/network", {"unknown_field": 1})
        self.assertEqual(status, 400)

    @inlineCallbacks
    def test_forwarded_for_walk_end_to_end(self):
        answer = yield self.whoami(PROXY, {"X-Forwarded-For": "203.0.113.5, 127.0.0.2"})
        self.assertEqual(answer["client_ip"], "203.0.113.5")
        answer = yield self.whoami(PROXY, {"X-Forwarded-For": "6.6.6.6, 198.51.100.4"})
        self.assertEqual(answer["client_ip"], "198.51.100.4")
        self.assertTrue(answer["via_trusted_proxy"])


# -- properties of the stripping rules (in memory) ------------------------------------------------

class FakeRequest:
    def __init__(self, peer: str, headers: Headers):
        self.requestHeaders = headers
        self.peer = peer
        self.channel = None

    def getClientAddress(self):
        return IPv4Address("TCP", self.peer, 40000)


FAMILY_NAMES = ["X-Forwarded-Client-Cert", "X-Forwarded-Client-Cert-Info", "X-Forwarded-Tls-Client-Cert",
                "X-Forwarded-Tls-Client-Cert-Info", "X-SSL-Client-Cert", "X-SSL-Client-S-DN", "X-Client-Cert",
                "X-Client-Cert-Chain", "SSL-Client-Cert", "Client-Cert", "Client-Cert-Chain", "X-Forwarded-Proto",
                "X-Forwarded-Host", "Origin", "X-Forwarded-For", "Forwarded", "X-Real-IP", "X-My-Cert-Info"]
NAME = st.one_of(st.sampled_from(FAMILY_NAMES), st.text(alphabet="abcXYZ-_", min_size=1, max_size=12))


def mangle(name: str, data) -> str:
    name = "".join(c.upper() if data.draw(st.booleans()) else c.lower() for c in name)
    return name.replace("-", "_") if data.draw(st.booleans()) else name


class StrippingPropertyTests(TestCase):
    def resolver(self, network):
        return IdentityResolver(lambda: network, CaState(), {}, "uptrakit.local", Clock())

    @settings(max_examples=300, deadline=None)
    @given(st.data(), st.lists(st.tuples(NAME, st.text(max_size=50)), max_size=12))
    def test_untrusted_peer_gets_no_identity_and_no_forwarded_header_survives(self, data, headers):
        network = NetworkSettings().updated({"trusted_proxies": ["10.0.0.0/8"],
                                             "forwarded_client_cert_info_header": "X-My-Cert-Info"})
        h = Headers()
        for name, value in headers:
            try:
                h.addRawHeader(mangle(name, data), value.encode("utf-8"))
            except ValueError:
                continue
        request = FakeRequest("192.0.2.1", h)
        context = self.resolver(network)(request)
        self.assertIsNone(context.identity)
        self.assertEqual((context.client_ip, context.proxy_ip), ("192.0.2.1", None))
        for raw, _ in h.getAllRawHeaders():
            self.assertIsNone(header_family(raw.decode("latin-1"), ["X-My-Cert-Info"], "X-Forwarded-For", True),
                              raw)

    def test_trusted_proxy_without_evidence_keeps_its_headers(self):
        network = NetworkSettings().updated({"trusted_proxies": ["10.0.0.0/8"]})
        h = Headers({b"X-Forwarded-For": [b"203.0.113.1"], b"X-SSL-Client-Cert": [b"junk"]})
        context = self.resolver(network)(FakeRequest("10.1.1.1", h))
        self.assertEqual((context.client_ip, context.proxy_ip, context.identity), ("203.0.113.1", "10.1.1.1", None))
        self.assertTrue(h.hasHeader(b"X-Forwarded-For"))


class ChannelEvidenceTests(TestCase):
    """What the WebSocket handshake does with each identity decision (SPEC §3 feeding §5)."""

    timeout = 60

    @inlineCallbacks
    def test_close_reason_follows_the_decision(self):
        import socket as socketlib

        from .channel_helpers import until_closed, ws_connect, ws_ssl
        c = yield start_controller(self, trusted_proxies=[PROXY], forwarded_client_cert_pem_header="X-SSL-Client-Cert")
        c.channel.enroll_timeout = 0.5
        leaf, _, _ = yield new_leaf(c)
        good = base64.b64encode(leaf.cert.public_bytes(serialization.Encoding.DER)).decode()
        _, foreign, _ = foreign_ca_and_leaf()
        bad = base64.b64encode(x509.load_pem_x509_certificate(foreign).public_bytes(serialization.Encoding.DER)).decode()

        def close_reason(source, header):
            sock = socketlib.create_connection(("127.0.0.1", https_port(c)), timeout=10, source_address=(source, 0))
            with ws_connect(f"wss://localhost:{https_port(c)}/api/v1/ws/agent", sock=sock, ssl=ws_ssl(c),
                            server_hostname="localhost", additional_headers={"X-SSL-Client-Cert": header}) as ws:
                return until_closed(ws)[2]
        self.assertEqual((yield deferToThread(close_reason, PROXY, bad)), "certificate not recognized")
        # from an untrusted peer the header is stripped: an anonymous socket that must enroll
        self.assertEqual((yield deferToThread(close_reason, CLIENT, good)), "enrollment timeout")
        yield request_json(c, "POST", f"/api/v1/certificates/{format_serial(leaf.serial)}/revoke", {})
        self.assertEqual((yield deferToThread(close_reason, PROXY, good)), "certificate revoked")


class VerifiedCacheTests(TestCase):
    """The cache stays bounded and a revocation evicts exactly that serial's entries."""

    def test_bound_and_eviction_by_serial(self):
        from uptrakitd.events import CertificateRevoked
        from uptrakitd.trust.verified import Checked, VerifiedCertificates

        class Facts:
            def __init__(self, serial):
                self.serial = serial
        cache = VerifiedCertificates(max_entries=3)
        for value, serial in (("a", 1), ("b", 2), ("c", 2), ("d", 3)):
            cache.get(value, lambda serial=serial: Checked(Facts(serial), 1))
        self.assertEqual(len(cache), 3, "the oldest entry ('a') left")
        cache.on_revoked(CertificateRevoked(2, None, 1, "keyCompromise", 0))
        self.assertEqual(len(cache), 1)
        calls = []
        cache.get("d", lambda: calls.append("d") or Checked(Facts(3), 1))
        cache.get("b", lambda: calls.append("b") or Checked(Facts(2), 1))
        self.assertEqual(calls, ["b"], "d was kept, b was checked again")
        long_value = "A" * 5000   # kept by its SHA-256, evicted by serial all the same
        cache.get(long_value, lambda: calls.append("long") or Checked(Facts(4), 1))
        cache.get(long_value, lambda: calls.append("long") or Checked(Facts(4), 1))
        cache.on_revoked(CertificateRevoked(4, None, 1, "keyCompromise", 0))
        cache.get(long_value, lambda: calls.append("long") or Checked(Facts(4), 1))
        self.assertEqual(calls, ["b", "long", "long"])


class VerifiedCacheDifferentialTests(TestCase):
    """The verified-header cache (trust/verified.py) shortcuts a full verification of a forwarded certificate:
    through a random run of requests, revocations, deactivations and CA rotations, the controller's resolver
    (with its cache) decides every request exactly as a twin resolver that verifies every header in full."""

    timeout = 120

    @inlineCallbacks
    def test_the_cache_decides_as_a_full_verification_does(self):
        import random

        from uptrakitd.errors import Conflict
        from uptrakitd.trust.verified import VerifiedCertificates
        c = yield start_controller(self, trusted_proxies=[PROXY])
        yield request_json(c, "PUT", "/api/v1/settings/network",
                           {"forwarded_client_cert_pem_header": "X-SSL-Client-Cert"})
        cached = c.resolver
        full = IdentityResolver(cached.current_network, cached.ca_state, cached.services, cached.trust_domain, cached.clock)
        full.verified = VerifiedCertificates(max_entries=0)   # every header verified in full, every time
        leaves = []
        for _ in range(4):
            leaf, _, service = yield new_leaf(c)
            leaves.append((leaf, service))
        foreign = x509.load_pem_x509_certificate(foreign_ca_and_leaf()[1])
        values = [base64.b64encode(leaf.cert.public_bytes(serialization.Encoding.DER)).decode() for leaf, _ in leaves]
        values += [leaves[0][0].pem.decode().replace("\n", " "), quote(leaves[1][0].pem.decode()),
                   base64.b64encode(foreign.public_bytes(serialization.Encoding.DER)).decode(), "junk", "A" * 5000]
        rng = random.Random(20261203)
        decisions: dict[str, int] = {}
        for step in range(160):
            roll = rng.random()
            if roll < 0.03:
                try:   # (a deactivation revoked its service's certificates already)
                    yield c.ca.revoke(rng.choice(leaves)[0].serial, "keyCompromise")
                except Conflict:
                    pass
            elif roll < 0.05:
                yield c.directory.deactivate(rng.choice(leaves)[1].id)
            elif roll < 0.065:   # two or three in a run: the first leaves are then untrusted
                yield c.ca.rotate()
            elif roll < 0.13:   # a new certificate for a service, as a renewal would make
                leaf, _, service = yield new_leaf(c)
                leaves.append((leaf, service))
                values.append(base64.b64encode(leaf.cert.public_bytes(serialization.Encoding.DER)).decode())
            value = rng.choice(values)
            headers = Headers({b"X-SSL-Client-Cert": [value.encode()]})
            fast = cached(FakeRequest(PROXY, headers.copy()))
            slow = full(FakeRequest(PROXY, headers.copy()))
            got = [(ctx.identity_source, ctx.identity and (ctx.identity.service_id, ctx.identity.serial,
                                                           ctx.identity.ca_generation), ctx.rejected, ctx.rejected_code)
                   for ctx in (fast, slow)]
            self.assertEqual(got[0], got[1], f"step {step}: {value[:60]}")
            decisions[got[0][2] or "identity"] = decisions.get(got[0][2] or "identity", 0) + 1
        # the run met the cases that matter: identities, revoked and deactivated certificates, foreign and
        # malformed headers, and the cache answered many of them
        self.assertGreater(decisions.get("identity", 0), 10, decisions)
        for reason in ("certificate revoked", "certificate not issued by a trusted CA",
                       "certificate header unusable: certificate is not DER"):
            self.assertIn(reason, decisions)
        self.assertGreater(cached.verified.hits, 40)
