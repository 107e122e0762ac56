"""The admin HTTP API: auth, tokens, services fields, errors, the UI files (SPEC §6)."""
from __future__ import annotations

import treq
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from uptrakitd.pki.serials import format_serial

from .helpers import enrolled_service, https_client, make_csr, request_json, start_controller, url


class ApiTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def test_admin_tokens_permissions_and_revocation(self):
        c = yield start_controller(self)
        status, body = yield request_json(c, "POST", "/api/v1/admin-tokens", {"name": "ci", "permissions": ["read"]})
        self.assertEqual(status, 201)
        read_only = body["token"]
        status, body = yield request_json(c, "GET", "/api/v1/services", token=read_only)
        self.assertEqual(status, 200)
        status, body = yield request_json(c, "POST", "/api/v1/settings/rotate-ca", token=read_only)
        self.assertEqual((status, body["code"]), (403, "forbidden"))
        self.assertEqual(c.ca.state.active().generation, 1)
        status, body = yield request_json(c, "POST", "/api/v1/admin-tokens", {"name": "ops"})
        ops_id, ops = body["id"], body["token"]
        status, body = yield request_json(c, "GET", "/api/v1/services", token=ops)
        self.assertEqual((status, body), (200, {"services": []}))
        status, body = yield request_json(c, "GET", "/api/v1/admin-tokens")
        self.assertEqual([t["name"] for t in body["tokens"]], ["bootstrap", "ci", "ops"])
        self.assertTrue(all("token" not in t for t in body["tokens"]))
        status, _ = yield request_json(c, "DELETE", f"/api/v1/admin-tokens/{ops_id}")
        self.assertEqual(status, 200)
        status, _ = yield request_json(c, "GET", "/api/v1/services", token=ops)
        self.assertEqual(status, 401)
        status, body = yield request_json(c, "POST", "/api/v1/admin-tokens", {"name": "x", "permissions": ["root"]})
        self.assertEqual(status, 400)

    @inlineCallbacks
    def test_enrollment_tokens_and_service_fields(self):
        c = yield start_controller(self)
        status, body = yield request_json(c, "POST", "/api/v1/enrollment-tokens",
                                          {"name": "lab", "kind": "agent", "max_uses": 2, "expires_in_seconds": 600})
        self.assertEqual(status, 201)
        self.assertTrue(body["token"].startswith("upt_"))
        self.assertEqual((body["kind"], body["max_uses"], body["uses"], body["auto_approve"]), ("agent", 2, 0, False))
        # the defaults are the safe ones: one use, 24 h, the service waits for approval; null lifts a limit
        status, default = yield request_json(c, "POST", "/api/v1/enrollment-tokens", {"name": "defaults"})
        self.assertEqual((default["max_uses"], default["auto_approve"]), (1, False))
        self.assertAlmostEqual(_epoch(default["expires_at"]) - _epoch(default["created_at"]), 86400, delta=2)
        status, open_ended = yield request_json(c, "POST", "/api/v1/enrollment-tokens",
                                                {"name": "fleet", "max_uses": None, "expires_in_seconds": None,
                                                 "auto_approve": True})
        self.assertEqual((open_ended["max_uses"], open_ended["expires_at"], open_ended["auto_approve"]),
                         (None, None, True))
        for bad in ({}, {"name": ""}, {"name": "x", "kind": "printer"}, {"name": "x", "max_uses": 0},
                    {"name": "x", "auto_approve": "yes"}, {"name": "x", "surprise": 1}):
            status, err = yield request_json(c, "POST", "/api/v1/enrollment-tokens", bad)
            self.assertEqual(status, 400, bad)
            self.assertEqual(set(err), {"error", "code"})
        status, _ = yield request_json(c, "DELETE", f"/api/v1/enrollment-tokens/{body['id']}")
        self.assertEqual(status, 200)
        status, _ = yield request_json(c, "DELETE", f"/api/v1/enrollment-tokens/{body['id']}")
        self.assertEqual(status, 404)
        service = yield enrolled_service(c, "mqtt", "bridge-1", friendly_name="Bridge")
        status, body = yield request_json(c, "PUT", f"/api/v1/services/{service.id}",
                                          {"cert_lifetime_hours": 24, "ping_interval_seconds": 15})
        self.assertEqual(status, 200)
        expected = {"id", "kind", "hostname", "friendly_name", "status", "capabilities", "ip_address", "proxy_ip",
                    "identity_source", "connected", "last_seen_at", "created_at", "certificate"}
        self.assertTrue(expected <= set(body))
        self.assertEqual((body["cert_lifetime_hours"], body["ping_interval_seconds"]), (24, 15))
        status, body = yield request_json(c, "PUT", f"/api/v1/services/{service.id}", {"cert_lifetime_hours": 0})
        self.assertEqual(status, 400)
        status, body = yield request_json(c, "GET", "/api/v1/services/00000000-0000-0000-0000-000000000000")
        self.assertEqual((status, body["code"]), (404, "service_not_found"))

    @inlineCallbacks
    def test_unknown_routes_methods_and_bodies(self):
        c = yield start_controller(self)
        status, body = yield request_json(c, "GET", "/api/v1/nope")
        self.assertEqual((status, body["code"]), (404, "not_found"))
        client = https_client(c)
        r = yield client.request("DELETE", url(c, "/api/v1/settings/network"),
                                 headers={"Authorization": "Bearer x"})
        yield treq.content(r)
        self.assertEqual(r.code, 405)
        self.assertEqual(r.headers.getRawHeaders("allow"), ["GET, HEAD, PUT"])
        status, body = yield request_json(c, "PUT", "/api/v1/settings/service-certificates", b"x" * 300000)
        self.assertEqual(status, 413)
        status, body = yield request_json(c, "GET", "/readyz", token=None)
        from uptrakitd import __version__
        self.assertEqual(body, {"status": "ready", "checks": {"database": "ok", "ca": "ok", "crl": "ok"}},
                         "an unauthenticated probe learns no version")
        status, body = yield request_json(c, "GET", "/readyz")
        self.assertEqual(body["version"], __version__)
        c.store.close()  # the database goes away under a running daemon
        status, body = yield request_json(c, "GET", "/readyz", token=None)
        self.assertEqual((status, body["status"]), (503, "not_ready"))
        self.assertTrue(body["checks"]["database"].startswith("unavailable"))
        self.assertEqual(body["checks"]["ca"], "ok")
        r = yield client.get(url(c, "/metrics"))
        text = yield treq.text_content(r)
        self.assertIn("uptrakit_ca_active_generation 1.0", text)

    @inlineCallbacks
    def test_ui_is_served_with_a_strict_policy(self):
        c = yield start_controller(self)
        client = https_client(c)
        r = yield client.get(url(c, "/ui/"))
        html = yield treq.text_content(r)
        self.assertEqual(r.code, 200)
        self.assertIn("Rotate CA", html)
        self.assertIn("script-src 'self'", r.headers.getRawHeaders("content-security-policy")[0])
        r = yield client.get(url(c, "/ui/app.js"))
        js = yield treq.text_content(r)
        self.assertIn("/api/v1/settings/rotate-ca", js)
        r = yield client.get(url(c, "/ui/../admin.token"))
        yield treq.content(r)
        self.assertEqual(r.code, 404)


