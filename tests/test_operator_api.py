"""The routes behind the web UI: overview and its banners, rotation progress, the proxy doctor, the session,
`/` and the favicon, and the refusal to revoke the controller's own server certificate."""
from __future__ import annotations

import json
import urllib.parse

import treq
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from uptrakitd.pki.serials import format_serial
from uptrakitd.trust.doctor import MAX_PEERS, IdentityDoctor

from .helpers import (blocking_get, blocking_tls_socket, ca_pem, enrolled_service, foreign_ca_and_leaf, https_client,
                      https_port, make_csr, new_leaf, request_json, start_controller, url)

UNTRUSTED, PROXY = "127.0.0.7", "127.0.0.3"


class OperatorApiTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_root_redirects_to_the_ui_and_the_favicon_is_served(self):
        c = yield start_controller(self)
        client = https_client(c)
        r = yield client.get(url(c, "/"), allow_redirects=False)
        yield treq.content(r)
        self.assertEqual((r.code, r.headers.getRawHeaders("location")), (302, ["/ui/"]))
        for path in ("/favicon.ico", "/ui/favicon.svg"):
            r = yield client.get(url(c, path))
            body = yield treq.content(r)
            self.assertEqual((r.code, r.headers.getRawHeaders("content-type")), (200, ["image/svg+xml"]), path)
            self.assertTrue(body.startswith(b"<svg"), path)

    @inlineCallbacks
    def test_session_names_the_token_and_its_role(self):
        c = yield start_controller(self)
        status, me = yield request_json(c, "GET", "/api/v1/session")
        self.assertEqual((status, me["name"], me["role"]), (200, "bootstrap", "admin"))
        status, created = yield request_json(c, "POST", "/api/v1/admin-tokens", {"name": "auditor",
                                                                                  "permissions": ["read"]})
        status, me = yield request_json(c, "GET", "/api/v1/session", token=created["token"])
        self.assertEqual((status, me["name"], me["role"], me["id"]), (200, "auditor", "read", created["id"]))
        yield request_json(c, "DELETE", f"/api/v1/admin-tokens/{created['id']}")
        status, body = yield request_json(c, "GET", "/api/v1/session", token=created["token"])
        self.assertEqual(status, 401)

    @inlineCallbacks
    def test_the_server_certificate_cannot_be_revoked_through_the_api(self):
        c = yield start_controller(self)
        server = next(r for r in c.ca.state.records.values() if r.purpose == "server")
        status, body = yield request_json(c, "POST", f"/api/v1/certificates/{format_serial(server.serial)}/revoke",
                                          {"reason": "keyCompromise"})
        self.assertEqual((status, body["code"]), (409, "server_certificate"))
        self.assertIn("rotate the CA", body["error"])
        self.assertIsNone(server.revoked_at)
        self.assertEqual(c.crls.current[1].entries, 0)

    @inlineCallbacks
    def test_overview_counts_and_banners(self):
        c = yield start_controller(self)
        service = yield enrolled_service(c, hostname="web-1")
        yield c.directory.issue_certificate(service.id, make_csr(service.id)[0])
        issued, _key, _leaf_service = yield new_leaf(c)
        status, o = yield request_json(c, "GET", "/api/v1/overview")
        self.assertEqual(status, 200)
        self.assertEqual((o["active_ca"]["generation"], o["previous_ca"]), (1, None))
        self.assertEqual(o["services"], {"total": 2, "connected": 0, "pending": 0})
        self.assertEqual(o["certificates"]["revoked_last_24h"], 0)
        self.assertEqual(o["banners"], [])
        self.assertEqual(o["ca_bundle_hash"], c.ca.bundle_hash())
        self.assertGreater(o["server_certificate"]["days_left"], 30)

        yield request_json(c, "POST", f"/api/v1/certificates/{format_serial(issued.serial)}/revoke")
        status, body = yield request_json(c, "PUT", "/api/v1/settings/network", {"trusted_proxies": ["0.0.0.0/0"]})
        self.assertEqual(status, 200)
        status, o = yield request_json(c, "GET", "/api/v1/overview")
        self.assertEqual(o["certificates"]["revoked_last_24h"], 1)
        self.assertEqual([b["code"] for b in o["banners"]], ["trusts_everything"])

        # a rotation: the service holding a generation-1 certificate keeps it "in progress"
        status, rotated = yield request_json(c, "POST", "/api/v1/settings/rotate-ca")
        status, o = yield request_json(c, "GET", "/api/v1/overview")
        self.assertEqual(o["previous_ca"]["generation"], 1)
        self.assertIn("rotation_in_progress", [b["code"] for b in o["banners"]])
        self.assertTrue(o["rotation"]["in_progress"])
        status, progress = yield request_json(c, "GET", "/api/v1/rotation")
        self.assertEqual((progress["generation"], progress["complete"], progress["notified"]), (2, False, 0))
        stuck = [s["name"] for s in progress["on_old_generation"]]
        self.assertIn("web-1", stuck)
        self.assertEqual(progress["renewed"], [])
        # it renews onto generation 2: done
        csr, _key = make_csr(service.id)
        yield c.directory.issue_certificate(service.id, csr)
        status, progress = yield request_json(c, "GET", "/api/v1/rotation")
        self.assertIn("web-1", [s["name"] for s in progress["renewed"]])
        self.assertNotIn("web-1", [s["name"] for s in progress["on_old_generation"]])

    @inlineCallbacks
    def test_proxy_doctor_reports_untrusted_senders_and_proxies_without_forwarded_for(self):
        c = yield start_controller(self, trusted_proxies=[PROXY + "/32"],
                                   forwarded_client_cert_pem_header="X-SSL-Client-Cert")
        issued, _key, _service = yield new_leaf(c)
        escaped = urllib.parse.quote(issued.pem.decode())
        junk = "not-a-certificate-but-a-secret-looking-value"

        def send() -> list[int]:
            statuses = []
            for source, headers in ((UNTRUSTED, {"X-SSL-Client-Cert": junk}),
                                    (PROXY, {"X-SSL-Client-Cert": escaped}),
                                    (PROXY, {"X-SSL-Client-Cert": escaped, "X-Forwarded-For": "192.0.2.5"})):
                sock = blocking_tls_socket(https_port(c), ca_pem(c), source=source)
                statuses.append(blocking_get(sock, "/api/v1/whoami", headers)[0])
                sock.close()
            return statuses
        statuses = yield deferToThread(send)
        self.assertEqual(statuses, [200, 200, 200])

        status, body = yield request_json(c, "GET", "/api/v1/diagnostics/identity", token=None)
        self.assertEqual(status, 401)
        status, report = yield request_json(c, "GET", "/api/v1/diagnostics/identity")
        self.assertEqual(status, 200)
        self.assertNotIn(junk, json.dumps(report))
        peers = {p["peer"]: p for p in report["peers"]}
        self.assertEqual(set(peers), {UNTRUSTED, PROXY}, "the API client itself sent no identity headers")
        outsider = peers[UNTRUSTED]
        self.assertEqual((outsider["trusted"], outsider["decisions"]), (False, {"ignored": 1}))
        advice = {a["code"]: a["text"] for a in outsider["advice"]}
        self.assertIn(f"add {UNTRUSTED}/32 to the trusted proxies", advice["untrusted_sender"])
        self.assertEqual([a.get("trust") for a in outsider["advice"]], [f"{UNTRUSTED}/32"])
        # trusted from now on: the record made before says what it was, and its advice is gone
        status, _ = yield request_json(c, "PUT", "/api/v1/settings/network",
                                       {"trusted_proxies": [PROXY + "/32", UNTRUSTED + "/32"]})
        self.assertEqual(status, 200)
        status, report = yield request_json(c, "GET", "/api/v1/diagnostics/identity")
        outsider = {p["peer"]: p for p in report["peers"]}[UNTRUSTED]
        self.assertEqual((outsider["trusted"], outsider["trusted_when_seen"], outsider["advice"]), (True, False, []))
        proxy = peers[PROXY]
        self.assertEqual((proxy["trusted"], proxy["count"], proxy["decisions"]), (True, 2, {"accepted": 2}))
        self.assertTrue(proxy["configured_header_seen"])
        # sampled once a second: the first request (without X-Forwarded-For) decided it
        self.assertIn("no_forwarded_for", [a["code"] for a in proxy["advice"]])

    @inlineCallbacks
    def test_a_trusted_proxy_sending_another_header_is_a_mismatch(self):
        c = yield start_controller(self, trusted_proxies=[PROXY + "/32"],
                                   forwarded_client_cert_pem_header="X-SSL-Client-Cert")

        def send() -> int:
            sock = blocking_tls_socket(https_port(c), ca_pem(c), source=PROXY)
            status = blocking_get(sock, "/api/v1/whoami", {"X-Forwarded-Tls-Client-Cert": "MIIB",
                                                           "X-Forwarded-For": "192.0.2.5"})[0]
            sock.close()
            return status
        status = yield deferToThread(send)
        self.assertEqual(status, 200)
        status, report = yield request_json(c, "GET", "/api/v1/diagnostics/identity")
        (proxy,) = report["peers"]
        self.assertEqual((proxy["header_families"], proxy["forwarded_for_present"]), (["traefik"], True))
        (mismatch,) = proxy["advice"]
        self.assertEqual(mismatch["code"], "header_mismatch")
        self.assertIn("forwarded_client_cert_pem_header = X-SSL-Client-Cert", mismatch["text"])


    @inlineCallbacks
    def test_routes_that_do_not_read_identity_leave_the_header_unchecked_but_the_doctor_still_sees_it(self):
        c = yield start_controller(self, trusted_proxies=[PROXY + "/32"],
                                   forwarded_client_cert_pem_header="X-SSL-Client-Cert")
        _, foreign, _ = foreign_ca_and_leaf()
        header = {"X-SSL-Client-Cert": urllib.parse.quote(foreign.decode()), "X-Forwarded-For": "192.0.2.5"}
        c.resolver.doctor.clock = lambda: 1000.0   # one moment: only the first request is the doctor's sample

        def send(path: str, times: int) -> list[tuple[int, bytes]]:
            sock = blocking_tls_socket(https_port(c), ca_pem(c), source=PROXY)
            try:
                return [blocking_get(sock, path, header) for _ in range(times)]
            finally:
                sock.close()
        answers = yield deferToThread(send, "/healthz", 5)
        self.assertEqual([status for status, _ in answers], [200] * 5)
        status, report = yield request_json(c, "GET", "/api/v1/diagnostics/identity")
        (proxy,) = report["peers"]
        self.assertEqual(proxy["decisions"], {"rejected": 1, "unchecked": 4},
                         "the sampled request is checked in full, so a bad header still shows")
        self.assertIn("rejected", [a["code"] for a in proxy["advice"]])
        decisions = c.metrics.registry.get_sample_value
        self.assertEqual(decisions("uptrakit_identity_decisions_total",
                                   {"source": "none", "outcome": "unchecked", "code": ""}), 4)
        # a route that reads identity always checks it, sampled or not
        ((status, body),) = yield deferToThread(send, "/api/v1/whoami", 1)
        answer = json.loads(body)
        self.assertEqual((status, answer["identity"], answer["client_ip"]), (200, None, "192.0.2.5"))
        self.assertIn("not issued by a trusted CA", answer["rejected"])
        self.assertEqual(decisions("uptrakit_identity_decisions_total",
                                   {"source": "proxy-cert", "outcome": "rejected", "code": "invalid"}), 2)


