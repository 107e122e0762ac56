"""PKI end to end, judged by openssl: issuance, revocation, OCSP, CRLs, rotation (SPEC §4)."""
from __future__ import annotations

import base64
import datetime
import hashlib
from pathlib import Path
from urllib.parse import quote

import treq

from .helpers import plain_http_client

plain = plain_http_client()
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ec import ECDSA
from cryptography.x509 import ocsp
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from uptrakitd.pki.serials import format_serial

from .helpers import (log_lines, enrolled_service, free_port, new_leaf, tls_refusal, ca_pem, https_port, make_csr, request_json,
                      require_program, run, start_controller, wait_until)


class OpensslOcspCrlTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def setUp(self):
        self.openssl = require_program("openssl", "apt-get install openssl")
        self.pki_port = free_port()
        self.c = yield start_controller(self, pki_addr=f"http://127.0.0.1:{self.pki_port}", pki_http="listener")
        self.dir = Path(self.c.tmp)
        (self.dir / "ca.pem").write_bytes(self.c.ca.state.active().pem)

    def write(self, name, data):
        (self.dir / name).write_bytes(data)
        return str(self.dir / name)

    @inlineCallbacks
    def ocsp(self, leaf_path, *extra):
        out, err, code = yield run(self.openssl, "ocsp", "-issuer", str(self.dir / "ca.pem"), "-cert", leaf_path,
                                   "-url", f"http://127.0.0.1:{self.pki_port}/api/v1/pki/ocsp",
                                   "-CAfile", str(self.dir / "ca.pem"), *extra)
        return out.decode() + err.decode()

    @inlineCallbacks
    def test_openssl_ocsp_good_then_revoked_with_and_without_nonce(self):
        issued, _, _ = yield new_leaf(self.c)
        leaf = self.write("leaf.pem", issued.pem)
        for _ in range(2):   # the second nonce answer is filled in from the first one's template
            out = yield self.ocsp(leaf)
            self.assertIn(f"{leaf}: good", out)
            self.assertIn("Response verify OK", out)
        out = yield self.ocsp(leaf, "-no_nonce")
        self.assertIn(f"{leaf}: good", out)
        status, body = yield request_json(self.c, "POST", f"/api/v1/certificates/{format_serial(issued.serial)}/revoke",
                                          {"reason": "keyCompromise"})
        self.assertEqual(status, 200, body)
        for _ in range(2):
            out = yield self.ocsp(leaf)
            self.assertIn(f"{leaf}: revoked", out)
            self.assertIn("Reason: keyCompromise", out)
            self.assertIn("Response verify OK", out)
        self.assertEqual((self.c.ocsp.nonces.filled, self.c.ocsp.nonces.built), (4, 0), "openssl judged templates")
        out = yield self.ocsp(leaf, "-no_nonce")
        self.assertIn(f"{leaf}: revoked", out)

    @inlineCallbacks
    def test_nginx_get_form_is_answered_with_cache_headers(self):
        issued, _, _ = yield new_leaf(self.c)
        ca = self.c.ca.state.active().cert
        req = ocsp.OCSPRequestBuilder().add_certificate(issued.cert, ca, hashes.SHA1()).build()
        der = req.public_bytes(serialization.Encoding.DER)
        encoded = quote(base64.b64encode(der).decode(), safe="")
        # nginx: HTTP/1.0, only Host, percent-escaped standard base64, SHA-1 CertID, no nonce.
        raw = f"GET /api/v1/pki/ocsp/{encoded} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode()
        response = yield self.raw_http(raw)
        head, _, body = response.partition(b"\r\n\r\n")
        self.assertIn(b" 200 ", head.split(b"\r\n")[0])
        self.assertIn(b"content-type: application/ocsp-response", head.lower())
        self.assertRegex(head.decode().lower(), r"cache-control: max-age=\d+, public, no-transform, must-revalidate")
        for h in (b"last-modified:", b"expires:", b"etag:"):
            self.assertIn(h, head.lower())
        parsed = ocsp.load_der_ocsp_response(body)
        self.assertEqual(parsed.certificate_status, ocsp.OCSPCertStatus.GOOD)
        self.assertEqual(parsed.serial_number, issued.serial)
        self.assertEqual(parsed.responder_key_hash, x509.SubjectKeyIdentifier.from_public_key(ca.public_key()).digest)
        self.assertEqual(parsed.next_update_utc - parsed.this_update_utc, datetime.timedelta(hours=1))
        ca.public_key().verify(parsed.signature, parsed.tbs_response_bytes,
                               ECDSA(parsed.signature_hash_algorithm))
        # unescaped '/', base64url without padding and a path prefix all decode to the same request
        b64 = base64.b64encode(der).decode()
        for form in (f"/api/v1/pki/ocsp/{b64}", f"/api/v1/pki/ocsp/{base64.urlsafe_b64encode(der).decode().rstrip('=')}",
                     f"/prefix/ocsp/{encoded}"):
            response = yield self.raw_http(f"GET {form} HTTP/1.0\r\n\r\n".encode())
            self.assertEqual(ocsp.load_der_ocsp_response(response.partition(b"\r\n\r\n")[2]).certificate_status,
                             ocsp.OCSPCertStatus.GOOD, form)

    @inlineCallbacks
    def test_unknown_is_never_cacheable_and_conditional_gets_are_answered_304(self):
        """A serial never issued may be issued by another controller a moment later: `unknown` carries no
        HTTP caching and a one-minute nextUpdate (RFC 5019 caches go by it). A cache revalidating a kept
        answer gets 304 (RFC 9110 §13.1), by ETag or by date, twice (the second time not on the fast path)."""
        issued, _, _ = yield new_leaf(self.c)
        ca = self.c.ca.state.active().cert

        def get_path(serial: int) -> str:
            good = ocsp.OCSPRequestBuilder().add_certificate(issued.cert, ca, hashes.SHA1()).build()
            der = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
                good.issuer_name_hash, good.issuer_key_hash, serial, hashes.SHA1()).build().public_bytes(
                serialization.Encoding.DER)
            return f"/api/v1/pki/ocsp/{quote(base64.b64encode(der).decode(), safe='')}"

        def head_of(response: bytes) -> dict[str, str]:
            lines = response.partition(b"\r\n\r\n")[0].decode().split("\r\n")
            return {"status": lines[0].split(" ")[1],
                    **{k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}}
        unknown = yield self.raw_http(f"GET {get_path(0x7777777)} HTTP/1.0\r\n\r\n".encode())
        parsed = ocsp.load_der_ocsp_response(unknown.partition(b"\r\n\r\n")[2])
        self.assertEqual(parsed.certificate_status, ocsp.OCSPCertStatus.UNKNOWN)
        self.assertEqual(head_of(unknown)["cache-control"], "no-store")
        self.assertNotIn("expires", head_of(unknown))
        self.assertEqual(parsed.next_update_utc - parsed.this_update_utc, datetime.timedelta(minutes=1))
        path = get_path(issued.serial)
        first = head_of((yield self.raw_http(f"GET {path} HTTP/1.0\r\n\r\n".encode())))
        self.assertEqual(first["status"], "200")
        for _ in range(2):
            for condition in (f"If-None-Match: {first['etag']}", "If-None-Match: *",
                              f"If-Modified-Since: {first['last-modified']}"):
                response = yield self.raw_http(f"GET {path} HTTP/1.0\r\n{condition}\r\n\r\n".encode())
                head = head_of(response)
                self.assertEqual((head["status"], response.partition(b"\r\n\r\n")[2]), ("304", b""), condition)
                self.assertEqual(head["etag"], first["etag"])
        for condition in ('If-None-Match: "other"', "If-Modified-Since: Mon, 01 Jan 2001 00:00:00 GMT",
                          "If-Modified-Since: yesterday"):
            response = yield self.raw_http(f"GET {path} HTTP/1.0\r\n{condition}\r\n\r\n".encode())
            self.assertEqual(head_of(response)["status"], "200", condition)

    @inlineCallbacks
    def test_a_repeated_get_is_answered_the_same_until_a_revocation_changes_it(self):
        """nginx asks the same URL at every handshake: the second time it is answered without the request
        machinery, with the same bytes and headers, over keep-alive too, and never stale."""
        import socket
        issued, _, _ = yield new_leaf(self.c)
        ca = self.c.ca.state.active().cert
        der = ocsp.OCSPRequestBuilder().add_certificate(issued.cert, ca, hashes.SHA1()).build().public_bytes(
            serialization.Encoding.DER)
        path = f"/api/v1/pki/ocsp/{quote(base64.b64encode(der).decode(), safe='')}"
        ask = f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode()

        def parts(response: bytes) -> tuple[list[str], bytes]:
            head, _, body = response.partition(b"\r\n\r\n")
            names = sorted(line.split(b":")[0].decode().lower() for line in head.split(b"\r\n")[1:])
            return names, body
        first = yield self.raw_http(ask)
        hits = self.c.fast_ocsp.hits
        second = yield self.raw_http(ask)
        self.assertEqual(self.c.fast_ocsp.hits, hits + 1, "the second GET took the short way")
        self.assertEqual(parts(second)[0], parts(first)[0], "the same headers")
        self.assertEqual(parts(second)[1], parts(first)[1], "the same signed answer")
        self.assertTrue(second.startswith(b"HTTP/1.0 200 OK\r\n"), second[:40])
        self.assertIn(b"content-length: %d\r\n" % len(parts(first)[1]), second.lower())
        self.assertEqual(ocsp.load_der_ocsp_response(parts(second)[1]).certificate_status, ocsp.OCSPCertStatus.GOOD)

        def keep_alive() -> list[bytes]:   # three on one HTTP/1.1 connection, each read by its Content-Length
            out = []
            with socket.create_connection(("127.0.0.1", self.pki_port), timeout=10) as s:
                for _ in range(3):
                    s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
                    data = b""
                    while b"\r\n\r\n" not in data:
                        data += s.recv(65536)
                    head, _, body = data.partition(b"\r\n\r\n")
                    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                    while len(body) < length:
                        body += s.recv(65536)
                    self.assertNotIn(b"connection: close", head.lower())
                    out.append(body)
            return out
        bodies = yield deferToThread(keep_alive)
        self.assertEqual(bodies, [parts(first)[1]] * 3)
        # any prefix before /ocsp/ is accepted, so a long one is answered but never kept (memory is bounded)
        long = f"GET /{'x' * 2000}{path[len('/api/v1/pki'):]} HTTP/1.0\r\n\r\n".encode()
        hits = self.c.fast_ocsp.hits
        for _ in range(2):
            self.assertEqual(parts((yield self.raw_http(long)))[1], parts(first)[1])
        self.assertEqual(self.c.fast_ocsp.hits, hits)
        # the fields that change how a request is read are honoured however they are spelled: an HTTP/1.1
        # client that says it closes gets the answer and the close (raw_http reads until the server closes)
        for spelling in (b"Connection: close", b"CONNECTION:Close", b"connection: keep-alive, close"):
            hits = self.c.fast_ocsp.hits
            closed = yield self.raw_http(f"GET {path} HTTP/1.1\r\nHost: x\r\n".encode() + spelling + b"\r\n\r\n")
            self.assertEqual(self.c.fast_ocsp.hits, hits + 1, spelling)
            self.assertIn(b"\r\nconnection: close\r\n", closed.lower(), spelling)
            self.assertEqual(parts(closed)[1], parts(first)[1], spelling)
        # a GET with a body, an upgrade or an expectation is left to twisted.web, which answers it as it would
        for field in (b"Transfer-Encoding: chunked", b"UPGRADE: websocket", b"Content-Length: 0", b"Expect: 100-continue"):
            hits = self.c.fast_ocsp.hits
            tail = b"0\r\n\r\n" if field.startswith(b"Transfer") else b""
            yield self.raw_http(f"GET {path} HTTP/1.0\r\nHost: x\r\n".encode() + field + b"\r\n\r\n" + tail)
            self.assertEqual(self.c.fast_ocsp.hits, hits, field)
        status, _ = yield request_json(self.c, "POST", f"/api/v1/certificates/{format_serial(issued.serial)}/revoke",
                                       {"reason": "keyCompromise"})
        self.assertEqual(status, 200)
        after = yield self.raw_http(ask)
        self.assertEqual(ocsp.load_der_ocsp_response(parts(after)[1]).certificate_status, ocsp.OCSPCertStatus.REVOKED)

    @inlineCallbacks
    def test_a_whole_post_is_answered_on_the_channel_like_the_ordinary_way(self):
        """A POST whose head and body arrive together skips the request machinery: the same answer and
        headers as one whose body comes later (the ordinary way), a fresh signature per nonce, garbage is
        malformedRequest, and an oversized body still gets 413."""
        import os
        issued, _, _ = yield new_leaf(self.c)
        ca = self.c.ca.state.active().cert

        def post(nonce: bytes) -> tuple[bytes, bytes]:
            body = (ocsp.OCSPRequestBuilder().add_certificate(issued.cert, ca, hashes.SHA256())
                    .add_extension(x509.OCSPNonce(nonce), critical=False).build()
                    .public_bytes(serialization.Encoding.DER))
            head = (f"POST /api/v1/pki/ocsp HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/ocsp-request\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n").encode()
            return head, body

        def parse(response: bytes) -> tuple[list[str], dict[str, str], ocsp.OCSPResponse]:
            head, _, body = response.partition(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            fields = dict((k.lower(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:]))
            self.assertEqual(int(fields["content-length"]), len(body))
            return [lines[0]] + sorted(fields), fields, ocsp.load_der_ocsp_response(body)
        before = self.c.fast_ocsp.posts
        head, body = post(b"n" * 16)
        fast = parse((yield self.raw_http(head + body)))
        self.assertEqual(self.c.fast_ocsp.posts, before + 1, "head and body together: answered on the channel")
        head, body = post(b"m" * 16)
        slow = parse((yield self.raw_http(head, body)))
        self.assertEqual(self.c.fast_ocsp.posts, before + 1, "a body that comes later goes the ordinary way")
        self.assertEqual(fast[0], slow[0], "the same status line and header names")
        for (_, fields, answer), nonce in ((fast, b"n" * 16), (slow, b"m" * 16)):
            self.assertEqual(answer.certificate_status, ocsp.OCSPCertStatus.GOOD)
            self.assertEqual(answer.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce, nonce)
            self.assertEqual(fields["cache-control"], "no-store")
            self.assertEqual(fields["content-type"], "application/ocsp-response")
            ca.public_key().verify(answer.signature, answer.tbs_response_bytes, ECDSA(answer.signature_hash_algorithm))
        garbage = os.urandom(40)
        response = yield self.raw_http(b"POST /api/v1/pki/ocsp HTTP/1.0\r\nContent-Length: 40\r\n\r\n" + garbage)
        self.assertTrue(response.startswith(b"HTTP/1.0 200 OK\r\n"), response[:60])
        self.assertEqual(ocsp.load_der_ocsp_response(response.partition(b"\r\n\r\n")[2]).response_status,
                         ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
        too_big = yield self.raw_http(b"POST /api/v1/pki/ocsp HTTP/1.0\r\nContent-Length: 70000\r\n\r\n" + b"x" * 70000)
        self.assertTrue(too_big.startswith(b"HTTP/1.1 413"), too_big[:60])

    def raw_http(self, request: bytes, later: bytes = b""):
        import socket
        import time

        def go():
            with socket.create_connection(("127.0.0.1", self.pki_port), timeout=10) as s:
                s.sendall(request)
                if later:
                    time.sleep(0.2)
                    s.sendall(later)
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
                return data
        return deferToThread(go)

    @inlineCallbacks
    def test_unknown_unauthorized_and_malformed(self):
        from .helpers import foreign_ca_and_leaf
        issued, _, _ = yield new_leaf(self.c)
        ca = self.c.ca.state.active().cert
        # a serial of our CA that we never issued -> unknown
        fake = x509.load_pem_x509_certificate(issued.pem)
        builder = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
            hashlib.sha1(ca.subject.public_bytes()).digest(),
            hashlib.sha1(ca.public_key().public_bytes(serialization.Encoding.X962,
                                                      serialization.PublicFormat.UncompressedPoint)).digest(),
            12345, hashes.SHA1())
        resp = yield self.post(builder.build().public_bytes(serialization.Encoding.DER))
        self.assertEqual(resp.certificate_status, ocsp.OCSPCertStatus.UNKNOWN)
        # a foreign issuer -> unauthorized
        fca, fleaf, _ = foreign_ca_and_leaf()
        req = ocsp.OCSPRequestBuilder().add_certificate(x509.load_pem_x509_certificate(fleaf),
                                                        x509.load_pem_x509_certificate(fca), hashes.SHA256()).build()
        resp = yield self.post(req.public_bytes(serialization.Encoding.DER))
        self.assertEqual(resp.response_status, ocsp.OCSPResponseStatus.UNAUTHORIZED)
        # garbage -> malformedRequest, still HTTP 200 + application/ocsp-response, for POST and GET
        resp = yield self.post(b"\x30\x03garbage")
        self.assertEqual(resp.response_status, ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
        r = yield plain.get(f"http://127.0.0.1:{self.pki_port}/api/v1/pki/ocsp/%%%not-base64!!")
        body = yield treq.content(r)
        self.assertEqual((r.code, r.headers.getRawHeaders("content-type")), (200, ["application/ocsp-response"]))
        self.assertEqual(ocsp.load_der_ocsp_response(body).response_status,
                         ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
        # SHA-256 CertID for a real leaf -> good
        req = ocsp.OCSPRequestBuilder().add_certificate(fake, ca, hashes.SHA256()).build()
        resp = yield self.post(req.public_bytes(serialization.Encoding.DER))
        self.assertEqual(resp.certificate_status, ocsp.OCSPCertStatus.GOOD)

    @inlineCallbacks
    def post(self, body: bytes):
        r = yield plain.post(f"http://127.0.0.1:{self.pki_port}/api/v1/pki/ocsp", data=body,
                            headers={"Content-Type": "application/ocsp-request"})
        self.assertEqual(r.code, 200)
        self.assertEqual(r.headers.getRawHeaders("content-type"), ["application/ocsp-response"])
        content = yield treq.content(r)
        return ocsp.load_der_ocsp_response(content)

    @inlineCallbacks
    def test_oversized_ocsp_body_is_413(self):
        r = yield plain.post(f"http://127.0.0.1:{self.pki_port}/api/v1/pki/ocsp", data=b"\0" * (65 * 1024))
        self.assertEqual(r.code, 413)
        yield treq.content(r)

    @inlineCallbacks
    def test_plain_listener_serves_only_pki_routes(self):
        for path, code in [("/healthz", 200), ("/api/v1/pki/ca.crt", 200), ("/api/v1/pki/ca.crl", 200),
                           ("/api/v1/pki/crl/1.crl", 200), ("/api/v1/settings/pki", 404), ("/readyz", 200),
                           ("/metrics", 404)]:
            r = yield plain.get(f"http://127.0.0.1:{self.pki_port}{path}")
            yield treq.content(r)
            self.assertEqual(r.code, code, path)

    @inlineCallbacks
    def test_crl_lists_revoked_serial_and_openssl_verify_refuses_it(self):
        revoked, _, _ = yield new_leaf(self.c)
        good, _, _ = yield new_leaf(self.c)
        before = self.c.crls.current[1].number
        status, _ = yield request_json(self.c, "POST", f"/api/v1/certificates/{format_serial(revoked.serial).lower()}"
                                       "/revoke", {"reason": "keyCompromise"})
        self.assertEqual(status, 200)
        # rebuilt after the revocation, not at the hourly rebuild (an hour away)
        yield wait_until(lambda: self.c.crls.current[1].number > before, timeout=10)
        r = yield plain.get(f"http://127.0.0.1:{self.pki_port}/api/v1/pki/crl/1.crl")
        self.assertEqual(r.headers.getRawHeaders("content-type"), ["application/pkix-crl"])
        der = yield treq.content(r)
        crl_der = self.write("crl.der", der)
        out, err, code = yield run(self.openssl, "crl", "-inform", "DER", "-in", crl_der, "-noout", "-text")
        self.assertEqual(code, 0, err)
        self.assertIn(f"Serial Number: {format_serial(revoked.serial)}", out.decode())
        self.assertIn("Key Compromise", out.decode())
        self.assertNotIn(format_serial(good.serial), out.decode())
        r = yield plain.get(f"http://127.0.0.1:{self.pki_port}/api/v1/pki/ca.crl")
        pem = yield treq.content(r)
        self.assertEqual(pem, (Path(self.c.tmp) / "data" / "pki" / "ca.crl").read_bytes())
        crl_pem = self.write("crl.pem", pem)
        out, err, code = yield run(self.openssl, "verify", "-crl_check", "-CAfile", str(self.dir / "ca.pem"),
                                   "-CRLfile", crl_pem, self.write("revoked.pem", revoked.pem))
        self.assertNotEqual(code, 0)
        self.assertIn("certificate revoked", (out + err).decode())
        out, err, code = yield run(self.openssl, "verify", "-crl_check", "-CAfile", str(self.dir / "ca.pem"),
                                   "-CRLfile", crl_pem, self.write("good.pem", good.pem))
        self.assertEqual(code, 0, out + err)

    @inlineCallbacks
    def test_revoked_client_certificate_is_refused_by_tls_listener(self):
        issued, key, _ = yield new_leaf(self.c)
        yield request_json(self.c, "POST", f"/api/v1/certificates/{format_serial(issued.serial)}/revoke", {})
        # refused at once: the handshake checks the records, it does not wait for the next CRL; the alert
        # says why (certificate_revoked, 44), and so does the controller's log
        from twisted.logger import formatEvent, globalLogPublisher
        seen = []
        globalLogPublisher.addObserver(seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, seen.append)
        alert = yield tls_refusal(https_port(self.c), ca_pem(self.c), issued.pem, key)
        self.assertIn("certificate revoked", alert)
        self.assertIn(f"serial {format_serial(issued.serial)} is revoked", "\n".join(formatEvent(e) for e in seen))

    @inlineCallbacks
    def test_etag_and_if_none_match(self):
        r = yield plain.get(f"http://127.0.0.1:{self.pki_port}/api/v1/pki/ca.crl")
        yield treq.content(r)
        etag = r.headers.getRawHeaders("etag")[0]
        self.assertTrue(r.headers.getRawHeaders("last-modified"))
        r = yield plain.get(f"http://127.0.0.1:{self.pki_port}/api/v1/pki/ca.crl", headers={"If-None-Match": etag})
        body = yield treq.content(r)
        self.assertEqual((r.code, body), (304, b""))

    @inlineCallbacks
    def test_crl_numbers_are_monotonic_and_persisted(self):
        numbers = [self.c.crls.current[1].number]
        for _ in range(3):
            yield self.c.crls.rebuild()
            numbers.append(self.c.crls.current[1].number)
        self.assertEqual(numbers, sorted(set(numbers)))
        crl = x509.load_der_x509_crl(self.c.crls.current[1].der)
        self.assertEqual(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number, numbers[-1])
        self.assertEqual(crl.next_update_utc - crl.last_update_utc, datetime.timedelta(hours=24))
        crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)


class DelegatedOcspSignerTests(TestCase):
    """--ocsp-signer delegated: answers signed by a P-256 responder certificate the CA issued, judged by openssl."""

    timeout = 60

    @inlineCallbacks
    def setUp(self):
        self.openssl = require_program("openssl", "apt-get install openssl")
        self.pki_port = free_port()
        self.c = yield start_controller(self, pki_addr=f"http://127.0.0.1:{self.pki_port}", pki_http="listener",
                                        ocsp_signer="delegated")
        self.dir = Path(self.c.tmp)

    @inlineCallbacks
    def ask(self, issued, *extra):
        """openssl ocsp against the CA bundle; (its output, the DER response it received)."""
        leaf, bundle, resp = self.dir / "leaf.pem", self.dir / "bundle.pem", self.dir / "resp.der"
        leaf.write_bytes(issued.pem)
        bundle.write_bytes(self.c.ca.bundle_pem())
        issuer = self.dir / "issuer.pem"
        issuer.write_bytes(self.c.ca.state.generations[issued.ca_generation].pem)
        out, err, _ = yield run(self.openssl, "ocsp", "-issuer", str(issuer), "-cert", str(leaf), "-url",
                                f"http://127.0.0.1:{self.pki_port}/api/v1/pki/ocsp", "-CAfile", str(bundle),
                                "-respout", str(resp), *extra)
        return out.decode() + err.decode(), ocsp.load_der_ocsp_response(resp.read_bytes())

    def check_responder(self, answer, generation):
        """The embedded responder certificate: issued by that CA generation for OCSP signing only, P-256,
        two days at most; the answer is signed with its key, not the CA's."""
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID
        ca = self.c.ca.state.generations[generation].cert
        [responder] = answer.certificates
        self.assertEqual(responder.issuer, ca.subject)
        ca.public_key().verify(responder.signature, responder.tbs_certificate_bytes,
                               ECDSA(responder.signature_hash_algorithm))
        self.assertEqual(list(responder.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value),
                         [ExtendedKeyUsageOID.OCSP_SIGNING])
        responder.extensions.get_extension_for_class(x509.OCSPNoCheck)
        self.assertFalse(responder.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
        self.assertIsInstance(responder.public_key().curve, ec.SECP256R1)
        self.assertLessEqual(responder.not_valid_after_utc - responder.not_valid_before_utc,
                             datetime.timedelta(days=2, minutes=5))
        self.assertEqual(answer.responder_key_hash,
                         x509.SubjectKeyIdentifier.from_public_key(responder.public_key()).digest)
        responder.public_key().verify(answer.signature, answer.tbs_response_bytes,
                                      ECDSA(answer.signature_hash_algorithm))
        return responder

    @inlineCallbacks
    def test_openssl_verifies_delegated_answers_before_and_after_a_rotation(self):
        issued, _, _ = yield new_leaf(self.c)
        for _ in range(2):   # the second from the first one's template
            out, answer = yield self.ask(issued)
            self.assertIn("Response verify OK", out)
            self.assertIn(": good", out)
            first = self.check_responder(answer, 1)
        self.assertEqual(self.c.ocsp.nonces.filled, 2)
        out, answer = yield self.ask(issued, "-no_nonce")
        self.assertIn("Response verify OK", out)
        self.assertEqual(self.check_responder(answer, 1), first, "one responder certificate per generation")
        status, _ = yield request_json(self.c, "POST", f"/api/v1/certificates/{format_serial(issued.serial)}/revoke",
                                       {"reason": "keyCompromise"})
        self.assertEqual(status, 200)
        out, answer = yield self.ask(issued)
        self.assertIn("Response verify OK", out)
        self.assertIn(": revoked", out)
        # after a rotation, G2's certificates are answered by a responder G2 issued; G1's still verify
        status, body = yield request_json(self.c, "POST", "/api/v1/settings/rotate-ca")
        self.assertEqual(status, 200, body)
        renewed, _, _ = yield new_leaf(self.c)
        self.assertEqual(renewed.ca_generation, 2)
        out, answer = yield self.ask(renewed)
        self.assertIn("Response verify OK", out)
        self.assertIn(": good", out)
        self.check_responder(answer, 2)
        out, answer = yield self.ask(issued)
        self.assertIn("Response verify OK", out)
        self.assertIn(": revoked", out)
        self.check_responder(answer, 1)


class OcspSigningLimitTests(TestCase):
    """--ocsp-nonce-rate: answers signed per request are limited per client address; cached ones are not."""

    timeout = 60

    @inlineCallbacks
    def test_an_address_over_the_rate_gets_try_later_others_and_cached_answers_do_not(self):
        import socket
        openssl = require_program("openssl", "apt-get install openssl")
        pki_port = free_port()
        c = yield start_controller(self, pki_addr=f"http://127.0.0.1:{pki_port}", pki_http="listener",
                                   ocsp_nonce_rate=2)
        c.ocsp.limit.clock = lambda: 1000.0   # one moment: the bucket (2 s worth, 4 answers) never refills
        issued, _, _ = yield new_leaf(c)
        ca = c.ca.state.active().cert

        def ask(source: str, nonce: bytes | None, serial: int | None = None) -> ocsp.OCSPResponse:
            builder = (ocsp.OCSPRequestBuilder().add_certificate(issued.cert, ca, hashes.SHA1()) if serial is None else
                       ocsp.OCSPRequestBuilder().add_certificate_by_hash(
                           *self._hashes(issued.cert, ca), serial, hashes.SHA1()))
            if nonce is not None:
                builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
            body = builder.build().public_bytes(serialization.Encoding.DER)
            with socket.create_connection(("127.0.0.1", pki_port), timeout=10, source_address=(source, 0)) as s:
                s.sendall(f"POST /api/v1/pki/ocsp HTTP/1.0\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
            head, _, der = data.partition(b"\r\n\r\n")
            self.assertTrue(head.startswith(b"HTTP/1.0 200 OK"), head[:40])
            return ocsp.load_der_ocsp_response(der)

        def storm():
            return ([ask("127.0.0.1", b"nonce-%08d" % i).response_status for i in range(5)],
                    ask("127.0.0.1", None, serial=0x7777777).response_status,   # never issued: signed each time
                    ask("127.0.0.1", None).certificate_status,                 # signed once, then cached
                    ask("127.0.0.1", None).certificate_status,
                    ask("127.0.0.2", b"other-address-01").certificate_status)
        nonces, unknown, cached, again, other = yield deferToThread(storm)
        ok, later = ocsp.OCSPResponseStatus.SUCCESSFUL, ocsp.OCSPResponseStatus.TRY_LATER
        self.assertEqual(nonces, [ok] * 4 + [later])
        self.assertEqual(unknown, later, "a serial never issued is signed per request too")
        self.assertEqual((cached, again, other), (ocsp.OCSPCertStatus.GOOD,) * 3)
        self.assertEqual(c.metrics.ocsp_responses.labels("try_later")._value.get(), 2)
        leaf = Path(c.tmp, "leaf.pem")
        leaf.write_bytes(issued.pem)
        Path(c.tmp, "ca.pem").write_bytes(c.ca.state.active().pem)
        out, err, _ = yield run(openssl, "ocsp", "-issuer", str(Path(c.tmp, "ca.pem")), "-cert", str(leaf), "-url",
                                f"http://127.0.0.1:{pki_port}/api/v1/pki/ocsp", "-CAfile", str(Path(c.tmp, "ca.pem")))
        self.assertIn("trylater", (out + err).decode().lower(), "openssl understands the refusal")

    @staticmethod
    def _hashes(cert, ca):
        request = ocsp.OCSPRequestBuilder().add_certificate(cert, ca, hashes.SHA1()).build()
        return request.issuer_name_hash, request.issuer_key_hash


class RevocationApiTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def test_errors(self):
        c = yield start_controller(self)
        issued, _, service = yield new_leaf(c)
        serial = format_serial(issued.serial)
        status, body = yield request_json(c, "POST", "/api/v1/certificates/ZZZ/revoke", {})
        self.assertEqual((status, body["code"]), (400, "invalid_serial"))
        status, body = yield request_json(c, "POST", "/api/v1/certificates/ABCDEF/revoke", {})
        self.assertEqual((status, body["code"]), (404, "certificate_not_found"))
        status, body = yield request_json(c, "POST", f"/api/v1/certificates/{serial}/revoke", {"reason": "bored"})
        self.assertEqual((status, body["code"]), (400, "invalid_reason"))
        status, body = yield request_json(c, "POST", f"/api/v1/certificates/{serial}/revoke", b"{not json")
        self.assertEqual((status, body["code"]), (400, "invalid_json"))
        status, body = yield request_json(c, "POST", f"/api/v1/certificates/{serial}/revoke", {}, token=None)
        self.assertEqual(status, 401)
        status, body = yield request_json(c, "POST", f"/api/v1/certificates/{serial}/revoke", {}, token="upt_wrong")
        self.assertEqual(status, 401)
        self.assertFalse(c.ca.state.records[issued.serial].revoked)
        # colons and lower case are accepted; a second revocation is a conflict
        colon = ":".join(serial[i:i + 2] for i in range(0, len(serial), 2)).lower()
        status, body = yield request_json(c, "POST", f"/api/v1/certificates/{colon}/revoke", {"reason": "superseded"})
        self.assertEqual((status, body["serial"], body["reason"]), (200, serial, "superseded"))
        status, body = yield request_json(c, "POST", f"/api/v1/certificates/{serial}/revoke", {})
        self.assertEqual((status, body["code"]), (409, "already_revoked"))
        status, body = yield request_json(c, "GET", f"/api/v1/certificates?service_id={service.id}")
        self.assertEqual(status, 200)
        self.assertEqual([(x["serial"], x["status"]) for x in body["certificates"]], [(serial, "revoked")])
        status, body = yield request_json(c, "GET", "/api/v1/settings/rotate-ca")
        self.assertEqual(status, 405)

    @inlineCallbacks
    def test_revocation_is_durable_before_the_answer(self):
        import sqlite3
        c = yield start_controller(self)
        issued, _, _ = yield new_leaf(c)
        yield request_json(c, "POST", f"/api/v1/certificates/{format_serial(issued.serial)}/revoke",
                           {"reason": "keyCompromise"})
        db = sqlite3.connect(c.settings.data_dir / "uptrakit.sqlite3")
        row = db.execute("SELECT revocation_reason, revoked_at FROM certificates WHERE serial = ?",
                         (format_serial(issued.serial),)).fetchone()
        db.close()
        self.assertEqual(row[0], "keyCompromise")
        self.assertIsNotNone(row[1])


class IssuanceTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def test_service_certificate_profile(self):
        c = yield start_controller(self, pki_addr="https://pki.example", trust_domain="corp.example")
        issued, _, service = yield new_leaf(c, "mqtt")
        cert = issued.cert
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
        self.assertEqual(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value, service.id)
        self.assertEqual(cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value, "Uptrakit MQTT")
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.UniformResourceIdentifier),
                         [f"spiffe://corp.example/service/{service.id}"])
        self.assertEqual(list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value),
                         [ExtendedKeyUsageOID.CLIENT_AUTH])
        self.assertFalse(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
        self.assertTrue(cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature)
        self.assertGreaterEqual(cert.serial_number.bit_length(), 64)
        self.assertEqual(cert.not_valid_after_utc - cert.not_valid_before_utc,
                         datetime.timedelta(hours=168, minutes=5))
        cdp = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
        self.assertEqual(cdp[0].full_name[0].value, "https://pki.example/api/v1/pki/crl/1.crl")

    @inlineCallbacks
    def test_csr_checks(self):
        from cryptography.hazmat.primitives.asymmetric import ec, rsa
        from uptrakitd.pki.issue import CsrRejected
        c = yield start_controller(self)
        service = yield enrolled_service(c, "agent", "h")
        bad = [
            (make_csr("not-the-service-id")[0], "common name"),
            (make_csr(service.id, uri="spiffe://uptrakit.local/service/other")[0], "SPIFFE"),
            (make_csr(service.id, key=ec.generate_private_key(ec.SECP521R1()))[0], "curve"),
            (make_csr(service.id, key=rsa.generate_private_key(65537, 1024))[0], "too small"),
            (b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", "not a PEM"),
            (b"", "not a PEM"),
        ]
        for csr, fragment in bad:
            failure = yield self.assertFailure(c.directory.issue_certificate(service.id, csr), CsrRejected)
            self.assertIn(fragment, str(failure))
        # a CSR whose signature does not verify
        good, _ = make_csr(service.id)
        req = x509.load_pem_x509_csr(good)
        der = bytearray(req.public_bytes(serialization.Encoding.DER))
        der[-5] ^= 0x55
        tampered = b"-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(bytes(der)) + \
            b"-----END CERTIFICATE REQUEST-----\n"
        yield self.assertFailure(c.directory.issue_certificate(service.id, tampered), CsrRejected)
        ok = yield c.directory.issue_certificate(service.id, make_csr(service.id, uri=f"spiffe://uptrakit.local/service/{service.id}")[0])
        self.assertEqual(ok.ca_generation, 1)

    @inlineCallbacks
    def test_lifetime_setting_and_per_service_override(self):
        c = yield start_controller(self)
        status, body = yield request_json(c, "PUT", "/api/v1/settings/service-certificates", {"lifetime_hours": 48})
        self.assertEqual((status, body["lifetime_hours"], body["renewal_window_hours"]), (200, 48, 9))
        issued, _, service = yield new_leaf(c)
        self.assertEqual(issued.cert.not_valid_after_utc - issued.cert.not_valid_before_utc,
                         datetime.timedelta(hours=48, minutes=5))
        yield c.directory.update(service.id, {"cert_lifetime_hours": 2})
        again = yield c.directory.issue_certificate(service.id, make_csr(service.id)[0])
        self.assertEqual(again.cert.not_valid_after_utc - again.cert.not_valid_before_utc,
                         datetime.timedelta(hours=2, minutes=5))
        for bad in ({"lifetime_hours": 0}, {"lifetime_hours": "1"}, {"renewal_window_hours": -1}, {"x": 1}):
            status, body = yield request_json(c, "PUT", "/api/v1/settings/service-certificates", bad)
            self.assertEqual(status, 400, bad)
        status, body = yield request_json(c, "GET", "/api/v1/settings/pki")
        self.assertEqual(body["service_certificates"]["lifetime_hours"], 48)
        self.assertEqual(body["active_ca"]["generation"], 1)
        self.assertIsNone(body["previous_ca"])
        self.assertEqual(body["active_ca"]["crl_number"], c.crls.current[1].number)


class PkiAddrTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def test_a_non_ascii_pki_addr_is_stored_as_an_a_label_and_issuance_keeps_working(self):
        from uptrakitd.pki.ca import embedded_urls
        c = yield start_controller(self)
        status, body = yield request_json(c, "PUT", "/api/v1/settings/network",
                                          {"pki_addr": "http://bücher.example:8080"})
        self.assertEqual((status, body["pki_addr"]), (200, "http://xn--bcher-kva.example:8080"))
        status, _ = yield request_json(c, "POST", "/api/v1/settings/rotate-ca")
        self.assertEqual(status, 200)
        issued, _, _ = yield new_leaf(c)
        self.assertEqual(embedded_urls(issued.cert)["ocsp"], "http://xn--bcher-kva.example:8080/api/v1/pki/ocsp")
        status, body = yield request_json(c, "PUT", "/api/v1/settings/network", {"pki_addr": "http://a..b"})
        self.assertEqual((status, body["code"]), (400, "invalid_setting"))


class CrlFailureTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def test_a_failed_rebuild_is_retried_and_readiness_reports_the_lag_meanwhile(self):
        import errno
        c = yield start_controller(self)
        c.crls.lag_grace = 0
        issued, _, _ = yield new_leaf(c)
        real, attempts = c.crls.files.write_crls, []

        def disk_full_once(pem):
            attempts.append(len(pem))
            if len(attempts) == 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(pem)
        c.crls.files.write_crls = disk_full_once
        status, _ = yield request_json(c, "POST", f"/api/v1/certificates/{format_serial(issued.serial)}/revoke", {})
        self.assertEqual(status, 200)
        yield wait_until(lambda: len(attempts) == 1)
        status, body = yield request_json(c, "GET", "/readyz", token=None)
        self.assertEqual(status, 503)
        self.assertIn("CRLs lack revocations", body["checks"]["crl"])
        yield wait_until(lambda: any(r.serial_number == issued.serial for r in c.crls.current[1].crl), timeout=10)
        self.assertEqual(len(attempts), 2, "retried once the disk had room again")
        on_disk = x509.load_pem_x509_crl((c.settings.data_dir / "pki" / "ca.crl").read_bytes())
        self.assertIsNotNone(on_disk.get_revoked_certificate_by_serial_number(issued.serial))
        status, body = yield request_json(c, "GET", "/readyz", token=None)
        self.assertEqual((status, body["checks"]["crl"]), (200, "ok"))
        self.assertEqual(c.metrics.registry.get_sample_value("uptrakit_crl_lag_seconds"), 0)
        self.flushLoggedErrors(OSError)


class StoredCrlStartTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_a_restart_serves_the_stored_crls_then_rebuilds_unless_a_revocation_is_missing(self):
        lines = log_lines(self)
        first = yield start_controller(self)
        number = first.crls.current[1].number
        yield first.stopService()
        second = yield start_controller(self, tmp=first.tmp)
        self.assertTrue(any("serving the stored CRLs (G1 #%d)" % number in line for line in lines), lines[-20:])
        self.assertEqual(second.crls.current[1].number, number, "the stored CRL is served first")
        yield wait_until(lambda: second.crls.current[1].number > number, timeout=10)   # then rebuilt
        issued, _, _ = yield new_leaf(second)
        yield second.ca.revoke(issued.serial, "keyCompromise")
        yield second.stopService()       # before the coalesced rebuild: the file lacks the revocation
        lines.clear()
        third = yield start_controller(self, tmp=first.tmp)
        self.assertFalse(any("serving the stored CRLs" in line for line in lines))
        self.assertIsNotNone(third.crls.current[1].crl.get_revoked_certificate_by_serial_number(issued.serial))