HOSTILE_BODIES = [b"", b"null", b"[]", b"\"text\"", b"1e999", b"{\"a\":", b"\xff\xfe", b"{}" * 3,
                  b"{\"name\": null}", b"{\"name\": 12}", b"{\"name\": [\"x\"]}", b"{\"name\": \"\\u0000\"}",
                  b"{\"lifetime_hours\": 1e308}", b"{\"lifetime_hours\": -1}", b"{\"lifetime_hours\": true}",
                  b"{\"trusted_proxies\": \"not-a-cidr\"}", b"{\"trusted_proxies\": [null]}",
                  b"{\"trusted_proxies\": [[\"10.0.0.0/8\"]]}", b"{\"real_ip_header\": \"bad header\"}",
                  b"{\"pki_addr\": \"javascript:alert(1)\"}", b"{\"forwarded_client_cert_info_format\": 3}",
                  b"{\"reason\": {\"nested\": 1}}", b"{\"max_uses\": 99999999999999999999999}",
                  b"{\"expires_in_seconds\": \"soon\"}", b"{\"permissions\": \"admin\"}",
                  b"{\"cert_lifetime_hours\": 1.5}", b"{\"ping_interval_seconds\": 1}",
                  b"[" * 5000 + b"]" * 5000,
                  b"{\"name\": \"\\ud800\"}", b"{\"friendly_name\": \"x\\udfff\"}",
                  b"{\"name\": \"ok\", \"kind\": \"\\udc00\"}"]


def _epoch(iso_time: str) -> float:
    import datetime
    return datetime.datetime.fromisoformat(iso_time.replace("Z", "+00:00")).timestamp()


class HostileBodyTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_no_body_yields_a_500_or_changes_settings(self):
        c = yield start_controller(self)
        service = yield enrolled_service(c, "agent", "h")
        issued = yield c.directory.issue_certificate(service.id, make_csr(service.id)[0])
        before = (c.runtime.network, c.runtime.service_certs, c.ca.state.active().generation)
        revoke = f"/api/v1/certificates/{format_serial(issued.serial)}/revoke"
        targets = [("PUT", "/api/v1/settings/network"), ("PUT", "/api/v1/settings/service-certificates"),
                   ("POST", "/api/v1/enrollment-tokens"), ("POST", "/api/v1/admin-tokens"),
                   ("PUT", f"/api/v1/services/{service.id}"), ("POST", revoke)]
        for method, path in targets:
            for body in HOSTILE_BODIES:
                if path == revoke and body == b"":
                    continue   # an empty body is a valid revocation (reason unspecified)
                status, answer = yield request_json(c, method, path, body)
                self.assertLess(status, 500, (method, path, body[:40]))
                if status >= 400:
                    self.assertIn(set(answer), ({"error", "code"}, {"error", "code", "field"}), (method, path, body[:40]))
        self.assertEqual((c.runtime.network, c.runtime.service_certs, c.ca.state.active().generation), before)
        self.assertIsNone(c.ca.state.records[issued.serial].revoked_at, "a hostile body revoked a certificate")


class UnknownFieldTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def test_every_json_route_refuses_unknown_fields_and_changes_nothing(self):
        c = yield start_controller(self)
        service = yield enrolled_service(c, "agent", "h")
        status, body = yield request_json(c, "POST", "/api/v1/admin-tokens", {"name": "viewer", "role": "read"})
        self.assertEqual((status, body["code"]), (400, "invalid_field"))
        self.assertIn("role", body["error"])
        status, tokens = yield request_json(c, "GET", "/api/v1/admin-tokens")
        self.assertEqual([t["name"] for t in tokens["tokens"]], ["bootstrap"], "no full-admin token was minted")
        issued = yield c.directory.issue_certificate(service.id, make_csr(service.id)[0])
        serial = format_serial(issued.serial)
        for method, path, body in [
                ("POST", "/api/v1/enrollment-tokens", {"name": "x", "uses": 1}),
                ("PUT", f"/api/v1/services/{service.id}", {"lifetime": 1}),
                ("PUT", "/api/v1/settings/network", {"trusted_proxy": ["10.0.0.1"]}),
                ("PUT", "/api/v1/settings/service-certificates", {"lifetime": 1}),
                ("POST", f"/api/v1/certificates/{serial}/revoke", {"reason": "keyCompromise", "now": True}),
                ("POST", "/api/v1/settings/rotate-ca", {"force": True})]:
            status, answer = yield request_json(c, method, path, body)
            self.assertEqual((status, answer["code"]), (400, "invalid_field"), path)
        self.assertIsNone(c.ca.state.records[issued.serial].revoked_at)
        self.assertEqual(c.ca.state.active().generation, 1)

    @inlineCallbacks
    def test_names_and_the_pki_address_with_control_characters_are_refused(self):
        c = yield start_controller(self)
        service = yield enrolled_service(c, "agent", "h")
        for method, path, body in [
                ("POST", "/api/v1/enrollment-tokens", {"name": "lab\n[uptrakitd#info] revoked nothing"}),
                ("POST", "/api/v1/admin-tokens", {"name": "\x1b]0;owned\x07"}),
                ("PUT", f"/api/v1/services/{service.id}", {"friendly_name": "ok\rhidden"}),
                ("PUT", "/api/v1/settings/network", {"pki_addr": "http://127.0.0.1:8080/pki\r\nX: y"}),
                ("PUT", "/api/v1/settings/network", {"pki_addr": "http://127.0.0.1:8080/p ki"})]:
            status, answer = yield request_json(c, method, path, body)
            self.assertEqual(status, 400, (path, answer))
            self.assertIn("control characters", answer["error"], path)
        status, tokens = yield request_json(c, "GET", "/api/v1/admin-tokens")
        self.assertEqual([t["name"] for t in tokens["tokens"]], ["bootstrap"])
        self.assertIsNone(c.runtime.network.pki_addr)
        self.assertIsNone(c.directory.get(service.id).friendly_name)


class StorageFullTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_a_full_database_answers_503_storage_unavailable_and_readiness_says_not_writable(self):
        c = yield start_controller(self)

        def cap(conn):  # SQLite's own "database or disk is full", as on a full filesystem
            conn.execute(f"PRAGMA max_page_count = {conn.execute('PRAGMA page_count').fetchone()[0]}")
        yield c.store.run(cap)
        statuses = []
        for i in range(400):
            status, body = yield request_json(c, "POST", "/api/v1/enrollment-tokens", {"name": f"{i:03d}" + "x" * 190})
            statuses.append(status)
            if status != 201:
                break
        self.assertEqual((statuses[-1], body["code"]), (503, "storage_unavailable"), statuses[-3:])
        self.assertNotIn(500, statuses)
        status, body = yield request_json(c, "GET", "/readyz", token=None)
        self.assertEqual(status, 503)
        self.assertTrue(body["checks"]["database"].startswith("not writable"), body)