class DoctorTests(TestCase):
    def test_memory_is_bounded_and_headers_are_sampled(self):
        now = [1000.0]
        doctor = IdentityDoctor(lambda: now[0])
        doctor.record("10.0.0.5", True, "accepted", ["configured"], forwarded_for=True)
        for i in range(MAX_PEERS + 50):   # untrusted senders choose their addresses
            doctor.record(f"10.1.{i // 256}.{i % 256}", False, "ignored", ["x-ssl-client"])
        self.assertEqual(len(doctor.peers), MAX_PEERS + 1)
        self.assertNotIn("10.1.0.0", doctor.peers, "the least recently seen untrusted sender goes first")
        self.assertIn("10.0.0.5", doctor.peers, "untrusted senders never push out a trusted proxy")
        peer = f"10.1.{(MAX_PEERS + 49) // 256}.{(MAX_PEERS + 49) % 256}"
        self.assertFalse(doctor.wants_sample(peer))
        now[0] += 1.0
        self.assertTrue(doctor.wants_sample(peer))
        self.assertEqual(len(doctor.report("X-Forwarded-For", {})["peers"]), MAX_PEERS + 1)


class CertificateListTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def test_filters_limit_and_total_keep_the_answer_small(self):
        c = yield start_controller(self)
        leaves = []
        for _ in range(4):
            issued, _key, _service = yield new_leaf(c)
            leaves.append(issued)
        yield request_json(c, "POST", f"/api/v1/certificates/{format_serial(leaves[0].serial)}/revoke")
        status, body = yield request_json(c, "GET", "/api/v1/certificates?status=valid&limit=2")
        self.assertEqual(status, 200)
        # 3 valid client certificates and the server certificate match; the newest 2 are sent
        self.assertEqual((body["total"], len(body["certificates"])), (4, 2))
        self.assertEqual(body["certificates"][-1]["serial"], format_serial(leaves[-1].serial))
        self.assertTrue(all(cert["status"] == "valid" for cert in body["certificates"]))
        status, body = yield request_json(c, "GET", "/api/v1/certificates?status=revoked")
        self.assertEqual([cert["serial"] for cert in body["certificates"]], [format_serial(leaves[0].serial)])
        prefix = format_serial(leaves[2].serial)[:10].lower()
        status, body = yield request_json(c, "GET", f"/api/v1/certificates?q={prefix}")
        self.assertIn(format_serial(leaves[2].serial), [cert["serial"] for cert in body["certificates"]])
        for bad in ("status=gone", "limit=0", "limit=x", "limit=100001"):
            status, body = yield request_json(c, "GET", f"/api/v1/certificates?{bad}")
            self.assertEqual((status, body["code"]), (400, "invalid_filter"), bad)
